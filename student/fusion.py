"""The fused multi-teacher target, kept per teacher: each teacher's own top-k plus its own tail bucket.

Per position (N positions, K teachers), teacher k's cache is a coarse-grained distribution over its own top-k
ids S_k (log-probs over the full vocab) plus one bucket for the rest of the vocab:

    p_k(y) for y in S_k,      tail_k = 1 - sum_{y in S_k} p_k(y)

The loss (student/loss/terms.py) compares each teacher's coarse view with the student's view on the same
partition, and mixes the teachers with per-position weights alpha [N, K]:

    CE_k = - sum_{y in S_k} p_k(y) log q(y) - tail_k log(1 - sum_{y in S_k} q(y))
    loss = sum_k alpha_k CE_k

This is linear in the target, so with top-k = vocab it is the cross-entropy to the mixture sum_k alpha_k p_k.
The fusion therefore does not merge the teachers' lists: it places them side by side ([N, T] with
T = sum_k k_k; teacher k owns columns `columns(k)`), normalises the weights and zeroes the teachers that have
no target at a position. (Merging the lists over their union U with one shared tail would be wrong whenever
the top-k sets differ: teacher k's mass on ids in U outside S_k would land in a tail that the student's
q(V \\ U) cannot match.)

Validity: an optional [N, K] bool mask says which teachers have a target at each position; the others carry
no KD there, and alpha is renormalised over the rest. A position where no teacher (with a positive weight)
has a target carries no KD at all (`has_target` False; the losses leave it out of their averages).

Teachers may store different k. Everything is vectorised over positions.

Sampled caches (`precompute --targets sampled`) fit the same form: teacher k's view is its drawn ids with
p_hat_k(y) = count(y) / N and no tail (`tailless`), an unbiased estimate of p_k. CE_k is linear in the
target, so E[sum_k alpha_k CE_k(p_hat_k)] = sum_k alpha_k CE_k(p_k): the fused target sum_k alpha_k p_hat_k is
unbiased, and a sampled teacher's term is unbiased for its full-vocab cross-entropy (no coarse-graining).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from student.weighting import WeightInputs, WeightSettings, renormalise, scheme


@dataclass
class FusedTargets:
    """Per-teacher sparse targets for N positions (flattened [B * L]), side by side."""

    ids: torch.Tensor
    """[N, T] int64 top-k ids of all teachers, teacher k in columns `columns(k)` (0 where it has no target)."""
    probs: torch.Tensor
    """[N, T] float32 (or float64 when built from float64 log-probs) p_k(y) at `ids`, unweighted (0 where the
    teacher has no target)."""
    tail: torch.Tensor
    """[N, K] teacher k's tail mass 1 - sum_{S_k} p_k, clamped to [0, 1] (0 where it has no target)."""
    weights: torch.Tensor
    """[N, K] float32 (float64 when given float64) alpha: 0 for teachers without a target, the rest sums to 1
    (all 0: no target here)."""
    sizes: tuple[int, ...]
    """Per-teacher widths k_k (sum = T)."""

    def __post_init__(self) -> None:
        self.sizes = tuple(int(s) for s in self.sizes)  # a DataLoader's pin_memory turns tuples into lists

    @property
    def num_teachers(self) -> int:
        return len(self.sizes)

    def columns(self, k: int) -> slice:
        """Teacher k's columns in `ids` / `probs`."""
        start = sum(self.sizes[:k])
        return slice(start, start + self.sizes[k])

    def column_teacher(self) -> torch.Tensor:
        """[T] int64: the teacher owning each column."""
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=self.ids.device),
                                       torch.tensor(self.sizes, device=self.ids.device))

    @property
    def has_target(self) -> torch.Tensor:
        """[N] bool: some teacher carries KD at this position."""
        return self.weights.sum(dim=1) > 0

    def rows(self, start: int, stop: int) -> FusedTargets:
        """Positions start..stop-1."""
        return FusedTargets(ids=self.ids[start:stop], probs=self.probs[start:stop], tail=self.tail[start:stop],
                            weights=self.weights[start:stop], sizes=self.sizes)

    def to(self, device: torch.device | str) -> FusedTargets:
        return FusedTargets(*(t.to(device, non_blocking=True) for t in (self.ids, self.probs, self.tail,
                                                                           self.weights)), sizes=self.sizes)


def teacher_weights(
    entropies: torch.Tensor | None,
    mode: str,
    fixed: Sequence[float] | None = None,
    *,
    eps: float = 1e-3,
    valid: torch.Tensor | None = None,
    observed: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Per-position teacher weights alpha [N, K] float32 of the scheme `mode` (student/weighting.py), rows
    summing to 1 (the inputs are taken in float32, as training takes them).

    entropies: [N, K] entropies (the `entropy` scheme), else any [N, K] tensor giving the shape (or None with
    `observed`); fixed: the `fixed` scheme's weights; eps: the `entropy` scheme's eps; valid: optional [N, K]
    bool, teachers with a target at each position (the others get weight 0, the rest is renormalised; a row
    with no valid teacher is all 0); observed: [N, K] log p_k(o) for the observed-token schemes; seq_len: the
    window length for the per-sequence scheme (default: all N rows are one window).
    """
    shape_from = entropies if entropies is not None else observed
    if shape_from is None:
        raise ValueError("teacher_weights needs entropies or observed log-probs [N, K] (at least for the shape)")
    n, k = shape_from.shape
    settings = WeightSettings(teacher_weights=None if fixed is None else tuple(fixed), entropy_eps=eps)
    inputs = WeightInputs(num_teachers=k, seq_len=seq_len or n, valid=valid, rows=n,
                          entropy=None if entropies is None else entropies.float(),
                          observed=None if observed is None else observed.float())
    return scheme(mode, settings).alpha(inputs)


def fuse_topk(
    topk_ids: Sequence[torch.Tensor],
    topk_logprobs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    tailless: Sequence[bool] | None = None,
) -> FusedTargets:
    """Place K teachers' top-k lists side by side with their tails and weights.

    topk_ids[k]: [N, k_k] integer ids (distinct within a row); topk_logprobs[k]: [N, k_k] log-probs over the
    full vocab (float16/32; float64 stays float64, for references); weights: [N, K] alpha >= 0; valid:
    optional [N, K] bool (None: every teacher has a target everywhere). Weights are zeroed where a teacher has
    no target and renormalised per row; that teacher's ids, probs and tail are zeroed there (its ids and
    log-probs may hold anything, e.g. padding or NaN). tailless: per teacher, True where the list is the
    whole target (a sampled cache's count / N, which sums to 1 up to rounding): its tail is exactly 0, and
    slots with probability 0 (padding, possibly repeating an id) carry nothing.
    """
    assert len(topk_ids) == len(topk_logprobs) == weights.shape[1], "one id/log-prob pair per teacher"
    dtype = torch.promote_types(torch.float32, topk_logprobs[0].dtype) if topk_logprobs else torch.float32
    ids, probs, tails = [], [], []
    for k, (i, lp) in enumerate(zip(topk_ids, topk_logprobs, strict=True)):
        p = lp.to(dtype).exp()  # [N, k_k]
        i = i.long()
        tail = (1.0 - p.sum(dim=1)).clamp(0.0, 1.0)  # [N]; rounding can push the sum past 1
        if tailless is not None and tailless[k]:
            tail = torch.zeros_like(tail)
        if valid is not None:
            ok = valid[:, k : k + 1]
            p = torch.where(ok, p, torch.zeros_like(p))
            i = torch.where(ok, i, torch.zeros_like(i))
            tail = torch.where(ok[:, 0], tail, torch.zeros_like(tail))
        ids.append(i)
        probs.append(p)
        tails.append(tail)
    return FusedTargets(
        ids=torch.cat(ids, dim=1),  # [N, T] int64
        probs=torch.cat(probs, dim=1),  # [N, T]
        tail=torch.stack(tails, dim=1),  # [N, K]
        weights=renormalise(weights.to(torch.promote_types(torch.float32, weights.dtype)), valid),  # [N, K]
        sizes=tuple(i.shape[1] for i in topk_ids),
    )


def fused_top1(fused: FusedTargets) -> torch.Tensor:
    """[N] int64: the id with the largest known mixture mass sum_{k: y in S_k} alpha_k p_k(y).

    A teacher's mass on ids outside its own top-k is unknown, so this is the argmax of a lower bound on the
    mixture; with top-k = vocab it is the mixture's argmax. Positions without a target give the first id.
    """
    w = fused.weights.to(fused.probs.dtype).index_select(1, fused.column_teacher()) * fused.probs  # [N, T]
    sorted_ids, order = fused.ids.sort(dim=1)
    sorted_w = w.gather(1, order)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # [N, T] slot of each entry among the distinct ids of its row
    mass = torch.zeros_like(sorted_w).scatter_add_(1, slot, sorted_w)  # [N, T], unused slots 0
    distinct = torch.zeros_like(sorted_ids).scatter_(1, slot, sorted_ids)
    return distinct.gather(1, mass.argmax(dim=1, keepdim=True)).squeeze(1)
