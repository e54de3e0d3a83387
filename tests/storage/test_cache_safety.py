"""A cache is only extended by a writer that produces the same bytes, by one writer per slice, never points
outside itself, and survives disk-full and kills without stale temporaries (storage layer)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from storage_helpers import make_header, make_targets, write_run

from storage import shards as shard_io
from storage.errors import ManifestError, MismatchError, StorageError
from storage.lock import LockHeldError, lock_name
from storage.manifest import Manifest
from storage.reader import TeacherDataset
from storage.writer import TargetsWriter, ledger_name
from tests.helpers import one_error_line, run_cli

_run, _one_error_line = run_cli, one_error_line


def _hashes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*"))}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is free
    return proc.pid


# ---- 1. every manifest and ledger in the directory is compared before anything is written -----------------
@pytest.mark.parametrize(("change", "field", "values"), [
    (dict(num_slices=2), "num_slices", (2, 1)),                          # sliced run over a finished cache
    (dict(num_slices=2, logprob_dtype="float32"), "logprob_dtype", ("float32", "float16")),
    (dict(num_slices=2, teacher_dtype="bfloat16"), "teacher.dtype", ("bfloat16", "float32")),
    (dict(head_chunk_size=7), "notes.backend.head_chunk_size", (7, 64)),  # same slicing, resumed
    (dict(device="cuda:3"), "device type", ("cuda", "cpu")),
])
def test_other_settings_never_touch_a_finished_cache(tmp_path, change, field, values):
    def header(num_slices=1, teacher_dtype="float32", head_chunk_size=64, device="cpu", **kw):
        h = make_header(num_slices=num_slices, notes={"backend": {"head_chunk_size": head_chunk_size,
                                                                  "device": device}}, schema_version=2, **kw)
        h.teacher.dtype = teacher_dtype
        return h

    finished, _ = write_run(str(tmp_path), header(), rows=[8, 8, 8, 8, 3])
    before = _hashes(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MismatchError) as err:
        TargetsWriter(str(tmp_path), header(**change))
    assert err.value.field == field and err.value.values == values
    assert f"manifest.json differ in '{field}': {values[0]!r} vs {values[1]!r}" in str(err.value)
    assert _hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == names  # untouched
    assert TeacherDataset.open(str(tmp_path)).manifest.shards == finished.shards


def test_other_slices_ledgers_and_merged_manifests_are_compared(tmp_path):
    write_run(str(tmp_path), make_header(slice_index=1, num_slices=2), rows=[8, 8, 8])
    with pytest.raises(MismatchError, match=r"manifest-slice-00001-of-00002.json differ in 'top_k': 2 vs 4"):
        TargetsWriter(str(tmp_path), make_header(slice_index=0, num_slices=2, top_k=2))
    (tmp_path / "manifest-slice-00001-of-00002.json").rename(tmp_path / ledger_name(1, 2))  # still running
    with pytest.raises(MismatchError, match=r"ledger-slice-00001-of-00002.json differ in 'top_k'"):
        TargetsWriter(str(tmp_path), make_header(slice_index=0, num_slices=2, top_k=2))
    with pytest.raises(MismatchError, match=r"differ in 'num_slices': 3 vs 2"):
        TargetsWriter(str(tmp_path), make_header(slice_index=0, num_slices=3))
    # the same settings and slicing are welcome, and a merged manifest keeps the slice count it came from
    (tmp_path / ledger_name(1, 2)).rename(tmp_path / "manifest-slice-00001-of-00002.json")
    write_run(str(tmp_path), make_header(slice_index=0, num_slices=2), rows=[8, 8, 8])
    assert _run("merge", tmp_path).exit_code == 0
    again, _ = write_run(str(tmp_path), make_header(slice_index=0, num_slices=2), rows=[8, 8, 8])
    assert [s.index for s in again.shards] == [0, 2]
    with pytest.raises(MismatchError, match=r"manifest.json differ in 'num_slices': 1 vs 2"):
        TargetsWriter(str(tmp_path), make_header(schema_version=1))  # the sliced helper caches are schema v1


def test_a_live_writer_with_other_slicing_is_refused(tmp_path):
    held = TargetsWriter(str(tmp_path), make_header(slice_index=1, num_slices=2))  # nothing recorded yet
    with pytest.raises(MismatchError, match=r"lock-slice-00001-of-00002.json .* differ in 'num_slices': 1 vs 2"):
        TargetsWriter(str(tmp_path), make_header())
    held.abort()
    TargetsWriter(str(tmp_path), make_header()).abort()  # once released, the directory is free again


# ---- 3. shard entries are plain names inside the cache ------------------------------------------------------
@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "../sB/shard-000000.parquet", "/etc/passwd",
                                   "sub/shard-000000.parquet", "..", "s3://bucket/shard-000000.parquet",
                                   "..\\sB\\shard-000000.parquet", "shard-000001.parquet"])
def test_shard_entries_outside_the_cache_are_refused_everywhere(tmp_path, entry):
    sa, sb = tmp_path / "sA", tmp_path / "sB"
    write_run(str(sa), make_header())
    write_run(str(sb), make_header())
    manifest = json.loads((sa / "manifest.json").read_text())
    target = sa / entry if "://" not in entry and "\\" not in entry else None
    if target is not None and target.resolve().is_file():  # make the escape look valid: size and sha256 match
        manifest["shards"][0]["bytes"] = target.resolve().stat().st_size
        manifest["shards"][0]["sha256"] = __import__("hashlib").sha256(target.resolve().read_bytes()).hexdigest()
    manifest["shards"][0]["file"] = entry
    (sa / "manifest.json").write_text(json.dumps(manifest))
    needle = f"shards[0] file {entry!r}"
    for args in (("inspect", sa), ("inspect", sa, "--no-verify"), ("merge", sa), ("merge", sa, "--verify")):
        _one_error_line(_run(*args), needle)
    for verify in (True, False):
        with pytest.raises(ManifestError, match="refusing to read it") as err:
            TeacherDataset.open(str(sa), verify=verify)
        assert needle in str(err.value)
    from student.data import join_teachers

    with pytest.raises(ManifestError, match="refusing to read it"):
        join_teachers([str(sb), str(sa)])
    (sa / "ledger-slice-00000-of-00001.json").write_text(json.dumps(manifest))  # and on resume
    (sa / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="refusing to read it"):
        TargetsWriter(str(sa), make_header())


def test_entries_built_in_code_are_checked_too(tmp_path):
    m, _ = write_run(str(tmp_path), make_header())
    m.shards[0].file = "../x.parquet"
    with pytest.raises(ManifestError, match="not a plain file name"):
        shard_io.check(None, str(tmp_path), m.shards[0])


# ---- 5. one writer per slice ----------------------------------------------------------------------------------
def test_second_writer_of_a_slice_is_refused_naming_the_holder(tmp_path):
    header = make_header()
    first = TargetsWriter(str(tmp_path), header)
    first.write_shard(0, make_targets(header, 0))
    tmp_shard = tmp_path / "shard-000001.parquet.tmp-1-0a1b2c3d"  # as if the first were writing shard 1
    tmp_shard.write_bytes(b"being written")
    with pytest.raises(LockHeldError) as err:
        TargetsWriter(str(tmp_path), header)
    assert f"is locked by pid {os.getpid()} on host {socket.gethostname()} since " in str(err.value)
    assert tmp_shard.exists()  # the refused writer removed nothing
    tmp_shard.unlink()
    first.write_shard(1, make_targets(header, 1))
    assert [s.index for s in first.close().shards] == [0, 1]
    assert not (tmp_path / lock_name(0, 1)).exists()  # released on close
    other_slice = TargetsWriter(str(tmp_path / "s"), make_header(slice_index=1, num_slices=2))
    TargetsWriter(str(tmp_path / "s"), make_header(slice_index=0, num_slices=2)).abort()  # other slice: free
    other_slice.abort()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / lock_name(0, 1)
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x", "token": "t"}))
    with pytest.warns(UserWarning, match="removed a stale lock of pid"):
        write_run(str(tmp_path), make_header())
    assert not lock.exists() and (tmp_path / "manifest.json").exists()


def test_lock_from_another_host_is_refused_with_the_way_out(tmp_path):
    lock = tmp_path / lock_name(0, 1)
    lock.write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "2026-11-29T08:00:00+00:00"}))
    with pytest.raises(LockHeldError, match=rf"locked by pid 4242 on host node-17 since 2026-11-29T08:00:00\+00:00 "
                       rf".*if that process is gone .*delete {lock}"):
        TargetsWriter(str(tmp_path), make_header())
    assert json.loads(lock.read_text())["host"] == "node-17"


def test_a_writer_that_lost_its_lock_stops_before_recording(tmp_path):
    header = make_header()
    w = TargetsWriter(str(tmp_path), header, background=False)
    w.write_shard(0, make_targets(header, 0))
    (tmp_path / lock_name(0, 1)).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "other"}))
    with pytest.raises(StorageError, match="lost its lock .*pid 1 on host elsewhere"):
        w.write_shard(1, make_targets(header, 1))
    assert [s["index"] for s in json.loads((tmp_path / ledger_name(0, 1)).read_text())["shards"]] == [0]


# ---- 6. disk full and unusable output paths ----------------------------------------------------------------
def test_disk_full_is_one_error_and_a_rerun_resumes_identically(tmp_path, monkeypatch):
    header = make_header()
    whole, _ = write_run(str(tmp_path / "whole"), header, rows=[8, 8, 8, 3])
    real = shard_io.write_shard

    def full_disk(fs, root, m, index, data):
        if index == 2:  # half a shard lands, then the disk is full
            (tmp_path / "cut" / f"shard-000002.parquet.tmp-{os.getpid()}-0a1b2c3d").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fs, root, m, index, data)

    monkeypatch.setattr(shard_io, "write_shard", full_disk)
    with pytest.raises(StorageError, match=r"shard-000002.parquet: cannot write: No space left on device "
                                           r"\(errno 28\).*re-run the same command to resume"):
        write_run(str(tmp_path / "cut"), header, rows=[8, 8, 8, 3])
    cut = tmp_path / "cut"
    assert not (cut / "manifest.json").exists() and not (cut / lock_name(0, 1)).exists()
    assert [s["index"] for s in json.loads((cut / ledger_name(0, 1)).read_text())["shards"]] == [0, 1]
    monkeypatch.setattr(shard_io, "write_shard", real)  # space freed
    rerun, _ = write_run(str(cut), header, rows=[8, 8, 8, 3])
    assert [(s.file, s.sha256) for s in rerun.shards] == [(s.file, s.sha256) for s in whole.shards]
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def test_disk_full_writing_the_ledger_or_manifest_leaves_no_temporary(tmp_path, monkeypatch):
    from storage import fs as sfs

    header = make_header()
    real = sfs.replace

    def full(fs, src, dst):
        if dst.endswith("manifest.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fs, src, dst)

    monkeypatch.setattr(sfs, "replace", full)
    with pytest.raises(StorageError, match=r"manifest.json: cannot write: No space left on device"):
        write_run(str(tmp_path), header)
    assert not list(tmp_path.glob("*.tmp-*")) and not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(sfs, "replace", real)
    assert [s.index for s in write_run(str(tmp_path), header)[0].shards] == [0, 1, 2]


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(tmp_path):
    """A real full filesystem (needs `mount -t tmpfs`, i.e. root or a user namespace; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; test_disk_full_is_one_error_... injects ENOSPC instead")
    try:
        header = make_header(seq_len=64, top_k=16, pooled={})
        rows = [8] * 12  # about 30 KB a shard: the filesystem fills after a few
        with pytest.raises(StorageError, match=r"cannot write: No space left on device"):
            write_run(str(mount / "c"), header, rows=rows)
        recorded = json.loads((mount / "c" / ledger_name(0, 1)).read_text())["shards"]
        assert 1 <= len(recorded) < 12 and not list((mount / "c").glob("*.tmp-*"))
        assert not (mount / "c" / "manifest.json").exists()
        shutil.copytree(mount / "c", tmp_path / "c")  # "free space": continue on a larger disk
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)  # lazy: never leave the mount behind
    rerun, _ = write_run(str(tmp_path / "c"), header, rows=rows)
    whole, _ = write_run(str(tmp_path / "whole"), header, rows=rows)
    assert [(s.file, s.sha256) for s in rerun.shards] == [(s.file, s.sha256) for s in whole.shards]


def test_output_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StorageError, match="afile: is a file, not a directory"):
        TargetsWriter(str(afile), make_header())
    with pytest.raises(StorageError, match="cannot create the output directory: Not a directory"):
        TargetsWriter(str(afile / "sub"), make_header())
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a non-root user on a read-only directory
    with pytest.raises(StorageError, match="the output directory is not writable"):
        TargetsWriter(str(tmp_path / "ro"), make_header())
    _one_error_line(_run("merge", afile), "afile: is a file, not a teacher directory")
    _one_error_line(_run("inspect", afile), "afile")


def test_merge_into_an_unwritable_directory(tmp_path, monkeypatch):
    for s in range(2):
        write_run(str(tmp_path), make_header(slice_index=s, num_slices=2), rows=[8, 8, 8])
    real = os.link

    def refuse(src, dst, *a, **k):  # the merge lock is the first file merge creates
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dst)

    monkeypatch.setattr(os, "link", refuse)
    _one_error_line(_run("merge", tmp_path), "lock-merge.json: cannot create the lock file: Permission denied")
    monkeypatch.setattr(os, "link", real)
    assert not list(tmp_path.glob("*.tmp-*")) and not (tmp_path / "manifest.json").exists()


# ---- 9. merge on a single-slice cache ---------------------------------------------------------------------------
def test_merge_on_a_single_slice_cache(tmp_path):
    m, _ = write_run(str(tmp_path), make_header())
    before = (tmp_path / "manifest.json").read_bytes()
    result = _run("merge", tmp_path, "--verify")
    assert result.exit_code == 0, result.output
    assert "manifest.json already covers the whole cache" in result.stdout and "3 shards, 19 sequences" in result.stdout
    assert (tmp_path / "manifest.json").read_bytes() == before
    (tmp_path / "shard-000001.parquet").unlink()
    _one_error_line(_run("merge", tmp_path, "--verify"), "shard-000001.parquet: missing")


# ---- 10. temporaries of a killed or disk-full run --------------------------------------------------------------
def test_own_json_temporaries_are_removed_on_the_next_run(tmp_path):
    mine = ["ledger-slice-00000-of-00002.json.tmp-123-0a1b2c3d", "manifest-slice-00000-of-00002.json.tmp-9-ffffffff",
            "lock-slice-00000-of-00002.json.tmp-5-01234567", "shard-000002.parquet.tmp-5-01234567"]
    theirs = ["ledger-slice-00001-of-00002.json.tmp-124-0a1b2c3d", "manifest-slice-00001-of-00002.json.tmp-9-ffffffff",
              "manifest.json.tmp-77-0a1b2c3d", "shard-000003.parquet.tmp-5-01234567", "notes.txt"]
    for name in mine + theirs:
        (tmp_path / name).write_bytes(b"left by a kill")
    write_run(str(tmp_path), make_header(slice_index=0, num_slices=2))
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & set(mine) and set(theirs) <= left
    (tmp_path / "manifest-slice-00001-of-00002.json.tmp-9-ffffffff").unlink()
    write_run(str(tmp_path), make_header(slice_index=1, num_slices=2))
    assert _run("merge", tmp_path).exit_code == 0  # the merge removes manifest.json temporaries
    assert not list(tmp_path.glob("*.json.tmp-*")) and (tmp_path / "notes.txt").exists()
    Manifest.from_json((tmp_path / "manifest.json").read_text())


def test_unsliced_run_removes_its_manifest_temporaries(tmp_path):
    (tmp_path / "manifest.json.tmp-77-0a1b2c3d").write_bytes(b"{")
    (tmp_path / "ledger-slice-00000-of-00001.json.tmp-77-0a1b2c3d").write_bytes(b"{")
    write_run(str(tmp_path), make_header())
    assert not list(tmp_path.glob("*.tmp-*"))
