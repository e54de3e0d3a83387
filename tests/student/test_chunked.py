"""Chunked CE + sparse KD from hidden states against the unchunked losses and a dense float64 reference."""

from __future__ import annotations

import pytest
import torch

from student.fusion import fuse_topk, teacher_weights
from student.loss.chunked import chunked_ce_kd
from student.loss.terms import next_token_ce, sparse_kl
from tests.student.coarse_reference import per_teacher_kl

B, L, H, V = 2, 7, 8, 50


def _setup(seed: int = 0, valid: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    n = B * L
    dense, ids, lps, ents = [], [], [], []
    for k, scale in ((5, 2.0), (9, 1.0)):
        logp = torch.log_softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * scale, -1)
        top = logp.topk(k, dim=-1)
        dense.append(logp.exp())
        ids.append(top.indices.int())
        lps.append(top.values.float())
        ents.append(-(logp.exp() * logp).sum(-1))
    alpha = teacher_weights(torch.stack(ents, 1).float(), "entropy")
    fused = fuse_topk(ids, lps, alpha, valid=valid)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    return hidden, weight, input_ids, fused, (dense, ids, alpha)


def _reference64(hidden, weight, input_ids, teachers, temperature, valid=None):
    """CE and the per-teacher coarse KL from dense float64 distributions (tests/student/coarse_reference.py)."""
    dense, ids, alpha = teachers
    logits = hidden @ weight.T
    ce = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
    kl = per_teacher_kl(dense, ids, alpha.double(), logits.reshape(-1, V), temperature, valid=valid)
    has = torch.ones(kl.shape[0], dtype=torch.bool) if valid is None else valid.any(1)
    return ce, kl[has].mean()


@pytest.mark.parametrize("chunk_size", [1, 5, 14, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_matches_unchunked_and_float64(chunk_size: int, temperature: float) -> None:
    hidden, weight, input_ids, fused, teachers = _setup()
    ce_c, kd_c = chunked_ce_kd(hidden, weight, input_ids, fused, temperature=temperature, chunk_size=chunk_size)
    g_c = torch.autograd.grad(0.3 * ce_c + 0.7 * kd_c, (hidden, weight))

    logits = hidden @ weight.T
    ce_u, kd_u = next_token_ce(logits, input_ids), sparse_kl(logits.reshape(-1, V), fused, temperature=temperature)
    g_u = torch.autograd.grad(0.3 * ce_u + 0.7 * kd_u, (hidden, weight))

    ce_r, kd_r = _reference64(hidden, weight, input_ids, teachers, temperature)
    g_r = torch.autograd.grad(0.3 * ce_r + 0.7 * kd_r, (hidden, weight))

    torch.testing.assert_close(ce_c.double(), ce_u.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd_c.double(), kd_u.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce_c.double(), ce_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd_c.double(), kd_r, rtol=1e-5, atol=1e-5)
    for a, b, r in zip(g_c, g_u, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_ce_only_and_no_grad() -> None:
    hidden, weight, input_ids, fused, _ = _setup(seed=1)
    ce, kd = chunked_ce_kd(hidden, weight, input_ids, fused, chunk_size=4, with_kd=False)
    assert kd.item() == 0.0
    torch.testing.assert_close(ce.double(), next_token_ce(hidden @ weight.T, input_ids).double(), rtol=1e-6, atol=1e-6)
    (gh,) = torch.autograd.grad(ce, (hidden,))
    (gu,) = torch.autograd.grad(next_token_ce(hidden @ weight.T, input_ids), (hidden,))
    torch.testing.assert_close(gh, gu, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ce2, kd2 = chunked_ce_kd(hidden, weight, input_ids, fused, chunk_size=3)
    assert not ce2.requires_grad and kd2.item() > 0
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_ce_kd(hidden, weight, input_ids, fused, chunk_size=0)


def test_validity_mask_matches_reference() -> None:
    valid = torch.rand(B * L, 2, generator=torch.Generator().manual_seed(4)) > 0.3
    valid[0] = False  # a position without any target: no KD, left out of the average
    hidden, weight, input_ids, fused, teachers = _setup(seed=2, valid=valid)
    ce_c, kd_c = chunked_ce_kd(hidden, weight, input_ids, fused, chunk_size=3)
    g_c = torch.autograd.grad(0.5 * ce_c + 0.5 * kd_c, (hidden, weight))
    ce_r, kd_r = _reference64(hidden, weight, input_ids, teachers, 1.0, valid=valid)
    g_r = torch.autograd.grad(0.5 * ce_r + 0.5 * kd_r, (hidden, weight))
    torch.testing.assert_close(kd_c, kd_r, rtol=1e-6, atol=1e-8)  # float32 weights, float64 otherwise
    for a, r in zip(g_c, g_r, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-8)


def test_same_teacher_at_k4_and_k8_has_zero_gradient_at_the_teacher() -> None:
    """Two caches of one teacher (k = 4, k = 8), any weights: a student whose logits equal the teacher's
    log-probs (hidden = log-probs, lm_head = identity) gets zero KD gradient, in every chunking."""
    n = B * L
    logp = torch.log_softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2,
                             -1)
    ids = [logp.topk(k, dim=-1).indices for k in (4, 8)]
    lps = [logp.gather(1, i) for i in ids]
    alpha = torch.rand(n, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fused = fuse_topk(ids, lps, alpha)
    hidden = logp.reshape(B, L, V).clone().requires_grad_()
    weight = torch.eye(V, dtype=torch.float64)
    input_ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(8))
    for chunk_size in (1, 5, 100):
        _, kd = chunked_ce_kd(hidden, weight, input_ids, fused, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(kd, hidden)
        assert abs(float(kd.detach())) < 1e-12
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


def test_float32_inputs_compute_in_float32_close_to_reference() -> None:
    hidden, weight, input_ids, fused, teachers = _setup(seed=3)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ce_c, kd_c = chunked_ce_kd(h32, w32, input_ids, fused, chunk_size=4)
    assert ce_c.dtype == kd_c.dtype == torch.float32
    g_c = torch.autograd.grad(0.5 * ce_c + 0.5 * kd_c, (h32, w32))
    ce_r, kd_r = _reference64(hidden, weight, input_ids, teachers, 1.0)
    g_r = torch.autograd.grad(0.5 * ce_r + 0.5 * kd_r, (hidden, weight))
    torch.testing.assert_close(ce_c.double(), ce_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd_c.double(), kd_r, rtol=1e-4, atol=1e-5)
    for a, r in zip(g_c, g_r, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-3, atol=1e-5)
