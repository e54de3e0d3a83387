"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.student.synthetic import make_cache

SCRIPT = Path(__file__).with_name("dist_script.py")
REPO = SCRIPT.parents[2]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return [str(make_cache(root / "a", name="a", seed=1, k=8, n=48, pooled={1: 12})),
            str(make_cache(root / "b", name="b", seed=2, k=4, n=48, pooled={1: 10}))]


def _train(caches, out: Path, nproc: int, batch_size: int, *extra: str,
           stop_after: int | None = None) -> tuple[list[dict], list[list[list[int]]]]:
    """Train 6 steps; with `stop_after`, stop there (checkpoint) and continue with --resume."""
    out.mkdir(parents=True)
    args = ["--output", str(out / "run"), "--max-steps", "6", "--batch-size", str(batch_size),
            "--eval-sequences", "8", "--eval-every", "3", "--log-every", "1", "--num-workers", "0",
            "--gamma-feat", "0.1", "--device", "cpu", *extra]
    for c in caches:
        args += ["--teacher-data", c]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    seen: list[list[list[int]]] = [[] for _ in range(nproc)]
    parts = [["--stop-after", str(stop_after)], ["--resume"]] if stop_after else [[]]
    for part in parts:
        proc = subprocess.run([*launcher, str(SCRIPT), str(out), *args, *part], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        for r in range(nproc):
            seen[r] += json.loads((out / f"seen-rank{r}.json").read_text())
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return metrics, seen


def _compare(single: list[dict], multi: list[dict]) -> None:
    assert [m["step"] for m in single] == [m["step"] for m in multi]
    worst = 0.0
    for a, b in zip(single, multi, strict=True):
        for key in ("loss", "kd", "ce", "feat", "eval_kl", "eval_ce"):
            if key in a:
                worst = max(worst, abs(b[key] - a[key]) / max(abs(a[key]), 1e-12))
                # same sequences and the same math; only the order of float reductions differs (gradient
                # all-reduce, per-rank means), which stays below 1e-4 relative over 6 AdamW steps
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
    print(f"largest relative difference to one process: {worst:.2e}")


@pytest.fixture(scope="module")
def single(caches, tmp_path_factory):
    return _train(caches, tmp_path_factory.mktemp("single") / "s", 1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-chunked"])
def test_two_ranks_match_one_process(caches, single, tmp_path, mode):
    # the FSDP run is also stopped after step 3 and resumed (sharded state saved in full by rank 0);
    # ddp-chunked: DDP with the chunked loss (--loss-chunk-size) against the unchunked single process
    extra = {"ddp": [], "fsdp": ["--fsdp"], "ddp-chunked": ["--loss-chunk-size", "24"]}[mode]
    metrics, seen = _train(caches, tmp_path / mode, 2, 2, *extra, stop_after=3 if mode == "fsdp" else None)
    (single_metrics, (single_seen,)) = single
    # the ranks see disjoint sequences whose union is the single process's batch, step by step
    assert len(seen[0]) == len(seen[1]) == len(single_seen) == 6
    for r0, r1, one in zip(seen[0], seen[1], single_seen, strict=True):
        assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(one)
    _compare(single_metrics, metrics)
    assert (tmp_path / mode / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_ranks_hash_each_shard_once_and_resume_hashes_none(tmp_path):
    """Acceptance: caches without a stamp are hashed once in total (by rank 0) under torchrun with 2
    processes; the run stamps them, so `--resume` hashes none."""
    caches = [str(make_cache(tmp_path / name, name=name, seed=seed, k=4, n=48)) for name, seed in (("a", 1), ("b", 2))]
    shard_files = set()
    for c in caches:
        for stamp in Path(c).glob("verified-*.json"):
            stamp.unlink()  # as if written by a version without stamps
        shard_files |= {str(p) for p in Path(c).glob("shard-*.parquet")}
    assert len(shard_files) > 2
    out = tmp_path / "out"
    out.mkdir()
    args = ["--output", str(out / "run"), "--max-steps", "4", "--batch-size", "2", "--eval-sequences", "4",
            "--eval-every", "0", "--num-workers", "0", "--device", "cpu"]
    for c in caches:
        args += ["--teacher-data", c]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    counts = []
    for part in (["--stop-after", "2"], ["--resume"]):
        proc = subprocess.run([*launcher, str(SCRIPT), str(out), *args, *part], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        per_rank = [json.loads((out / f"hashes-rank{r}.json").read_text()) for r in range(2)]
        counts.append([len(h) for h in per_rank])
        if part[0] == "--stop-after":
            assert sorted(per_rank[0]) == sorted(shard_files) and per_rank[1] == []  # each shard exactly once
    print(f"{len(shard_files)} shards; sha256 computations per rank: first run {counts[0]}, --resume {counts[1]}")
    assert counts == [[len(shard_files), 0], [0, 0]]


@pytest.mark.slow
def test_two_ranks_refuse_an_existing_run_with_the_same_line(tmp_path):
    """Rank 0 checks and locks the run directory; its refusal reaches rank 1, so both stop with the same one
    line (no rank left waiting at a collective) and the run directory is unchanged."""
    cache = str(make_cache(tmp_path / "a", name="a", seed=1, k=4, n=16))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')  # an earlier run's log
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*launcher, str(SCRIPT), str(tmp_path), "--teacher-data", cache, "--output", str(run),
                           "--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and "pass --resume" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
