"""What kind of artifact a path holds, and the one rule every command that writes applies to its output.

    kind = artifact_kind(path)          # Kind.CACHE, Kind.RUN, Kind.MODEL, Kind.REPORT, ...
    check_output(output, command="init-student", writes=Kind.MODEL, inputs=[Input("--from", teacher)],
                 replace_flag="--overwrite", replace=overwrite)

Each kind is recognised by its own marker files, never by what the user calls it:

- a teacher cache (precompute): a `manifest.json` with a cache manifest's keys, slice manifests, ledgers,
  slice configs, slice or merge locks, verified stamps or `shard-GGGGGG.<format>` entries; a file (or Zarr directory) inside one is a part
  of that cache;
- a train-student run directory: `metrics.jsonl`, `checkpoints/`, `final/`, its lock, or a `config.json`
  holding a TrainConfig (`teacher_data`); a file inside one is a part of that run (`final/` is a model);
- a model directory: `config.json` beside weights (safetensors, `pytorch_model.bin`, their index) or a
  `.gguf` file; a tokenizer directory: tokenizer files and no weights;
- an evaluation report: a JSON object with evaluate's keys (`models`, `windows`, `seq_len`), whatever its name;
- a figure: a file starting as PNG, PDF or SVG do, or named with another image suffix matplotlib writes;
- a corpus: a `.jsonl`, `.jsonl.gz`, `.json`, `.parquet`, `.txt` file, or a directory holding only such files.

The rule (docs/guarantees.md, "What is never overwritten"): a command refuses, in one line and before any
model loads, an output that holds another kind, that is one of its own inputs (or lies inside one, or holds
one), or that lies inside a cache or a model directory; an existing output of its own kind only with the
flag that says what to do (`replace`).
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.errors import ConfigError, UserError
from common.sidefile import read_side_json
from storage import fs as sfs
from storage.formats import FORMATS

# The run directory's layout (student/rundir.py re-exports these names; they live here because the
# classifier below must know them and storage sits below the student package).
RUN_CONFIG = "config.json"
RUN_METRICS = "metrics.jsonl"
RUN_CHECKPOINTS = "checkpoints"
RUN_FINAL = "final"
RUN_LOCK = "lock-run.json"
RUN_NAMES = (RUN_CONFIG, RUN_METRICS, RUN_CHECKPOINTS, RUN_FINAL, RUN_LOCK)
"""Names a run directory owns: nothing else may write them."""

_SHARD_NAME = rf"shard-\d{{6,}}\.({'|'.join(map(re.escape, FORMATS))})"
"""A shard's file name, `shard-GGGGGG.<format>` for every format of the registry (storage/formats.py)."""
_CACHE_RE = re.compile(r"^(manifest-slice-\d{5}-of-\d{5}\.json|ledger-slice-\d{5}-of-\d{5}\.json"
                       r"|config-slice-\d{5}-of-\d{5}\.json|lock-slice-\d{5}-of-\d{5}\.json|lock-merge\.json"
                       rf"|verified-[0-9a-f]{{16}}\.json|{_SHARD_NAME})$")
_SHARD_RE = re.compile(rf"^{_SHARD_NAME}$")
_WEIGHTS_RE = re.compile(r"(\.safetensors|\.gguf|^pytorch_model.*\.bin|\.safetensors\.index\.json|"
                         r"^pytorch_model\.bin\.index\.json)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")
_FIGURE_MAGIC = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".svg": (b"<?xml", b"<svg")}
_FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp",
                    ".pgf", ".raw", ".rgba")
_REPORT_KEYS = ("models", "windows", "seq_len")
_REPORT_MAX_BYTES = 64 << 20  # a report is a few KB to a few MB; a bigger file is not read to find out


class Kind(enum.Enum):
    """Kinds of paths; the value is the phrase an error message uses."""

    ABSENT = "nothing"
    EMPTY = "an empty directory"
    CACHE = "a teacher cache (precompute)"
    CACHE_PART = "a shard or file of the teacher cache"
    RUN = "a train-student run directory"
    RUN_PART = "a file the train-student run directory owns"
    MODEL = "a model directory"
    MODEL_PART = "a file of the model directory"
    TOKENIZER = "a tokenizer directory"
    REPORT = "an evaluation report (evaluate)"
    FIGURE = "a figure (plot)"
    CORPUS = "a corpus"
    FILE = "a file"
    DIRECTORY = "a directory holding other files"


FILE_KINDS = (Kind.CACHE_PART, Kind.RUN_PART, Kind.MODEL_PART, Kind.REPORT, Kind.FIGURE, Kind.FILE)
"""Kinds a path can have only as a file (CORPUS and CACHE_PART can be either)."""
_CONTAINERS = (Kind.CACHE, Kind.RUN, Kind.MODEL, Kind.TOKENIZER)


@dataclass(frozen=True)
class Artifact:
    """What a path holds: its kind and, for a part, the artifact it belongs to."""

    kind: Kind
    inside: str | None = None
    """The cache, run or model directory a *_PART path belongs to."""

    def phrase(self) -> str:
        return f"{self.kind.value} {self.inside}" if self.inside else self.kind.value


@dataclass(frozen=True)
class Input:
    """One input path of a command, for the rule that an output is never an input."""

    flag: str
    """The option (or argument) that names it, for the message."""
    path: str
    output_inside_ok: bool = False
    """The command may write a new file inside this directory (plot's figure in its run directory)."""


def _names(fs, path: str) -> set[str]:
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}


def _dir_kind(fs, path: str, ignore: Iterable[str] = ()) -> Kind:
    """The kind of an existing directory, from the names in it (and the run config's content)."""
    try:
        names = _names(fs, path) - set(ignore)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return Kind.DIRECTORY  # unreadable: unknown, so never written into
    if not names:
        return Kind.EMPTY
    if any(_CACHE_RE.match(n) for n in names) or (
            "manifest.json" in names and {"shards", "teacher"} <= _json_keys(fs, sfs.join(path, "manifest.json"))):
        return Kind.CACHE  # manifest.json is a common name (web apps): only a cache manifest's keys count
    if {RUN_METRICS, RUN_CHECKPOINTS, RUN_FINAL, RUN_LOCK} & names or (
            RUN_CONFIG in names and "teacher_data" in _json_keys(fs, sfs.join(path, RUN_CONFIG))):
        return Kind.RUN
    if any(_WEIGHTS_RE.search(n) for n in names):
        return Kind.MODEL
    if set(_TOKENIZER_FILES) & names:
        return Kind.TOKENIZER
    if "config.json" in names and "model_type" in _json_keys(fs, sfs.join(path, "config.json")):
        return Kind.MODEL  # a model config without weights (train-student --student accepts it)
    visible = [n for n in names if not n.startswith(".")]
    if visible and all(n.endswith(_CORPUS_SUFFIXES) for n in visible):
        return Kind.CORPUS
    return Kind.DIRECTORY


def _json_keys(fs, path: str) -> set[str]:
    """Top-level keys of a small regular JSON file; empty for anything else (a device, FIFO, directory, large,
    non-UTF-8 or non-JSON file is not a report, manifest or config: `read_side_json` never reads it whole)."""
    try:
        if fs.isdir(path):
            return set()
        value = read_side_json(path, fs=fs, max_bytes=_REPORT_MAX_BYTES)
    except (OSError, UserError):  # missing, unreadable, or refused by the side-file rule: not one of ours
        return set()
    return set(value) if isinstance(value, dict) else set()


def _head(fs, path: str, n: int = 1024) -> bytes:
    try:
        if sfs.is_local(fs) and not os.path.isfile(path):
            return b""
        with fs.open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _file_kind(fs, path: str) -> Kind:
    """The kind of an existing file by its content or name (its directory is looked at by the caller)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    suffix = os.path.splitext(name)[1]
    head = _head(fs, path)
    if head.lstrip().startswith(b"{") and set(_REPORT_KEYS) <= _json_keys(fs, path):  # whatever its name
        return Kind.REPORT
    if any(head.lstrip().startswith(m) for magics in _FIGURE_MAGIC.values() for m in magics):
        return Kind.FIGURE
    if suffix in _FIGURE_SUFFIXES and suffix not in _FIGURE_MAGIC:  # formats without a magic checked here
        return Kind.FIGURE
    if name.endswith(_CORPUS_SUFFIXES):
        return Kind.CORPUS
    return Kind.FILE


def _parent(path: str) -> str | None:
    parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else None
    return parent if parent and parent != path else None


def artifact(path: str, *, ignore: Iterable[str] = ()) -> Artifact:
    """What `path` (local or fsspec URL) holds. A path inside a cache, a run's owned names or a model
    directory is a part of it, whatever its own content; `ignore`: names in `path` not looked at (a lock
    this process holds)."""
    fs, p = sfs.resolve(path)
    parent = _parent(p)
    if parent is not None and fs.exists(parent) and fs.isdir(parent):
        up = _dir_kind(fs, parent)
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if up is Kind.CACHE or _SHARD_RE.match(name):
            return Artifact(Kind.CACHE_PART, _show(fs, parent, path))
        if up is Kind.RUN and name in RUN_NAMES:  # final/ too: a run's model is replaced by its run only
            return Artifact(Kind.RUN_PART, _show(fs, parent, path))
        if up is Kind.MODEL and fs.exists(p) and not fs.isdir(p) and fs.exists(sfs.join(parent, "config.json")):
            return Artifact(Kind.MODEL_PART, _show(fs, parent, path))
    if not fs.exists(p):
        return Artifact(Kind.ABSENT)
    if fs.isdir(p):
        return Artifact(_dir_kind(fs, p, ignore))
    return Artifact(_file_kind(fs, p))


def artifact_kind(path: str) -> Kind:
    """The kind of what `path` holds (see `artifact`)."""
    return artifact(path).kind


def _show(fs, inner: str, original: str) -> str:
    """`inner` spelt as the user spelt the path it came from (a local path, or a URL with its protocol)."""
    if "://" in original:
        return original.split("://", 1)[0] + "://" + inner.split("://", 1)[-1]
    return inner


def _real(path: str) -> str | None:
    """The resolved local path (symlinks followed), None for a URL."""
    if "://" in path and not path.startswith("file://"):
        return None
    return os.path.realpath(path.removeprefix("file://"))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _containers_above(path: str) -> tuple[Kind, str] | None:
    """The nearest directory above local `path` that is a cache or a transformers model directory (its
    `config.json` beside the weights), or a run directory `path` would write an owned name of; None when
    there is none. A directory that merely holds `.gguf` files or a tokenizer is often a shared folder of
    models, so writing beside them is left alone."""
    import fsspec

    fs = fsspec.filesystem("file")
    child, parent = path, os.path.dirname(path)
    while parent and parent != child:
        if os.path.isdir(parent):
            kind = _dir_kind(fs, parent)
            if kind is Kind.CACHE or (kind is Kind.MODEL and os.path.isfile(os.path.join(parent, "config.json"))):
                return kind, parent
            if kind is Kind.RUN and os.path.basename(child) in RUN_NAMES:
                return kind, parent
        child, parent = parent, os.path.dirname(parent)
    return None


def check_output(output: str, *, command: str, writes: Kind, inputs: Sequence[Input] = (),
                 replace_flag: str | None = None, replace: bool = False, flag: str = "--output",
                 ignore: Iterable[str] = ()) -> Artifact:
    """Refuse (ConfigError, one line) an `output` that `command` must not write; returns what it holds.

    `writes`: the kind the command makes (CACHE, RUN, MODEL: a directory; REPORT, FIGURE: a file). An
    existing output of that kind is accepted only with `replace` (the command's `replace_flag` was given,
    or it resumes its own kind, as precompute does); an empty directory or a new path always. Anything else
    is refused: another kind, one of `inputs` (the same path, inside one unless it allows it, or holding
    one), a path inside a cache or a model directory, or a name a run directory owns."""
    held = artifact(output, ignore=ignore)
    out_real = _real(output)
    for inp in inputs:
        if not inp.path:
            continue
        in_real = _real(inp.path)
        same_fs = (out_real is None) == (in_real is None)
        a, b = (out_real, in_real) if out_real is not None else (output.rstrip("/"), inp.path.rstrip("/"))
        if not same_fs or b is None:
            continue
        if a == b:
            raise ConfigError(f"{flag} {output} is {inp.flag} {inp.path}, an input of {command}; choose another "
                              f"{flag}")
        if _within(a, b) and not inp.output_inside_ok:
            raise ConfigError(f"{flag} {output} is inside {inp.flag} {inp.path}, an input of {command}; choose "
                              f"another {flag}")
        if _within(b, a):
            raise ConfigError(f"{flag} {output} holds {inp.flag} {inp.path}, an input of {command}; choose "
                              f"another {flag}")
    is_file_kind = writes in FILE_KINDS
    if held.kind is writes:
        if replace:
            return held
        how = f"pass {replace_flag} to replace it" if replace_flag else "nothing replaces it"
        if writes is Kind.RUN:
            how = f"pass {replace_flag} to continue it"
        raise ConfigError(f"{flag} {output} already holds {held.phrase()}; {how}, or choose another {flag}")
    if held.kind is Kind.ABSENT or (held.kind is Kind.EMPTY and not is_file_kind):
        if out_real is not None and (above := _containers_above(out_real)) is not None:
            kind, where = above
            raise ConfigError(f"{flag} {output} is inside {kind.value} {where}; {command} writes "
                              f"{writes.value} only outside it: choose another {flag}")
        return held
    if is_file_kind and held.kind in (Kind.EMPTY, Kind.DIRECTORY, Kind.CACHE, Kind.RUN, Kind.MODEL,
                                      Kind.TOKENIZER, Kind.CORPUS) and os.path.isdir(out_real or ""):
        extra = "" if held.kind in (Kind.EMPTY, Kind.DIRECTORY) else f" ({held.phrase()})"
        raise ConfigError(f"{flag} {output} is a directory{extra}; give a file name for {writes.value}")
    if not is_file_kind and held.kind is Kind.FILE:
        raise ConfigError(f"{output}: is a file, not a directory; choose another {flag}")
    if not is_file_kind and out_real is not None and os.path.isfile(out_real):
        raise ConfigError(f"{flag} {output} is a file ({held.phrase()}), not a directory; {command} writes "
                          f"{writes.value} and never replaces another kind: choose another {flag}")
    raise ConfigError(f"{flag} {output} holds {held.phrase()}; {command} writes {writes.value} and never "
                      f"replaces another kind: choose another {flag}")


def existing_paths(values: Iterable[str | None]) -> list[str]:
    """The values that name an existing local path or URL (hub ids and presets are left out)."""
    out = []
    for v in values:
        if not v:
            continue
        try:
            fs, p = sfs.resolve(v)
            if fs.exists(p):
                out.append(v)
        except (OSError, ValueError, UserError):  # not a path this machine can open: a hub id, a preset
            continue
    return out
