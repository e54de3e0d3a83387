"""Which teacher weighting makes the better student? Every scheme of student/weighting.py, trained and compared.

    python benchmarks/weighting_table.py --teachers-dir /work/exp/paper/teachers --work /work/exp/paper \\
        --write-results

Issue 23, point 5. The paper table's setting (benchmarks/paper_table.py, whose caches, runs, evaluation and
paired bootstrap this reuses): the student cut from SmolLM2 (WORK/student-init), the four teachers smollm2,
gemma3 (aligned onto SmolLM2's tokens), smollm2-scripture and smollm2-python, their top-32 training caches of
18,432 tokens (WORK/caches, shared with paper_table.py) and the held-out windows of each domain of
data/corpus/validation.jsonl. Rows, every one from the same start on the same windows with the same seeds:

    ce              CE only (lambda 0)
    only-T          KD from teacher T alone, for each of the four ("best single": the lowest on seed 0)
    uniform, entropy, confidence, min-ce, min-ce-seq
                    KD from the four with that --teacher-weighting
    tempered-bB     --teacher-weighting tempered --weight-beta B, for the two betas chosen before training

Choosing beta (never on held-out text): the first half of the training windows is the tuning slice; each beta of
--beta-grid is scored by the tempered fusion's mean NLL on the observed token there, and the two lowest are
kept. The heuristic tables (benchmarks/entropy_heuristic.py, every scheme) are then printed for the other half of
the training windows and for each domain's held-out caches.

Each student: --steps steps (default 40) x 4 x 256 tokens, --seeds seeds (default 2). Held out: `cli.py evaluate`
per domain (perplexity, window NLL, KL to the entropy fusion of the four held-out caches). Verdicts, for every
scheme: "beats the best single" and "beats uniform", each a 95% paired-bootstrap interval over held-out windows
(resampled within domains) with each seed's own difference; "holds" needs the interval below zero and every
seed agreeing. --rows runs a subset (the verdicts then use the rows present). Runs, caches and evaluations are
reused across invocations (a run only when its config matches the row), so an interrupted call resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import entropy_heuristic as eh  # noqa: E402
import paper_table as pt  # noqa: E402

from benchmarks import runner, shared  # noqa: E402

RESULTS = ROOT / "benchmarks/RESULTS.md"
BEGIN, END = "<!-- weighting_table:begin -->", "<!-- weighting_table:end -->"
HEADER = "## Teacher weighting schemes on students (`benchmarks/weighting_table.py`)"
HEUR_BEGIN, HEUR_END = "<!-- weighting_heuristic:begin -->", "<!-- weighting_heuristic:end -->"
HEUR_HEADER = "### Every weighting scheme on the paper table's caches (`benchmarks/weighting_table.py`)"
TEACHERS = ("smollm2", "gemma3", "smollm2-scripture", "smollm2-python")
POOL_LAYER = 11
"""The block the specialists' training caches pool (paper_table.py's --teacher-pool-layer, for its feat row), so
that the two scripts build the same caches."""
REFERENCE = "uniform"
"""The row every weighting scheme is compared with besides the best single teacher (a row label, not a
weighting dispatch)."""


@dataclass(frozen=True)
class Row:
    """One student row: its label, what it is, the teachers (indices into TEACHERS) and the LossConfig fields it
    sets."""

    label: str
    desc: str
    teachers: tuple[int, ...]
    loss: dict[str, object]


def scheme_rows(betas: tuple[float, ...], lambda_kd: float) -> list[Row]:
    """Every row: CE only, each teacher alone, then every scheme of the registry that takes no fixed weights over
    the four (the tempered one once per beta), in the registry's order."""
    from student.weighting import REGISTRY

    kd = {"lambda_kd": lambda_kd}
    every = tuple(range(len(TEACHERS)))
    rows = [Row("ce", "CE only", (0,), {"lambda_kd": 0.0})]
    rows += [Row(f"only-{t}", f"KD, {t} alone", (i,), kd) for i, t in enumerate(TEACHERS)]
    for name, cls in REGISTRY.items():
        if "teacher_weights" in cls.settings:
            continue
        if "weight_beta" in cls.settings:
            rows += [Row(f"{name}-b{b:g}", f"{name} KD, beta {b:g}, the four", every,
                         {**kd, "teacher_weighting": name, "weight_beta": b}) for b in betas]
        else:
            rows.append(Row(name, f"{name} KD, the four", every, {**kd, "teacher_weighting": name}))
    return rows


def select(rows: list[Row], wanted: list[str] | None) -> list[Row]:
    """The rows named in `wanted` (all when None), in table order; an unknown name is an error."""
    if wanted is None:
        return rows
    known = {r.label for r in rows}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; rows: {', '.join(sorted(known))}")
    return [r for r in rows if r.label in wanted]


# ------------------------------------------------------------------------------------------ the heuristic
def tempered_nll(
    p: np.ndarray, h: np.ndarray, window: np.ndarray, grid: tuple[float, ...]
) -> dict[str, float]:
    """Mean NLL on o of the fused p(o) [K, N] of uniform, tempered at each beta of `grid` and min-ce (the
    family's two limits), on the given positions."""
    alphas = eh.scheme_weights(p, h, window, betas=grid)
    keep = ["uniform", *(f"tempered beta={b:g}" for b in grid), "min-ce"]
    with np.errstate(divide="ignore"):
        return {k: float(-np.log((alphas[k] * p).sum(axis=0)).mean()) for k in keep}


def choose_betas(nll: dict[str, float], grid: tuple[float, ...], n: int = 2) -> tuple[float, ...]:
    """The `n` betas of `grid` with the lowest tuning NLL (`tempered_nll`), in increasing beta."""
    ranked = sorted(grid, key=lambda b: (nll[f"tempered beta={b:g}"], b))
    return tuple(sorted(ranked[:n]))


def subset(p: np.ndarray, h: np.ndarray, window: np.ndarray, counts: dict, keep: np.ndarray) -> tuple:
    """The positions of the windows `keep` [N] bool selects, with their counts (scored and left out)."""
    per_window = counts["positions"] // counts["windows"]
    n_windows = len(np.unique(window[keep]))
    total = n_windows * per_window
    sub = {"windows": n_windows, "positions": total, "left_out": total - int(keep.sum())}
    return p[:, keep], h[:, keep], window[keep], sub


def heuristic_table(names, p, h, window, counts, betas: tuple[float, ...], replicates: int) -> str:
    alphas = eh.scheme_weights(p, h, window, betas=betas)
    return eh.table(names, eh.bootstrap(p, h, window, n=replicates, alphas=alphas), counts)


def heuristic(
    train: list[Path], val: dict[str, list[Path]], grid: tuple[float, ...], replicates: int
) -> tuple[tuple[float, ...], dict[str, float], list[tuple[str, str]]]:
    """Choose the betas on the first half of the training windows, then the heuristic tables of every scheme on
    the other half and on each domain's held-out caches: (betas, tuning NLL by label, [(title, table)])."""
    names, p, h, window, counts = eh.from_caches([str(c) for c in train])
    half = counts["windows"] // 2
    tune = subset(p, h, window, counts, window < half)
    nll = tempered_nll(*tune[:3], grid)
    betas = choose_betas(nll, grid)
    rest = subset(p, h, window, counts, window >= half)
    tables = [
        (
            f"training caches, windows {half}..{counts['windows'] - 1} (not the tuning slice)",
            heuristic_table(names, *rest, betas, replicates),
        )
    ]
    for d, paths in val.items():
        vn, vp, vh, vw, vc = eh.from_caches([str(c) for c in paths])
        tables.append((f"held-out caches, {d}", heuristic_table(vn, vp, vh, vw, vc, betas, replicates)))
    return betas, nll, tables


# ------------------------------------------------------------------------------------------ the verdicts
def verdicts(
    scores: pt.Scores, runs: dict[str, list[str]], schemes: list[str], singles: list[str], replicates: int
) -> tuple[str | None, dict[str, dict[str, pt.Comparison]]]:
    """(best single, {scheme: {"best": comparison, "uniform": comparison}}): each scheme row against the best
    single-teacher row (lowest perplexity of its seed-averaged windows, as `compare` scores a row) and against
    uniform, where those rows ran."""
    present = [s for s in singles if s in runs]
    best = min(present, key=lambda r: pt.ppl(scores.row(runs[r]))) if present else None
    out: dict[str, dict[str, pt.Comparison]] = {}
    for s in schemes:
        if s not in runs:
            continue
        c = {}
        if best is not None:
            c["best"] = pt.compare(
                scores, runs, f"{s} vs best single ({best})", s, best, replicates=replicates
            )
        if s != REFERENCE and REFERENCE in runs:
            c["uniform"] = pt.compare(scores, runs, f"{s} vs {REFERENCE}", s, REFERENCE, replicates=replicates)
        out[s] = c
    return best, out


def verdict_lines(best: str | None, comps: dict[str, dict[str, pt.Comparison]]) -> list[str]:
    """The verdict table: one line per scheme, its two claims with interval and verdict."""

    def cell(c: pt.Comparison | None) -> str:
        return "- | -" if c is None else f"{pt.fmt_diff(c)} | **{c.verdict}**"

    lines = [
        f"| scheme | - best single ({best}) [95%] (relative); per seed | beats best single | "
        "- uniform [95%] (relative); per seed | beats uniform |",
        "|---|---|---|---|---|",
    ]
    for s, c in comps.items():
        lines.append(f"| {s} | {cell(c.get('best'))} | {cell(c.get('uniform'))} |")
    return lines


def teacher_lines(scores: pt.Scores) -> list[str]:
    """Held-out perplexity of each teacher as a model (Gemma: over its exact positions, share in brackets)."""
    doms = scores.domains
    lines = ["| teacher | perplexity | " + " | ".join(doms) + " |", "|---|---|" + "---|" * len(doms)]
    for t in TEACHERS:
        lab = f"teacher:{t}"
        if lab in scores.nll:
            cells = [pt.ppl(scores.windows(lab))] + [pt.ppl(scores.windows(lab, d)) for d in doms]
            lines.append(f"| {t} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        elif t in scores.observed:
            lines.append(
                f"| {t} | "
                + " | ".join("{:.2f}* ({:.0%})".format(*scores.observed_ppl(t, d)) for d in (None, *doms))
                + " |"
            )
    return lines


# ------------------------------------------------------------------------------------------------- stages
def caches(run: runner.Runner, work: Path, tdir: Path, args: argparse.Namespace) -> tuple[list[Path], dict]:
    """The four teachers' training caches and each domain's held-out caches: paper_table.py's runs (same paths
    and configs, so either script reuses the other's)."""
    teachers = [
        pt.Teacher(t, tdir / t, align=(t == "gemma3"), pool_layer=POOL_LAYER if t in pt.SPECIALISTS else None)
        for t in TEACHERS
    ]
    return pt.caches(run, teachers, teachers, work, args, tdir / "smollm2")


def students(rows: list[Row], train: list[Path], args: argparse.Namespace, run: runner.Runner, student: Path,
             tok: Path) -> dict[str, Path]:
    """Train every row's seeds (seed 0 of every row first), reusing finished runs: {run label: final model}."""
    runs = Path(args.work).resolve() / "weighting" / "runs"
    todo = sum(not (runs / pt.run_label(r.label, s) / "final").exists() for s in range(args.seeds) for r in rows)
    minutes = todo * args.steps * args.batch_size * args.seq_len / args.tok_per_s / 60
    run.say(f"{len(rows) * args.seeds} runs, {todo} to train: ~{minutes:.0f} min at {args.tok_per_s:g} tok/s "
            "(+ ~15 s of loading each)")
    table = [pt.Row(r.label, r.desc, tuple(train[i] for i in r.teachers), r.loss, args.seeds) for r in rows]
    return pt.train_rows(table, args, run, student, tok, runs)


def evaluation(run: runner.Runner, finals: dict[str, Path], tdir: Path, val: dict[str, list[Path]],
               work: Path) -> pt.Scores:
    """`evaluate` per domain of the students and of the SmolLM2-family teachers as models (reusing what an
    earlier call scored)."""
    models = {**finals, **{f"teacher:{t}": tdir / t for t in TEACHERS if t != "gemma3"}}
    return pt.evaluate_domains(run, models, val, work / "weighting")


def plot(
    scores: pt.Scores,
    runs: dict[str, list[str]],
    comps: dict[str, dict[str, pt.Comparison]],
    path: str,
    replicates: int,
) -> None:
    """Left: each row's held-out perplexity (seeds averaged per window) with its 95% bootstrap interval (windows
    resampled within domains). Right: each scheme minus the best single and minus uniform, paired 95%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strata = scores.strata()
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    idx = np.concatenate([g[rng.integers(0, len(g), size=(replicates, len(g)))] for g in groups], axis=1)
    labels = list(runs)
    pts, lows, highs = [], [], []
    for r in labels:
        w = scores.row(runs[r])
        lo, hi = np.quantile(np.exp(w[idx].mean(axis=1)), [0.025, 0.975])
        pts.append(pt.ppl(w))
        lows.append(pts[-1] - lo)
        highs.append(hi - pts[-1])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.errorbar(range(len(labels)), pts, yerr=[lows, highs], fmt="o", capsize=3)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("held-out perplexity (seeds averaged), 95%")
    schemes = list(comps)
    for j, (key, name) in enumerate((("best", "minus best single"), ("uniform", "minus uniform"))):
        xs = [i + 0.15 * (2 * j - 1) for i, s in enumerate(schemes) if key in comps[s]]
        cs = [comps[s][key].result for s in schemes if key in comps[s]]
        if not cs:
            continue
        bx.errorbar(
            xs,
            [c["difference"] for c in cs],
            fmt="o",
            capsize=3,
            label=name,
            yerr=[[c["difference"] - c["low"] for c in cs], [c["high"] - c["difference"] for c in cs]],
        )
    bx.axhline(0.0, color="grey", lw=0.8)
    bx.set_xlim(-0.5, len(schemes) - 0.5)
    bx.set_xticks(range(len(schemes)), schemes, rotation=60, ha="right", fontsize=7)
    bx.set_ylabel("perplexity difference, paired 95%")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[weighting] wrote {path}", flush=True)


def command(argv: list[str] | None) -> str:
    return "python benchmarks/weighting_table.py " + " ".join(argv if argv is not None else sys.argv[1:])


def beta_line(betas: tuple[float, ...], tune_nll: dict[str, float]) -> str:
    return (
        "**Beta, chosen on the tuning slice** (the first half of the training windows; mean NLL of the fused p(o) "
        "on the observed token): "
        + ", ".join(f"{k} {v:.4f}" for k, v in tune_nll.items())
        + f" -> betas {', '.join(f'{b:g}' for b in betas)}."
    )


def heuristic_markdown(*, args, argv, wall: float, betas, tune_nll, heur, reused: int = 0) -> str:
    """The heuristic block: command, the beta choice, and every scheme's table per slice."""
    out = [
        f"2-core CPU, no GPU, {time.strftime('%Y-%m-%d')}; `{command(argv)}`; wall {wall / 60:.1f} min (caches "
        f"included unless reused: {reused} reused). Teachers {', '.join(TEACHERS)}; top-{args.top_k} "
        f"caches of {args.train_tokens} training tokens and {args.eval_tokens} held-out tokens per domain; 95% "
        f"intervals from {args.heuristic_replicates} resamples of whole windows.",
        "",
        beta_line(betas, tune_nll),
    ]
    for title, text in heur:
        out += ["", f"*{title}*: " + text]
    return "\n".join(out)


def markdown(*, args, argv, wall: float, betas, tune_nll, scores, runs, desc, best, comps, reused: int = 0) -> str:
    cmd = command(argv)
    reused = f"; {reused} caches/runs/evaluations reused from earlier calls" if reused else ""
    out = [
        f"2-core CPU, no GPU, {time.strftime('%Y-%m-%d')}; `{cmd}`; wall {wall / 60:.1f} min{reused}.",
        "",
        f"Scale: {args.train_tokens} cached training tokens per teacher, {args.steps} steps x {args.batch_size} x "
        f"{args.seq_len} tokens per student, lr {args.lr}, lambda {args.lambda_kd}, top-{args.top_k}; "
        f"{args.seeds} seeds per row; held out: the first {args.eval_tokens} tokens of each domain "
        f"({len(scores.strata())} windows); {args.bootstrap} paired-bootstrap replicates (within domains); KL to "
        "the entropy fusion of the four held-out caches.",
        "",
        beta_line(betas, tune_nll) + " The heuristic tables: the section on the entropy heuristic.",
        "",
        "**Teachers** (held-out perplexity as models; * Gemma over its exact positions):",
        "",
        *teacher_lines(scores),
        "",
        "**Students**:",
        "",
        *pt.row_table(
            scores, runs, desc, *(("ce", "CE") if "ce" in runs else (next(iter(runs)), next(iter(runs))))
        ),
        "",
        "**Verdicts** (perplexity of the scheme minus the other row; holds: interval below zero and every seed "
        "agrees; does not hold: interval above zero):",
        "",
        *verdict_lines(best, comps),
        "",
        f"![held-out perplexity per weighting scheme]({Path(args.plot).name})",
    ]
    return "\n".join(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--teachers-dir", required=True, help="smollm2, gemma3, smollm2-scripture, smollm2-python"
    )
    ap.add_argument(
        "--work",
        required=True,
        help="paper_table.py's work directory (caches shared; runs under WORK/weighting)",
    )
    ap.add_argument("--student-init", default=None, help="the cut student (default: WORK/student-init)")
    ap.add_argument("--train-tokens", type=int, default=18432, help="cached training tokens per teacher")
    ap.add_argument("--seq-len", type=int, default=256, help="window length, training and evaluation")
    ap.add_argument("--top-k", type=int, default=32, help="top-k stored per position and teacher")
    ap.add_argument(
        "--eval-tokens", type=int, default=2816, help="held-out tokens per domain (whole windows)"
    )
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per student")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per student step")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--lambda-kd", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per row")
    ap.add_argument(
        "--beta-grid",
        type=lambda x: tuple(float(v) for v in x.split(",")),
        default=(0.5, 1.0, 2.0, 4.0),
        help="tempered betas tried on the tuning slice (the two best become rows)",
    )
    ap.add_argument(
        "--rows", type=lambda x: x.split(","), default=None, help="comma list of rows (default: all)"
    )
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap replicates")
    ap.add_argument(
        "--heuristic-replicates", type=int, default=1000, help="window resamples of the heuristic"
    )
    ap.add_argument(
        "--tok-per-s", type=float, default=180.0, help="student training rate, for the printed estimate"
    )
    ap.add_argument("--heuristic-only", action="store_true", help="stop after the caches and the heuristic")
    ap.add_argument(
        "--plot", default=str(ROOT / "benchmarks/weighting_table.png"), help="PNG of the comparison"
    )
    ap.add_argument("--write-results", action="store_true", help="replace the marked block of RESULTS.md")
    runner.add_options(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    run = runner.from_args(args, "[weighting]")
    work, tdir = Path(args.work).resolve(), Path(args.teachers_dir).resolve()
    missing = [t for t in TEACHERS if not (tdir / t / "config.json").exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing in {tdir} (scripts/build_teachers.py --gemma "
                         "--finetune scripture --finetune python)")
    tok = tdir / "smollm2"
    student = pt.student_start(run, tok, args.student_init, work)
    train, val = caches(run, work, tdir, args)
    betas, tune_nll, heur = heuristic(train, val, args.beta_grid, args.heuristic_replicates)
    for title, text in heur:
        print(f"\n[heuristic] {title}\n{text}", flush=True)
    run.say(f"tuning-slice NLL {tune_nll}; betas {betas}")
    heur_text = heuristic_markdown(args=args, argv=argv, wall=time.perf_counter() - start, betas=betas,
                                   tune_nll=tune_nll, heur=heur, reused=len(run.reused))
    runner.write_atomic(work / "weighting" / "heuristic.md", heur_text + "\n")
    if args.write_results:
        shared.replace_block(RESULTS, HEUR_BEGIN, HEUR_END, heur_text, header=HEUR_HEADER)
    if args.heuristic_only:
        return 0
    rows = select(scheme_rows(betas, args.lambda_kd), args.rows)
    scores = evaluation(run, students(rows, train, args, run, student, tok), tdir, val, work)
    runs = {r.label: [pt.run_label(r.label, s) for s in range(args.seeds)] for r in rows}
    best, comps = verdicts(scores, runs, [r.label for r in rows if len(r.teachers) > 1],
                           [f"only-{t}" for t in TEACHERS], args.bootstrap)
    plot(scores, runs, comps, args.plot, args.bootstrap)
    text = markdown(args=args, argv=argv, wall=time.perf_counter() - start, betas=betas, tune_nll=tune_nll,
                    scores=scores, runs=runs, desc={r.label: r.desc for r in rows}, best=best, comps=comps,
                    reused=len(run.reused))
    runner.publish(run, text, work / "weighting" / "weighting_table.md", write_results=args.write_results,
                   results=RESULTS, begin=BEGIN, end=END, header=HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
