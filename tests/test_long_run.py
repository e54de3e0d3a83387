"""benchmarks/long_run.py at a tiny scale: killed during training and run again, it continues without computing
a finished stage again, and its student is bitwise the one an uninterrupted training gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import load_script, make_two_tokenizer_setup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lr():
    return load_script("benchmarks/long_run.py")


def test_grid_and_curve_steps(lr):
    assert lr.grid("3e-4:0.5,1e-3:0.8") == ((3e-4, 0.5), (1e-3, 0.8))
    for bad in ("3e-4", "0:0.5", "1e-3:0", "1e-3:1.5"):
        with pytest.raises(Exception, match="--grid"):
            lr.grid(bad)
    assert lr.curve_steps(100, 40) == [40, 80, 100]
    assert lr.curve_steps(80, 40) == [40, 80]
    assert lr.curve_steps(5, 0) == [5]


def test_stage_usage_sums_wall_and_keeps_the_largest_peak(lr, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text("".join(json.dumps(x) + "\n" for x in (
        {"stage": "caches", "run": "a", "wall_s": 10.0, "peak_rss_mib": 300.0},
        {"stage": "caches", "run": "b", "wall_s": 5.0, "peak_rss_mib": 500.0},
        {"stage": "training", "run": "c", "wall_s": 1.0, "peak_rss_mib": 100.0})))
    assert lr.stage_usage(ledger) == {"caches": {"wall_s": 15.0, "peak_rss_mib": 500.0, "commands": 2},
                                      "training": {"wall_s": 1.0, "peak_rss_mib": 100.0, "commands": 1}}


def _teachers(root: Path) -> Path:
    """Tiny stand-ins: `smollm2` on a byte-level BPE tokenizer, `gemma3` on a SentencePiece-style one."""
    texts = [json.loads(line)["text"][:2000] for line in open(ROOT / "data/corpus/train.jsonl", encoding="utf-8")][:80]
    made = make_two_tokenizer_setup(root / "setup", texts=texts, s_vocab=400, t_vocab=320, t_seed=5, s_seed=6)
    tdir = root / "teachers"
    tdir.mkdir()
    made.teacher_s.rename(tdir / "smollm2")
    made.teacher_t.rename(tdir / "gemma3")
    return tdir


def _stats(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_killed_during_training_it_resumes_reusing_every_finished_stage(lr, tmp_path):
    tdir, work = _teachers(tmp_path), tmp_path / "work"
    argv = [sys.executable, str(ROOT / "benchmarks/long_run.py"), "--work", str(work), "--teachers-dir", str(tdir),
            "--train-tokens", "2048", "--eval-tokens", "256", "--seq-len", "64", "--top-k", "8", "--keep-layers",
            "1", "--calibration-tokens", "256", "--steps", "4", "--tune-steps", "2", "--tune-windows", "4",
            "--grid", "1e-3:0.5,3e-3:0.8", "--curve-every", "2", "--save-every", "1", "--bootstrap", "50", "--jobs", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    checkpoints = work / "runs/distilled/checkpoints"
    deadline = time.monotonic() + 400
    while not any(checkpoints.glob("step-*[0-9]")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    out = first.communicate()[0].decode(errors="replace")
    assert first.returncode == -signal.SIGKILL, out
    assert "[long] plan: 2,048 training tokens" in out
    assert not (work / "runs/distilled/final").exists(), "the kill came after the distilled student finished"

    caches = sorted(p for p in (work / "caches").rglob("*") if p.is_file() and ".log" not in p.name)
    tuned = sorted((work / "tune").glob("*/final/model.safetensors"))
    assert len(tuned) == 2 and any(p.name == "manifest.json" for p in caches)
    before = _stats([*caches, *tuned, work / "student-init" / "model.safetensors"])

    second = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert _stats(list(map(Path, before))) == before  # no cache, tuning run or cut computed again
    # 2 training and 3 held-out caches, 2 tuning runs, the cut (lines of parallel runs may interleave: counted in
    # the text)
    assert second.stdout.count("exists with the same config, reused") == 5 + 2 + 1, second.stdout
    assert "resumed from" in (work / "runs/distilled.log").read_text()
    result = json.loads((work / "long_run.json").read_text())
    assert result["tokens"] == 2048 and result["steps"] == 4 and len(result["tuning"]) == 2
    assert {"distilled", "ce-only", "smollm2", "init", "distilled-step2", "ce-only-step2"} <= set(result["models"])
    assert [x for x, _ in result["curve"]["distilled"]] == [0, 2 * 4 * 64, 4 * 4 * 64]
    assert {"teachers", "student", "caches", "tuning", "training", "learning curve", "evaluation"} >= set(
        result["usage"]) >= {"student", "caches", "tuning", "training", "evaluation"}
    assert (work / "long_run.png").read_bytes()[:4] == b"\x89PNG"
    assert "| distilled - smollm2 |" in (work / "long_run.md").read_text()

    # the same training, uninterrupted and in one piece, gives bitwise the same student
    config = json.loads((work / "runs/distilled/config.json").read_text())
    config.update(output=str(tmp_path / "uninterrupted"), resume=False)
    (tmp_path / "replay.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "cli.py", "train-student", "--config", str(tmp_path / "replay.json")], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    a, b = _tensors(work / "runs/distilled/final"), _tensors(tmp_path / "uninterrupted/final")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # a learning-curve model is its checkpoint's student: the last checkpoint's is the final model
    c = _tensors(lr.snapshot(work / "runs/distilled", 4, work / "student-init", tdir / "smollm2", tmp_path / "snap"))
    assert a.keys() == c.keys() and all(a[k].equal(c[k]) for k in a)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for label in ("distilled", "ce-only"):
        path = work / "runs" / label / "final"
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        ids = tok("In the beginning", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_interval_rows_give_the_verdict_of_each_difference(lr):
    below = {"difference": -1.0, "low": -2.0, "high": -0.5, "relative": -0.1, "rel_low": -0.2, "rel_high": -0.05}
    across = {**below, "high": 0.5, "rel_high": 0.05}
    rows = lr.interval_rows([("distilled", "smollm2", below), ("distilled", "ce-only", across)])
    assert rows[2].endswith("| **holds** |") and rows[3].endswith("| **cannot tell** |")
    assert "-1.00 [-2.00, -0.50]" in rows[2]


def test_param_count_reads_the_safetensors_headers(lr, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import make_tiny_teacher

    model = make_tiny_teacher(tmp_path / "m", 128, hidden_size=32)
    assert lr.param_count(model) == sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
