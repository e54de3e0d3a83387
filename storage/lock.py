"""CacheLock: one writer at a time per slice of a cache directory (and per merge).

    lock = CacheLock(fs, root, lock_name(slice_index, num_slices))
    lock.acquire()        # LockHeldError naming the holder if another live process holds it
    ...
    lock.verify()         # before recording work: StorageError if the lock is no longer ours
    lock.release()

The lock is a small JSON file (`lock-slice-IIIII-of-NNNNN.json`, `lock-merge.json`) holding the holder's
pid, host, process start time, start time of the run and a random token. It is created only if absent:

- local paths: the content is written to a temporary file that is then hard-linked to the lock name
  (`os.link` fails when the name exists; atomic on local filesystems and on NFS), so a reader never sees a
  half-written lock; where hard links are not supported, `open(O_CREAT | O_EXCL)`;
- fsspec stores: `open(path, "xb")`, which is atomic only where the store implements exclusive create;
  the lock is read back after writing, and `verify()` runs before every recorded shard, so a lost race
  is found before more than one shard is recorded (see docs/runbook.md, "Object stores").

A lock whose holder ran on this host and is no longer running (no such pid, a zombie, or a pid reused by a
process that started later) is stale: it is removed with a warning and taken over. A lock from another host
cannot be checked; it is refused with a message naming the holder and the file to delete if that process
is gone (a job preempted on another node leaves one behind when it is killed without a chance to clean up).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
import uuid
import warnings
from typing import Any

from fsspec import AbstractFileSystem

from common.sidefile import read_side_json
from storage import fs as sfs
from storage.errors import StorageError

MERGE_LOCK = "lock-merge.json"
LOCK_RE = re.compile(r"^lock-slice-(\d{5})-of-(\d{5})\.json$")
_ATTEMPTS = 5
MAX_LOCK_BYTES = 1 << 16
"""A lock file holds a few hundred bytes of JSON; a larger one (or a device) is garbage, read no further."""


class LockHeldError(StorageError):
    """Another process holds the lock; `holder` is the content of its lock file (empty if unreadable)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def lock_name(slice_index: int, num_slices: int) -> str:
    """File name of the lock of one slice."""
    return f"lock-slice-{slice_index:05d}-of-{num_slices:05d}.json"


def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[19] if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] if fields else None


def running_here(pid: int, pid_start: str | None) -> bool:
    """True while process `pid` of this host runs and is the one that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if _process_state(pid) == "Z":
        return False  # killed, not yet reaped by its parent
    started = _process_start(pid)
    return not (pid_start is not None and started is not None and started != pid_start)  # pid reused


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """True/False for a holder on this host; None when it ran on another host (cannot be checked)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    return running_here(holder["pid"], holder.get("pid_start"))


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process (the lock file is empty or unreadable)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"


class CacheLock:
    """An exclusive lock file `name` inside directory `root` of filesystem `fs` (see the module docstring)."""

    def __init__(self, fs: AbstractFileSystem, root: str, name: str, **info: Any) -> None:
        self.fs, self.root, self.name = fs, root, name
        self.path = sfs.join(root, name)
        self.info = {
            "pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex, **info,
        }
        self.held = False

    # ---- acquiring -----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock, removing a stale one; LockHeldError naming the holder if it is taken."""
        for _ in range(_ATTEMPTS):
            if self._create():
                self.held = True
                holder = self.read()
                if holder.get("token") != self.info["token"]:  # a store without exclusive create lost a race
                    self.held = False
                    raise self._held_error(holder)
                return
            holder = self.read()
            if holder is None:
                continue  # released between our create and our read: try again
            if holder and holder_alive(holder) is False:
                self._remove_stale(holder)
                continue
            raise self._held_error(holder)
        raise StorageError(f"{self.path}: could not take the lock after {_ATTEMPTS} attempts (other "
                           "processes keep taking it); is another precompute running on this cache?")

    def _held_error(self, holder: dict[str, Any]) -> LockHeldError:
        what = self.info.get("what", "this cache")
        remote = holder_alive(holder) is None if holder else True
        advice = (f"wait for it to finish; if that process is gone (e.g. a job preempted on another node), "
                  f"delete {self.path}" if remote else "wait for it to finish, or stop it")
        return LockHeldError(f"{what} is locked by {describe_holder(holder)} ({self.path}); {advice}", holder)

    def _create(self) -> bool:
        """Create the lock file with our content if it is absent; False if it exists."""
        data = (json.dumps(self.info, indent=2) + "\n").encode()
        try:
            if sfs.is_local(self.fs):
                return _create_local(self.path, data)
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(data)
                return True
            except (NotImplementedError, ValueError):  # no exclusive create: best effort (module docstring)
                if self.fs.exists(self.path):
                    return False
                with self.fs.open(self.path, "wb") as f:
                    f.write(data)
                return True
        except FileExistsError:
            return False
        except OSError as e:
            raise StorageError(f"{self.path}: cannot create the lock file: {sfs.os_error_reason(e)}") from e

    def read(self) -> dict[str, Any] | None:
        """The lock file's content; None if it does not exist, {} if it cannot be parsed."""
        try:
            holder = read_side_json(self.path, fs=self.fs, error=StorageError, max_bytes=MAX_LOCK_BYTES)
        except FileNotFoundError:
            return None
        except StorageError:  # not a regular file, too large, not UTF-8 JSON: a lock that names no holder
            return {}
        return holder if isinstance(holder, dict) else {}

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        """Remove a lock whose holder is gone, without ever removing a live holder's fresh lock."""
        if sfs.is_local(self.fs):
            aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.path, aside)  # atomic: of two processes removing it, one succeeds
            except FileNotFoundError:
                return
            moved = _read_json(aside)
            if moved.get("token") != holder.get("token"):  # another process took it meanwhile: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                os.unlink(aside)
                return
            os.unlink(aside)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
        warnings.warn(f"{self.path}: removed a stale lock of {describe_holder(holder)} (that process is no "
                      "longer running)", stacklevel=4)

    # ---- holding -------------------------------------------------------------------------------
    def verify(self) -> None:
        """StorageError unless the lock file still holds our token (someone removed or replaced it)."""
        holder = self.read()
        if not holder or holder.get("token") != self.info["token"]:
            who = "nobody" if holder is None else describe_holder(holder or {})
            raise StorageError(f"{self.path}: this process lost its lock (the file now names {who}); "
                               "stopping so two writers never record the same shard")

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder and holder.get("token") == self.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_local(path: str, data: bytes) -> bool:
    tmp = sfs.temp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # no hard links here
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        os.unlink(tmp)


def _read_json(path: str) -> dict[str, Any]:
    try:
        value = read_side_json(path, error=StorageError, max_bytes=MAX_LOCK_BYTES)
    except (OSError, StorageError):
        return {}
    return value if isinstance(value, dict) else {}


def live_locks(fs: AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """Slice lock file name -> content, for the slice locks in `root` whose holder may be running
    (alive on this host, or on another host where it cannot be checked)."""
    out: dict[str, dict[str, Any]] = {}
    for full in fs.ls(root, detail=False):
        name = full.rstrip("/").rsplit("/", 1)[-1]
        if not LOCK_RE.match(name):
            continue
        holder = CacheLock(fs, root, name).read()
        if holder is None:
            continue
        if holder and holder_alive(holder) is False:
            continue
        out[name] = holder
    return out
