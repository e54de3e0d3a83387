"""train-student, evaluate and plot under hostile input: non-finite numbers, divergence, crafted or damaged
checkpoints, disk full, torn logs, bad output paths. Each case is one `error:` line and exit code 2, or a
clean resume; never a traceback, never a NaN artefact."""

from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from tests.student.synthetic import make_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    return [str(make_cache(root / "a", name="a", seed=1, k=8, n=40, pooled={-1: 16})),
            str(make_cache(root / "b", name="b", seed=2, k=4, n=40, pooled={-1: 8}))]


_TIMING = ("tokens_per_s", "eval_seconds", "eval_share")  # wall-clock figures in metrics.jsonl, not results

def _train(caches, out, *extra: str):
    args = ["train-student", *[x for c in caches for x in ("--teacher-data", c)], "--output", str(out),
            "--max-steps", "6", "--batch-size", "4", "--eval-sequences", "4", "--eval-every", "3",
            "--log-every", "1", "--num-workers", "0", *extra]
    return CliRunner().invoke(main, args)


def one_error_line(result, *needles: str) -> str:
    """Asserts exit code 2 with exactly one `error:` line (no traceback) containing `needles`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


# ---- defect 2: non-finite numbers ------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("--weight-decay", "nan"), ("--lr", "inf"), ("--gamma-feat", "nan"), ("--grad-clip", "nan"),
    ("--lambda-kd", "nan"), ("--dkd-beta", "-inf"), ("--eval-fraction", "nan"), ("--temperature", "inf"),
    ("--feat-weights", "nan,1"),
])
def test_non_finite_option_is_refused(caches, tmp_path, option, value):
    one_error_line(_train(caches, tmp_path / "o", option, value), option, "finite")
    assert not (tmp_path / "o").exists()


def test_non_finite_teacher_weights_are_refused(caches, tmp_path):
    one_error_line(_train(caches, tmp_path / "o", "--teacher-weighting", "fixed", "--teacher-weights", "nan,1"),
                   "--teacher-weights", "'nan'")
    one_error_line(_train(caches, tmp_path / "o", "--teacher-weighting", "fixed", "--teacher-weights",
                          "1e308,1e308"), "--teacher-weights", "positive sum")


def test_config_objects_refuse_non_finite_values(tmp_path):
    from common.errors import ConfigError
    from student.config import LossConfig, OptimConfig
    from student.evaluation import EvalConfig

    with pytest.raises(ConfigError, match="weight_decay must be a finite number, got nan"):
        OptimConfig(weight_decay=float("nan"))
    with pytest.raises(ConfigError, match="teacher_weights must be a finite number"):
        LossConfig(teacher_weighting="fixed", teacher_weights=(float("nan"), 1.0))
    with pytest.raises(ConfigError, match="teacher_weights must be a finite number"):
        EvalConfig(students=["s"], data="x", teachers=["a", "b"], teacher_weighting="fixed",
                   teacher_weights=[float("inf"), 1.0])


def test_divergence_stops_with_one_line_and_saves_nothing_non_finite(caches, tmp_path):
    out = tmp_path / "div"
    # finite settings whose first step sends every weight to -1e33: the next forward pass overflows
    line = one_error_line(_train(caches, out, "--lr", "1000", "--weight-decay", "1e30", "--save-every", "1",
                                 "--gamma-feat", "0.1"), "not finite")
    assert "lower --lr" in line
    assert not (out / "final").exists()
    for ckpt in (out / "checkpoints").glob("step-*/state.pt"):
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), ckpt
    for rec in _records(out):
        assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float)), rec


# ---- defect 4: checkpoints are loaded with weights_only=True ---------------------------------------
class _RunsCode:
    """Unpickling this creates the file `marker` (stands for any code an attacker would run)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_in_checkpoint_is_refused_and_not_run(caches, tmp_path):
    import hashlib

    out = tmp_path / "run"
    _ok(_train(caches, out, "--stop-after", "2"))
    state = out / "checkpoints" / "step-0000002" / "state.pt"
    marker = tmp_path / "pwned"
    torch.save({"config": _RunsCode(str(marker)), "step": 2}, state)
    data = state.read_bytes()  # the attacker also rewrites the checksum
    (state.parent / "checkpoint.json").write_text(
        json.dumps({"step": 2, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    one_error_line(_train(caches, out, "--resume"), "refusing to unpickle")
    assert not marker.exists()
    torch.save({"model": torch.zeros(1)}, state)  # loads fine, but is no checkpoint of ours
    data = state.read_bytes()
    (state.parent / "checkpoint.json").write_text(
        json.dumps({"step": 2, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    one_error_line(_train(caches, out, "--resume"), "not a train-student checkpoint", "optimizer")


# ---- defect 6: bad output paths, disk full, bad devices --------------------------------------------
def test_output_that_is_a_file_or_under_a_file(caches, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_error_line(_train(caches, f), "is a file")
    one_error_line(_train(caches, f / "sub"), str(f / "sub"))
    assert f.read_text() == "x"


def test_bad_device_is_one_line(caches, tmp_path):
    one_error_line(_train(caches, tmp_path / "o", "--device", "bogus"), "--device", "bogus")
    if not torch.cuda.is_available():
        one_error_line(_train(caches, tmp_path / "o", "--device", "cuda"), "CUDA is not available")


def test_disk_full_during_checkpoint_keeps_the_previous_one(caches, tmp_path, monkeypatch):
    import student.trainer as trainer_mod

    full = tmp_path / "full"
    _ok(_train(caches, full, "--save-every", "2"))
    out = tmp_path / "cut"
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if obj.get("step") == 4:
            f.write(b"PK\x03\x04" + bytes(96))  # a partial file is left behind, as a real ENOSPC would
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(trainer_mod.torch, "save", save)
    one_error_line(_train(caches, out, "--save-every", "2"), "no space left", "step-0000002 is intact")
    monkeypatch.setattr(trainer_mod.torch, "save", real_save)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    _ok(_train(caches, out, "--save-every", "2", "--resume"))
    strip = [{k: v for k, v in r.items() if k not in _TIMING} for r in _records(full)]
    assert [{k: v for k, v in r.items() if k not in _TIMING} for r in _records(out)] == strip


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_inside_torch_save_is_one_line_and_removes_the_temporary(caches, tmp_path, monkeypatch):
    """A real ENOSPC under torch.save: its own writer reported it as a RuntimeError ('unexpected pos'), which
    was not caught, and checkpoints/step-*.tmp was left behind. Here state.pt is a link to /dev/full, where
    every write fails with ENOSPC as on a full disk."""
    import os

    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        real_makedirs(path, *args, **kwargs)
        if str(path).endswith("step-0000004.tmp"):
            os.symlink("/dev/full", os.path.join(path, "state.pt"))

    out = tmp_path / "full-disk"
    monkeypatch.setattr(os, "makedirs", makedirs)
    one_error_line(_train(caches, out, "--save-every", "2"), "no space left", "step-0000002 is intact")
    monkeypatch.setattr(os, "makedirs", real_makedirs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]  # no step-*.tmp


def test_huge_grad_accum_is_refused_before_work(caches, tmp_path):
    """2**63 micro-batches per step used to reach itertools.islice, which refuses counts past sys.maxsize."""
    from common.errors import ConfigError
    from student.config import MAX_GRAD_ACCUM, TrainConfig

    one_error_line(_train(caches, tmp_path / "o", "--grad-accum", str(2**63)), "--grad-accum", str(MAX_GRAD_ACCUM))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="--grad-accum"):
        TrainConfig(teacher_data=["x"], output="o", grad_accum=MAX_GRAD_ACCUM + 1)
    TrainConfig(teacher_data=["x"], output="o", grad_accum=MAX_GRAD_ACCUM)


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shard_read_in_a_loader_worker_is_one_line(caches, tmp_path, workers):
    """A shard damaged after the caches were verified (here: not verified, --verify off) is found when a
    micro-batch reads it: inside a DataLoader worker, torch re-raised the error with the worker's whole
    traceback in its message."""
    import shutil

    damaged = tmp_path / "a"
    shutil.copytree(caches[0], damaged)
    shard = damaged / "shard-000000.parquet"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # same size, other bytes
    shard.write_bytes(bytes(data))
    r = _train([str(damaged), caches[1]], tmp_path / f"run{workers}", "--verify", "off", "--num-workers",
               str(workers))
    one_error_line(r, "shard-000000.parquet")
    assert "Original Traceback" not in r.output and "worker" not in r.output, r.output


# ---- defect 7: torn metrics line, damaged latest checkpoint ----------------------------------------
def test_torn_metrics_line_does_not_block_resume(caches, tmp_path, caplog):
    out = tmp_path / "run"
    _ok(_train(caches, out, "--stop-after", "3"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # killed in the middle of a write
    r = _train(caches, out, "--resume")
    _ok(r)
    assert "torn last line" in caplog.text
    assert [m["step"] for m in _records(out) if m["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(caches, tmp_path, caplog):
    full, out = tmp_path / "full", tmp_path / "cut"
    _ok(_train(caches, full))
    _ok(_train(caches, out, "--save-every", "2", "--stop-after", "5"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    state = out / "checkpoints" / "step-0000005" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    r = _train(caches, out, "--resume")
    _ok(r)
    assert "step-0000005 is damaged" in caplog.text
    strip = [{k: v for k, v in m.items() if k not in _TIMING} for m in _records(full)]
    assert [{k: v for k, v in m.items() if k not in _TIMING} for m in _records(out)] == strip


# ---- defect 8: resuming a finished run -------------------------------------------------------------
def test_resume_of_a_finished_run_changes_nothing(caches, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="student")
    out = tmp_path / "run"
    _ok(_train(caches, out))
    before = (out / "metrics.jsonl").read_text()
    weights = (out / "final" / "model.safetensors").read_bytes()
    for _ in range(2):
        _ok(_train(caches, out, "--resume"))
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "final" / "model.safetensors").read_bytes() == weights
    assert "already finished" in caplog.text


# ---- defects 6 and 11: plot ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("plot") / "run"
    _ok(_train(caches, out, "--max-steps", "2"))
    return out


def test_plot_prints_the_path_it_wrote(run_dir, tmp_path):
    r = CliRunner().invoke(main, ["plot", str(run_dir), "--out", str(tmp_path / "sA")])
    _ok(r)
    assert r.output.strip() == str(tmp_path / "sA.png")
    assert (tmp_path / "sA.png").stat().st_size > 10_000 and not (tmp_path / "sA").exists()


def test_plot_into_a_missing_directory_or_bad_format(run_dir, tmp_path):
    one_error_line(CliRunner().invoke(main, ["plot", str(run_dir), "--out", str(tmp_path / "no" / "x.png")]),
                   "does not exist")
    one_error_line(CliRunner().invoke(main, ["plot", str(run_dir), "--out", str(tmp_path / "x.xyz")]),
                   "unsupported image format")


# ---- issue 25 defect 8: run fields edited in manifest.json -------------------------------------------------
@pytest.mark.parametrize(("field", "value", "needle", "workers"), [
    ("temperature", 2.0, "'temperature' is 2.0 in the manifest, 1.0 in the shard", "0"),
    ("vocab_size", 80, "'vocab_size' is 80 in the manifest, 64 in the shard", "0"),
    ("temperature", 2.0, "'temperature' is 2.0 in the manifest, 1.0 in the shard", "2"),
])
def test_edited_manifest_is_refused_against_the_shards_headers(caches, tmp_path, field, value, needle, workers):
    """Each shard's size and sha256 still match the edited manifest; its own header holds the true value.
    With DataLoader workers the refusal still comes from the main process (the check runs with verification,
    before any worker reads)."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(caches[0], edited)
    d = json.loads((edited / "manifest.json").read_text())
    d[field] = value
    (edited / "manifest.json").write_text(json.dumps(d))
    line = one_error_line(_train([str(edited)], tmp_path / "run", "--num-workers", workers), needle, "shard-0000")
    assert str(edited) in line


def test_failed_batch_keeps_the_error_type_when_it_can_cross_processes():
    import pickle

    from common.errors import UserError
    from storage.errors import MismatchError, ShardCorruptError
    from student.batch import FailedBatch

    shard = pickle.loads(pickle.dumps(FailedBatch.of(ShardCorruptError("s: cannot decode"))))
    with pytest.raises(ShardCorruptError, match="s: cannot decode"):
        shard.check()
    # MismatchError's constructor takes more than its message: it travels as a UserError with that message
    mismatch = pickle.loads(pickle.dumps(FailedBatch.of(MismatchError("teachers differ", "f", (1, 2)))))
    with pytest.raises(UserError, match="teachers differ"):
        mismatch.check()
