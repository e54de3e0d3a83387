"""The run directory of `train-student`: its layout, its creation, and one error for failed writes.

    config.json                                the TrainConfig (`train-student --config` replays it)
    metrics.jsonl                              student/metrics_log.py
    checkpoints/step-NNNNNNN/{state.pt,checkpoint.json}   student/checkpoint.py
    final/                                     save_pretrained student (+ tokenizer)
    lock-run.json                              held while a train-student process writes the directory

The names come from storage/artifacts.py, which recognises a run directory by them.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from common.errors import ConfigError
from storage.artifacts import RUN_CHECKPOINTS as CHECKPOINTS_DIR
from storage.artifacts import RUN_CONFIG as CONFIG_FILE
from storage.artifacts import RUN_FINAL as FINAL_DIR
from storage.artifacts import RUN_LOCK
from storage.artifacts import RUN_METRICS as METRICS_FILE
from storage.errors import StorageError

if TYPE_CHECKING:
    from storage.lock import CacheLock
    from student.config import TrainConfig

__all__ = ["CHECKPOINTS_DIR", "CONFIG_FILE", "FINAL_DIR", "METRICS_FILE", "RUN_LOCK", "claim_output",
           "prepare_output", "reason", "writing"]


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


def claim_output(cfg: TrainConfig) -> CacheLock:
    """Check `cfg.output` by the output rule (storage/artifacts.py), create it and lock it; returns the held
    lock (released by the caller when the run ends).

    Refused in one line, before anything is written: an output of another kind, one of the run's inputs, an
    existing run directory without --resume, a run directory another live process holds (its pid, host and
    start time named; a dead holder on this host is taken over with a warning). The kind is checked again
    once the lock is held, so a run that finished between the first check and the lock is not overwritten."""
    from storage import fs as sfs
    from storage.artifacts import Input, Kind, check_output, existing_paths
    from storage.lock import CacheLock

    inputs = [Input("--teacher-data", p) for p in cfg.teacher_data]
    inputs += [Input("--student", p) for p in existing_paths([cfg.student])]
    inputs += [Input("--tokenizer", p) for p in existing_paths([cfg.tokenizer])]

    def check(ignore: tuple[str, ...] = ()) -> None:
        check_output(cfg.output, command="train-student", writes=Kind.RUN, inputs=inputs, replace_flag="--resume",
                     replace=cfg.resume, ignore=ignore)

    fs, root = sfs.resolve(cfg.output)
    lock = CacheLock(fs, root, RUN_LOCK, what=f"run directory {cfg.output}")
    if fs.exists(lock.path) and artifact_kind_without_lock(cfg.output) in (Kind.RUN, Kind.EMPTY):
        lock.acquire()  # a run directory in use: the one line names its holder (a dead holder's is taken over)
    else:
        check()
        prepare_output(cfg.output)
        lock.acquire()
    try:
        check(ignore=(RUN_LOCK,))  # again under the lock: another run may have filled it meanwhile
    except BaseException:
        lock.release()
        raise
    return lock


def artifact_kind_without_lock(output: str) -> object:
    """The kind of `output` as if its run lock were absent (storage.artifacts.Kind)."""
    from storage.artifacts import artifact

    return artifact(output, ignore=(RUN_LOCK,)).kind
