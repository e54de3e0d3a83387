"""The layout of a teacher cache: its file names, and which shard and partition a sequence id lies in.

A teacher directory (local path or fsspec URL):

    manifest.json                               # written last, atomically (single slice, or merged)
    manifest-slice-00000-of-00004.json          # one per node when the run is sliced
    shard-000000.parquet | shard-000000.zarr/   # global shard index g holds seq ids
                                                # [g * shard_size, (g + 1) * shard_size)

The corpus is cut into `num_partitions` partitions (byte ranges or files of a local corpus, the data files
of a hub dataset), fixed by the corpus alone. Each partition is packed on its own; window w of partition p
lands in global shard g = p * SHARDS_PER_PARTITION + w // shard_size, and its sequence id is
g * shard_size + w % shard_size. Ids therefore depend only on corpus, partitioning, tokenizer and seq_len,
never on the number of slices: caches made with 4 slices join caches made with 1. Slice s of n owns the
partitions p with p % n == s (so it reads only them) and every shard in them (`Manifest.slice_of`).

Schema version 1 (before partitions) numbered windows of one unpartitioned stream; such a cache is read as
a single partition, and slice s of n owned the shards g % n == s.
"""

from __future__ import annotations

import re

SHARDS_PER_PARTITION = 1 << 20
"""Global shard indices reserved per corpus partition (partition p holds shards p * 2**20 ...)."""
MANIFEST_NAME = "manifest.json"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def slice_manifest_name(slice_index: int, num_slices: int) -> str:
    """File name of the manifest one slice writes."""
    return f"manifest-slice-{slice_index:05d}-of-{num_slices:05d}.json"


def partition_of(shard: int) -> int:
    """The corpus partition global shard `shard` belongs to."""
    return shard // SHARDS_PER_PARTITION


def shard_of(partition: int, window: int, shard_size: int) -> int:
    """Global shard holding window `window` (0-based, within its partition) of partition `partition`."""
    return partition * SHARDS_PER_PARTITION + window // shard_size


def shard_file_name(index: int, fmt: str) -> str:
    """File (Parquet) or directory (Zarr) name of global shard `index`."""
    return f"shard-{index:06d}.{fmt}"


def is_plain_name(name: object) -> bool:
    """True for a file name without any path part (no "/", "\\", ":", "..", nothing absolute)."""
    return isinstance(name, str) and bool(_PLAIN_NAME.match(name)) and name not in (".", "..")
