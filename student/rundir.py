"""The run directory of `train-student`: its layout, its creation, and one error for failed writes.

    config.json                                the TrainConfig (`train-student --config` replays it)
    metrics.jsonl                              student/metrics.py
    checkpoints/step-NNNNNNN/{state.pt,checkpoint.json}   student/checkpoint.py
    final/                                     save_pretrained student (+ tokenizer)
"""

from __future__ import annotations

import errno
import os

from common.errors import ConfigError
from storage.errors import StorageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"


class writing:  # noqa: N801 (used as `with writing(path):`)
    """Context manager turning an OSError while writing `what` (disk full, read-only, not a directory)
    into a one-line StorageError naming it."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {self.what}: {reason(exc)}") from exc


def reason(e: OSError) -> str:
    """A short cause for a failed write."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def prepare_output(output: str) -> None:
    """Create the run directory; ConfigError (one line) when it is a file or cannot be written."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output} is a file, not a run directory")
    with writing(output):
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
