"""One interface over the shard formats (storage/formats.py): write, record (size + sha256), check and open a
shard."""

from __future__ import annotations

import numpy as np
from fsspec import AbstractFileSystem

from storage import fs as sfs
from storage.errors import ManifestError, ShardCorruptError
from storage.formats import ShardReader, shard_format
from storage.layout import is_plain_name, shard_file_name
from storage.manifest import Manifest, ShardInfo


def write_shard(fs: AbstractFileSystem, root: str, m: Manifest, index: int,
                data: dict[str, np.ndarray]) -> ShardInfo:
    """Write global shard `index` (arrays from schema.to_columns) into `root`, rename it into place, and
    return its ShardInfo (bytes and sha256 are computed from what landed on the filesystem)."""
    name = shard_file_name(index, m.format)
    path = sfs.join(root, name)
    shard_format(m.format).write(fs, path, data, m, index)
    seq = data["seq_id"]
    return ShardInfo(index=index, file=name, rows=int(seq.shape[0]), first_seq_id=int(seq[0]),
                     last_seq_id=int(seq[-1]), bytes=sfs.size_of(fs, path), sha256=sfs.sha256_of(fs, path))


def shard_path(root: str, info: ShardInfo) -> str:
    """Path of a listed shard inside `root`; ManifestError if its entry is not a plain file name (manifests
    are validated on load; this guards entries built in code)."""
    if not is_plain_name(info.file):
        raise ManifestError(f"shards[{info.index}] file {info.file!r} is not a plain file name inside {root}; "
                            "refusing to read it")
    return sfs.join(root, info.file)


def problem(fs: AbstractFileSystem, root: str, info: ShardInfo, *, check_sha: bool = True) -> str | None:
    """Why the shard on disk does not match its manifest entry (missing, size, sha256), or None if it does."""
    path = shard_path(root, info)
    if not fs.exists(path):
        return "missing"
    try:
        size = sfs.size_of(fs, path)
    except FileNotFoundError:
        return "missing"
    if size != info.bytes:
        return f"size is {size} bytes, the manifest says {info.bytes} (truncated or rewritten)"
    if check_sha:
        digest = sfs.sha256_of(fs, path)
        if digest != info.sha256:
            return f"sha256 is {digest[:12]}..., the manifest says {info.sha256[:12]}... (corrupted)"
    return None


def check(fs: AbstractFileSystem, root: str, info: ShardInfo) -> None:
    """Raise ShardCorruptError naming the file and why, if the shard does not match its entry."""
    why = problem(fs, root, info)
    if why is not None:
        raise ShardCorruptError(f"{shard_path(root, info)}: {why}")


def open_shard(fs: AbstractFileSystem, root: str, m: Manifest, info: ShardInfo) -> ShardReader:
    """A reader with `.read(sorted_local_rows, names) -> dict` and `.close()` for one shard."""
    return shard_format(m.format).open(fs, shard_path(root, info), m, info)
