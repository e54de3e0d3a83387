"""The JSON side files every command reads (configs, manifests, ledgers, stamps) through common/sidefile.py:
a device, a link to one, or bytes that are not UTF-8 are one `error:` line and exit code 2.

The cases that used to read without end run in a child process whose address space is capped, so a
regression fails (MemoryError) instead of filling the machine's memory.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_error_line, run_cli
from tests.student.synthetic import make_cache

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1536 << 20
"""Address-space cap of the child (1.5 GiB): torch and transformers import in about 0.7 GiB."""
pytestmark = pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")


def _capped_cli(*args: str) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a child limited to LIMIT bytes of address space (no core dump)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return make_cache(tmp_path / "cache", n=24)


def _train_args(cache: Path, out: Path, steps: int = 1) -> list[str]:
    return ["train-student", "--teacher-data", str(cache), "--output", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--eval-sequences", "4", "--num-workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("command", ["train-student", "precompute"])
def test_config_from_dev_zero_is_one_line(command: str) -> None:
    _one_line(_capped_cli(command, "--config", "/dev/zero"), "--config /dev/zero", "not a regular file")


def test_verified_stamp_linked_to_dev_zero_is_one_line(cache: Path, tmp_path: Path) -> None:
    os.symlink("/dev/zero", cache / "verified-0123456789abcdef.json")
    _one_line(_capped_cli(*_train_args(cache, tmp_path / "run")), "verified-0123456789abcdef.json",
              "not a regular file", "delete it")
    assert not (tmp_path / "run" / "final").exists()


def test_manifest_linked_to_dev_zero_is_one_line(cache: Path) -> None:
    manifest = cache / "manifest.json"
    manifest.unlink()
    os.symlink("/dev/zero", manifest)
    _one_line(_capped_cli("inspect", str(cache)), "manifest.json", "not a regular file")


def test_non_utf8_manifest_is_one_line(cache: Path) -> None:
    manifest = cache / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"synthetic/', b'"synthetic\xff/', 1))
    one_error_line(run_cli("inspect", cache), "manifest.json", "not UTF-8")
    one_error_line(run_cli("merge", cache), "manifest.json", "not UTF-8")


def test_non_utf8_stamp_is_one_line(cache: Path, tmp_path: Path) -> None:
    (cache / "verified-0123456789abcdef.json").write_bytes(b'{"manifest_hash": "\xff"}')
    one_error_line(run_cli(*_train_args(cache, tmp_path / "run")), "verified-0123456789abcdef.json",
                   "not UTF-8", "delete it")


def test_lock_file_linked_to_dev_zero_names_no_holder(tmp_path: Path) -> None:
    """A lock is read by every writer of a cache; one that is a device is garbage ({}), read no further."""
    os.symlink("/dev/zero", tmp_path / "lock-slice-00000-of-00001.json")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fsspec; from storage.lock import CacheLock; "
            "print(CacheLock(fsspec.filesystem('file'), sys.argv[2], 'lock-slice-00000-of-00001.json').read())")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, preexec_fn=limit)
    assert proc.returncode == 0 and proc.stdout.strip() == "{}", proc.stderr[-2000:]


def test_checkpoint_record_linked_to_dev_zero_is_a_damaged_checkpoint(cache: Path, tmp_path: Path) -> None:
    """--resume reads each checkpoint's checkpoint.json: one that is a device makes that checkpoint damaged
    (skipped with a warning for the previous one), as a truncated one does."""
    out = tmp_path / "run"
    args = _train_args(cache, out, steps=4)
    r = run_cli(*args, "--save-every", "2", "--stop-after", "3")
    assert r.exit_code == 0, r.output
    record = out / "checkpoints" / "step-0000003" / "checkpoint.json"
    record.unlink()
    os.symlink("/dev/zero", record)
    proc = _capped_cli(*args, "--save-every", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-0000003 is damaged" in proc.stderr and "not a regular file" in proc.stderr
