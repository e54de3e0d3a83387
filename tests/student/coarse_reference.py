"""Independent float64 references for the KD losses, built from dense distributions.

Nothing here uses student/fusion.py or student/loss/terms.py: each teacher's coarse view is made by hand from its
dense distribution with an explicit partition matrix (one row per top-k id, one row for everything else), and
the student's view with the same matrix from its dense softmax.
"""

from __future__ import annotations

import torch


def partition(top_ids: list[int], vocab: int) -> torch.Tensor:
    """[C, V] float64 0/1 matrix: one row per id in `top_ids`, then one row for the rest of the vocab."""
    a = torch.zeros(len(top_ids) + 1, vocab, dtype=torch.float64)
    for c, y in enumerate(top_ids):
        a[c, y] = 1.0
    a[-1] = 1.0 - a[:-1].sum(0)
    return a


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of two explicit distributions (0 log 0 = 0)."""
    safe_p = torch.where(p > 0, p, torch.ones_like(p))
    safe_q = torch.where(p > 0, q, torch.ones_like(q))  # an empty rest-of-vocab bucket has p = q = 0
    return torch.where(p > 0, p * (safe_p.log() - safe_q.log()), torch.zeros_like(p)).sum()


def coarse_views(dense_p: torch.Tensor, q: torch.Tensor, top_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher's coarse view, student's coarse view) on the partition of `top_ids`: dense_p, q [V] probs."""
    a = partition(top_ids, dense_p.numel())
    return a @ dense_p, a @ q


def per_teacher_kl(teachers_p: list[torch.Tensor], top_ids: list[torch.Tensor], alpha: torch.Tensor,
                   student_logits: torch.Tensor, temperature: float = 1.0,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """[N] tau^2 sum_k alpha_k KL(coarse_k P_Tk || coarse_k P_S) by loops over positions and teachers.

    teachers_p[k] [N, V] float64 probabilities; top_ids[k] [N, k_k]; alpha [N, K] (renormalised here over
    the valid teachers); student_logits [N, V] float64 (differentiable).
    """
    q_all = torch.softmax(student_logits / temperature, dim=-1)
    rows = []
    for n in range(student_logits.shape[0]):
        ok = [k for k in range(len(teachers_p)) if valid is None or bool(valid[n, k])]
        w = torch.tensor([float(alpha[n, k]) for k in ok], dtype=torch.float64)
        if not ok or w.sum() == 0:
            rows.append(student_logits.new_zeros(()))
            continue
        w = w / w.sum()
        total = student_logits.new_zeros(())
        for wk, k in zip(w, ok, strict=True):
            p_c, q_c = coarse_views(teachers_p[k][n], q_all[n], top_ids[k][n].tolist())
            total = total + wk * kl(p_c, q_c)
        rows.append(total)
    return torch.stack(rows) * temperature**2


def dkd_direct(p: torch.Tensor, q: torch.Tensor, t: int, alpha: float, beta: float) -> torch.Tensor:
    """DKD's formula on explicit class distributions (float64): p, q [C], target class index t."""
    b_p = torch.stack([p[t], 1 - p[t]])
    b_q = torch.stack([q[t], 1 - q[t]])
    keep = [c for c in range(p.numel()) if c != t]
    return alpha * kl(b_p, b_q) + beta * kl(p[keep] / p[keep].sum(), q[keep] / q[keep].sum())


def per_teacher_dkd(teachers_p: list[torch.Tensor], top_ids: list[torch.Tensor], alpha: torch.Tensor,
                    student_logits: torch.Tensor, labels: torch.Tensor, *, a: float, b: float,
                    temperature: float = 1.0) -> list[torch.Tensor]:
    """Per labelled position (with some alpha > 0) tau^2 sum_k alpha_k DKD(coarse_k P_Tk || coarse_k P_S), the target class being the
    label's row of teacher k's partition (its own top-k id, or the rest-of-vocab row)."""
    q_all = torch.softmax(student_logits / temperature, dim=-1)
    out = []
    for n in range(student_logits.shape[0]):
        y = int(labels[n])
        if y < 0 or float(alpha[n].sum()) == 0:
            continue
        total = student_logits.new_zeros(())
        w = alpha[n].double() / alpha[n].double().sum()
        for k in range(len(teachers_p)):
            ids = top_ids[k][n].tolist()
            p_c, q_c = coarse_views(teachers_p[k][n], q_all[n], ids)
            t = ids.index(y) if y in ids else len(ids)
            total = total + w[k] * dkd_direct(p_c, q_c, t, a, b)
        out.append(total * temperature**2)
    return out
