"""TeacherDataset: indexing, verification on open, slice manifests, worker processes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from storage_helpers import assert_targets_equal, make_header, write_run

from storage.errors import ManifestError, ShardCorruptError
from storage.reader import TeacherDataset


@pytest.fixture
def teacher(tmp_path):
    header = make_header()
    manifest, written = write_run(str(tmp_path), header)
    return tmp_path, header, manifest, written


def test_indexing(teacher):
    path, header, manifest, written = teacher
    ds = TeacherDataset.open(str(path))
    assert len(ds) == 19 and ds.manifest == manifest
    np.testing.assert_array_equal(ds.seq_ids, np.arange(19))
    assert ds.seq_ids.dtype == np.int64
    assert ds.position_of(17) == 17
    np.testing.assert_array_equal(ds.position_of(np.array([3, 0])), [3, 0])
    with pytest.raises(KeyError, match="seq id 19 is not in"):
        ds.position_of(19)


def test_read_columns_shapes_order_and_duplicates(teacher):
    path, header, _, written = teacher
    ds = TeacherDataset.open(str(path))
    order = [18, 3, 3, 9, 0]
    cols = ds.read_columns(order)
    assert cols["seq_id"].shape == (5,)
    assert cols["input_ids"].shape == (5, 16) and cols["input_ids"].dtype == np.int32
    assert cols["topk_ids"].shape == (5, 16, 4)
    assert cols["topk_logprobs"].shape == (5, 16, 4) and cols["topk_logprobs"].dtype == np.float16
    assert cols["entropy"].shape == (5, 16)
    assert cols["pooled_5"].shape == (5, 12) and cols["pooled_2"].shape == (5, 8)
    np.testing.assert_array_equal(cols["seq_id"], order)
    np.testing.assert_array_equal(cols["topk_ids"], written.topk_ids[order])
    np.testing.assert_array_equal(cols["pooled_5"], written.pooled[5][order])
    assert all(a.flags.writeable and a.flags.c_contiguous for a in cols.values())
    only = ds.read_columns(np.array([], dtype=np.int64), ["topk_ids"])
    assert list(only) == ["topk_ids"] and only["topk_ids"].shape == (0, 16, 4)
    with pytest.raises(KeyError, match="unknown column 'logits'"):
        ds.read_columns([0], ["logits"])
    with pytest.raises(IndexError, match=r"position 19 is outside 0\.\.18"):
        ds.read_columns([19])


def test_missing_shard(teacher):
    path, *_ = teacher
    (path / "shard-000001.parquet").unlink()
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.parquet: missing"):
        TeacherDataset.open(str(path))
    ds = TeacherDataset.open(str(path), verify=False)
    ds.read_columns([0, 18])
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.parquet: shard file is missing"):
        ds.read_columns([8])


def test_only_manifest_shards_are_listed(teacher):
    path, *_ = teacher
    (path / "shard-000003.parquet").write_bytes(b"stray file from another run")
    assert len(TeacherDataset.open(str(path))) == 19


def test_newer_schema_version_refused(teacher):
    path, *_ = teacher
    d = json.loads((path / "manifest.json").read_text())
    d["schema_version"] = 3
    (path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"manifest\.json: schema_version 3 is newer than this reader"):
        TeacherDataset.open(str(path))


def test_not_a_teacher_directory(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json and no manifest-slice"):
        TeacherDataset.open(str(tmp_path))
    with pytest.raises(ManifestError, match="does not exist"):
        TeacherDataset.open(str(tmp_path / "nope"))


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_slices_are_merged_on_open(tmp_path, fmt):
    whole = make_header(fmt=fmt)
    _, written = write_run(str(tmp_path / "whole"), whole, rows=[8, 8, 8, 2])
    for s in range(2):
        write_run(str(tmp_path / "sliced"), make_header(fmt=fmt, slice_index=s, num_slices=2), rows=[8, 8, 8, 2])
    assert not (tmp_path / "sliced" / "manifest.json").exists()
    ds = TeacherDataset.open(str(tmp_path / "sliced"))
    assert len(ds) == 26 and ds.manifest.num_slices == 1
    assert_targets_equal(ds.read(np.arange(26)), written, whole)


def test_missing_slice_refused(tmp_path):
    for s in (0, 2):
        write_run(str(tmp_path), make_header(slice_index=s, num_slices=3), rows=[8, 8, 8, 8])
    with pytest.raises(ManifestError, match=r"1 of 3 slice manifests are missing: manifest-slice-00001-of-00003"):
        TeacherDataset.open(str(tmp_path))


def test_pickle_drops_open_files(teacher):
    path, *_ = teacher
    ds = TeacherDataset.open(str(path))
    ds.read_columns([0, 10])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.read_columns([10])["topk_ids"], ds.read_columns([10])["topk_ids"])


class _Torchable:
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.read_columns([i], ["seq_id", "topk_ids"])


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_dataloader_workers(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    header = make_header(fmt=fmt)
    _, written = write_run(str(tmp_path), header)
    ds = TeacherDataset.open(str(tmp_path))
    ds.read_columns([0])  # the parent has open files before the workers fork
    loader = torch.utils.data.DataLoader(_Torchable(ds), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    seen = {}
    for item in loader:
        seen[int(item["seq_id"][0])] = item["topk_ids"][0].numpy()
    assert sorted(seen) == list(range(19))
    for i, ids in seen.items():
        np.testing.assert_array_equal(ids, written.topk_ids[i])


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_shard_copied_over_another_is_refused_without_verify(tmp_path, fmt):
    """Same size, decodes fine, wrong data: caught by the shard index and seq ids stored in the shard."""
    import shutil

    write_run(str(tmp_path), make_header(fmt=fmt))
    src, dst = tmp_path / f"shard-000000.{fmt}", tmp_path / f"shard-000001.{fmt}"
    if fmt == "zarr":
        shutil.rmtree(dst)
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    with pytest.raises(ShardCorruptError, match=rf"shard-000001\.{fmt}: holds shard 0, the manifest lists it as shard 1"):
        ds.read_columns([8])


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_no_flipped_byte_returns_garbage(tmp_path, fmt):
    """Flip bytes all over a shard (data, page headers, footer, chunk and metadata files): every read either
    raises ShardCorruptError or returns exactly the written data."""
    header = make_header(fmt=fmt, seq_len=8, top_k=2, shard_size=4, pooled={1: 4})
    m, _ = write_run(str(tmp_path), header, rows=[4])
    want = TeacherDataset.open(str(tmp_path)).read_columns(np.arange(4))
    shard = tmp_path / m.shards[0].file
    files = [shard] if fmt == "parquet" else [shard / "zarr.json", shard / "topk_logprobs" / "zarr.json",
                                              shard / "topk_logprobs" / "c" / "0" / "0" / "0",  # shard + index
                                              shard / "seq_id" / "c" / "0"]
    outcomes = {"error": 0, "same": 0}
    for path in files:
        data = path.read_bytes()
        for offset in range(0, len(data), max(1, len(data) // 60)):
            damaged = bytearray(data)
            damaged[offset] ^= 0xFF
            path.write_bytes(bytes(damaged))
            try:
                got = TeacherDataset.open(str(tmp_path), verify=False).read_columns(np.arange(4))
            except ShardCorruptError:
                outcomes["error"] += 1
            else:
                assert all(np.array_equal(got[n], want[n]) for n in want), f"garbage from {path} @ {offset}"
                outcomes["same"] += 1
            path.write_bytes(data)
    assert outcomes["error"] > 0.5 * sum(outcomes.values())


@pytest.mark.parametrize("max_open", [64, 1])
def test_threads_share_one_dataset(teacher, monkeypatch, max_open):
    """Many threads on one dataset: reads of one shard take turns, evicted shards stay usable mid-read."""
    from concurrent.futures import ThreadPoolExecutor

    import storage.reader

    monkeypatch.setattr(storage.reader, "MAX_OPEN_SHARDS", max_open)
    path, _, _, written = teacher
    ds = TeacherDataset.open(str(path))
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, 19, 4) for _ in range(400)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: ds.read_columns(p, ["topk_ids", "topk_logprobs"]), picks))
    for p, got in zip(picks, results, strict=True):
        np.testing.assert_array_equal(got["topk_ids"], written.topk_ids[p])
        np.testing.assert_array_equal(got["topk_logprobs"], written.topk_logprobs[p].astype(np.float16))
    assert len(ds._readers) <= max_open
    ds.close()


# ---- the manifest's run fields against each shard's own header --------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
@pytest.mark.parametrize(("edit", "field", "values"), [
    pytest.param(lambda d: d.update(temperature=2.0), "temperature", "2.0 in the manifest, 1.0 in the shard",
                 id="temperature"),
    pytest.param(lambda d: d.update(vocab_size=120), "vocab_size", "120 in the manifest, 100 in the shard",
                 id="vocab_size"),
    pytest.param(lambda d: d.update(tokenizer_fingerprint="x" * 12), "tokenizer_fingerprint",
                 "'xxxxxxxxxxxx' in the manifest", id="tokenizer"),
    pytest.param(lambda d: d["teacher"].update(name="other"), "teacher.name",
                 "'other' in the manifest, 'tiny' in the shard", id="teacher.name"),
    pytest.param(lambda d: d.update(entropy_kind="estimate"), "entropy_kind",
                 "'estimate' in the manifest, 'exact' in the shard", id="entropy_kind"),
])
def test_edited_run_fields_are_refused_when_a_shard_is_opened(tmp_path, fmt, edit, field, values):
    """An edit of manifest.json leaves every shard's size and sha256 valid; the header each shard stores
    (Parquet footer metadata, Zarr group attributes) still holds the run's true values. Opening with
    verification compares the first shard's header; a reader compares each shard's when it opens it."""
    from storage.errors import MismatchError

    write_run(str(tmp_path), make_header(fmt=fmt))
    d = json.loads((tmp_path / "manifest.json").read_text())
    edit(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    for verify, shard, read in (("full", 0, None), ("off", 0, None), (False, 1, [9])):
        with pytest.raises(MismatchError) as err:
            ds = TeacherDataset.open(str(tmp_path), verify=verify)  # sizes and sha256 still match
            ds.read_columns(read)
        msg = str(err.value)
        assert f"shard-{shard:06d}.{fmt}" in msg and repr(field) in msg and values in msg, msg
        assert err.value.field == field


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_unedited_and_merged_manifests_match_their_shards(tmp_path, fmt):
    """The check passes for a plain cache and for slice manifests merged on open (no notes or slice
    fields are compared: they are not in the shards)."""
    write_run(str(tmp_path / "whole"), make_header(fmt=fmt))
    TeacherDataset.open(str(tmp_path / "whole")).read_columns(np.arange(19))
    for s in range(2):
        write_run(str(tmp_path / "sliced"), make_header(fmt=fmt, slice_index=s, num_slices=2), rows=[8, 8, 8])
    TeacherDataset.open(str(tmp_path / "sliced")).read_columns(np.arange(24))
