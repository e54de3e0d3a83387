"""Filesystem helpers: fsspec resolution, atomic writes, content hashes of files and Zarr directories.

Every storage path may be a local path or an fsspec URL (`memory://`, `file://`, `s3://`, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from common.sidefile import read_side_text
from storage.errors import StorageError

_BLOCK = 8 << 20  # bytes read per step when hashing


_DRIVER_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def resolve(path: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL.

    StorageError (one line) for an unknown protocol, or an object store whose driver is not installed,
    naming the package extra that installs it."""
    try:
        fs, inner = fsspec.core.url_to_fs(str(path))
    except ImportError as e:
        protocol = str(path).split("://", 1)[0]
        package, extra = _DRIVER_EXTRAS.get(protocol, (None, None))
        hint = (f"install {package}: pip install -e '.[{extra}]' from the checkout" if package
                else f"{str(e).strip().splitlines()[0]}")
        raise StorageError(f"{path}: {protocol}:// needs a driver that is not installed; {hint}") from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise StorageError(f"{path}: {e}") from None
    return fs, inner.rstrip("/") or inner


def join(base: str, *names: str) -> str:
    """Join with "/" (fsspec paths use "/" on every platform)."""
    out = base.rstrip("/")
    for name in names:
        out = f"{out}/{name.strip('/')}"
    return out


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the local filesystem (native pyarrow / zarr LocalStore paths can be used)."""
    return isinstance(fs, LocalFileSystem)


def temp_name(path: str) -> str:
    """A sibling name unique to this process, for write-then-rename."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def replace(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """Move `src` (file or directory) onto `dst`, replacing what is there.

    Local: os.replace / os.rename (atomic for files; a directory is removed first). Elsewhere: fsspec mv,
    which is as atomic as the store allows (object stores copy then delete).
    """
    if is_local(fs):
        if os.path.isdir(dst):
            fs.rm(dst, recursive=True)
        os.replace(src, dst)
        return
    if fs.exists(dst):
        fs.rm(dst, recursive=fs.isdir(dst))
    fs.mv(src, dst, recursive=fs.isdir(src))


def atomic_write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a small file to a temporary name, then rename it into place.

    StorageError naming `path` if the filesystem refuses (disk full, permissions); the temporary is removed
    (a kill can still leave one: writers remove their own on the next run)."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    tmp = temp_name(path)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
            if is_local(fs):
                f.flush()
                os.fsync(f.fileno())
        replace(fs, tmp, path)
    except OSError as e:  # disk full, permissions: a StorageError naming the file; no temporary left behind
        with contextlib.suppress(OSError):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise StorageError(f"{path}: cannot write: {os_error_reason(e)}") from e


def os_error_reason(e: OSError) -> str:
    """"No space left on device (errno 28)" for an OSError with an errno, else its message."""
    if e.errno:
        return f"{os.strerror(e.errno)} (errno {e.errno})"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def atomic_write_text(fs: AbstractFileSystem, path: str, text: str) -> None:
    atomic_write_bytes(fs, path, text.encode("utf-8"))


def atomic_write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    atomic_write_text(fs, path, json.dumps(obj, indent=2) + "\n")


def read_text(fs: AbstractFileSystem, path: str, *, label: str | None = None,
              error: type[StorageError] = StorageError, hint: str = "") -> str:
    """The text of side file `path` (a manifest, ledger or stamp) through common/sidefile.py: a regular file of
    at most MAX_SIDE_FILE_BYTES of UTF-8, else `error` in one line; FileNotFoundError when absent."""
    return read_side_text(path, fs=fs, label=label, error=error, hint=hint)


def sha256_file(fs: AbstractFileSystem, path: str) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def list_files(fs: AbstractFileSystem, path: str) -> dict[str, int]:
    """Relative path ("/"-separated) -> size of every file under directory `path`."""
    root = fs._strip_protocol(path).rstrip("/")
    out: dict[str, int] = {}
    for full, info in fs.find(path, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = fs._strip_protocol(full)[len(root):].lstrip("/")
        out[rel] = int(info["size"])
    return out


def sha256_dir(fs: AbstractFileSystem, path: str) -> str:
    """Hex sha256 of a directory: sha256 over the sorted lines "relative path\\0file sha256\\n"."""
    h = hashlib.sha256()
    for rel in sorted(list_files(fs, path)):
        h.update(f"{rel}\0{sha256_file(fs, join(path, rel))}\n".encode())
    return h.hexdigest()


def size_of(fs: AbstractFileSystem, path: str) -> int:
    """Bytes of a file, or the sum over the files of a directory."""
    if fs.isdir(path):
        return sum(list_files(fs, path).values())
    return int(fs.size(path))


def sha256_of(fs: AbstractFileSystem, path: str) -> str:
    """sha256_dir for a directory, sha256_file for a file."""
    return sha256_dir(fs, path) if fs.isdir(path) else sha256_file(fs, path)
