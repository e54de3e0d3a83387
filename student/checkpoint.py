"""Checkpoints of `train-student`: what is saved, how it is verified, and which one a `--resume` takes.

    checkpoints/step-NNNNNNN/state.pt          model + projections, optimizer, scheduler, RNG of every rank,
                                               data position (epoch, micro-batch), world size, config
    checkpoints/step-NNNNNNN/checkpoint.json   step, bytes and sha256 of state.pt (written before the rename)

What is trusted: state.pt holds tensors and plain Python values only and is loaded with
`torch.load(weights_only=True)`, so a state.pt carrying other objects is refused, never unpickled. A
checkpoint whose size or sha256 differs from its checkpoint.json, or that cannot be read, is skipped with a
warning for the previous one. Writes go to `step-NNNNNNN.tmp` and are renamed; a failed write (disk full)
removes the partial directory and leaves the earlier checkpoints as they were. The last `KEEP_CHECKPOINTS`
are kept. Only rank 0 writes; every rank reads.

What is saved comes from the trainer's stateful parts (student/stateful.py: the model, the optimizer, the LR
schedule; objects with `state_dict` / `load_state_dict`), handed to the manager once: `gather()` collects
their states (every rank calls it: a sharded model gathers its full state), `save` writes them with the plain
values (data position, config), `restore` loads a resumed checkpoint back into them. How a part is sharded
is the part's business, so nothing here depends on FSDP.

Resume rules: the fields in `RESUME_FIELDS` decide the data order and the model and must equal the
checkpoint's; `FREE_FIELDS` may change freely; any other change is allowed with a warning (the continued run
then differs from an uninterrupted one). The world size must be the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.errors import ConfigError
from common.sidefile import read_side_json
from storage.errors import MismatchError, StorageError
from student.rundir import CHECKPOINTS_DIR, FINAL_DIR, reason
from student.stateful import Stateful

log = logging.getLogger("student")
KEEP_CHECKPOINTS = 2
STATE_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "epoch", "micro_in_epoch", "world_size", "config")

# Fields a resumed run must share with its checkpoint (they decide the data order and the model).
RESUME_FIELDS = ("teacher_data", "student", "batch_size", "grad_accum", "seed", "split_seed", "eval_fraction",
                 "eval_sequences", "fsdp", "freeze_embeddings", "freeze_lm_head")
FREE_FIELDS = ("resume", "stop_after", "num_workers", "prefetch_factor", "log_every", "eval_every", "save_every",
               "device", "output", "tokenizer")
_CHECKPOINT_NAME = re.compile(r"step-\d{7}")


class CheckpointError(StorageError):
    """A checkpoint cannot be written, or no checkpoint of the run can be trusted and read."""


class _Damaged(Exception):
    """Internal: one checkpoint cannot be used (the caller falls back to an older one)."""


@dataclass(kw_only=True)
class Resumed:
    """The checkpoint a run continues from."""

    path: str
    """Its state.pt."""
    state: dict[str, Any]
    """Its contents (keys `STATE_KEYS`), on the CPU."""


class CheckpointManager:
    """Saves and finds the checkpoints under RUN_DIR/checkpoints for one rank of a run."""

    def __init__(self, run_dir: str, *, rank: int = 0, world_size: int = 1, keep: int = KEEP_CHECKPOINTS,
                 parts: Mapping[str, Stateful] | None = None) -> None:
        self.root = os.path.join(run_dir, CHECKPOINTS_DIR)
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.distributed = world_size > 1
        self.parts: dict[str, Stateful] = dict(parts or {})
        """The stateful parts saved under their names (keys of `STATE_KEYS`)."""

    def gather(self) -> dict[str, Any]:
        """Every part's state dict, by name (every rank calls it; a sharded part gathers its full state)."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def restore(self, resumed: Resumed) -> None:
        """Load each part from the checkpoint's entry of its name."""
        for name, part in self.parts.items():
            part.load_state_dict(resumed.state[name])

    def names(self) -> list[str]:
        """The checkpoint directory names present, oldest first."""
        return sorted(d for d in os.listdir(self.root) if _CHECKPOINT_NAME.fullmatch(d)) \
            if os.path.isdir(self.root) else []

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Write checkpoints/step-NNNNNNN/ (rank 0; every rank must call it), atomically; returns its path.

        `state` holds every key of `STATE_KEYS` but `rng`, `step` and `world_size`, which are added here (the
        RNG states of all ranks, gathered to every rank): the parts' states as `gather()` returned them (the
        trainer checks their weights are finite in between) and the plain values. A failed write raises
        CheckpointError naming the last intact checkpoint."""
        rng = rng_state()
        rngs: list[Any] = [None] * self.world_size
        if self.distributed:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        final = os.path.join(self.root, f"step-{step:07d}")
        if self.rank == 0:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            given = {**state, "rng": rngs, "step": step, "world_size": self.world_size}
            missing = [k for k in STATE_KEYS if k not in given]
            assert not missing, f"checkpoint state lacks {missing}"
            full = {k: given[k] for k in STATE_KEYS}
            try:
                os.makedirs(tmp)
                write_state(full, os.path.join(tmp, "state.pt"))
                size, digest = sha256_file(os.path.join(tmp, "state.pt"))
                with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
                    json.dump({"step": step, "bytes": size, "sha256": digest}, f)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                kept = self.names()
                raise CheckpointError(f"cannot write checkpoint {final}: {reason(e)}; "
                                      + (f"the previous checkpoint {kept[-1]} is intact, continue with --resume "
                                         "once there is room" if kept else "no earlier checkpoint exists")) from e
            for old in self.names()[: -self.keep]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        if self.distributed:
            dist.barrier()
        return final

    def resume(self, config: dict[str, Any], *, requested: bool, output: str) -> Resumed | None:
        """The checkpoint to continue from, or None for a fresh start.

        Without `requested` (--resume), existing checkpoints are refused (ConfigError). With it, the newest
        usable one is loaded (a damaged one is skipped with a warning), its config compared with `config`
        (`RESUME_FIELDS`), and its world size with this run's."""
        found = self.names()
        if not requested:
            if found:
                raise ConfigError(f"{output} already holds checkpoints; pass --resume to continue it "
                                  "or choose another --output")
            return None
        if not found:
            final = os.path.join(output, FINAL_DIR)
            if os.path.isdir(final) and os.listdir(final):  # starting again would replace an earlier run's model
                raise ConfigError(f"--resume: {output} has no checkpoint to continue from but holds {final} of "
                                  "an earlier run; choose another --output")
            log.warning("--resume: no checkpoint in %s, starting from step 0", self.root)
            return None
        path, state = load_latest(self.root, found)
        check_resume_config(state["config"], config, path)
        if state["world_size"] != self.world_size:
            raise ConfigError(f"{path} was written by {state['world_size']} ranks, this run has {self.world_size}; "
                              "resume with the same number of processes")
        return Resumed(path=path, state=state)


class _WriteWatch:
    """The file torch.save writes to, remembering the first write that failed."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_state(state: dict[str, Any], path: str) -> None:
    """torch.save `state` to `path`; a failed write (disk full, quota) raises its OSError.

    torch's zip writer turns a failed write into a RuntimeError ("unexpected pos ...", raised while it
    closes the archive), the same type as its own bugs. Writing through a Python file lets the OSError of
    the write itself be recorded: only a RuntimeError that follows a failed write is reported as that
    write's OSError; any other keeps its traceback."""
    with open(path, "wb") as f:  # buffered: its write() writes everything or raises
        out = _WriteWatch(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def check_resume_config(saved: dict, now: dict, path: str) -> None:
    """MismatchError when a `RESUME_FIELDS` entry differs; a warning naming any other changed setting."""
    for name in RESUME_FIELDS:
        if saved.get(name) != now.get(name):
            raise MismatchError(f"--resume: {path} and this run differ in {name!r}: {saved.get(name)!r} vs "
                                f"{now.get(name)!r}", name, (saved.get(name), now.get(name)))
    changed = [k for k in now if k not in RESUME_FIELDS + FREE_FIELDS and saved.get(k) != now[k]]
    if changed:
        log.warning("--resume with changed settings %s: the continued run differs from an uninterrupted one",
                    changed)


def sha256_file(path: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a local file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def load_checkpoint(directory: str) -> dict:
    """The state dict of one checkpoint directory, after checking its size and sha256 against checkpoint.json.

    Raises _Damaged when it is incomplete or unreadable, CheckpointError when state.pt holds anything but
    tensors and plain values (a pickle that would run code is refused, never executed)."""
    path = os.path.join(directory, "state.pt")
    try:
        meta = read_side_json(os.path.join(directory, "checkpoint.json"), error=CheckpointError)
        if not isinstance(meta, dict):
            raise CheckpointError("checkpoint.json holds no JSON object")
        if not os.path.isfile(path):  # a link to a device (/dev/zero) would be hashed without end
            raise CheckpointError("state.pt is not a regular file")
        size, digest = sha256_file(path)
    except (OSError, CheckpointError) as e:
        raise _Damaged(f"{type(e).__name__}: {e}") from e
    if (size, digest) != (meta.get("bytes"), meta.get("sha256")):
        raise _Damaged(f"state.pt has {size} bytes, sha256 {digest[:12]}..., checkpoint.json records "
                       f"{meta.get('bytes') if isinstance(meta, dict) else '?'} bytes")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values (or was written by an "
                              f"older version); refusing to unpickle it: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise _Damaged(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a train-student checkpoint (no {', '.join(missing)})")
    return state


def load_latest(root: str, found: list[str]) -> tuple[str, dict]:
    """(path, state) of the newest usable checkpoint among `found` (sorted names); a damaged one is skipped
    with a warning."""
    problems = []
    for name in reversed(found):
        try:
            return os.path.join(root, name, "state.pt"), load_checkpoint(os.path.join(root, name))
        except _Damaged as e:
            log.warning("--resume: checkpoint %s is damaged (%s); trying the previous one", name, e)
            problems.append(f"{name}: {e}")
    raise CheckpointError(f"--resume: no usable checkpoint in {root} ({'; '.join(problems)})")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state in types torch.load(weights_only=True) accepts (tensors, ints, floats, tuples)."""
    np_state = np.random.get_state(legacy=False)  # {'bit_generator', 'state': {'key', 'pos'}, 'has_gauss', 'gauss'}
    return {"python": random.getstate(),
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),  # [624] uint32 values
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
