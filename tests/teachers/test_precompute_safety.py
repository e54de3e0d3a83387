"""`cli.py precompute` never damages a cache and never shows a traceback for the user's files: other settings
over a finished cache, a second writer, bad corpora, bad output paths, disk full, unusable teacher weights."""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import shards as shard_io
from storage.reader import TeacherDataset
from tests.helpers import make_tiny_setup, one_error_line, run_cli, sample_texts

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 32 * 20  # 20 windows of 32 tokens: 5 shards of 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(root, teacher, corpus, a finished cache made with _args())."""
    root = tmp_path_factory.mktemp("safety")
    teacher, corpus = make_tiny_setup(root, n_docs=100, vocab=512, seed=4)
    result = _run(*_args(teacher, corpus, root / "finished"))
    assert result.exit_code == 0, result.output
    return root, teacher, corpus, root / "finished"


def _args(teacher, corpus, output, *extra) -> list[str]:
    return ["precompute", "--teacher", str(teacher), "--teacher-name", "tiny", "--dataset", str(corpus),
            "--output", str(output), "--seq-len", "32", "--shard-size", "4", "--top-k", "8", "--batch-size", "4",
            "--head-chunk-size", "64", "--device", "cpu", "--max-tokens", str(MAX_TOKENS), "--no-progress",
            *map(str, extra)]


_run = run_cli


def _one_error_line(result, *needles) -> str:
    # transformers may draw its "Loading weights" bar on stderr first; the error is the one last line
    return one_error_line(result, *needles, ignore=("Loading weights",))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _copy(setup, name: str) -> Path:
    dst = setup[0] / name
    shutil.copytree(setup[3], dst)
    return dst


# ---- 1. settings that change bytes are compared with everything already in the directory ----------------------
@pytest.mark.parametrize(("extra", "needle"), [
    (("--num-slices", 2, "--slice-index", 0, "--dtype", "bfloat16"), "differ in 'teacher.dtype': 'bfloat16' vs 'float32'"),
    (("--num-slices", 2, "--slice-index", 0), "differ in 'num_slices': 2 vs 1"),
    (("--head-chunk-size", 7), "differ in 'notes.backend.head_chunk_size': 7 vs 64"),
    (("--logprob-bits", 7), "differ in 'logprob_mantissa_bits': 7 vs None"),
    (("--pool-layers", "0"), "differ in 'pooled_layers': [0] vs [1]"),
])
def test_a_finished_cache_is_never_rewritten_with_other_settings(setup, extra, needle):
    cache = _copy(setup, f"m2-{len(os.listdir(setup[0]))}")
    before = _files(cache)
    args = _args(setup[1], setup[2], cache)
    head = args.index("--head-chunk-size")
    if "--head-chunk-size" in extra:
        del args[head:head + 2]
    line = _one_error_line(_run(*args, *extra), needle, str(cache / "manifest.json"))
    assert _files(cache) == before, line  # nothing rewritten, added or removed
    TeacherDataset.open(str(cache))  # still verifies
    again = _run(*_args(setup[1], setup[2], cache))  # the original command still resumes (all done)
    assert again.exit_code == 0, again.output
    assert {k: v for k, v in _files(cache).items() if k.startswith("shard-")} == \
        {k: v for k, v in before.items() if k.startswith("shard-")}


# ---- 6. user files that cannot be used: one line, exit 2 --------------------------------------------------------
def _corpus(root: Path, name: str, data: bytes) -> Path:
    path = root / "corpora" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def test_unreadable_corpora_are_one_line(setup):
    root = setup[0]
    text = "".join(json.dumps({"text": t}) + "\n" for t in sample_texts(50, seed=1)).encode()
    packed = gzip.compress(text)
    damaged = bytearray(packed)
    damaged[len(damaged) // 2] ^= 0xFF
    cases = {
        "latin1.jsonl": (b'{"text": "caf\xe9"}\n', "not UTF-8 text near row 0"),
        "latin1.txt": (b"caf\xe9 au lait\n\nsecond paragraph\n", "not UTF-8 text (byte 3"),
        "truncated.jsonl.gz": (packed[: len(packed) // 2], "cannot decompress"),
        "damaged.jsonl.gz": (bytes(damaged), "cannot decompress"),
        "plain.jsonl.gz": (text, "cannot decompress"),
    }
    for name, (data, needle) in cases.items():
        corpus = _corpus(root, name, data)
        _one_error_line(_run(*_args(setup[1], corpus, root / f"out-{name}")), str(corpus), needle)


def test_output_that_is_a_file_is_one_line_before_loading(setup, monkeypatch):
    import teachers.backends

    def never(*a, **k):
        raise AssertionError("the teacher was loaded before the output was checked")

    monkeypatch.setattr(teachers.backends, "create_backend", never)
    afile = setup[0] / "a-file"
    afile.write_text("not a directory")
    _one_error_line(_run(*_args(setup[1], setup[2], afile)), "a-file: is a file, not a directory")
    _one_error_line(_run(*_args(setup[1], setup[2], afile / "x")), "cannot create the output directory")


def test_disk_full_then_rerun_resumes_to_identical_shards(setup, monkeypatch):
    out = setup[0] / "disk-full"
    real = shard_io.write_shard

    def full(fs, root, m, index, data):
        if index == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fs, root, m, index, data)

    monkeypatch.setattr(shard_io, "write_shard", full)
    _one_error_line(_run(*_args(setup[1], setup[2], out)), "shard-000003.parquet: cannot write: No space left on device")
    ledger = json.loads((out / "ledger-slice-00000-of-00001.json").read_text())
    assert [s["index"] for s in ledger["shards"]] == [0, 1, 2]
    assert not (out / "manifest.json").exists() and not (out / "shard-000003.parquet").exists()
    monkeypatch.setattr(shard_io, "write_shard", real)
    result = _run(*_args(setup[1], setup[2], out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["notes"]["this_run"]["skipped_completed"] == 3
    finished = _files(setup[3])
    assert {k: v for k, v in _files(out).items() if k.startswith("shard-")} == \
        {k: v for k, v in finished.items() if k.startswith("shard-")}
    assert sorted(_files(out)) == sorted(finished)  # no temporary, lock or stray file left


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/nonexistent"


def test_unusable_teacher_weights_are_one_line_and_pickles_never_run(setup, tmp_path):
    global MARKER
    teacher = setup[1]
    truncated = tmp_path / "truncated"
    shutil.copytree(teacher, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_error_line(_run(*_args(truncated, setup[2], tmp_path / "o1")), "cannot load teacher", "SafetensorError")

    evil = tmp_path / "evil"
    shutil.copytree(teacher, evil)
    (evil / "model.safetensors").unlink()
    MARKER = str(tmp_path / "code-ran")
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _RunsCode()}))
    _one_error_line(_run(*_args(evil, setup[2], tmp_path / "o2")), "cannot load teacher", "UnpicklingError")
    assert not os.path.exists(MARKER)  # refused by the weights-only unpickler, never executed


# ---- issue 25 defect 6: windows longer than the teacher's positions -------------------------------------------
def _with_positions(teacher: Path, dst: Path, positions: int, key: str = "max_position_embeddings") -> Path:
    """A copy of `teacher` whose config.json declares `positions` positions under `key`."""
    shutil.copytree(teacher, dst)
    config = json.loads((dst / "config.json").read_text())
    config[key] = positions
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_seq_len_beyond_the_teachers_positions_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    """The tiny Llama computes any length (RoPE), so without the check it writes targets past the positions
    it was trained on. Refused before the teacher loads, and nothing is created."""
    import teachers.backends

    def never(*a, **k):
        raise AssertionError("the teacher was loaded before its positions were compared with --seq-len")

    monkeypatch.setattr(teachers.backends, "create_backend", never)
    short = _with_positions(setup[1], tmp_path / "short", 24)
    out = tmp_path / "out"
    _one_error_line(_run(*_args(short, setup[2], out)), "max_position_embeddings 24 < seq_len 32", "--seq-len")
    assert not out.exists()
    # with --seq-len at the positions, the check passes (and the stub shows the teacher would load next)
    with pytest.raises(AssertionError, match="loaded before"):
        args = _args(short, setup[2], tmp_path / "out2")
        args[args.index("--seq-len") + 1] = "24"
        raise _run(*args).exception


def test_vllm_needs_one_position_more():
    """vLLM's max_model_len is seq_len + 1 (the prompt plus the one step it generates); it refuses more than
    the model's positions itself, with a traceback, so the check runs first. An aligned run is left to the
    per-batch check."""
    from common.errors import ConfigError
    from teachers.config import tiny
    from teachers.precompute import check_window

    cfg = tiny("t", "c.jsonl", "out")
    check_window(cfg, 32)
    check_window(cfg, None)  # a config without positions: nothing to compare
    with pytest.raises(ConfigError, match="max_position_embeddings 31 < seq_len 32"):
        check_window(cfg, 31)
    cfg.teacher.backend = "vllm"
    check_window(cfg, 33)
    with pytest.raises(ConfigError, match=r"vllm backend needs seq_len \+ 1 = 33 positions"):
        check_window(cfg, 32)
    cfg.teacher.backend, cfg.teacher.align_tokenizer = "hf", "s"
    check_window(cfg, 8)


# ---- 5. two real processes on one cache -----------------------------------------------------------------------------
@pytest.mark.slow
def test_second_process_on_a_slice_is_refused_and_the_first_finishes(setup):
    root, teacher, corpus, _ = setup
    out = root / "two-writers"
    cmd = [sys.executable, "cli.py", *_args(teacher, corpus, out)]
    # one sequence per forward, 40 of them: the first still runs when the second reaches the lock (seconds)
    cmd[cmd.index("--max-tokens") + 1] = str(32 * 40)
    cmd[cmd.index("--batch-size") + 1] = "1"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the first run takes its lock before loading the teacher; it is then paused (SIGSTOP: alive, holding
        # the lock) while the second runs, so the test does not depend on how fast either process is
        lock = out / "lock-slice-00000-of-00001.json"
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, f"the first run ended too early: {first.stderr.read()[-2000:]}"
        assert lock.exists(), "the first run never took its lock"
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        alive_after_second = first.poll() is None
        first.send_signal(signal.SIGCONT)
        out_first, err_first = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [line for line in second.stderr.strip().splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in second.stderr
    assert f"is locked by pid {first.pid} on host " in lines[0] and "lock-slice-00000-of-00001.json" in lines[0]
    assert alive_after_second, "the refused run must not disturb the first"
    assert first.returncode == 0, err_first[-2000:]
    ds = TeacherDataset.open(str(out))  # every shard of the first run is listed and verifies
    assert len(ds) == 40 and sorted(p.name for p in out.glob("shard-*")) == [s.file for s in ds.manifest.shards]
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("lock-*"))


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_cache_without_its_lock(setup):
    """What a scheduler does to a preempted job: SIGTERM. The run stops cleanly and removes its lock, so
    the job may be restarted on any node."""
    root, teacher, corpus, finished = setup
    out = root / "terminated"
    cmd = [sys.executable, "cli.py", *_args(teacher, corpus, out)]
    cmd[cmd.index("--batch-size") + 1] = "1"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ledger = out / "ledger-slice-00000-of-00001.json"
        deadline = time.monotonic() + 120
        while not ledger.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert not (out / "lock-slice-00000-of-00001.json").exists() and not list(out.glob("*.tmp-*"))
    assert not (out / "manifest.json").exists()
    recorded = json.loads(ledger.read_text())["shards"]
    assert 1 <= len(recorded) < 5
    result = _run(*_args(teacher, corpus, out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["notes"]["this_run"]["skipped_completed"] == len(recorded)
    assert {k: v for k, v in _files(out).items() if k.startswith("shard-")} == \
        {k: v for k, v in _files(finished).items() if k.startswith("shard-")}
