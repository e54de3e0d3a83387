"""Zarr v3 shards: one zarr group (a directory `shard-GGGGGG.zarr`) per global shard.

Arrays are named like the Parquet columns, with shapes [N] (seq_id), [N, L], [N, L, k] and [N, d], chunked
by sequences (CHUNK_ROWS sequences per chunk; `seq_id` is one chunk). Layout (group attribute LAYOUT_KEY):
"sharded" (the default, SHARDED): zarr's sharding codec with one shard covering each array, so an array is one
file holding its encoded inner chunks plus an index of (offset, length) per chunk (crc32c-checked); reading one
sequence decodes one inner chunk. "chunked" (caches written before; no attribute there): one file per chunk.
Both read. Chunks are compressed with blosc-zstd (byte shuffle) followed by a crc32c checksum, so a flipped byte
fails to decode instead of returning garbage. Every chunk is written (write_empty_chunks), so a missing chunk
or shard file on read is corruption, checked on open.
One writer per shard: zarr-python loses data on concurrent partial writes to one shard (zarr #3682).

Writing: zarr creates the group and array metadata; the chunks are then encoded by the same numcodecs codecs
that zarr's codec pipeline calls (bytes little-endian -> blosc / zstd -> crc32c, read from each array's own
metadata), in `WRITE_THREADS` threads (blosc and zstd release the GIL); sharded arrays' files are assembled
as the sharding codec does (chunks in Morton order, then the index encoded by the index codecs) and written
(local paths: by the threads; other stores: one batched call per shard). zarr-python's own `arr[...] = data`
spends most of its time in per-chunk asyncio tasks; see benchmarks/RESULTS.md "Writer throughput". The bytes
are the same as zarr's (tests/storage/test_zarr.py compares whole shard trees, both layouts); a codec list the
encoder does not cover falls back to zarr's own write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numcodecs.blosc
import numpy as np
import zarr
from fsspec import AbstractFileSystem
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage import fs as sfs
from storage.errors import ShardCorruptError
from storage.formats import ShardFormat
from storage.layout import MANIFEST_NAME
from storage.manifest import Manifest, ShardInfo
from storage.schema import HEADER_KEY, INDEX_KEY, check_header, check_seq_ids, columns, shard_header

CHUNK_ROWS = 1
"""Sequences per (inner) chunk: a chunk is the unit of random access."""
SHARDED = True
"""New shards use zarr's sharding codec: one file per array, holding every chunk plus an index (False: the
layout of caches written before, one file per chunk; both read)."""
LAYOUT_KEY = "distill.zarr_layout"
"""Group attribute naming the layout (absent in shards written before it existed: those are chunked)."""
LAYOUT_SHARDED = "sharded"
LAYOUT_CHUNKED = "chunked"
ZSTD_LEVEL = 3
WRITE_THREADS = 4
"""Threads encoding and writing the chunks of one shard (the output does not depend on it: chunks are
independent). More than the cores: besides encoding (GIL released), each chunk is a file of its own, whose
creation waits on the file system."""


def default_compressors() -> list:
    """blosc-zstd with byte shuffle (17% smaller than plain zstd on LM targets, see RESULTS.md), then a
    crc32c checksum so a flipped byte fails to decode. Both are zarr v3 spec codecs."""
    return [BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle"), Crc32cCodec()]


def zstd_compressors() -> list:
    """Plain zstd with its frame checksum (the alternative measured in benchmarks/storage.py)."""
    return [ZstdCodec(level=ZSTD_LEVEL, checksum=True)]


def _async_fs(fs: AbstractFileSystem):
    """An asynchronous view of `fs` (zarr's FsspecStore needs one)."""
    if fs.async_impl and fs.asynchronous:
        return fs
    if fs.async_impl:
        spec = json.loads(fs.to_json())
        spec["asynchronous"] = True
        return AbstractFileSystem.from_json(json.dumps(spec))
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs, asynchronous=True)


def make_store(fs: AbstractFileSystem, path: str, *, read_only: bool):
    """zarr store at `path`: LocalStore for local paths, FsspecStore elsewhere (memory://, s3://, ...)."""
    if sfs.is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore(fs=_async_fs(fs), path=path, read_only=read_only)


def write_shard(fs: AbstractFileSystem, path: str, data: dict[str, np.ndarray], m: Manifest, index: int,
                *, compressors: list | None = None, chunk_rows: int | None = None,
                sharded: bool | None = None) -> None:
    """Write one shard into a temporary directory next to `path`, then rename it to `path`.

    compressors / chunk_rows / sharded default to default_compressors() / CHUNK_ROWS / SHARDED.
    """
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    sharded = SHARDED if sharded is None else sharded
    # blosc's multi-threaded compression orders blocks by thread timing; one thread keeps bytes deterministic
    numcodecs.blosc.use_threads = False
    tmp = sfs.temp_name(path)
    try:
        store = make_store(fs, tmp, read_only=False)
        group = zarr.create_group(store, zarr_format=3, attributes={
            HEADER_KEY: shard_header(m), INDEX_KEY: index,
            LAYOUT_KEY: LAYOUT_SHARDED if sharded else LAYOUT_CHUNKED})
        n = int(data["seq_id"].shape[0])
        pending: list[_File] = []
        for col in columns(m).values():
            chunks = (n,) if not col.shape else (chunk_rows, *col.shape)
            # one shard (file) covering the whole array; zarr requires it to be a multiple of the inner chunk
            shards = (math.ceil(n / chunks[0]) * chunks[0], *col.shape) if sharded else None
            arr = group.create_array(
                col.name, shape=(n, *col.shape), chunks=chunks, shards=shards, dtype=col.dtype, fill_value=0,
                compressors=compressors if compressors is not None else default_compressors(),
                config={"write_empty_chunks": True},
            )
            encode = chunk_encoder(arr)
            if encode is None:  # a codec the direct encoder does not cover: zarr writes it
                arr[...] = data[col.name]
                continue
            values = np.asarray(data[col.name], dtype=col.dtype)
            step = chunks[0]
            pieces = []
            for i in range(0, n, step):
                chunk = values[i:i + step]
                if len(chunk) < step:  # zarr stores a partial edge chunk padded with the fill value
                    chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *col.shape), dtype=col.dtype)])
                pieces.append(chunk)
            if sharded:
                pending.append(_File(f"{col.name}/{arr.metadata.encode_chunk_key((0,) * (1 + len(col.shape)))}",
                                     encode, pieces, _shard_assembler(arr)))
            else:
                pending += [_File(f"{col.name}/{arr.metadata.encode_chunk_key((j,) + (0,) * len(col.shape))}",
                                  encode, [piece], None) for j, piece in enumerate(pieces)]
        _store_files(store, pending)
        sfs.replace(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise


@dataclasses.dataclass(frozen=True)
class _File:
    """One stored object: its key, the inner-chunk encoder, the chunks, and (sharded) how to assemble them."""

    key: str
    encode: Callable[[np.ndarray], bytes]
    chunks: list[np.ndarray]
    assemble: Callable[[list[bytes]], bytes] | None


def chunk_encoder(arr: zarr.Array) -> Callable[[np.ndarray], bytes] | None:
    """A function from one chunk (a C-contiguous array of `arr`'s dtype and (inner) chunk shape) to its stored
    bytes, built from `arr`'s own codec metadata (for a sharded array: the sharding codec's inner codecs) with
    the numcodecs codecs zarr itself uses; None when a codec is not one of bytes (little-endian), blosc, zstd,
    crc32c, or the sharding codec is configured otherwise than one shard index at the start or end."""
    if np.dtype(arr.dtype).byteorder == ">":
        return None
    specs = [c.to_dict() for c in arr.metadata.codecs]
    if specs and specs[0]["name"] == "sharding_indexed":
        if len(specs) != 1:
            return None
        specs = [c.to_dict() for c in arr.metadata.codecs[0].codecs]
    return _bytes_encoder(specs)


def _bytes_encoder(specs: list[dict]) -> Callable[[np.ndarray], bytes] | None:
    """The encoder of a codec list (as dicts) starting with the little-endian bytes codec; None if unsupported."""
    import google_crc32c
    from numcodecs import Blosc, Zstd

    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    if not specs or specs[0] != {"name": "bytes", "configuration": {"endian": "little"}}:
        return None
    for spec in specs[1:]:
        name, conf = spec["name"], spec.get("configuration", {})
        if name == "blosc":
            shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
            codec = Blosc(cname=conf["cname"], clevel=conf["clevel"], shuffle=shuffle[conf["shuffle"]],
                          blocksize=conf["blocksize"], typesize=conf["typesize"])
            steps.append(lambda b, codec=codec: np.frombuffer(codec.encode(b), dtype=np.uint8))
        elif name == "zstd":
            codec = Zstd(level=conf["level"], checksum=conf["checksum"])
            steps.append(lambda b, codec=codec: np.frombuffer(codec.encode(b), dtype=np.uint8))
        elif name == "crc32c":  # the checksum of the bytes so far, appended as a little-endian uint32
            steps.append(lambda b: np.append(b, np.array([google_crc32c.value(b)], dtype="<u4").view(np.uint8)))
        else:
            return None

    def encode(chunk: np.ndarray) -> bytes:
        b = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)  # the bytes codec: little-endian, C order
        for step in steps:
            b = step(b)
        return b.tobytes()

    return encode


def _shard_assembler(arr: zarr.Array) -> Callable[[list[bytes]], bytes]:
    """For a sharded array holding one shard: encoded inner chunks (in C order of the chunk grid) -> the shard
    file, as the sharding codec specifies it: the chunks in Morton order, then (or before them) the index, a
    uint64 array [*chunks_per_shard, 2] of (offset, length), encoded by the index codecs."""
    from zarr.core.indexing import morton_order_iter

    codec = arr.metadata.codecs[0]
    grid = tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))  # chunks per shard
    encode_index = _bytes_encoder([c.to_dict() for c in codec.index_codecs])
    at_start = codec.index_location.value == "start"
    if encode_index is None or codec.index_location.value not in ("start", "end"):
        raise ValueError(f"index codecs {codec.index_codecs} / location {codec.index_location} not supported")
    order = list(morton_order_iter(grid))

    def assemble(blobs: list[bytes]) -> bytes:
        index = np.empty((*grid, 2), dtype="<u8")
        index_len = len(encode_index(index)) if at_start else 0
        offset, parts = index_len, []
        for coords in order:
            blob = blobs[int(np.ravel_multi_index(coords, grid))]
            index[coords] = (offset, len(blob))
            offset += len(blob)
            parts.append(blob)
        index_bytes = encode_index(index)
        return b"".join([index_bytes, *parts] if at_start else [*parts, index_bytes])

    return assemble


def _store_files(store, pending: list[_File]) -> None:
    """Encode the chunks of every file of `pending` in WRITE_THREADS threads, assemble and store each file."""
    if not pending:
        return
    local = isinstance(store, zarr.storage.LocalStore)
    if local:
        root = str(store.root)
        for d in sorted({os.path.dirname(os.path.join(root, f.key)) for f in pending}):
            os.makedirs(d, exist_ok=True)
    flat = [(f.encode, chunk) for f in pending for chunk in f.chunks]
    with ThreadPoolExecutor(max_workers=max(1, WRITE_THREADS)) as pool:
        encoded = iter(pool.map(lambda item: item[0](item[1]), flat))  # in order; re-raises the first error
        blobs = []
        for f in pending:
            parts = [next(encoded) for _ in f.chunks]
            blobs.append(f.assemble(parts) if f.assemble is not None else parts[0])
        if local:
            def put(item: tuple[_File, bytes]) -> None:
                with open(os.path.join(root, item[0].key), "wb") as out:
                    out.write(item[1])

            list(pool.map(put, zip(pending, blobs, strict=True)))
            return
    proto = default_buffer_prototype()
    sync(_gather_raise([store.set(f.key, proto.buffer.from_bytes(blob))
                        for f, blob in zip(pending, blobs, strict=True)]))


async def _gather_raise(coroutines: list) -> list:
    return await asyncio.gather(*coroutines)


# what zarr / numcodecs raise on undecodable bytes
_DECODE_ERRORS = (RuntimeError, ValueError, OSError, EOFError, KeyError, TypeError)


class ZarrShard:
    """Random-access reader of one Zarr shard (open it in the process that reads it)."""

    def __init__(self, fs: AbstractFileSystem, path: str, m: Manifest, info: ShardInfo) -> None:
        rows = info.rows
        self.path = path
        if not fs.exists(path):
            raise ShardCorruptError(f"{path}: shard directory is missing")
        try:
            group = zarr.open_group(make_store(fs, path, read_only=True), mode="r", zarr_format=3)
        except (*_DECODE_ERRORS, zarr.errors.BaseZarrError) as e:
            raise ShardCorruptError(f"{path}: not a readable zarr v3 group ({_one_line(e)})") from None
        files = sfs.list_files(fs, path)
        self._arrays = {}
        for col in columns(m).values():
            try:
                arr = group[col.name]
            except KeyError:
                raise ShardCorruptError(f"{path}: array {col.name!r} is missing") from None
            except (*_DECODE_ERRORS, zarr.errors.BaseZarrError) as e:
                raise ShardCorruptError(f"{path}: metadata of array {col.name!r} is unreadable "
                                        f"({_one_line(e)})") from None
            if tuple(arr.shape) != (rows, *col.shape) or arr.dtype != col.dtype:
                raise ShardCorruptError(f"{path}: array {col.name!r} is {arr.dtype}{list(arr.shape)}, "
                                        f"the manifest implies {col.dtype}{[rows, *col.shape]}")
            per_file = arr.shards or arr.chunks  # sharded: one file per shard, else one per chunk
            expected = math.prod(math.ceil(s / c) for s, c in zip(arr.shape, per_file, strict=True))
            found = sum(1 for rel in files if rel.startswith(f"{col.name}/c/"))
            if found != expected:
                raise ShardCorruptError(f"{path}: array {col.name!r} has {found} chunk/shard files, "
                                        f"expected {expected}")
            self._arrays[col.name] = arr
        index = group.attrs.get(INDEX_KEY)
        if index is not None and int(index) != info.index:
            raise ShardCorruptError(f"{path}: holds shard {int(index)}, the manifest lists it as shard {info.index}")
        check_header(path, group.attrs.get(HEADER_KEY), m)
        check_seq_ids(path, self.read(np.arange(rows), ["seq_id"])["seq_id"], info)

    def read(self, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Columns at sorted unique local `rows` -> arrays [len(rows), *shape]."""
        rows = np.asarray(rows, dtype=np.int64)
        try:
            # all arrays in one event-loop round trip: chunks of different arrays are fetched concurrently
            results = sync(_gather([self._arrays[n].async_array.get_orthogonal_selection((rows,))
                                    for n in names]))
        except _DECODE_ERRORS as e:
            raise ShardCorruptError(f"{self.path}: cannot decode ({_one_line(e)})") from None
        out = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, _DECODE_ERRORS):
                raise ShardCorruptError(f"{self.path}: cannot decode array {name!r} ({_one_line(result)})")
            if isinstance(result, BaseException):
                raise result
            out[name] = np.ascontiguousarray(result)
        return out

    def close(self) -> None:
        self._arrays = {}


async def _gather(coroutines: list) -> list:
    return await asyncio.gather(*coroutines, return_exceptions=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_header(fs: AbstractFileSystem, path: str) -> tuple[dict, int, int]:
    """(shard header, global shard index, rows) stored in a Zarr shard's group attributes."""
    if not fs.exists(path):
        raise ShardCorruptError(f"{path}: shard directory is missing")
    try:
        group = zarr.open_group(make_store(fs, path, read_only=True), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        rows = int(group["seq_id"].shape[0]) if "seq_id" in group else -1
    except (*_DECODE_ERRORS, zarr.errors.BaseZarrError) as e:
        raise ShardCorruptError(f"{path}: not a readable zarr v3 group ({_one_line(e)})") from None
    if HEADER_KEY not in attrs or INDEX_KEY not in attrs or rows < 0:
        raise ShardCorruptError(f"{path}: not a teacher-targets shard (no {HEADER_KEY!r} attribute)")
    return attrs[HEADER_KEY], int(attrs[INDEX_KEY]), rows



class ZarrFormat(ShardFormat):
    """The Zarr shard format: a group directory, the header in its attributes."""

    name = "zarr"
    write = staticmethod(write_shard)
    open = ZarrShard
    read_header = staticmethod(read_header)

    def is_shard(self, fs: AbstractFileSystem, path: str) -> bool:
        # a zarr shard is a group (zarr.json at its root); a teacher directory named *.zarr is not
        return fs.exists(sfs.join(path, "zarr.json")) and not fs.exists(sfs.join(path, MANIFEST_NAME))
