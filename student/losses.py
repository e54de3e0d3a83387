"""Distillation losses: pure functions in float32, masked, averaged over valid positions.

Shapes: N = positions (flattened [B * L]), V = vocab, M = union width of the fused target.

Temperature: the cached log-probs are already normalised at the precompute temperature tau recorded in the
manifests, and a top-k cache cannot be re-tempered exactly (the tail's shape is unknown). So training uses
that same tau: the student distribution is softmax(z / tau) and the KL is scaled by tau^2 (Hinton et al.),
which keeps gradient magnitudes comparable across temperatures. The trainer refuses a different tau.

Position alignment: the logits and the teacher target at position t both describe token t + 1 given tokens
<= t. Every position has a teacher target (the last one predicts the token after the window), so the KD
term uses all L positions; the CE and DKD terms need the true next token and use positions 0..L-2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from student.fusion import FusedTargets

IGNORE_INDEX = -100
_TINY = torch.finfo(torch.float32).tiny


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, clamped to log(tiny) where the difference rounds to <= 0."""
    return torch.log((-torch.expm1(log_x.clamp_max(0.0))).clamp_min(_TINY))


def student_coarse_logprobs(
    student_logits: torch.Tensor, fused: FusedTargets, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log q at the union ids and at the tail bucket.

    student_logits [N, V] (any float dtype) -> (log_q [N, M] float32, finite also at padding slots;
    log_q_tail [N] float32 = log(1 - sum_U q), computed as log1p(-exp(logsumexp(log_q_U))).
    """
    z = student_logits.float()
    if temperature != 1.0:
        z = z / temperature
    # log_softmax then gather, rather than z.gather - logsumexp(z): the same values (float32 rounding), but
    # log_softmax's fused forward and backward make the KD term about 2x cheaper on CPU (fewer [N, V] passes)
    log_q = torch.log_softmax(z, dim=-1).gather(1, fused.ids)  # [N, M]
    log_mass_u = torch.logsumexp(log_q.masked_fill(~fused.mask, float("-inf")), dim=1)  # [N]
    return log_q, _log1mexp(log_mass_u)


def sparse_kl(
    student_logits: torch.Tensor,
    fused: FusedTargets,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """tau^2 * KL(P_T || P_S) over the coarse-grained support U ∪ {tail}.

    student_logits [N, V]; mask [N] bool (None: all valid). Equals the full-vocab KL when every teacher's
    top-k covers the vocab. reduction "mean" (over valid positions) or "none" ([N], unscaled by mask).
    """
    log_q, log_q_tail = student_coarse_logprobs(student_logits, fused, temperature)
    p, p_tail = fused.probs, fused.tail
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1)  # p = 0 at padding, log_q finite there
    kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail  # [N]
    kl = kl * (temperature**2)
    if reduction == "none":
        return kl
    return _masked_mean(kl, mask)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of token t + 1 from the logits at t: logits [B, L, V], input_ids [B, L].

    Positions 0..L-2 (the last position has no label inside the window); labels equal to IGNORE_INDEX
    are skipped.
    """
    v = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(),
        input_ids[:, 1:].reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
    )


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] labels aligned with the positions: input_ids shifted left, IGNORE_INDEX at the last position."""
    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
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
    """Decoupled KD (Zhao et al., 2022) on the coarse-grained fused target: tau^2 (alpha TCKD + beta NCKD).

    Classes are the union slots plus the tail bucket; the target class is the label's slot, or the tail
    when the label is outside U. TCKD = KL([p_t, 1 - p_t] || [q_t, 1 - q_t]); NCKD = KL of the non-target
    classes, each renormalised. labels [N] int (IGNORE_INDEX: skipped).
    """
    log_q, log_q_tail = student_coarse_logprobs(student_logits, fused, temperature)
    n, m = fused.ids.shape
    p_c = torch.cat([fused.probs, fused.tail[:, None]], dim=1)  # [N, M + 1]
    log_q_c = torch.cat([log_q, log_q_tail[:, None]], dim=1)  # [N, M + 1] finite
    valid_c = torch.cat([fused.mask, torch.ones((n, 1), dtype=torch.bool, device=p_c.device)], dim=1)

    hit = (fused.ids == labels[:, None].long()) & fused.mask  # [N, M]
    target = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), torch.full_like(labels, m).long())
    p_t = p_c.gather(1, target[:, None]).squeeze(1).clamp(0.0, 1.0)  # [N]
    log_q_t = log_q_c.gather(1, target[:, None]).squeeze(1)
    log_1mq_t = _log1mexp(log_q_t)
    tckd = torch.xlogy(p_t, p_t) - p_t * log_q_t + torch.xlogy(1 - p_t, 1 - p_t) - (1 - p_t) * log_1mq_t

    non_target = valid_c.clone()
    non_target.scatter_(1, target[:, None], False)
    p_hat = torch.where(non_target, p_c / (1 - p_t).clamp_min(_TINY)[:, None], torch.zeros_like(p_c))
    log_q_hat = log_q_c - log_1mq_t[:, None]
    nckd = (torch.xlogy(p_hat, p_hat) - p_hat * log_q_hat).sum(dim=1)

    per_pos = (alpha * tckd + beta * nckd) * (temperature**2)
    return _masked_mean(per_pos, labels != IGNORE_INDEX)
