"""Stopping a run that diverged before anything non-finite is saved.

A non-finite loss or gradient norm stops training before the optimizer step (`check_step`); a checkpoint or
final model with a non-finite weight is never written (`check_weights`); a non-finite metrics record is
never logged (`check_metrics`). Each raises `DivergedError` on every rank (the checks that see one rank's
values agree through `Parallelism.any_rank`), a one-line `UserError` that says what to lower.
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import UserError
from common.params import non_finite
from student.parallel import Parallelism


class DivergedError(UserError):
    """Training produced a non-finite loss, gradient norm or weight; nothing non-finite was saved."""


def check_step(loss: torch.Tensor, grad_norm: torch.Tensor, *, parallel: Parallelism, step: int,
               last_checkpoint: Any) -> None:
    """DivergedError, before the optimizer step, when step `step`'s loss or gradient norm is NaN or inf on any
    rank. `last_checkpoint()` names the checkpoint to resume from (rank 0; called only then)."""
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the global norm as a DTensor
        grad_norm = grad_norm.full_tensor()
    values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
    if parallel.any_rank(not bool(torch.isfinite(values).all())):
        saved = last_checkpoint() if parallel.rank == 0 else None
        raise DivergedError(
            f"training diverged at step {step}: loss {float(values[0]):.4g}, gradient norm "
            f"{float(values[1]):.4g} (not finite); nothing was saved from this step"
            + (f" (last checkpoint: {saved})" if saved else "")
            + "; lower --lr or the loss weights")


def check_weights(state_dict: dict[str, Any], *, parallel: Parallelism, step: int) -> None:
    """DivergedError instead of saving a model or checkpoint with a NaN or inf weight (on any rank)."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if parallel.any_rank(bool(bad)):
        raise DivergedError(f"step {step}: the model holds non-finite weights"
                            + (f" ({bad[0]}{' and others' if len(bad) > 1 else ''})" if bad else "")
                            + "; nothing was saved; lower --lr or --weight-decay")


def check_metrics(record: dict[str, Any], *, step: int) -> None:
    """DivergedError when a metrics record holds a NaN or inf (throughput aside), e.g. a held-out loss of
    weights that went to inf in the last optimizer step."""
    bad = non_finite([v for k, v in record.items() if k != "tokens_per_s"])
    if bad is not None:
        raise DivergedError(f"step {step}: {record.get('split')} metrics are not finite ({bad}); nothing "
                            "was saved from this step; lower --lr or the loss weights")
