"""Both stages with every shard and manifest behind an fsspec URL instead of a local path.

`memory://` lives in one process, so those tests call `run_precompute` / `run_train` in-process with
`num_workers=0`; the `file://` tests also use DataLoader worker processes and the CLI in subprocesses.
Teacher A is computed as two node slices (merged by the reader, then by `merge`), teacher B in one slice
as Zarr; stage two trains on both with the feature loss on, so every column is read back through fsspec.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests.helpers import make_tiny_setup, make_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, SHARD_SIZE, WINDOWS = 32, 4, 24  # 6 global shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("objstore")
    teacher_a, corpus = make_tiny_setup(root, n_docs=120, seed=0)
    teacher_b = make_tiny_teacher(root / "teacher_b", 512, seed=7, tokenizer_dir=root / "tokenizer")
    return {"a": str(teacher_a), "b": str(teacher_b), "corpus": str(corpus), "tok": str(root / "tokenizer")}


def _precompute(teacher: str, corpus: str, output: str, **overrides):
    from teachers.config import StorageConfig, tiny
    from teachers.precompute import run_precompute

    fmt = overrides.pop("format", "parquet")
    cfg = tiny(teacher, corpus, output, storage=StorageConfig(output=output, shard_size=SHARD_SIZE, format=fmt),
               **overrides)
    cfg.corpus.max_tokens = SEQ_LEN * WINDOWS
    return run_precompute(cfg)


def _train(teacher_data: list[str], output: Path, tok: str, num_workers: int) -> dict[str, float]:
    from student.config import LossConfig, TrainConfig
    from student.trainer import run_train

    cfg = TrainConfig(teacher_data=teacher_data, output=str(output), student="tiny", tokenizer=tok,
                      loss=LossConfig(lambda_kd=0.5, teacher_weighting="entropy", gamma_feat=0.1),
                      max_steps=3, batch_size=2, eval_sequences=4, eval_every=0, log_every=1,
                      num_workers=num_workers, device="cpu", seed=0)
    return run_train(cfg)


def _run_both_stages(tiny, root: str, tmp_path: Path, num_workers: int) -> None:
    from storage.reader import TeacherDataset

    url_a, url_b = f"{root}/teacher_a", f"{root}/teacher_b"
    for s in range(2):  # two "nodes", each one slice of teacher A
        _precompute(tiny["a"], tiny["corpus"], url_a, num_slices=2, slice_index=s)
    m_b = _precompute(tiny["b"], tiny["corpus"], url_b, format="zarr")

    fs, _ = fsspec.core.url_to_fs(url_a)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url_a, detail=False))
    assert "manifest-slice-00000-of-00002.json" in names and "manifest-slice-00001-of-00002.json" in names
    assert sum(n.endswith(".parquet") for n in names) == WINDOWS // SHARD_SIZE
    assert not any(".tmp-" in n for n in names)  # every shard was renamed into place

    a, b = TeacherDataset.open(url_a), TeacherDataset.open(url_b)  # verify=True: sizes and sha256 via fsspec
    assert len(a) == len(b) == WINDOWS and a.manifest.num_slices == 1
    np.testing.assert_array_equal(a.read_columns([0, 23], ["input_ids"])["input_ids"],
                                  b.read_columns([0, 23], ["input_ids"])["input_ids"])
    assert m_b.format == "zarr" and b.read([5]).pooled  # pooled column read back from the Zarr store

    # the same runs to a local directory, teacher A unsliced, give the same bytes
    m_local = _precompute(tiny["b"], tiny["corpus"], str(tmp_path / "local_b"), format="zarr")
    assert [s.sha256 for s in m_local.shards] == [s.sha256 for s in m_b.shards]
    m_a1 = _precompute(tiny["a"], tiny["corpus"], str(tmp_path / "local_a"))
    assert [s.sha256 for s in m_a1.shards] == [s.sha256 for s in a.manifest.shards]

    # re-running the command on the store resumes: nothing is recomputed, nothing changes
    again = _precompute(tiny["b"], tiny["corpus"], url_b, format="zarr")
    assert again.notes["this_run"]["sequences"] == 0
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in m_b.shards]

    result = _train([url_a, url_b], tmp_path / "run", tiny["tok"], num_workers)
    assert math.isfinite(result["eval_kl"]) and result["eval_kl"] >= 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and all(math.isfinite(json.loads(x).get("loss", 0.0)) for x in lines)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_memory_store_round_trip(tiny, memory_url, tmp_path) -> None:
    _run_both_stages(tiny, memory_url, tmp_path, num_workers=0)


@pytest.mark.slow
def test_file_url_round_trip_with_loader_workers(tiny, tmp_path) -> None:
    root = (tmp_path / "store").as_uri()  # file:///...
    _run_both_stages(tiny, root, tmp_path, num_workers=1)
    assert (tmp_path / "store" / "teacher_b" / "manifest.json").is_file()


@pytest.mark.slow
def test_cli_with_file_urls(tiny, tmp_path) -> None:
    """Both stages as separate processes, as a cluster runs them (memory:// cannot cross processes)."""
    url = (tmp_path / "store" / "teacher_a").as_uri()
    common = ["--teacher", tiny["a"], "--dataset", tiny["corpus"], "--seq-len", str(SEQ_LEN), "--top-k", "8",
              "--shard-size", str(SHARD_SIZE), "--max-tokens", str(SEQ_LEN * WINDOWS), "--device", "cpu",
              "--batch-size", "4", "--output", url, "--num-slices", "2", "--no-progress"]
    for s in range(2):
        _cli("precompute", *common, "--slice-index", str(s))
    _cli("merge", url)
    assert (tmp_path / "store" / "teacher_a" / "manifest.json").is_file()
    _cli("train-student", "--teacher-data", url, "--output", str(tmp_path / "run"), "--student", "tiny",
         "--tokenizer", tiny["tok"], "--max-steps", "2", "--batch-size", "2", "--eval-sequences", "4",
         "--num-workers", "0", "--device", "cpu")
    assert (tmp_path / "run" / "final" / "config.json").exists()


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"cli.py {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize(("url", "extra"), [("s3://bucket/cache", "s3"), ("gs://bucket/cache", "gcs")])
def test_missing_object_store_driver_is_one_line_before_any_model_loads(tmp_path, url, extra):
    """Without s3fs / gcsfs, precompute stops in one line naming the extra; the teacher path does not even
    exist, so a model load attempted first would have failed with a different message."""
    import importlib.util

    if importlib.util.find_spec({"s3": "s3fs", "gcs": "gcsfs"}[extra]) is not None:
        pytest.skip(f"the {extra} driver is installed here")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a b c"}\n', encoding="utf-8")
    r = subprocess.run([sys.executable, "cli.py", "precompute", "--teacher", str(tmp_path / "no-such-teacher"),
                        "--dataset", str(corpus), "--output", url], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}: ") and f".[{extra}]" in lines[0], r.stderr
