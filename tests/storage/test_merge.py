"""merge_manifests / open_manifest / write_merged: slices join into one manifest or are refused by name."""

from __future__ import annotations

import copy

import pytest
from storage_helpers import make_header, write_run

from storage.errors import ManifestError, MismatchError
from storage.manifest import ShardInfo
from storage.merge import merge_manifests, open_manifest, write_merged


def _slice(index: int, num: int, shards: list[tuple[int, int]], **kw):
    """A slice manifest listing (global index, rows) shards."""
    m = make_header(slice_index=index, num_slices=num, **kw)
    m.shards = [ShardInfo(index=g, file=f"shard-{g:06d}.parquet", rows=r, first_seq_id=g * 8,
                          last_seq_id=g * 8 + r - 1, bytes=100 + g, sha256=f"{g:064x}") for g, r in shards]
    return m


def test_two_slices_equal_one_whole(tmp_path):
    rows = [8, 8, 8, 5]
    whole, _ = write_run(str(tmp_path / "whole"), make_header(schema_version=1), rows=rows)
    slices = [write_run(str(tmp_path / "sliced"), make_header(slice_index=s, num_slices=2), rows=rows)[0]
              for s in range(2)]
    merged = merge_manifests(slices)
    assert merged.shards == whole.shards
    assert (merged.slice_index, merged.num_slices) == (0, 1)
    assert merged.notes["merged_from_slices"] == 2
    assert merge_manifests(list(reversed(slices))).shards == whole.shards  # order of inputs does not matter
    plain = copy.deepcopy(merged)
    plain.notes = {}
    assert plain == whole

    assert not (tmp_path / "sliced" / "manifest.json").exists()
    assert open_manifest(str(tmp_path / "sliced")).shards == whole.shards
    written = write_merged(str(tmp_path / "sliced"))
    assert (tmp_path / "sliced" / "manifest.json").exists()
    assert open_manifest(str(tmp_path / "sliced")) == written


def _stats(documents: int, windows: int, truncated: bool, read: list[int], seconds: float) -> dict:
    return {"packing": {"documents": documents, "tokens": windows * 8 + 3, "windows": windows, "dropped_tokens": 3,
                        "truncated_by_max_tokens": truncated},
            "partitions": {"total": 3, "read": read, "windows": {str(p): windows // len(read) for p in read}},
            "this_run": {"sequences": windows, "shards": 1, "corpus_bytes_read": 100 * documents,
                         "teacher_seconds": seconds}}


def test_merged_manifest_reports_the_whole_runs_statistics():
    """Counts and seconds are summed over the slices, partitions joined, truncation true if any slice's was,
    and every slice's own statistics are kept under notes["slices"]; the other notes are the slices' shared ones."""
    a = _slice(0, 2, [(0, 8), (2, 8)], notes={"backend": {"device": "cpu"}, **_stats(5, 16, False, [0, 2], 1.25)})
    b = _slice(1, 2, [(1, 8)], notes={"backend": {"device": "cpu"}, **_stats(2, 8, True, [1], 0.5)})
    merged = merge_manifests([b, a])
    notes = merged.notes
    assert notes["backend"] == {"device": "cpu"} and notes["merged_from_slices"] == 2
    assert notes["packing"] == {"documents": 7, "tokens": 16 * 8 + 3 + 8 * 8 + 3, "windows": 24, "dropped_tokens": 6,
                                "truncated_by_max_tokens": True}
    assert notes["partitions"] == {"total": 3, "read": [0, 1, 2], "windows": {"0": 8, "1": 8, "2": 8}}
    assert notes["this_run"] == {"sequences": 24, "shards": 2, "corpus_bytes_read": 700, "teacher_seconds": 1.75}
    assert notes["slices"] == {"0": _stats(5, 16, False, [0, 2], 1.25), "1": _stats(2, 8, True, [1], 0.5)}
    assert a.notes["this_run"]["sequences"] == 16  # the slices' manifests are not changed

    # slices without statistics (written by code other than precompute): no run statistics are made up
    plain = merge_manifests([_slice(0, 2, [(0, 8)]), _slice(1, 2, [(1, 8)])])
    assert not {"packing", "partitions", "this_run", "slices"} & set(plain.notes)


def test_missing_range_named():
    a = _slice(0, 2, [(0, 8), (4, 8)])
    b = _slice(1, 2, [(1, 8), (5, 3)])
    with pytest.raises(ManifestError, match=r"seq ids 16\.\.31 \(shards 2\.\.3\) are missing"):
        merge_manifests([a, b])
    b = _slice(1, 2, [(1, 8), (3, 8), (5, 3)])
    with pytest.raises(ManifestError, match=r"seq ids 16\.\.23 \(shard 2\) are missing"):
        merge_manifests([a, b])


def test_partial_shard_that_is_not_last_refused():
    a = _slice(0, 2, [(0, 8), (2, 8)])
    b = _slice(1, 2, [(1, 5), (3, 1)])
    with pytest.raises(ManifestError, match=r"seq ids 13\.\.15 \(shard 1\) are missing .*holds 5 of 8 rows"):
        merge_manifests([a, b])


def test_overlap_named():
    a = _slice(0, 1, [(0, 8), (1, 8)])
    b = _slice(0, 1, [(1, 8)])
    b.slice_index = 0
    with pytest.raises(ManifestError, match="slice 0 of 1 appears twice"):
        merge_manifests([a, b])
    # two slices of a run listing the same shard (e.g. slices launched with a wrong --num-slices)
    a = _slice(0, 2, [(0, 8), (2, 8)])
    b = _slice(1, 2, [(1, 8)])
    b.shards.append(copy.deepcopy(a.shards[1]))
    with pytest.raises(ManifestError, match=r"seq ids 16\.\.23 \(shard 2\) overlap: listed by a and by b"):
        merge_manifests([a, b], sources=["a", "b"])


def test_run_field_mismatch_named():
    a = _slice(0, 2, [(0, 8)])
    b = _slice(1, 2, [(1, 8)], top_k=8)
    with pytest.raises(MismatchError, match=r"'top_k': 4 vs 8") as info:
        merge_manifests([a, b])
    assert info.value.field == "top_k"
    b = _slice(1, 2, [(1, 8)], pooled={2: 8, 5: 16})
    with pytest.raises(MismatchError, match="'pooled_dims'"):
        merge_manifests([a, b])


def test_num_slices_disagreement_and_missing_slice():
    a = _slice(0, 2, [(0, 8)])
    b = _slice(1, 3, [(1, 8)])
    with pytest.raises(MismatchError, match=r"'num_slices': 2 vs 3"):
        merge_manifests([a, b])
    with pytest.raises(ManifestError, match=r"slice\(s\) \[1\] of 2 are missing \(manifest-slice-00001-of-00002"):
        merge_manifests([a])
    with pytest.raises(ManifestError, match="no manifests"):
        merge_manifests([])


def test_slice_file_names_must_agree(tmp_path):
    write_run(str(tmp_path), make_header(slice_index=0, num_slices=2), rows=[8, 8])
    write_run(str(tmp_path), make_header(slice_index=1, num_slices=2), rows=[8, 8])
    (tmp_path / "manifest-slice-00001-of-00002.json").rename(tmp_path / "manifest-slice-00001-of-00003.json")
    with pytest.raises(ManifestError, match=r"disagree on the number of slices: \[2, 3\]"):
        open_manifest(str(tmp_path))


def test_memory_url(memory_url):
    for s in range(2):
        write_run(memory_url, make_header(slice_index=s, num_slices=2), rows=[8, 8, 1])
    merged = write_merged(memory_url)
    assert [s.index for s in merged.shards] == [0, 1, 2] and merged.num_sequences == 17
    assert open_manifest(memory_url) == merged


def test_partitions_are_checked_one_by_one():
    """Schema v2: slice s of n owns partitions p % n == s; each partition's shards must be contiguous from
    its first, and only a partition's last shard may be partial."""
    from storage.layout import SHARDS_PER_PARTITION as S

    def part(index, shards):
        return _slice(index, 2, shards, schema_version=2, num_partitions=3)

    a = part(0, [(0, 8), (1, 5), (2 * S, 8)])
    b = part(1, [(S, 3)])
    merged = merge_manifests([a, b])
    assert [s.index for s in merged.shards] == [0, 1, S, 2 * S]
    with pytest.raises(ManifestError, match=r"shard 1\) are missing"):
        merge_manifests([part(0, [(0, 8), (2, 8)]), b])
    with pytest.raises(ManifestError, match="not the last of partition 0"):
        merge_manifests([part(0, [(0, 5), (1, 8)]), b])
    with pytest.raises(ManifestError, match="does not belong to slice 1"):
        part(1, [(2 * S, 8)]).validate()
    with pytest.raises(ManifestError, match="beyond num_partitions 3"):
        part(1, [(3 * S, 8)]).validate()
