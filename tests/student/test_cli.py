"""train-student and plot through the CLI: bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main
from tests.student.synthetic import make_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "a": str(make_cache(root / "a", name="a", seed=1, k=8, n=40)),
        "b": str(make_cache(root / "b", name="b", seed=2, k=4, n=40)),  # different top-k: allowed
        "other_len": str(make_cache(root / "c", name="c", seed=3, seq_len=12, n=40)),
        "no_entropy": str(make_cache(root / "d", name="d", seed=4, entropy=False, n=40)),
        "root": root,
    }


def _run(args: list[str]):
    return CliRunner().invoke(main, ["train-student", *args])


def _fails_with(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_wrong_student_vocab(caches, tmp_path):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 2}))
    r = _run(["--teacher-data", caches["a"], "--output", str(tmp_path / "o"), "--student", str(cfg)])
    _fails_with(r, "vocab_size", "100 vs 64")


def test_mismatched_teachers(caches, tmp_path):
    r = _run(["--teacher-data", caches["a"], "--teacher-data", caches["other_len"], "--output", str(tmp_path / "o")])
    _fails_with(r, "'seq_len'", "16 vs 12")


def test_missing_directory(caches, tmp_path):
    r = _run(["--teacher-data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    _fails_with(r, "nope")


def test_negative_lambda_and_bad_weights(caches, tmp_path):
    _fails_with(_run(["--teacher-data", caches["a"], "--output", str(tmp_path / "o"), "--lambda-kd", "-0.5"]),
                "--lambda-kd")
    _fails_with(_run(["--teacher-data", caches["a"], "--teacher-data", caches["b"], "--output", str(tmp_path / "o"),
                      "--teacher-weighting", "fixed", "--teacher-weights", "0.5"]), "2 teachers")
    _fails_with(_run(["--teacher-data", caches["a"], "--output", str(tmp_path / "o"), "--temperature", "2"]),
                "temperature")


def test_entropy_weighting_needs_entropy(caches, tmp_path):
    _fails_with(_run(["--teacher-data", caches["no_entropy"], "--teacher-weighting", "entropy",
                      "--output", str(tmp_path / "o")]), "entropy_kind 'absent'", "--teacher-weighting uniform")


def test_different_top_k_trains_then_plot(caches, tmp_path):
    out = tmp_path / "run"
    args = ["--teacher-data", caches["a"], "--teacher-data", caches["b"], "--output", str(out), "--max-steps", "4",
            "--batch-size", "4", "--eval-sequences", "4", "--eval-every", "2", "--log-every", "1",
            "--num-workers", "0", "--gamma-feat", "0.1"]
    r = _run(args)
    assert r.exit_code == 0, r.output
    assert (out / "final" / "model.safetensors").is_file()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "lr", "loss", "kd", "ce", "feat", "alpha", "tokens_per_s"} <= set(recs[1])
    assert any(r["split"] == "eval" and "eval_ppl" in r for r in recs)
    # an existing run is not overwritten without --resume, and is resumed only with the same data settings
    _fails_with(_run(args), "--resume")
    _fails_with(_run([*args, "--resume", "--batch-size", "2"]), "'batch_size'", "4 vs 2")
    p = CliRunner().invoke(main, ["plot", str(out)])
    assert p.exit_code == 0, p.output
    assert (out / "curves.png").stat().st_size > 10_000
    _fails_with(CliRunner().invoke(main, ["plot", str(tmp_path)]), "metrics.jsonl")


def test_help_describes_every_option():
    r = CliRunner().invoke(main, ["train-student", "--help"])
    assert r.exit_code == 0 and "compared on its own top-k plus its own tail" in " ".join(r.output.split())
    cmd = main.commands["train-student"]
    assert all(p.help for p in cmd.params if hasattr(p, "help"))


def test_dkd_with_fixed_weights_and_workers(caches, tmp_path):
    out = tmp_path / "dkd"
    r = _run(["--teacher-data", caches["a"], "--teacher-data", caches["b"], "--output", str(out), "--loss", "dkd",
              "--teacher-weighting", "fixed", "--teacher-weights", "3,1", "--max-steps", "3", "--batch-size", "4",
              "--eval-sequences", "4", "--log-every", "1", "--num-workers", "2"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in recs if m["split"] == "train"]
    assert len(train) == 3 and train[0]["alpha"] == {"a": 0.75, "b": 0.25} and train[0]["kd"] > 0
