"""targets_head against a naive float64 dense reference (full log-softmax over the vocab)."""

from __future__ import annotations

import pytest
import torch

from teachers.head import dense_reference, targets_head


def _inputs(n: int = 96, h: int = 32, v: int = 700, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.6  # peaky but not degenerate distributions
    return hidden, weight


def assert_matches_reference(ids, lp, ent, ref_ids, ref_lp, ref_ent, ref_full, *, atol: float = 2e-5) -> None:
    """ids equal the reference wherever the reference's order is not a near-tie; log-probs and entropy close."""
    gaps = (ref_lp[:, :-1] - ref_lp[:, 1:]).abs()
    clear = torch.cat([gaps, torch.ones_like(gaps[:, :1])], 1) > 1e-4
    clear = clear & torch.cat([torch.ones_like(gaps[:, :1]), gaps], 1).gt(1e-4)
    assert clear.float().mean() > 0.95  # the comparison below covers nearly every slot
    torch.testing.assert_close(ids.long()[clear], ref_ids[clear], rtol=0, atol=0)
    # the stored value of each stored id is its true full-vocab log-prob
    torch.testing.assert_close(lp.double(), ref_full.gather(1, ids.long()), rtol=0, atol=atol)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=atol)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_head_matches_float64_reference(temperature: float) -> None:
    hidden, weight = _inputs()
    ids, lp, ent = targets_head(hidden, weight, k=16, temperature=temperature, chunk_size=32)
    assert ids.dtype == torch.int32 and lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert ids.shape == (96, 16) and ent.shape == (96,)
    ref = dense_reference(hidden, weight, k=16, temperature=temperature)
    assert_matches_reference(ids, lp, ent, *ref)
    # sorted descending, and log-probs are over the full vocab (top-k mass < 1)
    assert bool((lp[:, :-1] >= lp[:, 1:]).all())
    assert bool((lp.exp().sum(1) < 1).all())


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 95, 96, 1000])
def test_chunk_size_does_not_change_results(chunk_size: int) -> None:
    hidden, weight = _inputs(seed=1)
    base = targets_head(hidden, weight, k=8, temperature=1.3, chunk_size=96)
    out = targets_head(hidden, weight, k=8, temperature=1.3, chunk_size=chunk_size)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], base[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[2], base[2], rtol=1e-6, atol=1e-6)


def test_logit_transforms_bias_scale_softcap() -> None:
    hidden, weight = _inputs(n=40, v=300, seed=2)
    bias = torch.randn(300, generator=torch.Generator().manual_seed(3))
    kwargs = dict(bias=bias, logit_scale=0.8, softcap=5.0)
    ids, lp, ent = targets_head(hidden, weight, k=10, temperature=0.9, chunk_size=16, **kwargs)
    ref = dense_reference(hidden, weight, k=10, temperature=0.9, **kwargs)
    assert_matches_reference(ids, lp, ent, *ref)
    plain = dense_reference(hidden, weight, k=10, temperature=0.9)
    assert float((plain[2] - ref[2]).abs().max()) > 1e-2  # the transforms matter, so the test sees them


def test_k_equal_vocab_gives_the_full_distribution() -> None:
    hidden, weight = _inputs(n=8, v=50, seed=4)
    ids, lp, ent = targets_head(hidden, weight, k=50, chunk_size=3)
    torch.testing.assert_close(lp.double().exp().sum(1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), -(lp.double().exp() * lp.double()).sum(1), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise() -> None:
    hidden, weight = _inputs(n=4, v=20)
    with pytest.raises(ValueError, match="k must be"):
        targets_head(hidden, weight, k=21)
    with pytest.raises(ValueError, match="must be"):
        targets_head(hidden[:, :5], weight, k=2)


def test_entropy_stays_accurate_at_a_realistic_vocab() -> None:
    # float32 sums over ~50k terms: the entropy must still match float64 to well under 1e-4 relative
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(64, 64, generator=g)
    weight = torch.randn(49152, 64, generator=g) * 0.5
    _, _, ent = targets_head(hidden, weight, k=4, chunk_size=32)
    _, _, ref_ent, _ = dense_reference(hidden, weight, k=4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_lse_entropy_matches_eager_and_float64_reference() -> None:
    """compile=True (torch.compile of logsumexp + entropy; one compile per process, dynamic shapes) against
    the float64 dense reference and the eager head: temperatures, logit transforms, ragged last chunks, and
    a realistic vocab for the float32 accumulation."""
    import teachers.head

    hidden, weight = _inputs(seed=7)
    for temperature, chunk in ((1.0, 32), (0.7, 95), (2.5, 1000), (1.3, 1)):
        got = targets_head(hidden, weight, k=16, temperature=temperature, chunk_size=chunk, compile=True)
        assert_matches_reference(*got, *dense_reference(hidden, weight, k=16, temperature=temperature))
        eager = targets_head(hidden, weight, k=16, temperature=temperature, chunk_size=chunk)
        torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], eager[1], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[2], eager[2], rtol=1e-5, atol=1e-6)
    assert teachers.head._COMPILED is not None  # the compiled path really ran
    hidden, weight = _inputs(n=40, v=300, seed=2)
    kwargs = dict(bias=torch.randn(300, generator=torch.Generator().manual_seed(3)), logit_scale=0.8, softcap=5.0)
    got = targets_head(hidden, weight, k=10, temperature=0.9, chunk_size=16, compile=True, **kwargs)
    assert_matches_reference(*got, *dense_reference(hidden, weight, k=10, temperature=0.9, **kwargs))
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(64, 64, generator=g), torch.randn(49152, 64, generator=g) * 0.5
    _, _, ent = targets_head(hidden, weight, k=4, chunk_size=48, compile=True)
    torch.testing.assert_close(ent.double(), dense_reference(hidden, weight, k=4)[2], rtol=1e-5, atol=1e-6)
