"""What a precompute run read, packed and computed: kept per slice in its manifest's notes, summed on merge.

A slice manifest's notes hold its own statistics under `packing`, `partitions` and `this_run`. A merged
manifest holds the whole run's under the same keys (counts and seconds summed over the slices, the
partitions read joined, `truncated_by_max_tokens` true when any slice's stream was cut) and every slice's
own under `slices` (`{"<slice index>": {"packing": ..., "partitions": ..., "this_run": ...}}`), so nothing
a slice measured is lost and no slice's numbers pass for the run's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STAT_KEYS = ("packing", "partitions", "this_run")
"""The notes that are per-slice statistics (everything else in the notes is the same for every slice)."""
SLICES_KEY = "slices"


@dataclass(kw_only=True)
class SliceStats:
    """One slice's statistics, as they appear in its manifest's notes."""

    packing: dict[str, Any]
    """`PackStats.to_dict()` summed over the slice's partitions: documents, tokens, windows,
    dropped_tokens (ints), truncated_by_max_tokens (bool)."""
    partitions: dict[str, Any]
    """`total` (partitions of the corpus), `read` (indices this slice read), `windows` ({str(index): count})."""
    this_run: dict[str, Any]
    """Counts (sequences, shards, skipped_completed, corpus_bytes_read, corpus_documents_read) and seconds
    (teacher_seconds, writer_wait_s, loop_seconds) of this invocation."""

    def to_notes(self) -> dict[str, Any]:
        return {"packing": copy.deepcopy(self.packing), "partitions": copy.deepcopy(self.partitions),
                "this_run": copy.deepcopy(self.this_run)}

    @classmethod
    def from_notes(cls, notes: Mapping[str, Any]) -> SliceStats | None:
        """The statistics in a slice manifest's notes, or None when it has none (written before they were
        recorded, or by code that writes shards without precompute)."""
        if not all(isinstance(notes.get(k), dict) for k in STAT_KEYS):
            return None
        return cls(**{k: copy.deepcopy(notes[k]) for k in STAT_KEYS})


def _sum(values: Sequence[Any]) -> Any:
    """Sum of numbers (floats rounded to ms like the slices'), `any` of booleans."""
    if all(isinstance(v, bool) for v in values):
        return any(values)
    total = sum(values)
    return round(total, 3) if isinstance(total, float) else total


def _sum_keys(dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: _sum([d[k] for d in dicts if k in d]) for k in keys}


def merge_stats(stats: Sequence[SliceStats]) -> SliceStats:
    """The whole run's statistics from its slices' (each partition is read by exactly one slice)."""
    windows: dict[str, Any] = {}
    for s in stats:
        windows.update(s.partitions.get("windows", {}))
    partitions = {"total": stats[0].partitions.get("total"),  # num_partitions: equal in every slice (compared)
                  "read": sorted(p for s in stats for p in s.partitions.get("read", [])),
                  "windows": dict(sorted(windows.items(), key=lambda kv: int(kv[0])))}
    return SliceStats(packing=_sum_keys([s.packing for s in stats]), partitions=partitions,
                      this_run=_sum_keys([s.this_run for s in stats]))


def merged_notes(notes: Sequence[Mapping[str, Any]], slice_indices: Sequence[int]) -> dict[str, Any]:
    """Notes of the merged manifest: the shared notes (slice 0's, without its statistics), the whole run's
    statistics and each slice's own under `slices`. Slices without statistics leave the run's out."""
    first = {k: copy.deepcopy(v) for k, v in notes[0].items() if k not in (*STAT_KEYS, SLICES_KEY)}
    per_slice = [SliceStats.from_notes(n) for n in notes]
    if all(s is not None for s in per_slice):
        first.update(merge_stats(per_slice).to_notes())  # type: ignore[arg-type]
        first[SLICES_KEY] = {str(i): s.to_notes() for i, s in sorted(zip(slice_indices, per_slice, strict=True),
                                                                 key=lambda pair: pair[0])}
    return first
