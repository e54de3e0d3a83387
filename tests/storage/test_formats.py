"""Every shard format through the same tests (round trip bit for bit, sampled targets, an fsspec URL, same
data same bytes) and the registry that picks a format by name. Format-specific layout and corruption tests
are in test_parquet.py and test_zarr.py."""

from __future__ import annotations

import numpy as np
import pytest
from storage_helpers import assert_targets_equal, make_header, write_run

from storage.formats import FORMATS, format_of_file, shard_format
from storage.reader import TeacherDataset
from storage.records import TeacherTargets


@pytest.fixture(params=["parquet", "zarr-sharded", "zarr-chunked"])
def fmt(request, monkeypatch) -> str:
    """Each format; Zarr in both layouts (sharded, the default, and chunked, caches written before)."""
    name, _, layout = request.param.partition("-")
    if layout:
        from storage import zarr_shard

        monkeypatch.setattr(zarr_shard, "SHARDED", layout == "sharded")
    return name


def _take(t: TeacherTargets, idx: np.ndarray) -> TeacherTargets:
    return TeacherTargets(seq_ids=t.seq_ids[idx], input_ids=t.input_ids[idx], topk_ids=t.topk_ids[idx],
                          topk_logprobs=t.topk_logprobs[idx], entropy=t.entropy[idx],
                          pooled={k: v[idx] for k, v in t.pooled.items()})


@pytest.mark.parametrize("logprob_dtype", ["float16", "float32"])
@pytest.mark.parametrize("entropy_kind", ["exact", "absent"])
@pytest.mark.parametrize("pooled", [{}, {3: 8, 7: 12, 11: 4}])
def test_round_trip_bit_for_bit(tmp_path, fmt, logprob_dtype, entropy_kind, pooled):
    header = make_header(fmt=fmt, logprob_dtype=logprob_dtype, entropy_kind=entropy_kind, pooled=pooled)
    manifest, written = write_run(str(tmp_path), header)
    ds = TeacherDataset.open(str(tmp_path))
    assert len(ds) == len(written) == 19
    assert_targets_equal(ds.read(np.arange(len(ds))), written, header)
    assert [s.rows for s in manifest.shards] == [8, 8, 3]
    assert [s.file for s in manifest.shards] == [f"shard-00000{i}.{fmt}" for i in range(3)]


@pytest.mark.parametrize("entropy_kind", ["exact", "absent"])
def test_sampled_round_trip_bit_for_bit(tmp_path, fmt, entropy_kind):
    header = make_header(fmt=fmt, target_kind="sampled", top_k=6, entropy_kind=entropy_kind)
    manifest, written = write_run(str(tmp_path), header)
    ds = TeacherDataset.open(str(tmp_path))
    assert ds.manifest.target_kind == "sampled" and ds.manifest.samples == 6
    assert_targets_equal(ds.read(np.arange(len(ds))), written, header)
    assert [s.rows for s in manifest.shards] == [8, 8, 3]


def test_memory_url_round_trip(memory_url, fmt):
    header = make_header(fmt=fmt)
    _, written = write_run(memory_url, header)
    ds = TeacherDataset.open(memory_url)
    assert_targets_equal(ds.read(np.arange(len(ds))), written, header)
    order = np.array([18, 0, 9, 9, 3])
    assert_targets_equal(ds.read(order), _take(written, order), header)


def test_same_data_same_bytes(tmp_path, fmt):
    header = make_header(fmt=fmt)
    a, _ = write_run(str(tmp_path / "a"), header)
    b, _ = write_run(str(tmp_path / "b"), header)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_registry_picks_the_format_by_name_and_suffix(tmp_path):
    assert FORMATS == ("parquet", "zarr")
    for name in FORMATS:
        assert shard_format(name).name == name and shard_format(name) is shard_format(name)
        assert format_of_file(f"shard-000003.{name}") is shard_format(name)
    assert format_of_file("manifest.json") is None
    write_run(str(tmp_path / "t.zarr"), make_header(fmt="zarr"))
    zarr = shard_format("zarr")
    assert zarr.is_shard(*_local(tmp_path / "t.zarr" / "shard-000000.zarr"))
    assert not zarr.is_shard(*_local(tmp_path / "t.zarr"))  # a teacher directory named *.zarr
    header, index, rows = zarr.read_header(*_local(tmp_path / "t.zarr" / "shard-000001.zarr"))
    assert (index, rows, header["format"]) == (1, 8, "zarr")


def _local(path) -> tuple:
    from storage import fs as sfs

    return sfs.resolve(str(path))
