"""Typed records that flow between the stages.

Shapes use B = sequences in the batch, L = seq_len, k = top-k, d = hidden size of a pooled layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TeacherTargets:
    """What stage one stores for a batch of packed sequences (one row per sequence).

    All arrays are numpy, C-contiguous, on the host.
    """

    seq_ids: np.ndarray
    """[B] int64 global sequence ids."""
    input_ids: np.ndarray
    """[B, L] int32 packed tokens."""
    topk_ids: np.ndarray
    """[B, L, k] int32 top-k next-token ids, sorted by descending log-prob."""
    topk_logprobs: np.ndarray
    """[B, L, k] float32 (or float16) log-probs normalised over the full vocab at temperature tau."""
    entropy: np.ndarray | None
    """[B, L] float32 exact entropy (nats) of the full next-token distribution; None if the backend cannot give it."""
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    """layer index -> [B, d] float32 mean-pooled hidden state of that layer."""

    def __len__(self) -> int:
        return int(self.seq_ids.shape[0])

    def validate(self) -> None:
        """Check shapes and dtypes agree (internal invariant: raises AssertionError)."""
        b = len(self)
        assert self.seq_ids.dtype == np.int64 and self.seq_ids.shape == (b,)
        assert self.input_ids.dtype == np.int32 and self.input_ids.ndim == 2 and self.input_ids.shape[0] == b
        seq_len = self.input_ids.shape[1]
        assert self.topk_ids.dtype == np.int32 and self.topk_ids.shape[:2] == (b, seq_len)
        assert self.topk_logprobs.shape == self.topk_ids.shape
        assert self.topk_logprobs.dtype in (np.float16, np.float32)
        if self.entropy is not None:
            assert self.entropy.dtype == np.float32 and self.entropy.shape == (b, seq_len)
        for layer, arr in self.pooled.items():
            assert arr.ndim == 2 and arr.shape[0] == b, f"pooled_{layer} has shape {arr.shape}"

    def slice(self, start: int, stop: int) -> TeacherTargets:
        """Rows [start, stop) as a new record (views, no copy)."""
        return TeacherTargets(
            seq_ids=self.seq_ids[start:stop],
            input_ids=self.input_ids[start:stop],
            topk_ids=self.topk_ids[start:stop],
            topk_logprobs=self.topk_logprobs[start:stop],
            entropy=None if self.entropy is None else self.entropy[start:stop],
            pooled={layer: arr[start:stop] for layer, arr in self.pooled.items()},
        )

    @staticmethod
    def concat(parts: list[TeacherTargets]) -> TeacherTargets:
        """Concatenate records along the sequence axis."""
        first = parts[0]
        return TeacherTargets(
            seq_ids=np.concatenate([p.seq_ids for p in parts]),
            input_ids=np.concatenate([p.input_ids for p in parts]),
            topk_ids=np.concatenate([p.topk_ids for p in parts]),
            topk_logprobs=np.concatenate([p.topk_logprobs for p in parts]),
            entropy=None if first.entropy is None else np.concatenate([p.entropy for p in parts]),
            pooled={layer: np.concatenate([p.pooled[layer] for p in parts]) for layer in first.pooled},
        )
