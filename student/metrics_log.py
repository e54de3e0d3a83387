"""metrics.jsonl: one JSON object per logged training step (`"split": "train"`) or evaluation (`"eval"`).

Only rank 0 writes. A resumed run first drops the lines logged after its checkpoint (they are logged
again, identically); a torn last line (the process was killed mid-write) is dropped with a warning and cut
from the file; a damaged line before the last is a StorageError.
"""

from __future__ import annotations

import json
import logging
import os

from common.sidefile import read_side_bytes
from storage.errors import StorageError
from student.rundir import METRICS_FILE, writing

log = logging.getLogger("student")

MAX_METRICS_BYTES = 1 << 30
"""Largest metrics.jsonl read (1 GiB: millions of logged steps); like every side file (common/sidefile.py)
it must be a regular file."""


class MetricsWriter:
    """Appends records to RUN_DIR/metrics.jsonl (a no-op on ranks other than 0)."""

    def __init__(self, run_dir: str, *, rank: int = 0) -> None:
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.rank = rank

    def start(self, *, resumed_at: int | None) -> None:
        """A fresh run (None) starts an empty log; a run resumed at step S keeps the records up to S."""
        if self.rank != 0:
            return
        if resumed_at is None:
            with writing(self.path):
                open(self.path, "w").close()
        else:
            truncate_metrics(self.path, resumed_at)

    def write(self, record: dict) -> None:
        """Append one record (strict JSON: no NaN or infinity)."""
        if self.rank == 0:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")

    def last(self) -> dict:
        """The last record ({} when there is none, and on ranks other than 0)."""
        if self.rank != 0:
            return {}
        records = read_metrics(self.path)
        return records[-1] if records else {}


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl records; a torn last line (killed mid-write) is dropped with a warning and cut from the
    file; a damaged line before the last is a StorageError."""
    if not os.path.exists(path):
        return []
    lines = read_side_bytes(path, error=StorageError, max_bytes=MAX_METRICS_BYTES).split(b"\n")
    records, good_bytes = [], 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            good_bytes += len(raw) + 1
            continue
        try:
            records.append(json.loads(raw))
        except ValueError:
            if any(x.strip() for x in lines[i + 1 :]):
                raise StorageError(f"{path}:{i + 1}: not valid JSON (only a torn last line is repaired)") from None
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(raw))
            with writing(path), open(path, "r+b") as f:
                f.truncate(good_bytes)
            break
        good_bytes += len(raw) + 1
    return records


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines logged after `step` (the checkpoint a run resumes from; they will be logged again)."""
    if not os.path.exists(path):
        return
    keep = [rec for rec in read_metrics(path) if rec["step"] <= step]
    with writing(path), open(path, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in keep)
