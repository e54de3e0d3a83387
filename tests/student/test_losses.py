"""KD losses against float64 references built from dense distributions (tests/student/coarse_reference.py),
values and gradients; the two-teacher toy where top-k sets differ; the per-teacher validity mask."""

from __future__ import annotations

import pytest
import torch

from student.fusion import fuse_topk, teacher_weights
from student.loss.terms import (
    IGNORE_INDEX,
    dkd_loss,
    feature_loss,
    next_token_ce,
    next_token_labels,
    sparse_kl,
)
from tests.student.coarse_reference import kl, per_teacher_dkd, per_teacher_kl


def _teachers(n: int, v: int, ks: list[int], temperature: float = 1.0, seed: int = 0, same: bool = False):
    """Dense float64 teacher probabilities [N, V] (one distribution reused when `same`), their top-k ids and
    float64 top-k log-probs, entropies [N, K] and a float64 student [N, V]."""
    g = torch.Generator().manual_seed(seed)
    dense, ids, lps = [], [], []
    shared = torch.randn(n, v, generator=g, dtype=torch.float64)
    for i, k in enumerate(ks):
        z = shared * 2 if same else torch.randn(n, v, generator=g, dtype=torch.float64) * (1 + i)
        logp = torch.log_softmax(z / temperature, -1)
        top = logp.topk(k, dim=-1)
        dense.append(logp.exp())
        ids.append(top.indices.int())
        lps.append(top.values)
    ent = torch.stack([-torch.xlogy(p, p).sum(-1) for p in dense], dim=1)
    student = torch.randn(n, v, generator=g, dtype=torch.float64)
    return dense, ids, lps, ent, student


def _weights(mode: str, ent: torch.Tensor, seed: int = 5) -> torch.Tensor:
    if mode == "random":  # arbitrary per-position weights
        w = torch.rand(ent.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05
        return (w / w.sum(1, keepdim=True)).float()
    fixed = [0.8, 0.2, 0.5][: ent.shape[1]] if mode == "fixed" else None
    return teacher_weights(ent, mode, fixed)


# ---- values and gradients against the dense per-teacher reference -------------------------------------------
@pytest.mark.parametrize("ks", [[4, 4], [3, 6, 2], [20, 1]])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_matches_dense_per_teacher_reference(ks, temperature):
    dense, ids, lps, ent, student = _teachers(6, 20, ks, temperature)
    alpha = _weights("entropy", ent)
    s64 = student.clone().requires_grad_()
    ref = per_teacher_kl(dense, ids, alpha, s64, temperature)
    ref.sum().backward()

    # production dtypes: int32 ids, float32 log-probs and logits
    fused32 = fuse_topk(ids, [lp.float() for lp in lps], alpha)
    s32 = student.float().requires_grad_()
    got = sparse_kl(s32, fused32, temperature=temperature, reduction="none")
    got.sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)
    assert (got >= -1e-6).all()

    # float64 throughout: tight
    fused64 = fuse_topk(ids, lps, alpha.double())
    s = student.clone().requires_grad_()
    got64 = sparse_kl(s, fused64, temperature=temperature, reduction="none")
    got64.sum().backward()
    torch.testing.assert_close(got64, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighting", ["entropy", "uniform", "fixed", "random"])
def test_same_teacher_at_k4_and_k8_has_zero_gradient_at_the_teacher(weighting):
    """Two caches of one teacher (k = 4 and k = 8): a student equal to the teacher pays nothing, for KD and DKD."""
    n, v = 9, 24
    dense, ids, lps, ent, _ = _teachers(n, v, [4, 8], same=True)
    assert torch.equal(dense[0], dense[1]) and torch.equal(ids[1][:, :4], ids[0])  # S_4 is inside S_8
    alpha = _weights(weighting, ent)
    fused = fuse_topk(ids, lps, alpha)
    teacher_logits = dense[0].log()  # float64 log-probs are valid logits
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    labels[0], labels[1], labels[2] = ids[0][0, 0], ids[1][1, 6], IGNORE_INDEX  # in both / only in k=8 / none
    for loss_fn in (
        lambda z: sparse_kl(z, fused),
        lambda z: sparse_kl(z, fused, temperature=1.0, reduction="none").sum(),
        lambda z: dkd_loss(z, fused, labels, alpha=1.0, beta=8.0),
    ):
        z = teacher_logits.clone().requires_grad_()
        value = loss_fn(z)
        (grad,) = torch.autograd.grad(value, z)
        assert abs(float(value.detach())) < 1e-12
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
        # and the loss is not flat there: a perturbed student pays and is pushed back
        z2 = (teacher_logits + 0.3 * torch.randn(n, v, generator=torch.Generator().manual_seed(2))).requires_grad_()
        assert float(loss_fn(z2).detach()) > 1e-4


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_to_vocab_gives_the_dense_kl_to_the_mixture(temperature):
    v = 24
    dense, ids, lps, ent, student = _teachers(10, v, [v, v, v], temperature)
    alpha = _weights("entropy", ent).double()
    p_mix = sum(alpha[:, k : k + 1] * dense[k] for k in range(3))  # [N, V] dense mixture
    jsd = -torch.xlogy(p_mix, p_mix).sum(-1) - sum(alpha[:, k] * -torch.xlogy(dense[k], dense[k]).sum(-1)
                                                   for k in range(3))  # weighted Jensen-Shannon, [N]

    def dense_kl_to_mixture(z):
        return (p_mix * (p_mix.log() - torch.log_softmax(z / temperature, -1))).sum(-1) * temperature**2

    s64 = student.clone().requires_grad_()
    ref = dense_kl_to_mixture(s64).mean()
    ref.backward()
    for lp_dtype, logit_dtype, rtol, gtol in ((torch.float32, torch.float32, 1e-4, 1e-3),
                                              (torch.float64, torch.float64, 1e-10, 1e-9)):
        fused = fuse_topk(ids, [lp.to(lp_dtype) for lp in lps], alpha.float())
        s = student.to(logit_dtype).requires_grad_()
        got = sparse_kl(s, fused, temperature=temperature)
        got.backward()
        # value: the dense KL to the mixture plus the teachers' Jensen-Shannon divergence (constant in the student)
        torch.testing.assert_close(got.double(), ref.detach() + jsd.mean() * temperature**2, rtol=rtol, atol=1e-6)
        torch.testing.assert_close(s.grad.double(), s64.grad, rtol=gtol, atol=1e-7)

    # one teacher: exactly the dense KL
    fused1 = fuse_topk(ids[:1], lps[:1], torch.ones(10, 1))
    s1 = student.clone().requires_grad_()
    got1 = sparse_kl(s1, fused1, temperature=temperature)
    ref1 = (dense[0] * (dense[0].log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean()
    torch.testing.assert_close(got1, ref1 * temperature**2, rtol=1e-10, atol=1e-12)

    # the minimiser is the mixture: zero gradient there
    z = (p_mix.log() * temperature).requires_grad_()
    (grad,) = torch.autograd.grad(sparse_kl(z, fuse_topk(ids, lps, alpha), temperature=temperature), z)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


# ---- the two-teacher toy where the top-k sets differ --------------------------------------------------------
P1 = [0.30, 0.25, 0.15, 0.15, 0.10, 0.05]  # top-2 {0, 1}
P2 = [0.30, 0.15, 0.20, 0.15, 0.10, 0.10]  # top-2 {0, 2}
Q_CONSISTENT = [0.30, 0.25, 0.20, 0.10, 0.10, 0.05]  # matches teacher 1 on {0}, {1}, rest and teacher 2 on {0}, {2}, rest


def _toy():
    p = [torch.tensor([x], dtype=torch.float64) for x in (P1, P2)]
    ids = [x.topk(2, dim=-1).indices for x in p]
    assert ids[0].tolist() == [[0, 1]] and ids[1].tolist() == [[0, 2]]
    lps = [x.log().gather(1, i) for x, i in zip(p, ids, strict=True)]
    return p, ids, lps


def _old_union_kl(z: torch.Tensor, alpha: tuple[float, float]) -> torch.Tensor:
    """The former loss, written out by hand for this toy: U = {0, 1, 2}, P_T(y) = sum over teachers listing y
    of alpha_k p_k(y), one shared tail 1 - sum_U P_T, against the student's q at U and q(V \\ U)."""
    q = torch.softmax(z, -1)[0]
    a1, a2 = alpha
    target = torch.tensor([a1 * P1[0] + a2 * P2[0], a1 * P1[1], a2 * P2[2]], dtype=torch.float64)
    target = torch.cat([target, 1 - target.sum()[None]])
    student = torch.cat([q[:3], q[3:].sum()[None]])
    return kl(target, student)


def _minimise(loss_fn, seed: int = 0) -> torch.Tensor:
    z = torch.randn(1, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(z)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(z.detach(), -1)[0]


@pytest.mark.parametrize("alpha", [(0.5, 0.5), (0.7, 0.3)])
def test_two_teacher_toy_with_different_topk_sets(alpha):
    p, ids, lps = _toy()
    weights = torch.tensor([alpha], dtype=torch.float32)
    fused = fuse_topk(ids, lps, weights)
    new = lambda z: sparse_kl(z, fused)  # noqa: E731

    # a student consistent with both caches pays nothing under the new loss, with zero gradient...
    z = torch.tensor([Q_CONSISTENT], dtype=torch.float64).log().requires_grad_()
    value = new(z)
    (grad,) = torch.autograd.grad(value, z)
    assert abs(float(value.detach())) < 1e-12
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
    # ...while the former union loss charges it (teacher 1's mass on id 2 went into a tail q(V \ U) omits)
    assert float(_old_union_kl(z.detach(), alpha)) > 0.1

    # the student equal to the mixture: the new loss is the dense per-teacher reference
    mix = alpha[0] * p[0] + alpha[1] * p[1]
    zm = mix.log()
    torch.testing.assert_close(new(zm), per_teacher_kl(p, ids, weights.double(), zm)[0], rtol=1e-12, atol=1e-14)

    # minimisers: the new loss reaches 0 on a distribution that matches both teachers' views; the old one
    # moves the boundary ids' mass into V \ U (q(V \ U) = 0.25 for every distribution matching both caches)
    q_new = _minimise(new)
    assert float(new(q_new.log()[None])) < 1e-10
    for k, top in enumerate(([0, 1], [0, 2])):
        torch.testing.assert_close(q_new[top], p[k][0, top], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(q_new[3:].sum(), torch.tensor(0.25, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    q_old = _minimise(lambda z: _old_union_kl(z, alpha))
    old_tail = 1 - alpha[0] * (P1[0] + P1[1]) - alpha[1] * (P2[0] + P2[2])
    torch.testing.assert_close(q_old[3:].sum(), torch.tensor(old_tail, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    assert float(q_old[3:].sum()) > 0.4


# ---- masks ----------------------------------------------------------------------------------------------------
def test_sparse_kl_mask_averages_valid_positions_only():
    dense, ids, lps, ent, student = _teachers(8, 16, [4, 4])
    fused = fuse_topk(ids, [lp.float() for lp in lps], teacher_weights(ent, "entropy"))
    per = sparse_kl(student.float(), fused, reduction="none")
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(sparse_kl(student.float(), fused, mask=mask), per[mask].mean())


def _with_validity(n: int, v: int, ks: list[int]):
    """Three teachers, a per-position validity mask with one all-invalid row; invalid entries hold garbage
    (id -1, NaN log-probs, NaN entropy), as a cache with no target there would."""
    dense, ids, lps, ent, student = _teachers(n, v, ks)
    valid = torch.rand(n, len(ks), generator=torch.Generator().manual_seed(7)) > 0.4
    valid[0] = False
    valid[1] = True
    g_ids = [torch.where(valid[:, k : k + 1], i, torch.full_like(i, -1)) for k, i in enumerate(ids)]
    g_lps = [torch.where(valid[:, k : k + 1], lp, torch.full_like(lp, float("nan"))) for k, lp in enumerate(lps)]
    g_ent = torch.where(valid, ent, torch.full_like(ent, float("nan")))
    return dense, ids, g_ids, g_lps, ent, g_ent, valid, student


@pytest.mark.parametrize("weighting", ["entropy", "uniform", "fixed"])
def test_validity_mask_drops_teachers_and_renormalises(weighting):
    n, v = 12, 20
    dense, ids, g_ids, g_lps, ent, g_ent, valid, student = _with_validity(n, v, [4, 6, 3])
    alpha = teacher_weights(g_ent, weighting, [0.8, 0.2, 0.5] if weighting == "fixed" else None, valid=valid)
    assert torch.isfinite(alpha).all() and (alpha[~valid] == 0).all()
    has = valid.any(1)
    torch.testing.assert_close(alpha.sum(1), has.float())
    fused = fuse_topk(g_ids, g_lps, alpha, valid=valid)
    assert torch.equal(fused.has_target, has)

    # reference: the plain (unmasked) weights, renormalised over the valid teachers by the reference itself
    plain = teacher_weights(ent, weighting, [0.8, 0.2, 0.5] if weighting == "fixed" else None)
    s64 = student.clone().requires_grad_()
    ref = per_teacher_kl(dense, ids, plain.double(), s64, valid=valid)
    ref_mean = ref[has].mean()
    ref_mean.backward()
    s = student.clone().requires_grad_()
    got = sparse_kl(s, fused)
    got.backward()
    torch.testing.assert_close(got, ref_mean.detach(), rtol=1e-5, atol=1e-7)  # float32 weights
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-5, atol=1e-8)
    assert (s.grad[0] == 0).all()  # no teacher: no KD
    assert float(sparse_kl(s.detach(), fused, reduction="none")[0]) == 0.0

    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    dkd = dkd_loss(student, fused, labels)
    dkd_ref = per_teacher_dkd(dense, ids, plain.double() * valid, student, labels, a=1.0, b=8.0)
    torch.testing.assert_close(dkd, torch.stack(dkd_ref).mean(), rtol=1e-6, atol=1e-8)  # float32 weights


# ---- DKD -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dkd_matches_per_teacher_direct_formula(temperature):
    n, v = 7, 20
    dense, ids, lps, ent, student = _teachers(n, v, [5, 3], temperature)
    alpha = _weights("entropy", ent)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    labels[0] = ids[0][0, 0]  # in both top-k (teacher 0's top-1)
    labels[1] = ids[0][1, 4]  # in teacher 0's top-5 only (surely not in teacher 1's top-3 unless they agree)
    labels[-1] = IGNORE_INDEX
    s64 = student.clone().requires_grad_()
    ref = torch.stack(per_teacher_dkd(dense, ids, alpha.double(), s64, labels, a=1.0, b=8.0,
                                      temperature=temperature)).mean()
    ref.backward()

    s32 = student.float().requires_grad_()
    got = dkd_loss(s32, fuse_topk(ids, [lp.float() for lp in lps], alpha), labels, alpha=1.0, beta=8.0,
                   temperature=temperature)
    got.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)

    s = student.clone().requires_grad_()
    got64 = dkd_loss(s, fuse_topk(ids, lps, alpha.double()), labels, alpha=1.0, beta=8.0, temperature=temperature)
    got64.backward()
    torch.testing.assert_close(got64, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-9, atol=1e-12)


# ---- CE, labels, features ------------------------------------------------------------------------------------
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
