"""Documents in, one string at a time: hub datasets (streamed) or local jsonl / jsonl.gz / parquet / txt.

The corpus is cut into partitions that depend only on the corpus (never on how many slices read it):

- an uncompressed `.jsonl` / `.json` file: byte ranges of `partition_bytes`; a line belongs to the range
  holding its first byte, so a reader seeks to its range and reads only it (plus the end of its last line);
- any other local file (`.jsonl.gz`, `.parquet`, `.txt`): one partition per file;
- a hub dataset (streamed): one partition per data file, via `datasets.distributed.split_dataset_by_node`
  with world size = the dataset's `n_shards` (C4 `en` train: 1024 files).

Local files are read in sorted path order, so the document order depends only on the files; each file type
has its reader in common/corpus_files.py (pyarrow for jsonl, gzip and parquet; a `.txt` file yields one
document per paragraph). `iter_partition` reads one partition and counts the bytes it read;
`iter_documents` chains all of them in order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from common.corpus_files import (
    LOCAL_SUFFIXES,
    SPLITTABLE_SUFFIXES,
    file_suffix,
    iter_file,
    iter_jsonl_range,
    line_blocks,
)
from common.errors import ConfigError, CorpusError
from common.params import check_positive

CORPUS_FORMATS = ("text", "chat")
"""`text`: documents; `chat`: conversations (lists of {role, content} messages, common/chat.py)."""


@dataclass(kw_only=True)
class CorpusConfig:
    """Where the documents come from and how many to take."""

    dataset: str
    """Hub dataset id (streamed, e.g. `allenai/c4`), or local `.jsonl`, `.jsonl.gz`, `.parquet`, `.txt`
    file(s): a path, a glob, a directory, or several separated by commas."""
    dataset_config: str | None = None
    """Hub dataset configuration name (e.g. `en`); hub datasets only."""
    split: str = "train"
    """Hub dataset split; hub datasets only."""
    revision: str | None = None
    """Hub dataset revision (commit or tag); recorded in the corpus fingerprint."""
    text_field: str = "text"
    """Column holding the document text (jsonl, parquet, hub)."""
    max_documents: int | None = None
    """Use at most this many documents in all (None: all), shared between partitions like `max_tokens`."""
    max_tokens: int | None = None
    """Use at most this many packed tokens in all (None: all). Each of the P corpus partitions packs at most
    its share: max_tokens // P, plus one for the first max_tokens % P partitions."""
    partition_bytes: int = 64 << 20
    """Local uncompressed JSON-lines files are cut into partitions of about this many bytes (other local
    files are one partition each; a hub dataset has one per data file). Part of the corpus fingerprint:
    sequence ids are derived per partition, so caches to be joined need the same value."""
    corpus_format: str = "text"
    """`text`: each row's `text_field` is a document; `chat`: each row's `messages_field` is a conversation
    (a list of {role, content}), rendered with a chat template and loss-masked to the assistant replies
    (common/chat.py)."""
    messages_field: str = "messages"
    """Column holding a conversation's messages (`corpus_format` chat)."""
    chat_template: str | None = None
    """Jinja chat template file (`corpus_format` chat); None: the tokenizer's own template."""
    truncate_conversations: bool = False
    """`corpus_format` chat: cut a conversation longer than seq_len to the window instead of refusing it
    (refused conversations are counted in the manifest's packing notes as `too_long`)."""

    def __post_init__(self) -> None:
        if not self.dataset or not self.dataset.strip():
            raise ConfigError("dataset must name a hub dataset or local file(s)")
        if not self.text_field:
            raise ConfigError("text_field must not be empty")
        check_positive("max_documents", self.max_documents, optional=True)
        check_positive("max_tokens", self.max_tokens, optional=True)
        check_positive("partition_bytes", self.partition_bytes)
        if self.corpus_format not in CORPUS_FORMATS:
            raise ConfigError(f"corpus_format must be one of {', '.join(CORPUS_FORMATS)}, got {self.corpus_format!r}")
        if self.corpus_format == "chat" and not self.messages_field:
            raise ConfigError("messages_field must not be empty")
        if self.corpus_format == "text" and (self.chat_template is not None or self.truncate_conversations):
            raise ConfigError("--chat-template and --truncate-conversations need --corpus-format chat")

    @property
    def chat(self) -> bool:
        """True for a conversational corpus."""
        return self.corpus_format == "chat"


@dataclass(frozen=True)
class Partition:
    """One fixed piece of the corpus, packed on its own (its windows get their own sequence ids)."""

    index: int
    """0-based position among the corpus' partitions."""
    path: str | None
    """Local file, or None for a hub data file."""
    start: int = 0
    """First byte of the range (local files)."""
    stop: int = 0
    """End of the range, exclusive (local files)."""
    source: object = field(default=None, compare=False, repr=False)
    """The opened streaming dataset (hub partitions)."""


@dataclass
class ReadStats:
    """What reading partitions cost, for the manifest notes (and the tests that bound it)."""

    bytes_read: int = 0
    """Bytes read from local files (hub: 0, not known)."""
    documents: int = 0
    """Documents yielded."""


def share(total: int | None, parts: int, index: int) -> int | None:
    """Partition `index`'s share of a corpus-wide limit: total // parts, plus one for the first total % parts."""
    if total is None:
        return None
    return total // parts + (1 if index < total % parts else 0)


def corpus_partitions(cfg: CorpusConfig) -> list[Partition]:
    """The corpus' partitions in order (see the module docstring); the count depends only on the corpus."""
    files = local_files(cfg)
    if files is None:
        ds = _open_hub(cfg)
        n = int(getattr(ds, "n_shards", 1) or 1)
        return [Partition(index=i, path=None, source=ds) for i in range(n)]
    parts: list[Partition] = []
    for path in files:
        size = os.path.getsize(path)
        if file_suffix(path) in SPLITTABLE_SUFFIXES and size > cfg.partition_bytes:
            for start in range(0, size, cfg.partition_bytes):
                parts.append(Partition(index=len(parts), path=path, start=start,
                                       stop=min(size, start + cfg.partition_bytes)))
        else:
            parts.append(Partition(index=len(parts), path=path, start=0, stop=size))
    return parts


def iter_partition(cfg: CorpusConfig, part: Partition, *, max_documents: int | None = None,
                   stats: ReadStats | None = None) -> Iterator[Any]:
    """Yield the documents of one partition (texts; for a chat corpus, validated message lists), at most
    `max_documents`; `stats` counts what was read."""
    stats = stats if stats is not None else ReadStats()
    if cfg.chat:
        source = _iter_chat(cfg, part, stats)
    elif part.path is None:
        source = _iter_hub(cfg, part)
    elif file_suffix(part.path) in SPLITTABLE_SUFFIXES:
        source = iter_jsonl_range(part.path, part.start, part.stop, cfg.text_field, stats)
    else:
        stats.bytes_read += part.stop - part.start  # read whole (compressed or columnar files)
        source = iter_file(part.path, cfg.text_field)
    if max_documents is not None:
        source = islice(source, max_documents)  # never reads past the limit
    for doc in source:
        stats.documents += 1
        yield doc


def _iter_chat(cfg: CorpusConfig, part: Partition, stats: ReadStats) -> Iterator[Any]:
    """The validated conversations of one partition of a chat corpus (common/chat.py)."""
    from common import chat

    if part.path is None:
        yield from chat.iter_hub_conversations(_hub_rows(part), cfg.messages_field,
                                               f"{cfg.dataset}: partition {part.index}")
        return
    suffix = file_suffix(part.path)
    if suffix in SPLITTABLE_SUFFIXES:
        where = "" if part.start == 0 else f" of the partition at byte {part.start}"
        yield from chat.iter_jsonl_conversations(part.path, line_blocks(part.path, part.start, part.stop, stats),
                                                 cfg.messages_field, where)
    elif suffix == ".parquet":
        stats.bytes_read += part.stop - part.start
        yield from chat.iter_parquet_conversations(part.path, cfg.messages_field)
    elif suffix in (".jsonl.gz", ".json.gz"):
        stats.bytes_read += part.stop - part.start
        yield from chat.iter_jsonl_conversations(part.path, chat.gzip_lines(part.path), cfg.messages_field)
    else:
        raise CorpusError(f"{part.path}: a chat corpus is read from .jsonl, .jsonl.gz, .parquet files or a hub "
                          "dataset, not plain text")


_GLOB_CHARS = re.compile(r"[*?\[]")


def _looks_local(part: str) -> bool:
    return (
        bool(_GLOB_CHARS.search(part)) or os.path.exists(part) or file_suffix(part) is not None
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
            matched = sorted(str(p) for p in Path(part).iterdir() if p.is_file() and file_suffix(p.name))
            if not matched:
                raise CorpusError(f"directory {part!r} holds no {'/'.join(LOCAL_SUFFIXES)} file")
        elif os.path.isfile(part):
            matched = [part]
        else:
            raise CorpusError(f"corpus file {part!r} does not exist")
        for path in matched:
            if file_suffix(path) is None:
                raise CorpusError(f"{path!r}: unsupported corpus file type (expected {', '.join(LOCAL_SUFFIXES)})")
        files += matched
    return files


def iter_documents(cfg: CorpusConfig) -> Iterator[Any]:
    """Yield document texts (a chat corpus: validated message lists) in a fixed order: every partition in
    turn, each at most its share of `cfg.max_documents`.

    Raises CorpusError for a missing file, a missing/null/non-text field (naming file and row), or an
    empty corpus.
    """
    parts = corpus_partitions(cfg)
    count = 0
    for part in parts:
        for doc in iter_partition(cfg, part, max_documents=share(cfg.max_documents, len(parts), part.index)):
            yield doc
            count += 1
    if count == 0:
        raise CorpusError(f"corpus {cfg.dataset!r} has no documents")




def _open_hub(cfg: CorpusConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, revision=cfg.revision,
                                     streaming=True)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorpusError(f"cannot open hub dataset {cfg.dataset!r}: {first}") from None


def _hub_rows(part: Partition) -> Any:
    """The streamed rows of one hub partition (data file)."""
    ds = part.source
    n = int(getattr(ds, "n_shards", 1) or 1)
    if n > 1:
        from datasets.distributed import split_dataset_by_node

        # world size = number of data files, so partition p is exactly data file p (no example skipping)
        ds = split_dataset_by_node(ds, rank=part.index, world_size=n)
    return ds


def _iter_hub(cfg: CorpusConfig, part: Partition) -> Iterator[str]:
    ds = _hub_rows(part)
    text_field = cfg.text_field
    for row, example in enumerate(ds):
        text = example.get(text_field)
        if not isinstance(text, str):
            what = "missing" if text_field not in example else f"not text ({type(text).__name__})"
            raise CorpusError(f"{cfg.dataset}: partition {part.index}: row {row}: field {text_field!r} is {what} "
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
        desc = {"source": "local", "files": [_file_entry(p) for p in files], "partition_bytes": cfg.partition_bytes}
    desc.update(text_field=cfg.text_field, max_documents=cfg.max_documents, max_tokens=cfg.max_tokens)
    if cfg.chat:  # only chat corpora carry these keys, so a text corpus keeps its fingerprint
        desc.update(corpus_format="chat", messages_field=cfg.messages_field,
                    chat_template=None if cfg.chat_template is None else _template_entry(cfg.chat_template),
                    truncate_conversations=cfg.truncate_conversations)
    return desc


def corpus_fingerprint(cfg: CorpusConfig) -> tuple[str, dict[str, Any]]:
    """(sha256 hex of the canonical JSON corpus description, the description)."""
    desc = corpus_description(cfg)
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return digest, desc


def _template_entry(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--chat-template {path}: no such file")
    return _file_entry(path)


def _file_entry(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}
