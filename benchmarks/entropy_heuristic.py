"""Does entropy weighting pick the better teacher? The heuristic alpha_k ~ 1/H_k, measured before any training.

    python benchmarks/entropy_heuristic.py --caches demo/caches/smollm2 demo/caches/smollm2-python
    python benchmarks/entropy_heuristic.py --dense /tmp/g13/full     # from align_gemma_dense.py --save

The method weights teacher k at each position by alpha_k = (1 / (H_k + eps)) / sum_j (1 / (H_j + eps)): a
teacher that is sure of itself (low entropy) is trusted more. That only helps if low entropy goes with a high
probability on the token that actually comes next. For every position t with a known next token o, and every
teacher's probability p_k(o) known, this prints:

- per teacher: perplexity on o, mean entropy, mean alpha, and Spearman's rho between H_k and -log p_k(o);
- for two teachers: how often the lower-entropy one puts more probability on o (positions whose entropies
  differ by more than 1e-6);
- for any number of teachers: how often the lowest-entropy teacher (unique by more than 1e-6) is the one that
  gives o the most probability, and Spearman's rho between the weights alpha_k and the teachers' losses
  -log p_k(o), pooled over teachers and positions (negative: the weight goes to the teacher with low loss);
- the fused prediction sum_k w_k p_k(o) with entropy weights against uniform weights: the perplexity of each
  and the paired difference of mean NLL;
- for every weighting scheme of stage two's registry (student/weighting.py: uniform, entropy, confidence,
  tempered at each --weight-beta, min-ce, min-ce-seq; fixed with --teacher-weights), computed by that code on
  the same positions: the fused prediction's NLL on o, its paired difference to the uniform fusion's, and the
  share of positions where the top-weighted teacher (unique by more than 1e-9) is the one that gives o the most
  probability (n/a for uniform weights). The schemes that read p_k(o) choose their weights knowing o, so on
  these two figures they win by construction (the top-weighted teacher is the argmax of p(o) wherever the
  weights rise with p(o), and min-ce maximises the fused p(o)); only training says whether that helps a student.

Every figure comes with a 95% percentile interval from a bootstrap over windows (whole windows are resampled,
so the correlation between neighbouring positions is kept), 2,000 replicates.

Where p_k(o) comes from: with --caches, the cache's exact observed-token log-prob (`observed_logprob`: caches
aligned to another tokenizer, and every top-k or sampled cache precomputed since it was stored), else the
teacher's stored top-k row when o is in it; a position where some teacher's p_k(o) is unknown (o outside its
top-k in a cache without the column, no exact value, or masked) is left out, and the table says how many.
That leaves out the hard positions, so perplexities are lower than the models' own. With --dense, the arrays
saved by benchmarks/align_gemma_dense.py: SmolLM2's dense p(o) and entropy, Gemma's exact chunk probability
and the entropy of its first-token projection (positions without Gemma's exact value are left out). In both
modes a teacher aligned to another tokenizer is weighted by the entropy stage two uses: the projection's entropy
corrected for the exact observed-token probability (`student.observed.corrected_entropy`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REFERENCE = "uniform"
"""The alpha label every scheme's fused NLL is paired with (a label of `alphas`, not a weighting dispatch)."""

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPS = 1e-3  # the entropy weights' default eps (LossConfig.entropy_eps)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along the last axis (ties broken by order: the inputs are continuous)."""
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two 1-d arrays (Pearson correlation of their ranks)."""
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def entropy_weights(h: np.ndarray, eps: float = EPS) -> np.ndarray:
    """[K, N] entropies -> [K, N] weights 1/(H+eps), normalised over the teachers."""
    w = 1.0 / (h + eps)
    return w / w.sum(axis=0, keepdims=True)


def scheme_weights(p: np.ndarray, h: np.ndarray, window: np.ndarray, *, betas: tuple[float, ...] = (1.0,),
                   floor: float = 0.0, eps: float = EPS,
                   fixed: tuple[float, ...] | None = None) -> dict[str, np.ndarray]:
    """{label: alpha [K, N] float64} of every scheme in student/weighting.py's REGISTRY, computed by that code:
    p, h [K, N] float64 (p(o), entropy) at N scored positions grouped by `window` [N] (contiguous groups, in
    order). Positions are laid out as windows padded to the longest one (padding: no valid teacher), so the
    per-sequence scheme sees each window's scored positions. `fixed` needs --teacher-weights; `tempered` gets
    one label per beta."""
    import torch

    from student.weighting import REGISTRY, WeightInputs, WeightSettings

    k, n = p.shape
    _, start, count = np.unique(window, return_index=True, return_counts=True)
    slot = np.arange(n) - np.repeat(start, count)  # position of each scored position inside its window
    group = np.repeat(np.arange(len(start)), count)
    length = int(count.max())
    rows = group * length + slot  # [N] row in the padded layout
    size = len(start) * length
    obs = np.full((size, k), np.nan)
    ent = np.zeros((size, k))
    valid = np.zeros((size, k), dtype=bool)
    with np.errstate(divide="ignore"):
        obs[rows] = np.log(p.T)
    ent[rows], valid[rows] = h.T, True
    inputs = WeightInputs(num_teachers=k, seq_len=length, valid=torch.from_numpy(valid),
                          entropy=torch.from_numpy(ent), observed=torch.from_numpy(obs))
    out: dict[str, np.ndarray] = {}
    for name, cls in REGISTRY.items():
        if "teacher_weights" in cls.settings and fixed is None:
            continue
        for beta in betas if "weight_beta" in cls.settings else (None,):
            settings = WeightSettings(teacher_weights=fixed if "teacher_weights" in cls.settings else None,
                                      entropy_eps=eps, weight_beta=1.0 if beta is None else beta,
                                      weight_floor=floor)
            label = name if beta is None else f"{name} beta={beta:g}"
            out[label] = cls(settings).alpha(inputs).numpy()[rows].T  # [K, N]
    return out


def figures(p: np.ndarray, h: np.ndarray, alphas: dict[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray | float]:
    """The statistics of one sample: p, h [K, N] float64 (probability of the observed token, entropy); with
    `alphas` ({label: [K, N] weights}, `scheme_weights`) also each scheme's fused NLL on o (`nll[label]`) and
    the share of positions whose top-weighted teacher gives o the most probability (`top_best[label]`)."""
    k = p.shape[0]
    nll = -np.log(p)
    alpha = entropy_weights(h)
    out: dict[str, np.ndarray | float] = {
        "ppl": np.exp(nll.mean(axis=1)),
        "entropy": h.mean(axis=1),
        "alpha": alpha.mean(axis=1),
        "rho": np.array([spearman(h[i], nll[i]) for i in range(k)]),
        "nll_entropy_fused": float(-np.log((alpha * p).sum(axis=0)).mean()),
        "nll_uniform_fused": float(-np.log(p.mean(axis=0)).mean()),
    }
    if k >= 2:  # does the most-trusted teacher give o the most probability; do weights go to low loss
        hs = np.sort(h, axis=0)
        unique = hs[1] - hs[0] > 1e-6  # the lowest entropy is unique by more than 1e-6
        out["lowest_entropy_best"] = float((np.argmin(h, axis=0) == np.argmax(p, axis=0))[unique].mean())
        out["rho_alpha_nll"] = spearman(alpha.reshape(-1), nll.reshape(-1))
    if k == 2:
        differ = np.abs(h[0] - h[1]) > 1e-6
        lower = np.where(h[0] < h[1], 0, 1)[differ]
        rows = np.arange(differ.sum())
        pp = p[:, differ]
        out["lower_entropy_wins"] = float((pp[lower, rows] > pp[1 - lower, rows]).mean())
    best = np.argmax(p, axis=0)
    for label, a in (alphas or {}).items():
        with np.errstate(divide="ignore"):
            out[f"nll[{label}]"] = float(-np.log((a * p).sum(axis=0)).mean())
        if REFERENCE in (alphas or {}) and label != REFERENCE:  # paired: the same positions, so the same resample
            with np.errstate(divide="ignore"):
                uni = float(-np.log((alphas[REFERENCE] * p).sum(axis=0)).mean())
            out[f"dnll[{label}]"] = out[f"nll[{label}]"] - uni
        ranked = np.sort(a, axis=0)
        unique = ranked[-1] - ranked[-2] > 1e-9 if k >= 2 else np.ones(a.shape[1], dtype=bool)
        hit = (np.argmax(a, axis=0) == best)[unique]
        out[f"top_best[{label}]"] = float(hit.mean()) if hit.size else float("nan")
    return out


def bootstrap(p: np.ndarray, h: np.ndarray, window: np.ndarray, *, n: int = 2000, seed: int = 0,
              alphas: dict[str, np.ndarray] | None = None) -> dict:
    """figures() on all positions, and 95% percentile intervals from resampling whole windows. `alphas` are
    computed once on all positions: a position's weights depend only on its own window, which is resampled
    whole."""
    ids = np.unique(window)
    by_window = [np.flatnonzero(window == w) for w in ids]
    point = figures(p, h, alphas)
    rng = np.random.default_rng(seed)
    reps: dict[str, list] = {key: [] for key in point}
    reps["nll_entropy_minus_uniform"] = []
    for _ in range(n):
        pick = np.concatenate([by_window[i] for i in rng.integers(0, len(ids), size=len(ids))])
        f = figures(p[:, pick], h[:, pick], {key: a[:, pick] for key, a in (alphas or {}).items()})
        for key, value in f.items():
            reps[key].append(value)
        reps["nll_entropy_minus_uniform"].append(f["nll_entropy_fused"] - f["nll_uniform_fused"])
    point["nll_entropy_minus_uniform"] = point["nll_entropy_fused"] - point["nll_uniform_fused"]
    ci = {}
    for key, v in reps.items():
        arr = np.asarray(v, dtype=np.float64)  # NaN: a replicate without a defined value (e.g. no unique top)
        ci[key] = np.full(2, np.nan) if np.isnan(arr).all() else np.nanquantile(arr, [0.025, 0.975], axis=0)
    return {"point": point, "ci": ci, "windows": len(ids), "positions": int(p.shape[1]), "replicates": n}


def from_caches(paths: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict]:
    """(names, p [K, N], h [K, N], window [N], counts) from project caches over the same windows."""
    from align_gemma import _prob_of  # benchmarks/ is on the path when this runs as a script

    from storage.reader import TeacherDataset
    from student.observed import corrected_entropy

    sets = [TeacherDataset.open(path) for path in paths]
    rows = np.arange(min(len(s) for s in sets))
    cols = ["input_ids", "topk_ids", "topk_logprobs", "entropy"]
    data = []
    for s in sets:
        extra = ["target_mask"] if s.manifest.alignment else []
        extra += ["observed_logprob"] if s.manifest.has_observed_logprob else []
        data.append(s.read_columns(rows, cols + extra))
    for d, path in zip(data[1:], paths[1:], strict=True):
        if not np.array_equal(d["input_ids"], data[0]["input_ids"]):
            raise SystemExit(f"{path} holds other windows than {paths[0]}")
    n, length = data[0]["input_ids"].shape
    obs = data[0]["input_ids"][:, 1:].reshape(-1).astype(np.int64)  # the next token of positions 0..L-2
    window = np.repeat(rows, length - 1)
    ps, hs, known = [], [], np.ones(obs.shape[0], dtype=bool)
    for d in data:
        ids = d["topk_ids"][:, : length - 1].reshape(-1, d["topk_ids"].shape[-1])
        lp = d["topk_logprobs"][:, : length - 1].reshape(ids.shape).astype(np.float64)
        p, found = _prob_of(ids, lp, obs)  # p: the k-th probability where o is not in the row (never scored)
        h = d["entropy"][:, : length - 1].reshape(-1).astype(np.float64)
        if "target_mask" in d:  # aligned: the exact value, and the entropy stage two uses with it
            exact = d["observed_logprob"][:, : length - 1].reshape(-1).astype(np.float64)
            mask = d["target_mask"][:, : length - 1].reshape(-1).astype(bool)
            e = np.exp(np.where(np.isnan(exact), -np.inf, exact))
            h = corrected_entropy(h, np.where(found, p, 0.0), e)
            found = mask & ~np.isnan(exact)
            p = e
        elif "observed_logprob" in d:  # a plain cache with the exact value at every position
            exact = d["observed_logprob"][:, : length - 1].reshape(-1).astype(np.float64)
            found = ~np.isnan(exact)
            p = np.exp(np.where(found, exact, -np.inf))
        known &= found
        ps.append(p)
        hs.append(h)
    names = [s.manifest.teacher.name or path for s, path in zip(sets, paths, strict=True)]
    counts = {"windows": int(n), "positions": int(obs.shape[0]), "left_out": int((~known).sum())}
    return names, np.stack(ps)[:, known], np.stack(hs)[:, known], window[known], counts


def from_dense(path: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict]:
    """The same from benchmarks/align_gemma_dense.py --save DIR (positions.npz)."""
    a = np.load(Path(path) / "positions.npz")
    window = np.concatenate([[0], np.cumsum(a["last"][:-1])])  # `last` ends each window
    from student.observed import corrected_entropy

    keep = ~a["last"] & a["mask"] & ~np.isnan(a["e"]) & ~np.isnan(a["h_q"])
    counts = {"windows": int(window.max() + 1), "positions": int((~a["last"]).sum()),
              "left_out": int((~a["last"] & ~keep).sum())}
    e = np.exp(a["e"][keep])  # saved as the exact log-prob
    h_gemma = corrected_entropy(a["h_q"][keep], np.nan_to_num(a["q_proj"][keep]), e)
    p = np.stack([a["p_s"][keep], e])
    h = np.stack([a["h_s"][keep], h_gemma])
    return ["smollm2", "gemma3-270m (exact)"], p, h, window[keep], counts


def table(names: list[str], r: dict, counts: dict) -> str:
    pt, ci = r["point"], r["ci"]

    def cell(key: str, i: int | None = None, fmt: str = "{:.3f}") -> str:
        v = pt[key] if i is None else pt[key][i]
        lo, hi = (ci[key][0], ci[key][1]) if i is None else (ci[key][0][i], ci[key][1][i])
        return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"

    lines = [f"{r['positions']} positions scored in {r['windows']} windows ({counts['left_out']} of "
             f"{counts['positions']} left out: some teacher's p(o) unknown); 95% intervals from "
             f"{r['replicates']} window resamples", "",
             "| teacher | perplexity on o | mean entropy | mean alpha | Spearman rho(H, -log p(o)) |",
             "|---|---|---|---|---|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {cell('ppl', i, '{:.2f}')} | {cell('entropy', i)} | {cell('alpha', i)} | "
                     f"{cell('rho', i)} |")
    lines += ["", "| fused p(o) | value |", "|---|---|",
              f"| perplexity, entropy weights | {np.exp(pt['nll_entropy_fused']):.2f} |",
              f"| perplexity, uniform weights | {np.exp(pt['nll_uniform_fused']):.2f} |",
              f"| mean NLL, entropy minus uniform | {cell('nll_entropy_minus_uniform', None, '{:+.4f}')} |"]
    if "lowest_entropy_best" in pt:
        lines.append(f"| share of positions where the lowest-entropy teacher gives o the most probability | "
                     f"{cell('lowest_entropy_best', None, '{:.3f}')} |")
        lines.append(f"| Spearman rho(alpha, -log p(o)) over all teachers and positions | "
                     f"{cell('rho_alpha_nll', None, '{:+.3f}')} |")
    if "lower_entropy_wins" in pt:
        lines.append(f"| share of positions where the lower-entropy teacher gives o more probability | "
                     f"{cell('lower_entropy_wins', None, '{:.3f}')} |")
    labels = [key[len("nll["):-1] for key in pt if key.startswith("nll[")]
    if labels:
        lines += ["", "| scheme | fused perplexity on o | fused mean NLL on o | minus uniform (paired) | "
                  "top-weighted teacher gives o the most probability |", "|---|---|---|---|---|"]
        for label in labels:
            nll, top, diff = f"nll[{label}]", f"top_best[{label}]", f"dnll[{label}]"
            best = cell(top, None) if not np.isnan(pt[top]) else "n/a (no unique top weight)"
            minus = cell(diff, None, "{:+.4f}") if diff in pt else "-"
            lines.append(f"| {label} | {np.exp(pt[nll]):.2f} | {cell(nll, None, '{:.4f}')} | {minus} | {best} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--caches", nargs="+", metavar="DIR", help="two or more caches over the same windows")
    src.add_argument("--dense", metavar="DIR", help="the --save directory of benchmarks/align_gemma_dense.py")
    ap.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates (windows resampled)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--weight-beta", type=float, nargs="+", default=[1.0],
                    help="beta(s) of the tempered scheme, one table row each")
    ap.add_argument("--weight-floor", type=float, default=0.0, help="floor of the tempered scheme")
    ap.add_argument("--entropy-eps", type=float, default=EPS, help="eps of the entropy scheme")
    ap.add_argument("--teacher-weights", type=float, nargs="+", default=None,
                    help="weights of the fixed scheme (without them it is left out)")
    args = ap.parse_args()
    if args.caches and len(args.caches) < 2:
        ap.error("--caches needs at least two caches")
    from student.weighting import SETTINGS, WeightSettings

    settings = WeightSettings(teacher_weights=tuple(args.teacher_weights) if args.teacher_weights else None,
                              entropy_eps=args.entropy_eps, weight_floor=args.weight_floor)
    for field, setting in SETTINGS.items():  # the registry's own range checks
        values = args.weight_beta if field == "weight_beta" else [getattr(settings, field)]
        for value in values:
            problem = None if value is None else setting.check(value)
            if problem:
                ap.exit(2, f"error: {setting.flag} {problem}\n")
    k = len(args.caches) if args.caches else 2
    if args.teacher_weights and len(args.teacher_weights) != k:
        ap.exit(2, f"error: --teacher-weights has {len(args.teacher_weights)} values for {k} teachers\n")
    names, p, h, window, counts = from_caches(args.caches) if args.caches else from_dense(args.dense)
    alphas = scheme_weights(p, h, window, betas=tuple(args.weight_beta), floor=args.weight_floor,
                            eps=args.entropy_eps, fixed=settings.teacher_weights)
    r = bootstrap(p, h, window, n=args.replicates, alphas=alphas)
    print(table(names, r, counts))
    if args.json:
        def plain(x):
            return x.tolist() if isinstance(x, np.ndarray) else x
        with open(args.json, "w") as f:
            json.dump({"names": names, "counts": counts, "point": {k: plain(v) for k, v in r["point"].items()},
                       "ci": {k: plain(v) for k, v in r["ci"].items()}}, f, indent=1)


if __name__ == "__main__":
    main()
