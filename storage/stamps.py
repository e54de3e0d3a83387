"""Verified stamps: hash each shard once, then trust the record.

    report = verify_shards(fs, root, manifest.shards, mode="stamp", by="train-student")

A stamp is a small JSON file `verified-<hash16>.json` in the teacher directory, keyed by the hash of the
shard entries it covers (index, file, rows, bytes, sha256: the manifest's record of each shard). It says
"these files had exactly these sha256 when `by` read them". It is written when the sha256 was computed
from the bytes on the filesystem anyway: by the writer (a slice's shards, at close), by `inspect` and
`merge --verify`, and by training's rank 0 after a full check.

Modes (`--verify` of train-student):
- `full`: size and sha256 of every shard, then a stamp;
- `stamp` (default): size of every shard; sha256 only of shards no stamp covers (then a stamp);
- `off`: size of every shard only.
The size check is always on: a truncated or rewritten file is found without reading it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from fsspec import AbstractFileSystem

from common.sidefile import read_side_json
from storage import fs as sfs
from storage import shards as shard_io
from storage.errors import ShardCorruptError, StorageError
from storage.manifest import ShardInfo

VERIFY_MODES = ("full", "stamp", "off")
_STAMP_RE = re.compile(r"^verified-[0-9a-f]{16}\.json$")


@dataclass
class VerifyReport:
    """What one verification did."""

    shards: int = 0
    """Shards checked (size at least)."""
    hashed: int = 0
    """Shards whose sha256 was computed."""
    hashed_bytes: int = 0
    """Bytes read to compute them."""
    trusted: int = 0
    """Shards whose sha256 a stamp vouched for (size checked only)."""

    def line(self, mode: str) -> str:
        return (f"verify {mode}: {self.shards} shard(s) size-checked, {self.hashed} hashed "
                f"({self.hashed_bytes / 1e6:.1f} MB), {self.trusted} trusted by a stamp")


def shards_hash(shards: Sequence[ShardInfo]) -> str:
    """sha256 hex of the canonical JSON of the shard entries (sorted by index)."""
    entries = [asdict(s) for s in sorted(shards, key=lambda s: s.index)]
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def stamp_name(shards: Sequence[ShardInfo]) -> str:
    return f"verified-{shards_hash(shards)[:16]}.json"


def write_stamp(fs: AbstractFileSystem, root: str, shards: Sequence[ShardInfo], *, by: str) -> None:
    """Record that `shards` were just hashed and matched. A directory that cannot be written to (read-only
    bucket or mount) only loses the shortcut: warned, not fatal."""
    if not shards:
        return
    body = {"manifest_hash": shards_hash(shards), "by": by, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.index)]}
    try:
        sfs.atomic_write_json(fs, sfs.join(root, stamp_name(shards)), body)
    except (OSError, PermissionError) as e:
        warnings.warn(f"{root}: cannot write a verified stamp ({e}); later runs will hash again", stacklevel=2)


def stamped(fs: AbstractFileSystem, root: str) -> set[tuple[str, int, str]]:
    """(file, bytes, sha256) of every shard some stamp in `root` vouches for."""
    out: set[tuple[str, int, str]] = set()
    for full in fs.ls(root, detail=False):
        name = full.rstrip("/").rsplit("/", 1)[-1]
        if not _STAMP_RE.match(name):
            continue
        path = sfs.join(root, name)
        try:
            body = read_side_json(path, fs=fs, error=StorageError, hint="; delete it")
            entries = [ShardInfo(**s) for s in body["shards"]]
        except (KeyError, TypeError) as e:
            raise StorageError(f"{path}: not a valid verified stamp ({e}); delete it") from None
        if shards_hash(entries) != body.get("manifest_hash"):
            raise StorageError(f"{path}: its shard list does not match its manifest_hash; delete it")
        out.update((s.file, s.bytes, s.sha256) for s in entries)
    return out


def verify_shards(fs: AbstractFileSystem, root: str, shards: Sequence[ShardInfo], *, mode: str,
                  by: str) -> VerifyReport:
    """Check `shards` under `mode` (see the module docstring); ShardCorruptError naming the first bad file."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r} is not one of {VERIFY_MODES}")
    trusted = stamped(fs, root) if mode == "stamp" else set()
    report = VerifyReport()
    for info in shards:
        report.shards += 1
        hash_it = mode == "full" or (mode == "stamp" and (info.file, info.bytes, info.sha256) not in trusted)
        why = shard_io.problem(fs, root, info, check_sha=hash_it)
        if why is not None:
            raise ShardCorruptError(f"{sfs.join(root, info.file)}: {why}")
        if hash_it:
            report.hashed += 1
            report.hashed_bytes += info.bytes
        elif mode == "stamp":
            report.trusted += 1
    if report.hashed:
        write_stamp(fs, root, shards, by=by)
    return report
