"""Text corpora behave exactly as before conversations existed: the same precompute and train-student
commands, run once by this tree and once by the last commit without conversation support, give the same
shard bytes, the same manifest (timings aside), the same metrics and bitwise the same final student."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEFORE_CHAT = "12650d03c326bc1231cdf2c4889970a2fc88c804"
"""The last commit on main before conversational corpora (issue 27); its top-k caches already store
`observed_logprob` (issue 23), so shards compare byte for byte."""
TIMINGS = {"tokens_per_s", "eval_seconds", "eval_share"}


def _export(commit: str, into: Path) -> bool:
    """The tree of `commit` under `into` (False when this checkout lacks git or that commit)."""
    if shutil.which("git") is None:
        return False
    r = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True)
    if r.returncode != 0:
        return False
    into.mkdir(parents=True)
    archive = into.parent / "tree.tar"
    archive.write_bytes(r.stdout)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return True


def _run(tree: Path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(tree))
    r = subprocess.run([sys.executable, "cli.py", *args], cwd=tree, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _pipeline(tree: Path, teacher: Path, corpus: Path, out: Path) -> None:
    _run(tree, "precompute", "--teacher", str(teacher), "--dataset", str(corpus), "--output", str(out / "cache"),
         "--seq-len", "32", "--top-k", "8", "--shard-size", "4", "--max-tokens", str(32 * 24), "--device", "cpu",
         "--batch-size", "4", "--no-progress")
    _run(tree, "train-student", "--teacher-data", str(out / "cache"), "--output", str(out / "run"), "--student",
         "tiny", "--max-steps", "3", "--batch-size", "4", "--eval-sequences", "4", "--eval-every", "3",
         "--log-every", "1", "--num-workers", "0", "--device", "cpu")


def _manifest(path: Path) -> dict:
    m = json.loads(path.read_text())
    m["notes"].pop("this_run", None)  # seconds
    return m


@pytest.mark.slow
def test_text_caches_and_training_are_bitwise_those_before_conversations(tmp_path):
    from tests.helpers import make_tiny_setup

    if not _export(BEFORE_CHAT, tmp_path / "before"):
        pytest.skip(f"this checkout has no git history holding commit {BEFORE_CHAT[:7]}")
    teacher, corpus = make_tiny_setup(tmp_path / "setup", n_docs=120, vocab=512, seed=3)
    _pipeline(tmp_path / "before", teacher, corpus, tmp_path / "old")
    _pipeline(ROOT, teacher, corpus, tmp_path / "new")
    old, new = tmp_path / "old", tmp_path / "new"
    shards = sorted(p.name for p in (old / "cache").glob("shard-*.parquet"))
    assert shards and shards == sorted(p.name for p in (new / "cache").glob("shard-*.parquet"))
    for name in shards:
        assert (old / "cache" / name).read_bytes() == (new / "cache" / name).read_bytes(), name
    assert _manifest(old / "cache" / "manifest.json") == _manifest(new / "cache" / "manifest.json")
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                for line in (d / "run" / "metrics.jsonl").read_text().splitlines()] for d in (old, new)]
    assert metrics[0] == metrics[1] and "positions" not in metrics[1][0]
    weights = [hashlib.sha256((d / "run" / "final" / "model.safetensors").read_bytes()).hexdigest() for d in (old, new)]
    assert weights[0] == weights[1]
