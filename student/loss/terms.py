"""Distillation losses: pure functions in float32, masked, averaged over valid positions.

Shapes: N = positions (flattened [B * L]), V = vocab, K = teachers, T = sum of the teachers' top-k widths.

KD against the per-teacher target of student/fusion.py: teacher k's coarse view (its top-k S_k plus its own
tail bucket) is compared with the student's view on the same partition (q at S_k, and 1 - sum_{S_k} q):

    KL_k = sum_{y in S_k} p_k(y) log(p_k(y) / q(y)) + tail_k log(tail_k / (1 - sum_{S_k} q))
    KD   = tau^2 * sum_k alpha_k KL_k

KD = sum_k alpha_k CE_k minus the matching target entropy sum_k alpha_k H_k^coarse, so its gradient is that
of the cross-entropy to the mixture, which it equals (up to that constant) with top-k = vocab; there the value
is sum_k alpha_k KL(P_Tk || P_S) = KL(sum_k alpha_k P_Tk || P_S) + (the weighted Jensen-Shannon divergence of
the teachers, a constant in the student). It is 0, with zero gradient, when the student equals every teacher.
The student's log-probs are its log-softmax gathered at the teachers' ids (never a dense teacher tensor).

dtype: the arithmetic runs in float32, or in float64 when the logits are float64 (references and tests).

Temperature: the cached log-probs are already normalised at the precompute temperature tau recorded in the
manifests, and a top-k cache cannot be re-tempered exactly (the tail's shape is unknown). So training uses
that same tau: the student distribution is softmax(z / tau) and the KL is scaled by tau^2 (Hinton et al.),
which keeps gradient magnitudes comparable across temperatures. The trainer refuses a different tau.

Position alignment: the logits and the teacher target at position t both describe token t + 1 given tokens
<= t. Every position has a teacher target (the last one predicts the token after the window), so the KD
term uses all L positions; the CE and DKD terms need the true next token and use positions 0..L-2.
Positions where no teacher has a target (`FusedTargets.has_target`) are left out of the KD averages.

Conversations (a cache with a `loss_mask` column): only the positions whose next token belongs to an
assistant reply count. The loader folds the mask into the fused targets (no teacher has a target elsewhere,
so KD averages over the masked positions) and CE takes it as `loss_mask` (its labels elsewhere are
IGNORE_INDEX), so both are means over the masked positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from student.fusion import FusedTargets

IGNORE_INDEX = -100


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, clamped to log(tiny) where the difference rounds to <= 0."""
    tiny = torch.finfo(log_x.dtype).tiny
    return torch.log((-torch.expm1(log_x.clamp_max(0.0))).clamp_min(tiny))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.float32, logits.dtype)  # bf16/fp16 -> float32; float64 stays


def student_coarse_logprobs(
    student_logits: torch.Tensor, fused: FusedTargets, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's coarse view for every teacher: log q at the teachers' ids and at their tail buckets.

    student_logits [N, V] (any float dtype) -> (log_q [N, T], log_q_tail [N, K]) float32 (float64 for float64
    logits), log_q_tail[:, k] = log(1 - sum_{S_k} q) computed as log1p(-exp(logsumexp(log_q over S_k))).
    """
    z = student_logits.to(_compute_dtype(student_logits))
    if temperature != 1.0:
        z = z / temperature
    # log_softmax then gather, rather than z.gather - logsumexp(z): the same values (float32 rounding), but
    # log_softmax's fused forward and backward make the KD term about 2x cheaper on CPU (fewer [N, V] passes)
    log_q = torch.log_softmax(z, dim=-1).gather(1, fused.ids)  # [N, T]
    log_mass = torch.stack([torch.logsumexp(log_q[:, fused.columns(k)], dim=1)
                            for k in range(fused.num_teachers)], dim=1)  # [N, K]
    return log_q, _log1mexp(log_mass)


def teacher_kl(student_logits: torch.Tensor, fused: FusedTargets, *, temperature: float = 1.0) -> torch.Tensor:
    """[N, K] KL_k: teacher k's coarse view against the student's on the same partition (unweighted, no tau^2).

    Entries of teachers without a target are 0.
    """
    log_q, log_q_tail = student_coarse_logprobs(student_logits, fused, temperature)
    p, tail = fused.probs.to(log_q.dtype), fused.tail.to(log_q.dtype)
    per_col = torch.xlogy(p, p) - p * log_q  # [N, T]; p = 0 where a teacher has no target, log_q finite
    kl = torch.stack([per_col[:, fused.columns(k)].sum(dim=1) for k in range(fused.num_teachers)], dim=1)
    return kl + torch.xlogy(tail, tail) - tail * log_q_tail  # [N, K]


def sparse_kl(
    student_logits: torch.Tensor,
    fused: FusedTargets,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """tau^2 * sum_k alpha_k KL_k: each teacher's coarse view (own top-k + own tail) against the student's.

    student_logits [N, V]; mask [N] bool (None: all valid). With top-k = vocab it is
    sum_k alpha_k KL(P_Tk || P_S), whose gradient is that of the full-vocab KL to the mixture.
    reduction "mean" (over valid positions that have a target) or "none" ([N]; 0 where no target).
    """
    kl = teacher_kl(student_logits, fused, temperature=temperature)
    kl = (fused.weights.to(kl.dtype) * kl).sum(dim=1) * (temperature**2)  # [N]
    if reduction == "none":
        return kl
    return _masked_mean(kl, fused.has_target if mask is None else mask & fused.has_target)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of token t + 1 from the logits at t: logits [B, L, V], input_ids [B, L].

    Positions 0..L-2 (the last position has no label inside the window); labels equal to IGNORE_INDEX
    are skipped. loss_mask [B, L] bool (conversations): only the positions it marks count (the mean is over
    them); None: every position.
    """
    v = logits.shape[-1]
    labels = input_ids[:, 1:].reshape(-1).long()
    if loss_mask is not None:
        labels = torch.where(loss_mask[:, :-1].reshape(-1), labels, torch.full_like(labels, IGNORE_INDEX))
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(),
        labels,
        ignore_index=IGNORE_INDEX,
    )


def next_token_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] labels aligned with the positions: input_ids shifted left, IGNORE_INDEX at the last position
    (and where `loss_mask` [B, L] bool, if given, is False)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    if loss_mask is not None:
        labels = torch.where(loss_mask, labels, torch.full_like(labels, IGNORE_INDEX))
    return labels


def feature_loss(
    student_pooled: torch.Tensor,
    teacher_pooled: Sequence[torch.Tensor | None],
    projections: Sequence[torch.nn.Module | None],
    betas: Sequence[float],
) -> torch.Tensor:
    """sum_k beta_k * mean_b ||W_k h_S - h_Tk||^2 / d_k.

    student_pooled [B, d_S]; teacher_pooled[k] [B, d_k] or None (feature loss disabled for teacher k).
    The squared norm is divided by d_k so gamma does not depend on the teacher's width.
    """
    total = student_pooled.new_zeros((), dtype=torch.float32)
    for h_t, proj, beta in zip(teacher_pooled, projections, betas, strict=True):
        if h_t is None or proj is None or beta == 0.0:
            continue
        diff = proj(student_pooled.float()) - h_t.float()  # [B, d_k]
        total = total + beta * diff.pow(2).mean(dim=1).mean()
    return total


def dkd_loss(
    student_logits: torch.Tensor,
    fused: FusedTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., 2022) per teacher: tau^2 * sum_k alpha_k (a TCKD_k + b NCKD_k).

    DKD_k is DKD on teacher k's coarse view against the student's on the same partition: the classes are
    S_k plus teacher k's tail bucket; the target class is the label's slot in S_k, or the tail when the label
    is outside S_k. TCKD_k = KL([p_t, 1 - p_t] || [q_t, 1 - q_t]); NCKD_k = KL of the non-target classes,
    each renormalised. Each DKD_k is 0 with zero gradient when the student equals teacher k, so the sum is
    exact in the same sense as `sparse_kl`. DKD is not linear in the target, so with top-k = vocab this is
    sum_k alpha_k DKD(P_Tk || P_S), not DKD to the mixture. labels [N] int (IGNORE_INDEX: skipped); positions
    without a target are skipped too.
    """
    log_q, log_q_tail = student_coarse_logprobs(student_logits, fused, temperature)
    dt = log_q.dtype
    tiny = torch.finfo(dt).tiny
    hit_all = fused.ids == labels[:, None].long()  # [N, T]
    per_pos = torch.zeros(labels.shape[0], dtype=dt, device=log_q.device)
    for k in range(fused.num_teachers):
        cols = fused.columns(k)
        p = torch.cat([fused.probs[:, cols].to(dt), fused.tail[:, k : k + 1].to(dt)], dim=1)  # [N, k_k + 1]
        lq = torch.cat([log_q[:, cols], log_q_tail[:, k : k + 1]], dim=1)  # [N, k_k + 1] finite
        hit = torch.cat([hit_all[:, cols], ~hit_all[:, cols].any(dim=1, keepdim=True)], dim=1)
        p_t = (p * hit).sum(dim=1).clamp(0.0, 1.0)  # [N]; exactly one class hits
        log_q_t = torch.where(hit, lq, torch.zeros_like(lq)).sum(dim=1)
        log_1mq_t = _log1mexp(log_q_t)
        tckd = torch.xlogy(p_t, p_t) - p_t * log_q_t + torch.xlogy(1 - p_t, 1 - p_t) - (1 - p_t) * log_1mq_t
        p_hat = torch.where(hit, torch.zeros_like(p), p / (1 - p_t).clamp_min(tiny)[:, None])
        log_q_hat = lq - log_1mq_t[:, None]
        nckd = (torch.xlogy(p_hat, p_hat) - p_hat * log_q_hat).sum(dim=1)
        per_pos = per_pos + fused.weights[:, k].to(dt) * (alpha * tckd + beta * nckd)
    per_pos = per_pos * (temperature**2)
    return _masked_mean(per_pos, (labels != IGNORE_INDEX) & fused.has_target)
