"""Documents in, one string at a time: hub datasets (streamed) or local jsonl / jsonl.gz / parquet / txt.

Local files are read with pyarrow (jsonl, gzip, parquet) or plain Python (txt), in sorted path order, so
the document order depends only on the files. A `.txt` file yields one document per paragraph (blocks
separated by blank lines). Hub datasets go through `datasets.load_dataset(..., streaming=True)`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from teachers.config import CorpusConfig
from teachers.errors import CorpusError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _suffix(path: str) -> str | None:
    for suffix in sorted(LOCAL_SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return suffix
    return None


def _looks_local(part: str) -> bool:
    return (
        bool(_GLOB_CHARS.search(part)) or os.path.exists(part) or _suffix(part) is not None
        or part.startswith(("/", ".", "~"))
    )


def local_files(cfg: CorpusConfig) -> list[str] | None:
    """The sorted local files `cfg.dataset` names, or None when it names a hub dataset."""
    parts = [p.strip() for p in cfg.dataset.split(",") if p.strip()]
    local = [_looks_local(p) for p in parts]
    if not any(local):
        if len(parts) != 1:
            raise CorpusError(f"--dataset {cfg.dataset!r}: give one hub dataset, or local files")
        return None
    if not all(local):
        raise CorpusError(f"--dataset {cfg.dataset!r} mixes local files and hub dataset ids")
    files: list[str] = []
    for part in parts:
        part = os.path.expanduser(part)
        if _GLOB_CHARS.search(part):
            matched = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
            if not matched:
                raise CorpusError(f"no file matches {part!r}")
        elif os.path.isdir(part):
            matched = sorted(str(p) for p in Path(part).iterdir() if p.is_file() and _suffix(p.name))
            if not matched:
                raise CorpusError(f"directory {part!r} holds no {'/'.join(LOCAL_SUFFIXES)} file")
        elif os.path.isfile(part):
            matched = [part]
        else:
            raise CorpusError(f"corpus file {part!r} does not exist")
        for path in matched:
            if _suffix(path) is None:
                raise CorpusError(f"{path!r}: unsupported corpus file type (expected {', '.join(LOCAL_SUFFIXES)})")
        files += matched
    return files


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Yield document texts in a fixed order, at most `cfg.max_documents` of them.

    Raises CorpusError for a missing file, a missing/null/non-text field (naming file and row), or an
    empty corpus.
    """
    files = local_files(cfg)
    source = _iter_hub(cfg) if files is None else (doc for path in files for doc in _iter_file(path, cfg.text_field))
    if cfg.max_documents is not None:
        source = islice(source, cfg.max_documents)  # never reads past the limit
    count = 0
    for doc in source:
        yield doc
        count += 1
    if count == 0:
        raise CorpusError(f"corpus {cfg.dataset!r} has no documents")


def _iter_file(path: str, text_field: str) -> Iterator[str]:
    suffix = _suffix(path)
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


def _iter_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: not a Parquet file ({_first_line(e)})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no field {text_field!r} (columns: {', '.join(names)}); use --text-field")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
            yield from _check_column(path, batch.column(0), text_field, row)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"{path}: cannot read near row {row}: {_first_line(e)} (damaged file?)") from None


def _iter_hub(cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, revision=cfg.revision,
                                   streaming=True)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorpusError(f"cannot open hub dataset {cfg.dataset!r}: {first}") from None
    text_field = cfg.text_field
    for row, example in enumerate(ds):
        text = example.get(text_field)
        if not isinstance(text, str):
            what = "missing" if text_field not in example else f"not text ({type(text).__name__})"
            raise CorpusError(f"{cfg.dataset}: row {row}: field {text_field!r} is {what} "
                              f"(fields: {', '.join(example)})")
        yield text


def corpus_description(cfg: CorpusConfig) -> dict[str, Any]:
    """What identifies the corpus: hub coordinates, or each local file's name, size and sha256; plus the
    text field and the limits. Paths are reduced to file names so nodes may mount the corpus anywhere."""
    files = local_files(cfg)
    desc: dict[str, Any]
    if files is None:
        desc = {"source": "hub", "dataset": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split,
                "revision": cfg.revision}
    else:
        desc = {"source": "local", "files": [_file_entry(p) for p in files]}
    desc.update(text_field=cfg.text_field, max_documents=cfg.max_documents, max_tokens=cfg.max_tokens)
    return desc


def corpus_fingerprint(cfg: CorpusConfig) -> tuple[str, dict[str, Any]]:
    """(sha256 hex of the canonical JSON corpus description, the description)."""
    desc = corpus_description(cfg)
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return digest, desc


def _file_entry(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}
