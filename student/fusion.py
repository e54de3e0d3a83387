"""Fused multi-teacher target over the union of the teachers' top-k ids plus one tail bucket.

Per position (N positions, K teachers, teacher k stores its top k_k ids S_k with log-probs over the full
vocab), with weights alpha [N, K] summing to 1 over teachers:

    P_T(y)    = sum_{k: y in S_k} alpha_k p_k(y)        for y in U = union_k S_k
    P_T(tail) = 1 - sum_{y in U} P_T(y)

Teacher k's mass outside S_k (its own tail, 1 - sum_{S_k} p_k) ends up in the fused tail even when another
teacher lists those ids: the cache does not know p_k(y) for y outside S_k, and guessing it would invent
data. Teachers may store different k; the union handles it (the concatenation is just wider).

Everything is vectorised: ids of all teachers are concatenated to [N, T] (T = sum_k k_k), sorted per row,
and duplicates are collapsed with a cumulative "new id" counter and a scatter-add. No loop over positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WEIGHTINGS = ("entropy", "uniform", "fixed")


@dataclass
class FusedTargets:
    """The fused sparse target for N positions (flattened [B * L])."""

    ids: torch.Tensor
    """[N, M] int64 union ids (padding slots hold id 0; see `mask`). M = largest union size in the batch."""
    probs: torch.Tensor
    """[N, M] float32 fused P_T(y) at `ids` (0 at padding slots)."""
    tail: torch.Tensor
    """[N] float32 P_T(tail) = 1 - sum of `probs`, clamped at 0 (float32 rounding)."""
    mask: torch.Tensor
    """[N, M] bool, True where the slot holds a real union id."""
    weights: torch.Tensor
    """[N, K] float32 teacher weights alpha used for the fusion (rows sum to 1)."""

    def to(self, device: torch.device | str) -> FusedTargets:
        return FusedTargets(*(t.to(device, non_blocking=True) for t in
                              (self.ids, self.probs, self.tail, self.mask, self.weights)))


def teacher_weights(
    entropies: torch.Tensor | None,
    mode: str,
    fixed: Sequence[float] | None = None,
    *,
    num_teachers: int | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Per-position teacher weights alpha [N, K] float32, rows summing to 1.

    entropy: alpha_k ∝ 1 / (H_k + eps) from `entropies` [N, K] (nats; eps guards H -> 0).
    uniform: 1 / K everywhere (`entropies` [N, K] or `num_teachers` plus a shape from `entropies`).
    fixed:   the given weights, normalised to sum to 1, the same at every position.
    """
    if mode == "entropy":
        if entropies is None:
            raise ValueError("entropy weighting needs entropies")
        inv = 1.0 / (entropies.float().clamp_min(0.0) + eps)  # [N, K]
        return inv / inv.sum(dim=-1, keepdim=True)
    if entropies is None:
        raise ValueError("teacher_weights needs entropies [N, K] (or a tensor of that shape) for the shape")
    n, k = entropies.shape
    if mode == "uniform":
        return torch.full((n, k), 1.0 / k, dtype=torch.float32, device=entropies.device)
    if mode == "fixed":
        if fixed is None or len(fixed) != k:
            raise ValueError(f"fixed weighting needs {k} weights, got {fixed!r}")
        w = torch.tensor(list(fixed), dtype=torch.float32, device=entropies.device)
        return (w / w.sum()).expand(n, k).contiguous()
    raise ValueError(f"unknown weighting {mode!r}; expected one of {WEIGHTINGS}")


def fuse_topk(
    topk_ids: Sequence[torch.Tensor],
    topk_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> FusedTargets:
    """Fuse K teachers' top-k lists into one sparse target.

    topk_ids[k]: [N, k_k] integer ids (distinct within a row); topk_logprobs[k]: [N, k_k] log-probs over
    the full vocab (float16/32); weights: [N, K] float32 alpha, rows summing to 1.
    """
    assert len(topk_ids) == len(topk_logprobs) == weights.shape[1], "one id/log-prob pair per teacher"
    ids = torch.cat([t.long() for t in topk_ids], dim=1)  # [N, T] int64
    probs = torch.cat(
        [lp.float().exp() * weights[:, i : i + 1] for i, lp in enumerate(topk_logprobs)], dim=1
    )  # [N, T] float32, alpha_k p_k(y)
    sorted_ids, order = ids.sort(dim=1)
    sorted_probs = probs.gather(1, order)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # [N, T] slot of each entry in the union row
    width = int(new.sum(dim=1).max()) if ids.shape[0] else 0
    n = ids.shape[0]
    union_ids = torch.zeros((n, width), dtype=torch.int64, device=ids.device)
    union_ids.scatter_(1, slot, sorted_ids)  # duplicates write the same id
    union_probs = torch.zeros((n, width), dtype=torch.float32, device=ids.device)
    union_probs.scatter_add_(1, slot, sorted_probs)
    mask = torch.zeros((n, width), dtype=torch.bool, device=ids.device)
    mask.scatter_(1, slot, True)
    tail = (1.0 - union_probs.sum(dim=1)).clamp_min(0.0)
    return FusedTargets(ids=union_ids, probs=union_probs, tail=tail, mask=mask, weights=weights.float())
