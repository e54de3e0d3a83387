"""Parquet shards: one file per global shard, one row per sequence, one row group per sequence.

Layout choices (measured in benchmarks/storage.py, see benchmarks/RESULTS.md "Storage"):
- zstd level 3, dictionary encoding off (ids and log-probs are high-cardinality: dictionaries only cost);
- BYTE_STREAM_SPLIT on the columns listed in BYTE_STREAM_SPLIT (where it made files smaller);
- one row group per sequence: the row group is Parquet's unit of random access, so reading one sequence
  decodes only that sequence;
- CRC32 page checksums written and verified on read, so a flipped byte is an error, never silent garbage;
- statistics only for `seq_id` (min/max of long list columns are useless and bloat the footer).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from storage import fs as sfs
from storage.errors import ShardCorruptError
from storage.formats import ShardFormat
from storage.manifest import Manifest, ShardInfo
from storage.schema import HEADER_KEY, INDEX_KEY, Column, check_header, check_seq_ids, columns, shard_header

ROWS_PER_ROW_GROUP = 1
ZSTD_LEVEL = 3
BYTE_STREAM_SPLIT: tuple[str, ...] = ("input_ids", "topk_ids", "topk_logprobs", "entropy", "sample_ids",
                                     "sample_counts")
"""Columns written with BYTE_STREAM_SPLIT ("pooled_*" would match every pooled layer). Chosen per column by
benchmarks/storage.py at L=512, k=64: it shrinks topk_ids by 13%, topk_logprobs (float16) by 25%, entropy
and input_ids a little, and leaves pooled float32 states unchanged (so they stay PLAIN). See RESULTS.md."""

_DECODE_ERRORS = (pa.ArrowException, OSError, EOFError, ValueError)


def _arrow_type(col: Column) -> pa.DataType:
    value = pa.from_numpy_dtype(col.dtype)
    return value if not col.shape else pa.list_(value, col.width)


def arrow_schema(m: Manifest, index: int | None = None) -> pa.Schema:
    """Arrow schema of a shard of this manifest (with the header as key-value metadata)."""
    schema = pa.schema([pa.field(c.name, _arrow_type(c), nullable=False) for c in columns(m).values()])
    if index is None:
        return schema
    return schema.with_metadata({HEADER_KEY: json.dumps(shard_header(m), sort_keys=True),
                                 INDEX_KEY: str(index)})


def _leaf(col: Column) -> str:
    return col.name if not col.shape else f"{col.name}.list.element"


def _bss_columns(m: Manifest, bss: tuple[str, ...]) -> list[str]:
    out = []
    for col in columns(m).values():
        if col.name in bss or (col.name.startswith("pooled_") and "pooled_*" in bss):
            out.append(_leaf(col))
    return out


def to_table(data: dict[str, np.ndarray], m: Manifest, index: int) -> pa.Table:
    """Arrow table of one shard from arrays [N, *shape] (zero-copy where numpy allows)."""
    arrays = []
    for col in columns(m).values():
        arr = data[col.name]
        flat = pa.array(arr.reshape(-1))
        arrays.append(flat if not col.shape else pa.FixedSizeListArray.from_arrays(flat, col.width))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(m, index))


def write_shard(fs: AbstractFileSystem, path: str, data: dict[str, np.ndarray], m: Manifest, index: int,
                *, byte_stream_split: tuple[str, ...] | None = None,
                rows_per_row_group: int | None = None) -> None:
    """Write one shard to a temporary name next to `path`, then rename it to `path`.

    byte_stream_split / rows_per_row_group default to the module's BYTE_STREAM_SPLIT / ROWS_PER_ROW_GROUP.
    Deterministic: the same data and manifest give the same bytes (with the same pyarrow version).
    """
    byte_stream_split = BYTE_STREAM_SPLIT if byte_stream_split is None else byte_stream_split
    rows_per_row_group = ROWS_PER_ROW_GROUP if rows_per_row_group is None else rows_per_row_group
    table = to_table(data, m, index)
    options = dict(
        compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
        use_byte_stream_split=_bss_columns(m, byte_stream_split) or False,
        write_statistics=["seq_id"], write_page_checksum=True, row_group_size=rows_per_row_group,
    )
    tmp = sfs.temp_name(path)
    try:
        if sfs.is_local(fs):
            pq.write_table(table, tmp, **options)
        else:
            with fs.open(tmp, "wb") as f:
                pq.write_table(table, f, **options)
        sfs.replace(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


class ParquetShard:
    """Random-access reader of one Parquet shard (open it in the process that reads it)."""

    def __init__(self, fs: AbstractFileSystem, path: str, m: Manifest, info: ShardInfo) -> None:
        rows = info.rows
        self.path = path
        self._file = None
        self._cols = columns(m)
        try:
            if sfs.is_local(fs):
                self._pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
            else:
                self._file = fs.open(path, "rb")
                self._pf = pq.ParquetFile(self._file, page_checksum_verification=True)
        except FileNotFoundError:
            raise ShardCorruptError(f"{path}: shard file is missing") from None
        except _DECODE_ERRORS as e:
            raise ShardCorruptError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
        meta = self._pf.metadata
        if meta.num_rows != rows:
            raise ShardCorruptError(f"{path}: has {meta.num_rows} rows, the manifest says {rows}")
        expected = arrow_schema(m)
        actual = self._pf.schema_arrow
        for field in expected:
            idx = actual.get_field_index(field.name)
            if idx < 0:
                raise ShardCorruptError(f"{path}: column {field.name!r} is missing")
            if actual.field(idx).type != field.type:
                raise ShardCorruptError(f"{path}: column {field.name!r} is {actual.field(idx).type}, "
                                        f"the manifest implies {field.type}")
        sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], dtype=np.int64)
        self._rg_start = np.concatenate([[0], np.cumsum(sizes)])
        # a shard renamed or copied over another one would decode fine: check which shard this is
        meta = actual.metadata or {}
        index = meta.get(INDEX_KEY.encode())
        if index is not None and int(index) != info.index:
            raise ShardCorruptError(f"{path}: holds shard {int(index)}, the manifest lists it as shard {info.index}")
        check_header(path, _json_or_none(meta.get(HEADER_KEY.encode())), m)
        try:
            seq = self._pf.read(columns=["seq_id"], use_threads=False).column(0).to_numpy()
        except _DECODE_ERRORS as e:
            raise ShardCorruptError(f"{path}: cannot decode column 'seq_id' ({_one_line(e)})") from None
        check_seq_ids(path, seq, info)

    def read(self, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Columns at sorted unique local `rows` -> arrays [len(rows), *shape] (freshly allocated)."""
        rows = np.asarray(rows, dtype=np.int64)
        rg_of = np.searchsorted(self._rg_start, rows, side="right") - 1
        groups, first = np.unique(rg_of, return_index=True)
        # position of each wanted row inside the table of the selected row groups
        sel_sizes = self._rg_start[groups + 1] - self._rg_start[groups]
        sel_start = np.concatenate([[0], np.cumsum(sel_sizes)])[:-1]
        where = sel_start[np.searchsorted(groups, rg_of)] + (rows - self._rg_start[rg_of])
        try:
            table = self._pf.read_row_groups(groups.tolist(), columns=names, use_threads=False)
            out = {}
            for name in names:
                col = self._cols[name]
                chunks = table.column(name).chunks
                parts = []
                for chunk in chunks:
                    values = chunk.flatten() if col.shape else chunk
                    parts.append(values.to_numpy(zero_copy_only=True).reshape(-1, *col.shape))
                full = parts[0] if len(parts) == 1 else np.concatenate(parts)
                out[name] = full[where]  # fancy indexing copies: the result owns its memory
            return out
        except _DECODE_ERRORS as e:
            raise ShardCorruptError(f"{self.path}: cannot decode ({_one_line(e)})") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _json_or_none(raw: bytes | None) -> object:
    """The JSON value of a footer metadata entry; None when absent or not JSON (check_header refuses both)."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def read_header(fs: AbstractFileSystem, path: str) -> tuple[dict, int, int]:
    """(shard header, global shard index, rows) stored in a Parquet shard's footer."""
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            rows = pf.metadata.num_rows
    except FileNotFoundError:
        raise ShardCorruptError(f"{path}: shard file is missing") from None
    except _DECODE_ERRORS as e:
        raise ShardCorruptError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    if HEADER_KEY.encode() not in meta or INDEX_KEY.encode() not in meta:
        raise ShardCorruptError(f"{path}: not a teacher-targets shard (no {HEADER_KEY!r} metadata)")
    return json.loads(meta[HEADER_KEY.encode()]), int(meta[INDEX_KEY.encode()]), rows



class ParquetFormat(ShardFormat):
    """The Parquet shard format: one file, the header in its footer metadata."""

    name = "parquet"
    write = staticmethod(write_shard)
    open = ParquetShard
    read_header = staticmethod(read_header)
