"""Fused per-teacher targets and weights against naive float64 references (loops over positions)."""

from __future__ import annotations

import math

import pytest
import torch

from student.fusion import FusedTargets, fuse_topk, fused_top1, teacher_weights


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


@pytest.mark.parametrize("ks", [[5, 5], [3, 7, 4], [16, 1]])
def test_teachers_side_by_side_match_naive(ks):
    dense, ids, lps = _teachers(9, 16, ks)
    ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in dense], dim=1)
    alpha = teacher_weights(ent, "entropy")
    fused = fuse_topk(ids, lps, alpha)
    assert fused.sizes == tuple(ks) and fused.ids.shape == fused.probs.shape == (9, sum(ks))
    assert fused.ids.dtype == torch.int64 and fused.probs.dtype == torch.float32
    assert fused.tail.shape == fused.weights.shape == (9, len(ks))
    assert fused.column_teacher().tolist() == [k for k, w in enumerate(ks) for _ in range(w)]
    for pos in range(9):
        for k in range(len(ks)):
            cols = fused.columns(k)
            assert fused.ids[pos, cols].tolist() == ids[k][pos].tolist()  # teacher k's own list, in order
            p = [math.exp(x) for x in lps[k][pos].double().tolist()]
            torch.testing.assert_close(fused.probs[pos, cols].double(), torch.tensor(p, dtype=torch.float64),
                                       rtol=1e-6, atol=1e-8)
            # the tail is the teacher's own: everything outside its top-k, from the dense distribution
            outside = dense[k][pos].exp().sum() - dense[k][pos, ids[k][pos].long()].exp().sum()
            torch.testing.assert_close(fused.tail[pos, k].double(), outside, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.weights, alpha)
    assert torch.equal(fused.has_target, torch.ones(9, dtype=torch.bool))


def test_validity_mask_zeroes_teachers_and_renormalises_weights():
    dense, ids, lps = _teachers(6, 12, [3, 4, 2])
    valid = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in dense], dim=1).float()
    ent_garbage = torch.where(valid, ent, torch.full_like(ent, float("nan")))
    for mode, fixed in (("entropy", None), ("uniform", None), ("fixed", [0.5, 0.3, 0.2])):
        alpha = teacher_weights(ent_garbage, mode, fixed, valid=valid)
        full = teacher_weights(ent, mode, fixed)
        ref = full * valid
        ref = torch.where(ref.sum(1, keepdim=True) > 0, ref / ref.sum(1, keepdim=True).clamp_min(1e-30), ref)
        torch.testing.assert_close(alpha, ref)
        ids_g = [torch.where(valid[:, k : k + 1], i, torch.full_like(i, -7)) for k, i in enumerate(ids)]
        lps_g = [torch.where(valid[:, k : k + 1], lp, torch.full_like(lp, float("nan"))) for k, lp in enumerate(lps)]
        fused = fuse_topk(ids_g, lps_g, full, valid=valid)  # unmasked weights in: fuse_topk masks them itself
        torch.testing.assert_close(fused.weights, ref)
        assert fused.has_target.tolist() == [True, True, True, False, True, True]
        for k in range(3):
            cols = fused.columns(k)
            off = ~valid[:, k]
            assert (fused.ids[off, cols] == 0).all() and (fused.probs[off, cols] == 0).all()
            assert (fused.tail[off, k] == 0).all() and torch.isfinite(fused.probs).all()
            assert torch.equal(fused.ids[~off, cols], ids[k][~off].long())


def test_batch_round_trip_and_rows():
    import pickle

    from student.batch import DistillBatch

    dense, ids, lps = _teachers(5, 10, [3, 2])
    fused = fuse_topk(ids, lps, teacher_weights(torch.ones(5, 2), "uniform"))
    # what a DataLoader worker sends: a pickled DistillBatch; sizes given as a list come back as a tuple
    listed = FusedTargets(ids=fused.ids, probs=fused.probs, tail=fused.tail, weights=fused.weights, sizes=[3, 2])
    batch = DistillBatch(seq_ids=torch.arange(1), input_ids=torch.zeros(1, 5, dtype=torch.long), fused=listed,
                         pooled=[None, None])
    back = pickle.loads(pickle.dumps(batch)).to("cpu").fused
    assert back.sizes == (3, 2)
    for a, b in ((back.ids, fused.ids), (back.probs, fused.probs), (back.tail, fused.tail),
                 (back.weights, fused.weights)):
        assert torch.equal(a, b)
    part = fused.rows(1, 4)
    assert part.ids.shape == (3, 5) and torch.equal(part.tail, fused.tail[1:4]) and part.sizes == (3, 2)


def test_fused_top1_is_the_largest_known_mixture_mass():
    dense, ids, lps = _teachers(11, 16, [3, 5, 2])
    alpha = teacher_weights(torch.rand(11, 3, generator=torch.Generator().manual_seed(1)), "entropy")
    got = fused_top1(fuse_topk(ids, lps, alpha))
    for pos in range(11):
        mass: dict[int, float] = {}
        for k in range(3):
            for y, lp in zip(ids[k][pos].tolist(), lps[k][pos].double().tolist(), strict=True):
                mass[y] = mass.get(y, 0.0) + float(alpha[pos, k]) * math.exp(lp)
        assert int(got[pos]) == max(mass, key=mass.get)


def test_fused_top1_at_full_vocab_is_the_mixture_argmax():
    dense, ids, lps = _teachers(7, 12, [12, 12])
    alpha = teacher_weights(torch.ones(7, 2), "fixed", [0.7, 0.3])
    ref = (0.7 * dense[0].exp() + 0.3 * dense[1].exp()).argmax(-1)
    assert torch.equal(fused_top1(fuse_topk(ids, lps, alpha)), ref)


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
