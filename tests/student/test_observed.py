"""Observed-token correction of an aligned teacher against a dense float64 reference."""

from __future__ import annotations

import numpy as np
import torch

from student.observed import apply_observed_correction, corrected_entropy, corrected_entropy_torch


def _dense(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, v, generator=g, dtype=torch.float64), dim=-1)


def _corrected_dense(q: torch.Tensor, o: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """q' = e at o, c q elsewhere (float64, full vocab)."""
    q_o = q.gather(1, o[:, None]).squeeze(1)
    c = (1 - e) / (1 - q_o)
    out = q * c[:, None]
    out.scatter_(1, o[:, None], e[:, None])
    return out


def _entropy(q: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(q, q).sum(-1)


def test_corrected_entropy_is_the_entropy_of_the_corrected_distribution():
    n, v = 64, 40
    q = _dense(n, v, 0)
    g = torch.Generator().manual_seed(1)
    o = torch.randint(0, v, (n,), generator=g)
    e = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    ref = _entropy(_corrected_dense(q, o, e))
    q_o = q.gather(1, o[:, None]).squeeze(1)
    np.testing.assert_allclose(corrected_entropy(_entropy(q).numpy(), q_o.numpy(), e.numpy()), ref.numpy(),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(corrected_entropy_torch(_entropy(q), q_o, e).numpy(), ref.numpy(), rtol=1e-10)
    # e = 1: a point mass
    np.testing.assert_allclose(corrected_entropy(1.3, 0.2, 1.0), 0.0, atol=1e-12)


def test_correction_of_the_top_k_view_matches_the_dense_reference():
    n, v, k = 200, 30, 6
    q = _dense(n, v, 2)
    # o outside the top-k is a token of probability 0, so q(o) = 0 is what the cache would assume as well
    q[:, -1] = 0.0
    q = q / q.sum(-1, keepdim=True)
    g = torch.Generator().manual_seed(3)
    top_p, top_i = torch.topk(q, k, dim=-1)
    inside = torch.rand(n, generator=g) < 0.5
    o = torch.where(inside, top_i[torch.arange(n), torch.randint(0, k, (n,), generator=g)], torch.full((n,), v - 1))
    e = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    obs = e.log().float()
    obs[:10] = float("nan")  # unavailable: left unchanged
    ids, lp, ent = apply_observed_correction(top_i.int(), top_p.log().float(), _entropy(q).float(), obs, o)
    ref = _corrected_dense(q, o, e)
    for r in range(n):
        if r < 10:
            assert torch.equal(ids[r], top_i[r]) and torch.allclose(lp[r], top_p[r].log().float())
            continue
        assert len(set(ids[r].tolist())) == k and o[r].item() in ids[r].tolist()
        # every listed id carries its corrected probability, and the tail is the corrected rest
        np.testing.assert_allclose(lp[r].double().exp().numpy(), ref[r, ids[r]].numpy(), rtol=2e-6, atol=1e-9)
        tail = 1 - lp[r].double().exp().sum()
        rest = torch.ones(v, dtype=torch.bool)
        rest[ids[r]] = False
        np.testing.assert_allclose(tail.item(), ref[r, rest].sum().item(), atol=2e-6)
        np.testing.assert_allclose(ent[r].item(), _entropy(ref[r]).item(), rtol=1e-5, atol=1e-6)
    assert inside[10:].any() and (~inside[10:]).any()
