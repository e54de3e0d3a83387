"""TargetsWriter: validation, background thread, manifest naming, resume ledger, determinism."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from storage_helpers import flip_byte, make_header, make_targets, write_run

from storage import shards as shard_io
from storage.errors import MismatchError, StorageError
from storage.reader import TeacherDataset
from storage.writer import TargetsWriter, ledger_name


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_manifest_lists_sorted_shards(tmp_path, fmt):
    header = make_header(fmt=fmt)
    with TargetsWriter(str(tmp_path), header) as w:
        for index in (2, 0, 1):  # out of order on purpose
            w.write_shard(index, make_targets(header, index, 3 if index == 2 else None))
    m = w.close()
    assert [s.index for s in m.shards] == [0, 1, 2]
    assert (m.shards[2].first_seq_id, m.shards[2].last_seq_id, m.shards[2].rows) == (16, 18, 3)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["index"] for s in on_disk["shards"]] == [0, 1, 2]
    assert w.close() is m  # idempotent


def test_slice_manifest_name(tmp_path):
    header = make_header(slice_index=1, num_slices=3)
    with TargetsWriter(str(tmp_path), header) as w:
        w.write_shard(1, make_targets(header, 1))
        w.write_shard(4, make_targets(header, 4))
    assert (tmp_path / "manifest-slice-00001-of-00003.json").exists()
    assert not (tmp_path / "manifest.json").exists()
    assert [s.index for s in w.close().shards] == [1, 4]


@pytest.mark.parametrize("background", [True, False])
def test_validation(tmp_path, background):
    header = make_header(slice_index=0, num_slices=2)
    w = TargetsWriter(str(tmp_path), header, background=background)
    with pytest.raises(StorageError, match="shard 1 belongs to slice 1 of 2, this writer is slice 0"):
        w.write_shard(1, make_targets(header, 1))
    bad = make_targets(header, 2)
    bad.seq_ids = bad.seq_ids + 1
    with pytest.raises(StorageError, match=r"contiguous seq ids 16\.\.23, got 17\.\.24"):
        w.write_shard(2, bad)
    big = make_targets(make_header(shard_size=9), 0)
    with pytest.raises(StorageError, match=r"shard 0 has 9 rows, expected 1\.\.8"):
        w.write_shard(0, big)
    longer = make_targets(make_header(seq_len=17), 0)
    with pytest.raises(StorageError, match=r"input_ids has shape \(8, 17\), expected \(8, 16\)"):
        w.write_shard(0, longer)
    no_pool = make_targets(header, 0)
    del no_pool.pooled[5]
    with pytest.raises(StorageError, match="lack pooled layer 5"):
        w.write_shard(0, no_pool)
    no_entropy = make_targets(header, 0)
    no_entropy.entropy = None
    with pytest.raises(StorageError, match="lack 'entropy'"):
        w.write_shard(0, no_entropy)
    w.write_shard(0, make_targets(header, 0))
    assert [s.index for s in w.close().shards] == [0]


def test_entropy_refused_when_manifest_says_absent(tmp_path):
    header = make_header(entropy_kind="absent")
    targets = make_targets(make_header(), 0)
    with TargetsWriter(str(tmp_path), header) as w, pytest.raises(StorageError, match="entropy_kind='absent'"):
        w.write_shard(0, targets)


def test_caller_may_reuse_buffers(tmp_path):
    header = make_header()
    targets = make_targets(header, 0)
    expected = targets.topk_ids.copy()
    with TargetsWriter(str(tmp_path), header) as w:
        w.write_shard(0, targets)
        targets.topk_ids[:] = -1  # overwritten while the thread may still be writing
    got = TeacherDataset.open(str(tmp_path)).read_columns(np.arange(8), ["topk_ids"])["topk_ids"]
    np.testing.assert_array_equal(got, expected)


def _failing_on(index_to_fail, monkeypatch):
    real = shard_io.write_shard

    def write(fs, root, m, index, data):
        if index == index_to_fail:
            raise OSError(f"disk full while writing shard {index}")
        return real(fs, root, m, index, data)

    monkeypatch.setattr(shard_io, "write_shard", write)


def test_thread_error_raised_on_next_call(tmp_path, monkeypatch):
    _failing_on(1, monkeypatch)
    header = make_header()
    w = TargetsWriter(str(tmp_path), header)
    w.write_shard(0, make_targets(header, 0))
    w.write_shard(1, make_targets(header, 1))
    with pytest.raises(StorageError, match="shard-000001.parquet: cannot write: disk full while writing shard 1"):
        for index in range(2, 50):  # the error surfaces on a later call, never lost
            w.write_shard(index, make_targets(header, index))
    with pytest.raises(StorageError, match="a shard failed to write .*disk full.*no manifest written"):
        w.close()  # closing after the error never writes a manifest that lacks shard 1
    assert not (tmp_path / "manifest.json").exists()
    ledger = json.loads((tmp_path / ledger_name(0, 1)).read_text())
    assert [s["index"] for s in ledger["shards"]] == [0]


def test_thread_error_raised_on_close(tmp_path, monkeypatch):
    _failing_on(0, monkeypatch)
    header = make_header()
    with pytest.raises(StorageError, match="disk full"), TargetsWriter(str(tmp_path), header) as w:
        w.write_shard(0, make_targets(header, 0))
    assert not (tmp_path / "manifest.json").exists()


def test_bounded_queue(tmp_path, monkeypatch):
    """write_shard blocks while max_pending shards wait, so memory stays bounded."""
    gate = threading.Event()
    real = shard_io.write_shard

    def slow(*args):
        gate.wait(10)
        return real(*args)

    monkeypatch.setattr(shard_io, "write_shard", slow)
    header = make_header()
    w = TargetsWriter(str(tmp_path), header, max_pending=1)
    w.write_shard(0, make_targets(header, 0))  # taken by the thread, which waits on the gate
    w.write_shard(1, make_targets(header, 1))  # fills the queue
    blocked = threading.Thread(target=w.write_shard, args=(2, make_targets(header, 2)))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()
    gate.set()
    blocked.join(10)
    assert [s.index for s in w.close().shards] == [0, 1, 2]


def test_exception_in_block_keeps_ledger_and_resume_skips(tmp_path):
    header = make_header()
    with pytest.raises(KeyboardInterrupt), TargetsWriter(str(tmp_path), header) as w:
        w.write_shard(0, make_targets(header, 0))
        w.write_shard(1, make_targets(header, 1))
        raise KeyboardInterrupt  # preempted
    assert not (tmp_path / "manifest.json").exists()
    first = {i: s.sha256 for i, s in w.completed.items()}
    assert sorted(first) == [0, 1]

    with TargetsWriter(str(tmp_path), header) as again:
        assert sorted(again.completed) == [0, 1]
        again.write_shard(2, make_targets(header, 2, 3))
    m = again.close()
    assert [s.index for s in m.shards] == [0, 1, 2]
    assert {s.index: s.sha256 for s in m.shards if s.index < 2} == first


def test_killed_and_rerun_gives_identical_shards(tmp_path):
    header = make_header()
    full, _ = write_run(str(tmp_path / "full"), header)
    with pytest.raises(RuntimeError), TargetsWriter(str(tmp_path / "cut"), header) as w:
        w.write_shard(0, make_targets(header, 0))
        raise RuntimeError("killed")
    (tmp_path / "cut" / "shard-000001.parquet.tmp-1-deadbeef").write_bytes(b"half a shard")  # left by a kill
    rerun, _ = write_run(str(tmp_path / "cut"), header)
    assert not list((tmp_path / "cut").glob("*.tmp-*"))  # the killed run's half-written shard is gone
    assert [(s.file, s.sha256, s.bytes) for s in rerun.shards] == [(s.file, s.sha256, s.bytes) for s in full.shards]


def test_resume_drops_corrupt_and_missing_shards(tmp_path):
    header = make_header()
    write_run(str(tmp_path), header)
    (tmp_path / "manifest.json").unlink()  # as if killed before close
    flip_byte(str(tmp_path / "shard-000000.parquet"), 100)
    (tmp_path / "shard-000002.parquet").unlink()
    with pytest.warns(UserWarning) as record:
        w = TargetsWriter(str(tmp_path), header)
    messages = " | ".join(str(r.message) for r in record)
    assert "shard-000000.parquet: sha256" in messages and "shard-000002.parquet: missing" in messages
    assert sorted(w.completed) == [1]
    ledger = json.loads((tmp_path / ledger_name(0, 1)).read_text())
    assert [s["index"] for s in ledger["shards"]] == [1]
    w.abort()


def test_finished_run_is_found_without_ledger(tmp_path):
    header = make_header()
    m, _ = write_run(str(tmp_path), header)
    (tmp_path / ledger_name(0, 1)).unlink()
    w = TargetsWriter(str(tmp_path), header)
    assert sorted(w.completed) == [0, 1, 2]
    assert w.close().shards == m.shards


def test_header_mismatch_on_resume(tmp_path):
    write_run(str(tmp_path), make_header())
    with pytest.raises(MismatchError, match=r"'seq_len': 32 vs 16") as info:
        TargetsWriter(str(tmp_path), make_header(seq_len=32))
    assert info.value.field == "seq_len" and info.value.values == (32, 16)
    with pytest.raises(MismatchError, match=r"'teacher.name'"):
        h = make_header()
        h.teacher.name = "other"
        TargetsWriter(str(tmp_path), h)


def test_memory_url(memory_url):
    header = make_header()
    m, _ = write_run(memory_url, header)
    assert len(TeacherDataset.open(memory_url)) == m.num_sequences == 19
    assert sorted(TargetsWriter(memory_url, header).completed) == [0, 1, 2]


def test_write_after_close_refused(tmp_path):
    header = make_header()
    w = TargetsWriter(str(tmp_path), header)
    w.write_shard(0, make_targets(header, 0))
    w.close()
    with pytest.raises(StorageError, match="closed TargetsWriter"):
        w.write_shard(1, make_targets(header, 1))
    with pytest.raises(StorageError, match="max_pending must be >= 1"):
        TargetsWriter(str(tmp_path / "x"), header, max_pending=0)


def test_only_own_slice_temporaries_removed(tmp_path):
    mine = tmp_path / "shard-000002.zarr.tmp-7-0a1b2c3d"
    theirs = tmp_path / "shard-000003.parquet.tmp-8-0a1b2c3d"
    mine.mkdir()
    theirs.write_bytes(b"being written by slice 1")
    TargetsWriter(str(tmp_path), make_header(slice_index=0, num_slices=2)).abort()
    assert not mine.exists() and theirs.exists()


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_resume_over_an_edited_manifest_refuses_its_shards(tmp_path, fmt):
    """manifest.json and the ledger edited to temperature 2.0, then resumed by a run at 2.0: the records
    agree, and the shards' sizes and sha256 match, but each shard's own header says 1.0. Resuming would mix
    shards of two temperatures under one manifest; it is refused naming the shard, and nothing is written."""
    import dataclasses

    header = make_header(fmt=fmt)
    write_run(str(tmp_path), header)
    for record in (tmp_path / "manifest.json", tmp_path / ledger_name(0, 1)):
        d = json.loads(record.read_text())
        d["temperature"] = 2.0
        record.write_text(json.dumps(d))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MismatchError, match=rf"shard-000000\.{fmt}: field 'temperature' is 2\.0 in the manifest, "
                                            r"1\.0 in the shard"):
        TargetsWriter(str(tmp_path), dataclasses.replace(header, temperature=2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
