"""Zarr v3 shards: plain-zarr readability, layout, the direct encoder, corruption detection (round trip and
determinism of every format: test_formats.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from storage_helpers import assert_targets_equal, flip_byte, make_header, truncate, write_run

from storage.errors import ShardCorruptError
from storage.reader import TeacherDataset


def test_plain_zarr_reads_a_shard(tmp_path):
    """What the README shows: no project code needed to read a shard."""
    header = make_header(fmt="zarr", seq_len=16, top_k=4)
    _, written = write_run(str(tmp_path), header)

    group = zarr.open_group(str(tmp_path / "shard-000001.zarr"), mode="r")
    topk_ids = group["topk_ids"][:]          # [N, L, k] int32
    logprobs = group["topk_logprobs"][2]     # [L, k] of the third sequence

    np.testing.assert_array_equal(group["seq_id"][:], np.arange(8, 16))
    np.testing.assert_array_equal(topk_ids, written.topk_ids[8:16])
    np.testing.assert_array_equal(logprobs, written.topk_logprobs[10].astype(np.float16))
    assert group["pooled_5"].shape == (8, 12)
    assert group.attrs["distill.shard_index"] == 1


def test_layout_sharded_chunked_by_sequence(tmp_path):
    """The default layout: one shard file per array (zarr's sharding codec), inner chunk = one sequence."""
    header = make_header(fmt="zarr")
    write_run(str(tmp_path), header)
    group = zarr.open_group(str(tmp_path / "shard-000000.zarr"), mode="r")
    assert group["topk_ids"].chunks == (1, 16, 4)
    assert group["topk_ids"].shards == (8, 16, 4)
    assert group["input_ids"].chunks == (1, 16)
    assert group["seq_id"].chunks == (8,)
    assert group.attrs["distill.zarr_layout"] == "sharded"
    assert [c.to_dict()["name"] for c in group["topk_logprobs"].compressors] == ["blosc", "crc32c"]
    assert sorted(os.listdir(tmp_path / "shard-000000.zarr" / "topk_ids" / "c" / "0" / "0")) == ["0"]


@pytest.fixture(params=["sharded", "chunked"])
def layout(request, monkeypatch):
    """Both layouts: sharded (the default) and chunked (caches written before sharding, still read)."""
    from storage import zarr_shard

    monkeypatch.setattr(zarr_shard, "SHARDED", request.param == "sharded")
    return request.param


def test_unsharded_cache_still_reads(tmp_path, monkeypatch):
    """A cache in the older layout (one file per chunk, no layout attribute) reads like a sharded one."""
    from storage import zarr_shard

    monkeypatch.setattr(zarr_shard, "SHARDED", False)
    header = make_header(fmt="zarr")
    _, written = write_run(str(tmp_path), header)
    group = zarr.open_group(str(tmp_path / "shard-000000.zarr"), mode="r+")
    assert group["topk_ids"].shards is None
    del group.attrs["distill.zarr_layout"]  # as written before the attribute existed
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    assert_targets_equal(ds.read(np.arange(len(ds))), written, header)


@pytest.mark.parametrize("compressors", ["default", "zstd"])
@pytest.mark.parametrize("chunk_rows", [1, 3])
@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("sharded", [True, False])
def test_direct_encoder_writes_zarrs_bytes(tmp_path, memory_url, monkeypatch, compressors, chunk_rows, where,
                                           sharded):
    """The shard writer encodes chunks (and assembles shard files with their index) itself; the tree it writes
    is byte for byte what zarr's own `arr[...] = data` writes, sharded or not (chunk_rows 3 of 8 rows leaves a
    partial edge chunk, padded by zarr), and zarr reads it back equal."""
    from storage_helpers import make_targets

    from storage import fs as sfs
    from storage import zarr_shard
    from storage.schema import to_columns

    header = make_header(fmt="zarr", logprob_dtype="float16")
    data = to_columns(make_targets(header, 0), header)
    comp = None if compressors == "default" else zarr_shard.zstd_compressors()
    fs, root = sfs.resolve(str(tmp_path) if where == "local" else memory_url)
    direct, by_zarr = sfs.join(root, "direct.zarr"), sfs.join(root, "zarr.zarr")
    kw = dict(compressors=comp, chunk_rows=chunk_rows, sharded=sharded)
    zarr_shard.write_shard(fs, direct, data, header, 0, **kw)
    monkeypatch.setattr(zarr_shard, "chunk_encoder", lambda arr: None)  # every array through zarr itself
    zarr_shard.write_shard(fs, by_zarr, data, header, 0, **kw)
    files = sfs.list_files(fs, direct)
    assert files == sfs.list_files(fs, by_zarr)
    data_files = [f for f in files if "/c/" in f]
    n_chunks = -(-8 // chunk_rows)
    # sharded: one file per array; else one per chunk (seq_id is one chunk)
    assert len(data_files) == (len(data) if sharded else (len(data) - 1) * n_chunks + 1)
    for rel in files:
        assert fs.cat(sfs.join(direct, rel)) == fs.cat(sfs.join(by_zarr, rel)), rel
    group = zarr.open_group(zarr_shard.make_store(fs, direct, read_only=True), mode="r")
    assert group.attrs["distill.zarr_layout"] == ("sharded" if sharded else "chunked")
    for name, values in data.items():
        assert (group[name].shards is not None) == sharded
        np.testing.assert_array_equal(group[name][:], values)
        np.testing.assert_array_equal(group[name][5], values[5])


def _data_file(shard, name: str, row: int, layout: str) -> str:
    """The file holding local `row` of array `name` (sharded: the array's one shard file)."""
    parts = ["0"] if layout == "sharded" else [str(row)]
    ndim = {"entropy": 2, "seq_id": 1}.get(name, 3)
    return str(shard / name / "c" / os.path.join(*parts, *["0"] * (ndim - 1)))


def _byte_of_row(path: str, row: int, layout: str) -> int:
    """An offset inside the encoded chunk of local `row` (sharded: read from the shard index at the end)."""
    if layout == "chunked":
        return os.path.getsize(path) // 2
    with open(path, "rb") as f:
        blob = f.read()
    index = np.frombuffer(blob[-(8 * 16 + 4):-4], dtype="<u8").reshape(8, 2)  # 8 chunks, crc32c after
    offset, length = index[row]
    return int(offset + length // 2)


def test_flipped_byte_detected_without_verify(tmp_path, layout):
    write_run(str(tmp_path), make_header(fmt="zarr"))
    chunk = _data_file(tmp_path / "shard-000001.zarr", "topk_logprobs", 2, layout)
    flip_byte(chunk, _byte_of_row(chunk, 2, layout))
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    ds.read_columns([9], ["topk_logprobs"])
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.zarr: cannot decode array 'topk_logprobs'"):
        ds.read_columns([10], ["topk_logprobs"])
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.zarr: sha256"):
        TeacherDataset.open(str(tmp_path), verify="full")


def test_truncated_chunk_detected_without_verify(tmp_path, layout):
    write_run(str(tmp_path), make_header(fmt="zarr"))
    chunk = _data_file(tmp_path / "shard-000000.zarr", "topk_ids", 4, layout)
    truncate(chunk, os.path.getsize(chunk) // 2)
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    with pytest.raises(ShardCorruptError, match=r"shard-000000\.zarr: cannot decode array 'topk_ids'"):
        ds.read_columns([4])
    with pytest.raises(ShardCorruptError, match=r"shard-000000\.zarr: size is \d+ bytes"):
        TeacherDataset.open(str(tmp_path))


def test_missing_chunk_detected_without_verify(tmp_path, layout):
    """zarr would silently return the fill value for a missing chunk or shard file; the reader refuses."""
    write_run(str(tmp_path), make_header(fmt="zarr"))
    os.remove(_data_file(tmp_path / "shard-000000.zarr", "entropy", 5, layout))
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    found, expected = (0, 1) if layout == "sharded" else (7, 8)
    with pytest.raises(ShardCorruptError, match=rf"array 'entropy' has {found} chunk/shard files, expected {expected}"):
        ds.read_columns([1])


def test_damaged_metadata_detected_without_verify(tmp_path):
    write_run(str(tmp_path), make_header(fmt="zarr"))
    meta = str(tmp_path / "shard-000002.zarr" / "zarr.json")
    truncate(meta, 10)
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    with pytest.raises(ShardCorruptError, match=r"shard-000002\.zarr: not a readable zarr v3 group"):
        ds.read_columns([17])
