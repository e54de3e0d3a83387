"""CE + sparse KD from the student's final hidden states, in chunks of positions (no [B·L, V] tensor).

    ce, kd = chunked_ce_kd(hidden, weight, input_ids, fused, temperature=tau, chunk_size=512)

The same values as `next_token_ce(logits, input_ids)` and `sparse_kl(logits.reshape(-1, V), fused)` with
`logits = hidden @ weight.T`, but the logits exist for one chunk of positions at a time: each chunk's logits,
CE and KD are computed under activation checkpointing, so backward recomputes that chunk's logits instead of
keeping them. Peak memory for the loss grows with `chunk_size * V` rather than `B * L * V`; the price is
one extra lm_head matmul per chunk in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from student.fusion import FusedTargets
from student.loss.terms import IGNORE_INDEX, next_token_labels, sparse_kl


def check_plain_head(model: torch.nn.Module, vocab_size: int) -> None:
    """Refuse a student whose logits are not `final hidden @ output_embedding.T` (a bias, logit scaling or
    soft-capping would be skipped by the chunked loss)."""
    from common.errors import ConfigError

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ConfigError(f"--loss-chunk-size needs a bias-free linear output head; {type(model).__name__} has "
                          f"{type(head).__name__}")
    ids = torch.arange(min(8, vocab_size), device=head.weight.device)[None] % vocab_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        mine = (model.base_model(input_ids=ids, use_cache=False).last_hidden_state @ head.weight.T).float()
    model.train(was_training)
    if not torch.allclose(logits, mine, rtol=1e-4, atol=1e-4):
        raise ConfigError(f"--loss-chunk-size: {type(model).__name__}'s logits are not final hidden @ lm_head "
                          f"(max difference {(logits - mine).abs().max().item():.2e})")


def _chunk_sums(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, fused: FusedTargets,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over valid labels, sum of per-position KD) for one chunk [C, H]; `fused` holds its C rows."""
    z = h @ weight.T  # [C, V]
    z = z.to(torch.promote_types(torch.float32, z.dtype))
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    kd = sparse_kl(z, fused, temperature=temperature, reduction="none").sum()
    return ce, kd


def chunked_ce_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    fused: FusedTargets,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_kd: bool = True,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, KD) as `next_token_ce` and `sparse_kl` (mean over positions with a target, mask None) give them
    for `logits = hidden @ weight.T`.

    hidden [B, L, H]; weight [V, H] (the output embedding; no bias); input_ids [B, L]; fused: N = B * L rows.
    with_kd False: KD is returned as a zero and not computed (CE-only training). loss_mask [B, L] bool
    (conversations): CE only at the positions it marks, as `next_token_ce(..., loss_mask)`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, length, width = hidden.shape
    n = b * length
    flat = hidden.reshape(n, width)
    labels = next_token_labels(input_ids, loss_mask).reshape(-1)  # [N], IGNORE_INDEX at each last position
    ce_sum = flat.new_zeros((), dtype=torch.float32)
    kd_sum = flat.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        if not with_kd:
            args = (flat[s:e], weight, labels[s:e])
            ce_sum = ce_sum + (checkpoint(_chunk_ce, *args, use_reentrant=False) if grad else _chunk_ce(*args))
            continue
        args = (flat[s:e], weight, labels[s:e], fused.rows(s, e), temperature)
        ce, kd = checkpoint(_chunk_sums, *args, use_reentrant=False) if grad else _chunk_sums(*args)
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    count = (labels != IGNORE_INDEX).sum().clamp_min(1)
    targets = fused.has_target.sum().clamp_min(1) if with_kd else 1
    return ce_sum / count, kd_sum / targets


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = h @ weight.T  # [C, V]
    return F.cross_entropy(z.to(torch.promote_types(torch.float32, z.dtype)), labels, ignore_index=IGNORE_INDEX,
                           reduction="sum")
