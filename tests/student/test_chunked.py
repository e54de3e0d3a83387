"""Chunked CE + sparse KD from hidden states against the unchunked losses and a float64 reference."""

from __future__ import annotations

import pytest
import torch

from student.chunked import chunked_ce_kd
from student.fusion import fuse_topk, teacher_weights
from student.losses import next_token_ce, sparse_kl

B, L, H, V = 2, 7, 8, 50


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = B * L
    ids, lps, ents = [], [], []
    for k, scale in ((5, 2.0), (9, 1.0)):
        logp = torch.log_softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * scale, -1)
        top = logp.topk(k, dim=-1)
        ids.append(top.indices.int())
        lps.append(top.values.float())
        ents.append(-(logp.exp() * logp).sum(-1))
    fused = fuse_topk(ids, lps, teacher_weights(torch.stack(ents, 1).float(), "entropy"))
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    return hidden, weight, input_ids, fused


def _reference64(hidden, weight, input_ids, fused, temperature):
    """CE and coarse KL entirely in float64 (the losses themselves compute in float32)."""
    z = (hidden @ weight.T) / temperature  # [B, L, V]
    logp_ce = torch.log_softmax(hidden @ weight.T, -1)
    ce = -logp_ce[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
    log_q = torch.log_softmax(z.reshape(-1, V), -1).gather(1, fused.ids)
    q_tail = 1 - (log_q.exp() * fused.mask).sum(1)
    p, p_tail = fused.probs.double(), fused.tail.double()
    kl = (torch.xlogy(p, p) - p * log_q).sum(1) + torch.xlogy(p_tail, p_tail) - p_tail * torch.log(q_tail)
    return ce, (kl * temperature**2).mean()


@pytest.mark.parametrize("chunk_size", [1, 5, 14, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_matches_unchunked_and_float64(chunk_size: int, temperature: float) -> None:
    hidden, weight, input_ids, fused = _setup()
    ce_c, kd_c = chunked_ce_kd(hidden, weight, input_ids, fused, temperature=temperature, chunk_size=chunk_size)
    g_c = torch.autograd.grad(0.3 * ce_c + 0.7 * kd_c, (hidden, weight))

    logits = hidden @ weight.T
    ce_u, kd_u = next_token_ce(logits, input_ids), sparse_kl(logits.reshape(-1, V), fused, temperature=temperature)
    g_u = torch.autograd.grad(0.3 * ce_u + 0.7 * kd_u, (hidden, weight))

    ce_r, kd_r = _reference64(hidden, weight, input_ids, fused, temperature)
    g_r = torch.autograd.grad(0.3 * ce_r + 0.7 * kd_r, (hidden, weight))

    torch.testing.assert_close(ce_c.double(), ce_u.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kd_c.double(), kd_u.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce_c.double(), ce_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd_c.double(), kd_r, rtol=1e-5, atol=1e-5)
    for a, b, r in zip(g_c, g_u, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_ce_only_and_no_grad() -> None:
    hidden, weight, input_ids, fused = _setup(seed=1)
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
