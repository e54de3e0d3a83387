"""Shard formats, chosen by name through one registry (`--format`, `Manifest.format`).

Each format is one class in its own module (`storage/parquet.py`: `ParquetFormat`, `storage/zarr_shard.py`:
`ZarrFormat`) with the same four methods; code that writes, opens or describes a shard asks `shard_format`
for the class of the manifest's format and never tests the format's name. The modules (pyarrow, zarr) are
imported only when a format is first used.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any, Protocol

import numpy as np

_REGISTRY: dict[str, tuple[str, str]] = {
    "parquet": ("storage.parquet", "ParquetFormat"),
    "zarr": ("storage.zarr_shard", "ZarrFormat"),
}
FORMATS = tuple(_REGISTRY)
"""Format names, which are also the shard files' suffixes (`shard-GGGGGG.<format>`)."""


class ShardReader(Protocol):
    """Random access to the rows of one shard (opened in the process that reads it)."""

    def read(self, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Columns `names` of the sorted local `rows`: {name: [n, *shape]}."""
        ...

    def close(self) -> None: ...


class ShardFormat:
    """One shard format: write a shard, open it for reading, read the header stored inside it. A format
    module subclasses it with its own functions and reader class."""

    name: str
    """The format's name and file suffix."""

    def write(self, fs: Any, path: str, data: dict[str, np.ndarray], m: Any, index: int) -> None:
        """Write global shard `index` (arrays from `schema.to_columns`) to a temporary name, then rename it
        to `path`; the same data and manifest give the same bytes."""
        raise NotImplementedError

    def open(self, fs: Any, path: str, m: Any, info: Any) -> ShardReader:
        """A reader of the shard at `path`, listed in manifest `m` as `info`."""
        raise NotImplementedError

    def read_header(self, fs: Any, path: str) -> tuple[dict, int, int]:
        """(shard header, global shard index, rows) stored inside the shard."""
        raise NotImplementedError

    def is_shard(self, fs: Any, path: str) -> bool:
        """Whether `path` (named `*.<format>`) is a shard of this format rather than something else."""
        return True


@cache
def shard_format(name: str) -> ShardFormat:
    """The format class registered as `name` (manifests are validated, so the name is known)."""
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def format_of_file(name: str) -> ShardFormat | None:
    """The format whose suffix `name` (a file or directory name) ends with, or None."""
    for fmt in FORMATS:
        if name.endswith(f".{fmt}"):
            return shard_format(fmt)
    return None
