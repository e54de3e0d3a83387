"""Sampled targets: the seeded uniforms, the count compaction, and unbiasedness of count / N against the dense
float64 softmax (a CLT bound over many seeds, at temperature 1 and 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teachers.head import dense_reference
from teachers.sampling import counts_of, draw_uniforms, sample_key, sampled_head


def test_uniforms_depend_only_on_key_sequence_position_and_draw() -> None:
    key = sample_key("corpus", "teacher", "/models/t")
    both = draw_uniforms(key, np.array([7, 3]), 5, 4)  # rows: (7, 0..4), (3, 0..4)
    alone = draw_uniforms(key, np.array([3]), 5, 4)
    np.testing.assert_array_equal(both[5:], alone)
    more = draw_uniforms(key, np.array([7]), 5, 9)  # more draws: the first 4 are the same
    np.testing.assert_array_equal(more[:, :4], both[:5])
    assert ((both >= 0) & (both < 1)).all() and len(np.unique(both)) == both.size
    other = draw_uniforms(sample_key("corpus", "other", "/models/t"), np.array([7, 3]), 5, 4)
    assert not np.isin(other, both).any()
    # uniform on [0, 1): mean 1/2, variance 1/12 over 20k values
    u = draw_uniforms(key, np.arange(1000), 20, 1).ravel()
    assert abs(u.mean() - 0.5) < 5 * (1 / 12) ** 0.5 / len(u) ** 0.5
    assert abs(u.var() - 1 / 12) < 0.005


def test_counts_of_orders_by_count_then_id_and_pads_with_slot_zero() -> None:
    draws = torch.tensor([[5, 2, 5, 9, 2, 5], [4, 4, 4, 4, 4, 4], [3, 1, 2, 0, 5, 4]])
    ids, counts = counts_of(draws)
    assert ids.tolist() == [[5, 2, 9, 5, 5, 5], [4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 4, 5]]
    assert counts.tolist() == [[3, 2, 1, 0, 0, 0], [6, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert ids.dtype == counts.dtype == torch.int32


def test_chunk_size_does_not_change_the_draws() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(23, 16, generator=g), torch.randn(97, 16, generator=g)
    u = torch.from_numpy(draw_uniforms(1, np.arange(23), 1, 10))
    a = sampled_head(hidden, weight, uniforms=u, chunk_size=5)
    b = sampled_head(hidden, weight, uniforms=u, chunk_size=64)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # ids
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)  # counts
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-6)  # entropy: the matmul's blocking moves last bits
    ent = dense_reference(hidden, weight, k=1)[2]
    torch.testing.assert_close(a[2].double(), ent, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_count_over_n_converges_to_the_dense_softmax(temperature: float) -> None:
    """Mean of count / N over R seeds vs the float64 softmax: every |error| within 5 standard errors
    sqrt(p (1 - p) / (N R)) (plus float32 rounding of the head), and the bound is not vacuous."""
    g = torch.Generator().manual_seed(1)
    positions, hidden_size, vocab, n, seeds = 6, 16, 40, 16, 400
    hidden = torch.randn(positions, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.6
    p = dense_reference(hidden, weight, k=1, temperature=temperature)[3].exp()  # [P, V] float64
    total = torch.zeros(positions, vocab, dtype=torch.float64)
    for seed in range(seeds):
        u = torch.from_numpy(draw_uniforms(sample_key(f"corpus-{seed}", "t", "p"), np.arange(positions), 1, n))
        ids, counts, _ = sampled_head(hidden, weight, uniforms=u, temperature=temperature, chunk_size=4)
        assert (counts.sum(-1) == n).all()
        total.scatter_add_(1, ids.long(), counts.double())
    mean = total / (n * seeds)
    se = (p * (1 - p) / (n * seeds)).sqrt()
    err = (mean - p).abs()
    assert (err <= 5 * se + 1e-6).all(), float((err / (se + 1e-12)).max())
    # the bound is tight (under 0.7% of mass) and the errors have the binomial size: their mean
    # square over all cells is se^2 on average (chi-square-like, 240 cells)
    assert float(se.max()) < 0.007
    assert 0.6 < float((err**2).sum() / (se**2).sum()) < 1.4
