"""Local corpus files: which file types a corpus may hold and how each is read.

- `.jsonl` / `.json` (JSON lines, uncompressed; `SPLITTABLE_SUFFIXES`): read by byte range, `line_blocks`
  yields the whole lines whose first byte lies in the range and `iter_jsonl_range` parses them with pyarrow;
- `.jsonl.gz` / `.json.gz`: read whole by pyarrow, which decompresses the stream;
- `.parquet`: read in record batches of the one column asked for (`open_parquet_field`, also used for
  conversations by common/chat.py);
- `.txt`: one document per paragraph (blocks separated by blank lines).

Every reader checks the text column (string type, no nulls) and refuses bad data with a one-line
`CorpusError` naming the file (and the row, for files of rows). common/corpus.py cuts the corpus into partitions and picks the reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import CorpusError

if TYPE_CHECKING:
    from common.corpus import ReadStats

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt")
SPLITTABLE_SUFFIXES = (".jsonl", ".json")
"""Local files cut into byte-range partitions (JSON lines, uncompressed)."""
_READ_BLOCK = 4 << 20


def file_suffix(path: str) -> str | None:
    """The corpus file type of `path` (the longest of `LOCAL_SUFFIXES` it ends with), or None."""
    for suffix in sorted(LOCAL_SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return suffix
    return None


def iter_file(path: str, text_field: str) -> Iterator[str]:
    """The documents of a whole local file: `.txt` paragraphs, else the `text_field` column of its rows."""
    suffix = file_suffix(path)
    if suffix == ".txt":
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert the file to "
                              "UTF-8") from None
        for paragraph in re.split(r"\n\s*\n", text):
            if paragraph.strip():
                yield paragraph.strip()
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        yield from _iter_jsonl(path, text_field)


def _check_column(path: str, column: Any, text_field: str, first_row: int) -> list[str]:
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CorpusError(f"{path}: field {text_field!r} has type {column.type}, expected text")
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True)
        raise CorpusError(f"{path}: row {row}: field {text_field!r} is missing or null")
    return column.to_pylist()


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]), unexpected_field_behavior="ignore")
    row = 0
    try:
        reader = pj.open_json(pa.input_stream(path, compression="detect"), parse_options=parse,
                              read_options=pj.ReadOptions(block_size=4 << 20))
        for batch in reader:
            yield from _check_column(path, batch.column(0), text_field, row)
            row += batch.num_rows
    except pa.ArrowInvalid as e:
        if row == 0 and "Empty JSON stream" in str(e):
            return  # an empty file has no documents; iter_documents reports an empty corpus
        raise CorpusError(f"{path}: cannot read as JSON lines near row {row}: {_first_line(e)}") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text near row {row} ({e.reason}); convert the file to "
                          "UTF-8") from None
    except OSError as e:  # pyarrow's I/O errors: a damaged or truncated gzip stream, an unreadable file
        what = "cannot decompress" if path.endswith(".gz") else "cannot read"
        raise CorpusError(f"{path}: {what} near row {row}: {_first_line(e)} (damaged or truncated "
                          "file?)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def line_blocks(path: str, start: int, stop: int, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) blocks of whole lines: every line whose first byte lies in [start, stop)."""
    with open(path, "rb") as f:
        pos = max(start - 1, 0)  # file offset of buf[0]
        f.seek(pos)
        buf, eof, tail = b"", False, 256

        def more() -> None:
            # read up to `stop` in large blocks; past it (finishing the last line) in small doubling ones,
            # so a slice reads its ranges plus about one line each
            nonlocal buf, eof, tail
            ahead = pos + len(buf)
            if ahead < stop:
                want = min(_READ_BLOCK, stop - ahead)
            else:
                want, tail = tail, min(2 * tail, _READ_BLOCK)
            chunk = f.read(want)
            stats.bytes_read += len(chunk)
            eof = not chunk
            buf += chunk

        if start > 0:  # drop the line that began before the range (byte start-1 is its last or a middle one)
            while True:
                more()
                i = buf.find(b"\n")
                if i >= 0:
                    pos, buf = pos + i + 1, buf[i + 1:]
                    break
                if eof:
                    return
                pos, buf = pos + len(buf), b""
        while pos < stop:
            if not eof:
                more()
            limit = stop - pos  # lines starting before buf[limit] are ours
            if len(buf) >= limit:
                j = buf.find(b"\n", limit - 1)  # end of the line holding byte stop - 1
                if j < 0 and not eof:
                    continue
                cut = len(buf) if j < 0 else j + 1
                if cut:
                    yield pos, buf[:cut]
                return
            j = buf.rfind(b"\n")
            if j < 0:
                if eof:
                    if buf:
                        yield pos, buf
                    return
                continue
            yield pos, buf[: j + 1]
            pos, buf = pos + j + 1, buf[j + 1:]


def iter_jsonl_range(path: str, start: int, stop: int, text_field: str, stats: ReadStats) -> Iterator[str]:
    """The `text_field` of every JSON line whose first byte lies in [start, stop); `stats` counts the bytes."""
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]), unexpected_field_behavior="ignore")
    row = 0
    where = "" if start == 0 else f" of the partition at byte {start}"
    for _, block in line_blocks(path, start, stop, stats):
        try:
            table = pj.read_json(pa.BufferReader(block), parse_options=parse,
                                 read_options=pj.ReadOptions(block_size=max(len(block), 1 << 16)))
        except pa.ArrowInvalid as e:
            if "Empty JSON" in str(e):
                continue  # only blank lines
            raise CorpusError(f"{path}: cannot read as JSON lines near row {row}{where}: "
                              f"{str(e).splitlines()[0]}") from None
        column = table.column(0)
        for chunk in column.chunks:
            try:
                texts = _check_column(path, chunk, text_field, row)
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}: not UTF-8 text near row {row}{where} ({e.reason}); convert the file "
                                  "to UTF-8") from None
            yield from texts
            row += len(chunk)


def open_parquet_field(path: str, name: str, flag: str) -> Any:
    """The `pyarrow.parquet.ParquetFile` at `path`, which must have the column `name` (a one-line
    `CorpusError` otherwise, naming the file, the columns and the option `flag` that picks another)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a Parquet file ({_first_line(e)})") from None
    names = pf.schema_arrow.names
    if name not in names:
        raise CorpusError(f"{path}: no field {name!r} (columns: {', '.join(names)}); use {flag}")
    return pf


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    pf = open_parquet_field(path, text_field, "--text-field")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
            yield from _check_column(path, batch.column(0), text_field, row)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: cannot read near row {row}: {_first_line(e)} (damaged file?)") from None
