"""`DistillLoss`: the method's objective, composed from the pure terms of student/loss/terms.py.

    L = lambda * sum_k alpha_k KD_k + (1 - lambda) * CE + gamma * sum_k beta_k ||W_k h_S - h_Tk||^2 / d_k

KD_k is teacher k's sparse KL (`sparse_kl`; `dkd_loss` with `--loss dkd`), CE the next-token cross-entropy,
the last term the pooled-feature alignment (`feature_loss`). The composition holds no parameters: the
projections W_k live in the trained module (the trainer's `DistillModule`) and are passed in. Two ways to
get (CE, KD):

- `logit_terms(logits, ...)` from the student's logits [B, L, V];
- `chunked_terms(hidden, weight, ...)` from its final hidden states and output head, in chunks of positions
  (student/loss/chunked.py; `kd` only), so the [B·L, V] logits never exist. The trainer calls it inside the
  module's forward so DDP sees every use of the parameters.

DKD is a training loss only: evaluation (`train=False`) always reports the sparse KL, so held-out KL is
comparable between `kd` and `dkd` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from student.config import LossConfig
from student.fusion import FusedTargets
from student.loss.terms import dkd_loss, feature_loss, next_token_ce, next_token_labels, sparse_kl


@dataclass(kw_only=True)
class LossTerms:
    """The objective's terms for one micro-batch (0-dim float32 tensors unless noted)."""

    loss: torch.Tensor
    """The total L (what is backpropagated)."""
    kd: torch.Tensor
    """sum_k alpha_k KD_k (or DKD_k) times tau^2, averaged over positions with a target."""
    ce: torch.Tensor
    """Next-token cross-entropy over positions 0..L-2 (those of the loss mask, for conversations)."""
    feat: torch.Tensor
    """sum_k beta_k ||W_k h_S - h_Tk||^2 / d_k (0 when the feature term is off)."""
    alpha: torch.Tensor
    """[K] mean teacher weight over the batch's positions (detached)."""

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) in field order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


class DistillLoss:
    """The weighted sum of the KD, CE and feature terms (pure: no parameters, no state)."""

    def __init__(self, *, kind: str = "kd", lambda_kd: float = 0.5, gamma_feat: float = 0.0,
                 temperature: float = 1.0, betas: Sequence[float] = (), dkd_alpha: float = 1.0,
                 dkd_beta: float = 8.0, chunk_size: int | None = None) -> None:
        self.kind, self.lambda_kd, self.gamma_feat = kind, lambda_kd, gamma_feat
        self.temperature, self.betas = temperature, list(betas)
        self.dkd_alpha, self.dkd_beta, self.chunk_size = dkd_alpha, dkd_beta, chunk_size

    @classmethod
    def from_config(cls, lc: LossConfig, *, temperature: float, num_teachers: int) -> DistillLoss:
        """The loss of a `LossConfig` at the caches' temperature (beta_k = 1 unless `feat_weights`)."""
        betas = list(lc.feat_weights) if lc.feat_weights is not None else [1.0] * num_teachers
        return cls(kind=lc.loss, lambda_kd=lc.lambda_kd, gamma_feat=lc.gamma_feat, temperature=temperature,
                   betas=betas, dkd_alpha=lc.dkd_alpha, dkd_beta=lc.dkd_beta, chunk_size=lc.chunk_size)

    @property
    def chunked(self) -> bool:
        """True when (CE, KD) come from `chunked_terms`."""
        return self.chunk_size is not None

    def logit_terms(self, logits: torch.Tensor, input_ids: torch.Tensor, fused: FusedTargets, *,
                    train: bool, loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, KD) from the student's logits [B, L, V] and tokens [B, L]; `fused` holds N = B * L positions.
        loss_mask [B, L] bool (conversations): CE averages over the positions it marks (KD already does: the
        loader gave no target elsewhere).

        KD carries no gradient when lambda = 0 or outside training (it is still reported)."""
        flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
        ce = next_token_ce(logits, input_ids, loss_mask)
        with torch.enable_grad() if self.lambda_kd > 0 and train else torch.no_grad():
            if self.kind == "dkd" and train:
                labels = next_token_labels(input_ids, loss_mask).reshape(-1)  # [N]
                kd = dkd_loss(flat, fused, labels, alpha=self.dkd_alpha, beta=self.dkd_beta,
                              temperature=self.temperature)
            else:
                kd = sparse_kl(flat, fused, temperature=self.temperature)
        return ce, kd

    def chunked_terms(self, hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                      fused: FusedTargets, loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, KD) from the final hidden states [B, L, H] and the output head's weight [V, H], computed
        `chunk_size` positions at a time (the same values as `logit_terms` on hidden @ weight.T). KD is always
        in the graph here (times 0 when lambda = 0)."""
        from student.loss.chunked import chunked_ce_kd

        assert self.chunk_size is not None, "chunked_terms needs a chunk_size"
        return chunked_ce_kd(hidden, weight, input_ids, fused, temperature=self.temperature,
                             chunk_size=self.chunk_size, loss_mask=loss_mask)

    def feature(self, student_pooled: torch.Tensor, teacher_pooled: Sequence[torch.Tensor | None],
                projections: Sequence[torch.nn.Module | None]) -> torch.Tensor:
        """sum_k beta_k mean_b ||W_k h_S - h_Tk||^2 / d_k: student_pooled [B, d_S], teacher_pooled[k] [B, d_k]
        or None, projections[k] the module W_k or None (no feature term for teacher k)."""
        return feature_loss(student_pooled, teacher_pooled, projections, self.betas)

    def combine(self, ce: torch.Tensor, kd: torch.Tensor, feat: torch.Tensor, fused: FusedTargets) -> LossTerms:
        """The total lambda * KD + (1 - lambda) * CE + gamma * feat, with its terms."""
        loss = self.lambda_kd * kd + (1 - self.lambda_kd) * ce + self.gamma_feat * feat
        return LossTerms(loss=loss, kd=kd, ce=ce, feat=feat, alpha=fused.weights.mean(dim=0).detach())
