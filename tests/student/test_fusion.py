"""Fused target against a naive float64 reference (dense teacher distributions, loops over positions)."""

from __future__ import annotations

import pytest
import torch

from student.fusion import fuse_topk, teacher_weights


def _teachers(n: int, v: int, ks: list[int], seed: int = 0, temperature: float = 1.0):
    """Dense float64 teacher log-probs [N, V] each (different sharpness) and their top-k lists."""
    g = torch.Generator().manual_seed(seed)
    dense, ids, lps = [], [], []
    for i, k in enumerate(ks):
        logits = torch.randn(n, v, generator=g, dtype=torch.float64) * (1.0 + 2.0 * i)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        top = logp.topk(k, dim=-1)
        dense.append(logp)
        ids.append(top.indices.to(torch.int32))
        lps.append(top.values.to(torch.float32))
    return dense, ids, lps


def _naive_fused(ids, lps, alpha):
    """Per-position dict {id: P_T(id)} and tail, in float64, by plain loops."""
    out = []
    for pos in range(alpha.shape[0]):
        p: dict[int, float] = {}
        for k in range(len(ids)):
            for y, lp in zip(ids[k][pos].tolist(), lps[k][pos].double().tolist(), strict=True):
                p[y] = p.get(y, 0.0) + float(alpha[pos, k]) * torch.tensor(lp).exp().item()
        out.append((p, 1.0 - sum(p.values())))
    return out


@pytest.mark.parametrize("ks", [[5, 5], [3, 7, 4], [16, 1]])
def test_union_and_probs_match_naive(ks):
    dense, ids, lps = _teachers(9, 16, ks)
    ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in dense], dim=1)
    alpha = teacher_weights(ent, "entropy")
    fused = fuse_topk(ids, lps, alpha)
    for pos, (p, tail) in enumerate(_naive_fused(ids, lps, alpha)):
        got_ids = fused.ids[pos][fused.mask[pos]].tolist()
        assert sorted(got_ids) == sorted(p)  # every union id exactly once
        got = dict(zip(got_ids, fused.probs[pos][fused.mask[pos]].tolist(), strict=True))
        torch.testing.assert_close(
            torch.tensor([got[y] for y in sorted(p)], dtype=torch.float64),
            torch.tensor([p[y] for y in sorted(p)], dtype=torch.float64), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fused.tail[pos].double(), torch.tensor(max(tail, 0.0), dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)
    assert torch.all(fused.probs[~fused.mask] == 0)


def test_full_vocab_union_is_dense_mixture():
    dense, ids, lps = _teachers(7, 12, [12, 12])
    alpha = teacher_weights(torch.ones(7, 2), "fixed", [0.7, 0.3])
    fused = fuse_topk(ids, lps, alpha)
    dense_fused = torch.zeros(7, 12, dtype=torch.float64)
    dense_fused.scatter_(1, fused.ids, fused.probs.double())
    ref = 0.7 * dense[0].exp() + 0.3 * dense[1].exp()
    torch.testing.assert_close(dense_fused, ref, rtol=1e-5, atol=1e-7)
    assert float(fused.tail.max()) < 1e-5


def test_entropy_weights_sum_to_one_and_favour_low_entropy():
    dense, _, _ = _teachers(20, 30, [4, 4, 4])
    ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in dense], dim=1).float()  # [N, 3]
    alpha = teacher_weights(ent, "entropy", eps=1e-3)
    torch.testing.assert_close(alpha.sum(1), torch.ones(20))
    ref = (1 / (ent.double() + 1e-3)) / (1 / (ent.double() + 1e-3)).sum(1, keepdim=True)
    torch.testing.assert_close(alpha.double(), ref, rtol=1e-5, atol=1e-7)
    # at every position the teacher with the lowest entropy gets the largest weight
    assert torch.equal(alpha.argmax(1), ent.argmin(1))
    # zero entropy is guarded by eps: finite weights
    alpha0 = teacher_weights(torch.tensor([[0.0, 1.0]]), "entropy")
    assert torch.isfinite(alpha0).all() and alpha0[0, 0] > 0.99


def test_uniform_and_fixed_weights():
    ent = torch.rand(4, 3)
    torch.testing.assert_close(teacher_weights(ent, "uniform"), torch.full((4, 3), 1 / 3))
    w = teacher_weights(ent, "fixed", [2.0, 1.0, 1.0])
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.25, 0.25]]).expand(4, 3))
    with pytest.raises(ValueError):
        teacher_weights(ent, "fixed", [1.0])
