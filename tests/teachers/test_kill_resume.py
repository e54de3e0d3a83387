"""A `cli.py precompute` process killed with SIGKILL after its first shard is recorded, then re-run, yields
shards byte-identical (sha256) to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teachers.config import tiny
from teachers.precompute import run_precompute
from tests.helpers import make_tiny_setup, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.parquet"))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk", "sampled", "aligned"])
def test_sigkill_then_rerun_gives_identical_shards(tmp_path: Path, kind: str) -> None:
    aligned = kind == "aligned"
    targets = ["--targets", "sampled", "--samples", "12"] if kind == "sampled" else []
    teacher, corpus = make_tiny_setup(tmp_path, n_docs=100, vocab=512, seed=4)
    extra: list[str] = []
    if aligned:  # the same teacher, its targets aligned to another tokenizer (S) trained on the same texts
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        s_dir = train_tiny_tokenizer(tmp_path / "S", texts, vocab_size=300)
        extra = ["--align-tokenizer", str(s_dir), "--max-tokens", str(32 * 4 * 12)]  # 12 shards
    out = tmp_path / "killed"
    cmd = [sys.executable, "cli.py", "precompute", "--teacher", str(teacher), "--teacher-name", "tiny",
           "--dataset", str(corpus), "--output", str(out), "--seq-len", "32", "--shard-size", "4", "--top-k", "8",
           "--batch-size", "4", "--head-chunk-size", "64", "--device", "cpu", "--no-progress", *targets, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger = out / "ledger-slice-00000-of-00001.json"
    recorded = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists():
                try:
                    recorded = len(json.loads(ledger.read_text())["shards"])
                except (json.JSONDecodeError, KeyError):
                    recorded = 0  # replaced while we read it; try again
                if recorded >= 1:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and recorded >= 1
    assert not (out / "manifest.json").exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["notes"]["this_run"]["skipped_completed"] >= 1

    cfg = tiny(str(teacher), str(corpus), str(tmp_path / "whole"))
    if targets:
        cfg.teacher.targets, cfg.teacher.samples = "sampled", 12
    if aligned:
        cfg.teacher.align_tokenizer = extra[1]
        cfg.corpus.max_tokens = int(extra[3])
    reference = run_precompute(cfg)
    assert manifest.get("target_kind", "topk") == reference.target_kind == ("sampled" if targets else "topk")
    assert len(reference.shards) == len(manifest["shards"]) > 10
    assert _hashes(out) == _hashes(tmp_path / "whole")
    if aligned:  # the per-shard statistics (coverage, mass) survive the kill as well
        assert manifest["schema_version"] == 2
        assert [s["stats"] for s in manifest["shards"]] == [s.stats for s in reference.shards]
    assert sorted(s["file"] for s in manifest["shards"]) == sorted(_hashes(out))
