"""The one way the tool reads its JSON side files: configs (`--config`), manifests, slice manifests, ledgers,
verified stamps, lock files, checkpoint records, student JSON configs and metrics logs.

A side file is read only from a regular file, and at most `max_bytes` of it (`MAX_SIDE_FILE_BYTES` unless the
caller gives a cap of its own). Anything else is refused with one line naming the file, in the caller's error
class (`ConfigError` for options, `ManifestError` / `StorageError` for a cache, ...): a device such as
`/dev/zero` (or a link to one) would be read without end, a FIFO would block, and a huge file would be parsed
into many times its size in memory. Bytes that are not UTF-8 and text that is not JSON are refused the same
way, so a damaged side file is never a traceback.

A missing file raises `FileNotFoundError`, unchanged: for several callers "absent" is a normal state (a cache
without `manifest.json` yet, a lock that was just released), which they handle themselves.

Local paths are opened once and checked on the open descriptor (`fstat`), so the file cannot be swapped for
a device between the check and the read; on other filesystems (fsspec: object stores, `memory://`) the
entry's type and size come from `fs.info`, and the read itself is capped as well.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from common.errors import UserError

MAX_SIDE_FILE_BYTES = 64 << 20
"""Largest side file read (64 MiB): a manifest of about 300,000 shard entries. Parsed JSON takes several
times its size in memory, so this also bounds what reading one costs."""
_BLOCK = 1 << 20


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _is_local(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


def read_side_bytes(path: str, *, fs: Any = None, label: str | None = None, error: type[UserError] = UserError,
                    hint: str = "", max_bytes: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of side file `path` (local, or on fsspec filesystem `fs`); `error("LABEL: why" + hint)` when
    it is not a regular file, holds more than `max_bytes` or cannot be read. `label` defaults to `path`."""
    label = label or path
    if fs is None or _is_local(fs):
        return _read_local(path, label, error, hint, max_bytes)
    info = fs.info(path)  # FileNotFoundError when absent
    if info.get("type") != "file":
        raise error(f"{label}: is {info.get('type') or 'not a file'}, not a regular file{hint}")
    size = info.get("size")
    if isinstance(size, int) and size > max_bytes:
        raise error(f"{label}: {size} bytes, more than the {max_bytes} a side file may hold{hint}")
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{label}: more than the {max_bytes} bytes a side file may hold{hint}")
    return data


def _read_local(path: str, label: str, error: type[UserError], hint: str, max_bytes: int) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{label}: cannot read ({e.strerror or e}){hint}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{label}: is {_kind(st.st_mode)}, not a regular file{hint}")
        if st.st_size > max_bytes:
            raise error(f"{label}: {st.st_size} bytes, more than the {max_bytes} a side file may hold{hint}")
        blocks, total = [], 0
        while total <= max_bytes:  # capped even so: a file can grow while it is read
            block = os.read(fd, min(_BLOCK, max_bytes + 1 - total))
            if not block:
                break
            blocks.append(block)
            total += len(block)
    except OSError as e:
        raise error(f"{label}: cannot read ({e.strerror or e}){hint}") from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise error(f"{label}: more than the {max_bytes} bytes a side file may hold{hint}")
    return b"".join(blocks)


def decode_text(data: bytes, *, label: str, error: type[UserError] = UserError, hint: str = "") -> str:
    """`data` as UTF-8 text; `error` naming the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{label}: not UTF-8 text (byte {e.start}: {e.reason}){hint}") from None


def parse_json(text: str | bytes, *, label: str, error: type[UserError] = UserError, hint: str = "") -> Any:
    """The JSON value of `text` (bytes are decoded as UTF-8 first); `error` in one line when it is not JSON,
    including nesting too deep for the parser."""
    if isinstance(text, bytes):
        text = decode_text(text, label=label, error=error, hint=hint)
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise error(f"{label}: not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise error(f"{label}: not valid JSON (nested too deeply){hint}") from None


def read_side_text(path: str, *, fs: Any = None, label: str | None = None, error: type[UserError] = UserError,
                   hint: str = "", max_bytes: int = MAX_SIDE_FILE_BYTES) -> str:
    """`read_side_bytes` decoded as UTF-8 (one-line `error` otherwise)."""
    data = read_side_bytes(path, fs=fs, label=label, error=error, hint=hint, max_bytes=max_bytes)
    return decode_text(data, label=label or path, error=error, hint=hint)


def read_side_json(path: str, *, fs: Any = None, label: str | None = None, error: type[UserError] = UserError,
                   hint: str = "", max_bytes: int = MAX_SIDE_FILE_BYTES) -> Any:
    """The JSON value held in side file `path`: `read_side_bytes`, then UTF-8 and JSON, each refused in one
    line (`error`) when wrong."""
    data = read_side_bytes(path, fs=fs, label=label, error=error, hint=hint, max_bytes=max_bytes)
    return parse_json(data, label=label or path, error=error, hint=hint)
