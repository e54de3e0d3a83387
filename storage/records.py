"""Typed records that flow between the stages.

Shapes use B = sequences in the batch, L = seq_len, k = top-k (or N = draws of a sampled cache), d = hidden
size of a pooled layer.
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
    topk_ids: np.ndarray | None
    """[B, L, k] int32 top-k next-token ids, sorted by descending log-prob (None in a sampled record)."""
    topk_logprobs: np.ndarray | None
    """[B, L, k] float32 (or float16) log-probs normalised over the full vocab at temperature tau (None in a
    sampled record)."""
    entropy: np.ndarray | None
    """[B, L] float32 exact entropy (nats) of the full next-token distribution; None if the backend cannot give it."""
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    """layer index -> [B, d] float32 mean-pooled hidden state of that layer."""
    sample_ids: np.ndarray | None = None
    """[B, L, N] int32 distinct ids among N draws from the teacher's softmax at tau, by descending count
    (ties: ascending id); slots past the distinct ones repeat slot 0's id with count 0. None in a top-k record."""
    sample_counts: np.ndarray | None = None
    """[B, L, N] uint16 draws of each `sample_ids` slot (0 at padding); each row sums to N, and count / N is the
    unbiased estimate of the teacher's probability. None in a top-k record."""

    target_mask: np.ndarray | None = None
    """[B, L] uint8, aligned caches only: 1 where the position has a target (the teacher has a token boundary
    there), 0 where it has none (KD and feature terms skip it; its top-k/entropy hold no information)."""
    observed_logprob: np.ndarray | None = None
    """[B, L] float32: the teacher's exact log-prob of the observed next token input_ids[t + 1] at the cache's
    temperature, NaN where unavailable (always at t = L - 1); aligned caches, and plain caches of backends that
    give it (manifest `observed_logprob`). None otherwise."""
    loss_mask: np.ndarray | None = None
    """[B, L] uint8, conversation caches only: 1 where the next token belongs to an assistant reply (the
    positions the losses use); None for text (every position counts)."""
    doc_start: np.ndarray | None = None
    """[B, L] uint8, conversation caches only: 1 where a conversation begins."""
    stats: dict[str, np.ndarray] | None = None
    """Aligned caches only: name -> [B] float64 per-sequence sums (positions, aligned, observed, mass_whole,
    ...); their totals over a shard go into its manifest entry."""

    _ARRAYS = ("seq_ids", "input_ids", "topk_ids", "topk_logprobs", "entropy", "sample_ids", "sample_counts",
               "target_mask", "observed_logprob", "loss_mask", "doc_start")

    @property
    def sampled(self) -> bool:
        """True for a sampled record (sample_ids / sample_counts), False for a top-k one."""
        return self.sample_ids is not None

    def __len__(self) -> int:
        return int(self.seq_ids.shape[0])

    def validate(self) -> None:
        """Check shapes and dtypes agree (internal invariant: raises AssertionError)."""
        b = len(self)
        assert self.seq_ids.dtype == np.int64 and self.seq_ids.shape == (b,)
        assert self.input_ids.dtype == np.int32 and self.input_ids.ndim == 2 and self.input_ids.shape[0] == b
        seq_len = self.input_ids.shape[1]
        if self.sampled:
            assert self.topk_ids is None and self.topk_logprobs is None and self.sample_counts is not None
            assert self.sample_ids.dtype == np.int32 and self.sample_ids.shape[:2] == (b, seq_len)
            assert self.sample_counts.dtype == np.uint16 and self.sample_counts.shape == self.sample_ids.shape
        else:
            assert self.topk_ids.dtype == np.int32 and self.topk_ids.shape[:2] == (b, seq_len)
            assert self.topk_logprobs.shape == self.topk_ids.shape
            assert self.topk_logprobs.dtype in (np.float16, np.float32)
        if self.entropy is not None:
            assert self.entropy.dtype == np.float32 and self.entropy.shape == (b, seq_len)
        for layer, arr in self.pooled.items():
            assert arr.ndim == 2 and arr.shape[0] == b, f"pooled_{layer} has shape {arr.shape}"
        if self.target_mask is not None:
            assert self.target_mask.shape == (b, seq_len) and self.observed_logprob is not None
        if self.observed_logprob is not None:
            assert self.observed_logprob.dtype == np.float32 and self.observed_logprob.shape == (b, seq_len)

    def slice(self, start: int, stop: int) -> TeacherTargets:
        """Rows [start, stop) as a new record (views, no copy)."""
        arrays = {name: None if getattr(self, name) is None else getattr(self, name)[start:stop]
                  for name in self._ARRAYS}
        return TeacherTargets(**arrays, pooled={layer: arr[start:stop] for layer, arr in self.pooled.items()},
                              stats=None if self.stats is None
                              else {key: v[start:stop] for key, v in self.stats.items()})

    @staticmethod
    def concat(parts: list[TeacherTargets]) -> TeacherTargets:
        """Concatenate records along the sequence axis."""
        first = parts[0]
        arrays = {name: None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in parts])
                  for name in TeacherTargets._ARRAYS}
        return TeacherTargets(**arrays, pooled={layer: np.concatenate([p.pooled[layer] for p in parts])
                                                for layer in first.pooled},
                              stats=None if first.stats is None
                              else {key: np.concatenate([p.stats[key] for p in parts]) for key in first.stats})
