"""`DistillBatch`: one micro-batch of stage two, as `DistillDataset` yields it and the trainer consumes it.

B sequences of L tokens from K joined teachers; the fused targets are flattened over N = B * L positions.
The batch crosses a process boundary (DataLoader workers pickle it) and may be pinned (`pin_memory`), so it
holds tensors and plain values only.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

from common.errors import UserError
from storage.errors import MismatchError
from student.fusion import FusedTargets


@dataclass(kw_only=True)
class DistillBatch:
    """One fused micro-batch."""

    seq_ids: torch.Tensor
    """[B] int64 sequence ids (the first teacher's; every teacher holds the same)."""
    input_ids: torch.Tensor
    """[B, L] int64 tokens."""
    fused: FusedTargets
    """The K teachers' sparse targets side by side, N = B * L positions."""
    pooled: list[torch.Tensor | None]
    """Per teacher, [B, d_k] float32 pooled hidden states of the layer the feature loss aligns to, or None."""
    mismatch: int | None = None
    """Seq id of the first sequence whose input_ids (or loss masks) differ between teachers (None: they all
    agree). The dataset records it rather than raising in a DataLoader worker, which would lose the error's
    type."""
    observed_counts: torch.Tensor | None = None
    """[K, 3] int64 per teacher: positions whose log p(o) (read by the observed-token weightings) was exact,
    listed or bounded (student/targets.py `OBSERVED_SOURCES`); None when the weighting does not read it."""
    loss_mask: torch.Tensor | None = None
    """[B, L] bool, caches of conversations only: the positions the losses use (the next token belongs to an
    assistant reply); None: every position (text caches)."""
    mismatch_field: str = "input_ids"
    """The column `mismatch` refers to (`input_ids` or `loss_mask`)."""

    def check(self) -> None:
        """MismatchError naming the sequence when the teachers disagree on this batch's tokens or masks."""
        if self.mismatch is not None:
            sid, name = self.mismatch, self.mismatch_field
            raise MismatchError(f"teachers differ in {name!r} at seq id {sid}", name, (sid, sid))

    @property
    def shape(self) -> tuple[int, int]:
        """(B, L)."""
        b, seq_len = self.input_ids.shape
        return int(b), int(seq_len)

    def to(self, device: torch.device | str) -> DistillBatch:
        """The tensors on `device` (non-blocking from pinned memory)."""
        return DistillBatch(seq_ids=self.seq_ids, input_ids=self.input_ids.to(device, non_blocking=True),
                            fused=self.fused.to(device),
                            pooled=[None if p is None else p.to(device, non_blocking=True) for p in self.pooled],
                            mismatch=self.mismatch, mismatch_field=self.mismatch_field,
                            loss_mask=None if self.loss_mask is None else self.loss_mask.to(device, non_blocking=True),
                            observed_counts=self.observed_counts)

    def pin_memory(self) -> DistillBatch:
        """Page-locked copies (called by a DataLoader with `pin_memory=True`)."""
        f = self.fused
        fused = FusedTargets(ids=f.ids.pin_memory(), probs=f.probs.pin_memory(), tail=f.tail.pin_memory(),
                             weights=f.weights.pin_memory(), sizes=f.sizes)
        return DistillBatch(seq_ids=self.seq_ids.pin_memory(), input_ids=self.input_ids.pin_memory(), fused=fused,
                            pooled=[None if p is None else p.pin_memory() for p in self.pooled],
                            mismatch=self.mismatch, mismatch_field=self.mismatch_field,
                            loss_mask=None if self.loss_mask is None else self.loss_mask.pin_memory(),
                            observed_counts=self.observed_counts)


@dataclass
class FailedBatch:
    """A micro-batch a DataLoader worker could not build because of the user's data (a damaged shard).

    The error travels to the training process as a value and `check()` raises it there, as the trainer checks
    every batch before using it: raised inside the worker, torch would re-raise it with the worker's whole
    traceback in its message, so the command's one `error:` line would become many."""

    error: UserError
    """The worker's error (its type kept when it survives pickling, else a plain UserError with its message)."""

    @classmethod
    def of(cls, error: UserError) -> FailedBatch:
        """The batch carrying `error` across the worker's pickling: an error whose constructor takes more than
        its message (MismatchError) cannot be rebuilt by unpickling and travels as a UserError instead."""
        try:
            pickle.loads(pickle.dumps(error))
        except (pickle.PickleError, TypeError, AttributeError):  # what a failed round trip raises
            error = UserError(str(error))
        return cls(error=error)

    def check(self) -> None:
        """Raise the worker's error."""
        raise self.error

    def pin_memory(self) -> FailedBatch:
        """Nothing to pin (the DataLoader's pinning thread calls this)."""
        return self
