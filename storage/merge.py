"""Merging the slice manifests of a sliced run into one manifest (slice 0 of 1), and opening manifests."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from storage import fs as sfs
from storage.consistency import compare_parts
from storage.errors import ManifestError, MismatchError, StorageError
from storage.layout import MANIFEST_NAME, SHARDS_PER_PARTITION, partition_of, slice_manifest_name
from storage.manifest import Manifest, ShardInfo
from storage.run_stats import merged_notes

_SLICE_RE = re.compile(r"^manifest-slice-(\d{5})-of-(\d{5})\.json$")


def _range(m: Manifest, index: int, first: int | None = None, last: int | None = None) -> str:
    first = index * m.shard_size if first is None else first
    last = (index + 1) * m.shard_size - 1 if last is None else last
    return f"seq ids {first}..{last} (shard {index})"


def merge_manifests(manifests: Sequence[Manifest], sources: Sequence[str] | None = None) -> Manifest:
    """Merge the manifests of every slice of one run into one manifest (slice 0 of 1, shards sorted).

    Refuses (naming the field, slice or seq-id range): differing run fields, byte-changing settings
    (consistency.compare_parts) or num_slices, a missing or duplicated slice, a shard listed twice, and gaps:
    within each corpus partition the shards must cover its seq ids contiguously from the partition's first,
    so every shard but a partition's last must be full.
    """
    if not manifests:
        raise ManifestError("no manifests to merge")
    names = list(sources) if sources is not None else [f"slice manifest {m.slice_index}" for m in manifests]
    first = manifests[0]
    for m, name in zip(manifests[1:], names[1:], strict=True):
        if m.num_slices != first.num_slices:
            raise MismatchError(f"{names[0]} and {name} differ in 'num_slices': {first.num_slices} vs "
                                f"{m.num_slices}", "num_slices", (first.num_slices, m.num_slices))
        compare_parts(first, m, what=f"{names[0]} and {name}")
    seen: dict[int, str] = {}
    for m, name in zip(manifests, names, strict=True):
        if m.slice_index in seen:
            raise ManifestError(f"slice {m.slice_index} of {first.num_slices} appears twice "
                                f"({seen[m.slice_index]} and {name})")
        seen[m.slice_index] = name
    missing = sorted(set(range(first.num_slices)) - set(seen))
    if missing:
        files = ", ".join(slice_manifest_name(i, first.num_slices) for i in missing)
        raise ManifestError(f"slice(s) {missing} of {first.num_slices} are missing ({files})")

    by_index: dict[int, tuple[ShardInfo, str]] = {}
    for m, name in zip(manifests, names, strict=True):
        for info in m.shards:
            if info.index in by_index:
                raise ManifestError(f"{_range(m, info.index, info.first_seq_id, info.last_seq_id)} overlap: "
                                    f"listed by {by_index[info.index][1]} and by {name}")
            by_index[info.index] = (info, name)
    shards = [by_index[i][0] for i in sorted(by_index)]
    check_contiguous(first, shards)

    merged = copy.deepcopy(first)
    merged.slice_index, merged.num_slices = 0, 1
    merged.shards = copy.deepcopy(shards)
    if first.num_slices > 1:  # the whole run's statistics, and each slice's own (storage/run_stats.py)
        notes = merged_notes([m.notes for m in manifests], [m.slice_index for m in manifests])
        merged.notes = {**notes, "merged_from_slices": first.num_slices}
    merged.validate("merged manifest")
    return merged


def check_contiguous(m: Manifest, shards: Sequence[ShardInfo]) -> None:
    """Raise ManifestError naming the first missing seq-id range if, within each corpus partition, `shards`
    (sorted) do not cover the partition's first id onwards contiguously (only a partition's last shard may
    hold fewer than shard_size rows). Schema v1 caches are one partition."""
    by_partition: dict[int, list[ShardInfo]] = {}
    for info in shards:
        by_partition.setdefault(partition_of(info.index) if m.schema_version >= 2 else 0, []).append(info)
    for partition, infos in by_partition.items():
        expected = partition * SHARDS_PER_PARTITION if m.schema_version >= 2 else 0
        for pos, info in enumerate(infos):
            if info.index > expected:
                last_missing = expected if info.index == expected + 1 else info.index - 1
                what = _range(m, expected) if last_missing == expected else (
                    f"seq ids {expected * m.shard_size}..{info.index * m.shard_size - 1} "
                    f"(shards {expected}..{last_missing})")
                raise ManifestError(f"{what} are missing")
            if info.index < expected:
                raise ManifestError(f"{_range(m, info.index, info.first_seq_id, info.last_seq_id)} overlap "
                                    "an earlier shard")
            if info.rows < m.shard_size and pos != len(infos) - 1:
                raise ManifestError(f"{_range(m, info.index, info.last_seq_id + 1)} are missing (shard "
                                    f"{info.index} holds {info.rows} of {m.shard_size} rows but is not the last "
                                    f"of partition {partition})")
            expected = info.index + 1


def read_manifest(path: str) -> Manifest:
    """Parse one manifest file (local path or URL); ManifestError naming the file on any problem."""
    fs, p = sfs.resolve(path)
    try:
        text = sfs.read_text(fs, p, label=path, error=ManifestError)
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest is missing") from None
    return Manifest.from_json(text, source=path)


def slice_manifest_paths(path: str) -> list[str]:
    """Paths of the `manifest-slice-*.json` files in teacher directory `path`, sorted."""
    fs, root = sfs.resolve(path)
    if not fs.exists(root):
        raise ManifestError(f"{path}: directory does not exist")
    if not fs.isdir(root):
        raise ManifestError(f"{path}: is a file, not a teacher directory")
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        raise ManifestError(f"{path}: directory does not exist") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot list the directory: {e.strerror or e}") from e
    return [sfs.join(path, n) for n in sorted(names) if _SLICE_RE.match(n)]


def open_slices(path: str) -> Manifest:
    """Read and merge every slice manifest of teacher directory `path` (refusing missing slices)."""
    paths = slice_manifest_paths(path)
    if not paths:
        raise ManifestError(f"{path}: no {MANIFEST_NAME} and no manifest-slice-*.json (not a teacher "
                            "directory, or its precompute has not finished)")
    counts = {int(_SLICE_RE.match(p.rsplit("/", 1)[-1]).group(2)) for p in paths}
    if len(counts) > 1:
        raise ManifestError(f"{path}: slice manifests disagree on the number of slices: {sorted(counts)}")
    manifests = []
    for p in paths:
        m = read_manifest(p)
        i, n = (int(x) for x in _SLICE_RE.match(p.rsplit("/", 1)[-1]).groups())
        if (m.slice_index, m.num_slices) != (i, n):
            raise ManifestError(f"{p}: says slice {m.slice_index} of {m.num_slices}, its name says {i} of {n}")
        manifests.append(m)
    n = counts.pop()
    missing = sorted(set(range(n)) - {m.slice_index for m in manifests})
    if missing:
        files = ", ".join(slice_manifest_name(i, n) for i in missing)
        raise ManifestError(f"{path}: {len(missing)} of {n} slice manifests are missing: {files} "
                            "(those slices have not finished)")
    return merge_manifests(manifests, paths)


def open_manifest(path: str) -> Manifest:
    """The manifest of teacher directory `path`: manifest.json, or the merge of its slice manifests."""
    fs, root = sfs.resolve(path)
    if fs.exists(sfs.join(root, MANIFEST_NAME)):
        return read_manifest(sfs.join(path, MANIFEST_NAME))
    if not fs.exists(root):
        raise ManifestError(f"{path}: directory does not exist")
    return open_slices(path)


def write_merged(path: str) -> Manifest:
    """Merge the slice manifests of `path` and write manifest.json atomically; return the merged manifest.

    A single-slice cache (manifest.json and no slice manifests) needs no merge: its manifest is read,
    validated and returned unchanged. The merge holds `lock-merge.json` (storage/lock.py), and removes the
    `manifest.json.tmp-*` a killed merge left behind before it writes."""
    from storage.lock import MERGE_LOCK, CacheLock

    fs, root = sfs.resolve(path)
    if not slice_manifest_paths(path) and fs.exists(sfs.join(root, MANIFEST_NAME)):
        return read_manifest(sfs.join(path, MANIFEST_NAME))
    merged = open_slices(path)
    with CacheLock(fs, root, MERGE_LOCK, what=f"merging {path}"):
        for full in fs.ls(root, detail=False):
            if full.rstrip("/").rsplit("/", 1)[-1].startswith(f"{MANIFEST_NAME}.tmp-"):
                fs.rm(full, recursive=True)
        sfs.atomic_write_text(fs, sfs.join(root, MANIFEST_NAME), merged.to_json())
    return merged
