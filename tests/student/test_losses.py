"""Losses against float64 dense / hand-computed references, values and gradients."""

from __future__ import annotations

import pytest
import torch

from student.fusion import fuse_topk, teacher_weights
from student.losses import (
    IGNORE_INDEX,
    dkd_loss,
    feature_loss,
    next_token_ce,
    next_token_labels,
    sparse_kl,
)


def _setup(n: int, v: int, ks: list[int], temperature: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense, ids, lps = [], [], []
    for i, k in enumerate(ks):
        logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * (1 + i) / temperature, -1)
        top = logp.topk(k, dim=-1)
        dense.append(logp)
        ids.append(top.indices.int())
        lps.append(top.values.float())
    ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in dense], dim=1)
    alpha = teacher_weights(ent, "entropy")
    student = torch.randn(n, v, generator=g, dtype=torch.float64)
    return dense, ids, lps, alpha, student


def _coarse(dense, ids, alpha, student, temperature):
    """Hand-computed coarse-grained distributions (float64, loops): list of (P over classes, q over classes,
    class ids) with the tail last. Differentiable w.r.t. `student`."""
    q_full = torch.softmax(student / temperature, dim=-1)
    rows = []
    for pos in range(student.shape[0]):
        union = sorted({y for k in range(len(ids)) for y in ids[k][pos].tolist()})
        p = []
        for y in union:
            p.append(sum(float(alpha[pos, k]) * dense[k][pos, y].exp()
                         for k in range(len(ids)) if y in ids[k][pos].tolist()))
        p = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in p])
        p = torch.cat([p, (1 - p.sum()).clamp_min(0)[None]])
        q_u = q_full[pos, union]
        q = torch.cat([q_u, (1 - q_u.sum())[None]])
        rows.append((p, q, union))
    return rows


def _kl(p, q):
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros_like(p)).sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_equals_full_kl_when_k_is_vocab(temperature):
    v = 24
    dense, ids, lps, alpha, student = _setup(10, v, [v, v, v], temperature)
    fused = fuse_topk(ids, lps, alpha)
    s32 = student.float().requires_grad_()
    got = sparse_kl(s32, fused, temperature=temperature)
    got.backward()

    s64 = student.clone().requires_grad_()
    p_t = sum(alpha[:, k : k + 1].double() * dense[k].exp() for k in range(3))  # [N, V] dense mixture
    log_q = torch.log_softmax(s64 / temperature, dim=-1)
    ref = (p_t * (p_t.log() - log_q)).sum(-1).mean() * temperature**2
    ref.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("ks", [[4, 4], [3, 6, 2]])
def test_sparse_kl_equals_hand_computed_coarse_kl(ks):
    dense, ids, lps, alpha, student = _setup(6, 20, ks)
    fused = fuse_topk(ids, lps, alpha)
    s32 = student.float().requires_grad_()
    got = sparse_kl(s32, fused, temperature=1.0, reduction="none")
    got.sum().backward()

    s64 = student.clone().requires_grad_()
    ref = torch.stack([_kl(p, q) for p, q, _ in _coarse(dense, ids, alpha, s64, 1.0)])
    ref.sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)
    assert (got >= -1e-6).all()


def test_sparse_kl_mask_averages_valid_positions_only():
    dense, ids, lps, alpha, student = _setup(8, 16, [4, 4])
    fused = fuse_topk(ids, lps, alpha)
    per = sparse_kl(student.float(), fused, reduction="none")
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(sparse_kl(student.float(), fused, mask=mask), per[mask].mean())


def test_student_equal_to_teacher_gives_zero_kl():
    v = 16
    dense, ids, lps, _, _ = _setup(5, v, [v])
    fused = fuse_topk(ids, lps, torch.ones(5, 1))
    kl = sparse_kl(dense[0].float(), fused)  # log-probs are valid logits
    # float32: the tails are rounding noise (~1e-7) whose log ratio can be large, hence 1e-5
    torch.testing.assert_close(kl, torch.tensor(0.0), atol=1e-5, rtol=0)


def _dkd_direct(p, q, t, alpha, beta):
    """DKD's formula on explicit class distributions (float64): p, q [C], target class index t."""
    b_p = torch.stack([p[t], 1 - p[t]])
    b_q = torch.stack([q[t], 1 - q[t]])
    keep = [c for c in range(p.numel()) if c != t]
    p_hat = p[keep] / p[keep].sum()
    q_hat = q[keep] / q[keep].sum()
    return alpha * _kl(b_p, b_q) + beta * _kl(p_hat, q_hat)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dkd_matches_direct_formula(temperature):
    n, v = 7, 20
    dense, ids, lps, alpha, student = _setup(n, v, [5, 3], temperature)
    fused = fuse_topk(ids, lps, alpha)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    labels[0] = ids[0][0, 0]  # one label surely inside the union
    labels[-1] = IGNORE_INDEX
    s32 = student.float().requires_grad_()
    got = dkd_loss(s32, fused, labels, alpha=1.0, beta=8.0, temperature=temperature)
    got.backward()

    s64 = student.clone().requires_grad_()
    terms = []
    for pos, (p, q, union) in enumerate(_coarse(dense, ids, alpha, s64, temperature)):
        if labels[pos] == IGNORE_INDEX:
            continue
        y = int(labels[pos])
        t = union.index(y) if y in union else len(union)  # the tail bucket when y is outside U
        terms.append(_dkd_direct(p, q, t, 1.0, 8.0))
    ref = torch.stack(terms).mean() * temperature**2
    ref.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)


def test_next_token_ce_and_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.stack([-torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]]
                       for b in range(2) for t in range(4)]).mean()
    torch.testing.assert_close(next_token_ce(logits, ids).double(), ref, rtol=1e-5, atol=1e-6)
    labels = next_token_labels(ids)
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == IGNORE_INDEX).all()


def test_feature_loss_matches_naive_and_skips_disabled_teachers():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(3, 8, generator=g)
    h_t = [torch.randn(3, 6, generator=g), None, torch.randn(3, 4, generator=g)]
    projs = [torch.nn.Linear(8, 6), None, torch.nn.Linear(8, 4)]
    got = feature_loss(h_s, h_t, projs, [0.5, 1.0, 2.0])
    ref = 0.0
    for k, beta in ((0, 0.5), (2, 2.0)):
        w, b = projs[k].weight.detach().double(), projs[k].bias.detach().double()
        diff = h_s.double() @ w.T + b - h_t[k].double()
        ref += beta * sum(float((diff[i] ** 2).sum()) / diff.shape[1] for i in range(3)) / 3
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
