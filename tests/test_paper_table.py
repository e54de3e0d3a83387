"""benchmarks/paper_table.py: the verdict rules, the paired bootstrap and the tables, against hand computations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def pt():
    return load_script("benchmarks/paper_table.py")


def test_verdict_better(pt):
    assert pt.verdict_better(-3.0, -1.0, [-2.0, -1.5]) == "holds"
    assert pt.verdict_better(-3.0, -1.0, [-2.0, +0.5]) == "cannot tell"  # a seed disagrees
    assert pt.verdict_better(-3.0, +1.0, [-2.0, -1.0]) == "cannot tell"  # the interval holds zero
    assert pt.verdict_better(+0.5, +2.0, [+1.0, +1.0]) == "does not hold"


def test_verdict_no_worse_and_all(pt):
    assert pt.verdict_no_worse(-1.0, 0.5, margin=1.0) == "holds"
    assert pt.verdict_no_worse(-1.0, 1.5, margin=1.0) == "cannot tell"
    assert pt.verdict_no_worse(0.1, 0.5, margin=1.0) == "does not hold"  # significantly worse, even if small
    assert pt.verdict_all(["holds", "holds"]) == "holds"
    assert pt.verdict_all(["holds", "cannot tell"]) == "cannot tell"
    assert pt.verdict_all(["holds", "does not hold", "cannot tell"]) == "does not hold"
    assert pt.verdict_all([]) == "cannot tell"


def test_paired_bootstrap_by_hand(pt):
    rng = np.random.default_rng(0)
    b = rng.uniform(2.0, 4.0, size=12)
    strata = np.repeat([0, 1, 2], 4)
    # a constant NLL shift c: every replicate's ratio is exp(c), so the relative interval is a point
    r = pt.paired_bootstrap(b + 0.1, b, strata, n=300)
    assert r["relative"] == pytest.approx(math.exp(0.1) - 1, rel=1e-12)
    assert r["rel_low"] == pytest.approx(math.exp(0.1) - 1, rel=1e-9)
    assert r["rel_high"] == pytest.approx(math.exp(0.1) - 1, rel=1e-9)
    assert r["difference"] == pytest.approx(math.exp(b.mean() + 0.1) - math.exp(b.mean()), rel=1e-12)
    assert r["low"] <= r["difference"] <= r["high"] and r["low"] > 0
    same = pt.paired_bootstrap(b, b, strata, n=100)
    assert same["low"] == same["high"] == same["difference"] == 0.0
    # a difference in one domain only: an interval that holds the point estimate and is not a point
    a = b.copy()
    a[:4] -= rng.uniform(0.0, 0.4, size=4)
    r = pt.paired_bootstrap(a, b, strata, n=500)
    assert r["low"] < r["difference"] < r["high"] <= 0
    with pytest.raises(ValueError):
        pt.paired_bootstrap(a[:5], b, strata)


def _results(values: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Fake `evaluate` JSON per domain: label -> domain -> window NLLs (KL = NLL / 10)."""
    doms = next(iter(values.values())).keys()
    return {
        d: {
            "models": {
                lab: {"window_nll": v[d], "window_kl_fused": [x / 10 for x in v[d]]}
                for lab, v in values.items()
            }
        }
        for d in doms
    }


def test_scores_rows_compare_and_table_by_hand(pt):
    vals = {
        "ce-s0": {"x": [3.0, 3.2], "y": [4.0, 4.2]},
        "ce-s1": {"x": [3.2, 3.4], "y": [4.2, 4.0]},
        "k1-s0": {"x": [2.8, 3.0], "y": [3.8, 3.9]},
        "k1-s1": {"x": [2.9, 3.1], "y": [3.9, 3.7]},
    }
    s = pt.Scores.from_results(_results(vals))
    rows = {"ce": ["ce-s0", "ce-s1"], "k1": ["k1-s0", "k1-s1"]}
    assert s.strata().tolist() == [0, 0, 1, 1]
    ce_windows = [(3.0 + 3.2) / 2, (3.2 + 3.4) / 2, (4.0 + 4.2) / 2, (4.2 + 4.0) / 2]
    assert np.allclose(s.row(rows["ce"]), ce_windows)
    assert pt.ppl(s.row(rows["ce"])) == pytest.approx(math.exp(np.mean(ce_windows)))
    assert pt.ppl(s.row(rows["ce"], "y")) == pytest.approx(math.exp(np.mean(ce_windows[2:])))
    c = pt.compare(s, rows, "k1 vs ce", "k1", "ce", replicates=200)
    by_seed = [
        math.exp(np.mean([2.8, 3.0, 3.8, 3.9])) - math.exp(np.mean([3.0, 3.2, 4.0, 4.2])),
        math.exp(np.mean([2.9, 3.1, 3.9, 3.7])) - math.exp(np.mean([3.2, 3.4, 4.2, 4.0])),
    ]
    assert c.seed_diffs == pytest.approx(by_seed)
    assert c.verdict == "holds"  # every window is lower for k1 in the seed mean, and both seeds agree
    lines = pt.row_table(s, rows, {"ce": "CE only", "k1": "KD"}, "ce")
    assert lines[0].startswith("| row |") and "| x | y |" in lines[0]
    k1 = lines[3]
    k1_ppl = math.exp(np.mean(s.row(rows["k1"])))
    ce_ppl = math.exp(np.mean(ce_windows))
    assert f"**{k1_ppl:.2f}**" in k1
    assert f"{100 * (k1_ppl / ce_ppl - 1):+.1f}%" in k1
    assert f"{np.mean(s.row(rows['k1'], kind='kl')):.3f}" in k1
    assert lines[2].endswith("| +0.0% |")


def test_feature_row_labels_keep_the_first_gamma_as_feat(pt):
    assert pt.feat_label(0, 0.1) == "feat"  # runs made with a single gamma stay reusable
    assert pt.feat_label(1, 0.01) == "feat-g0.01"
    assert pt.run_label("feat-g0.01", 0) == "feat-g0.01-s0"


def test_rows_with_other_seed_counts_are_compared_on_shared_seeds(pt):
    vals = {
        "a-s0": {"x": [3.0, 3.1], "y": [3.2, 3.3]},
        "a-s1": {"x": [2.0, 2.1], "y": [2.2, 2.3]},  # a much luckier seed 1
        "b-s0": {"x": [2.9, 3.0], "y": [3.1, 3.2]},
    }
    s = pt.Scores.from_results(_results(vals))
    rows = {"a": ["a-s0", "a-s1"], "b": ["b-s0"]}
    c = pt.compare(s, rows, "b vs a", "b", "a", replicates=200)
    # only seed 0 is shared: b is lower than a there, although a's seed mean is lower still
    expected = math.exp(np.mean([2.9, 3.0, 3.1, 3.2])) - math.exp(np.mean([3.0, 3.1, 3.2, 3.3]))
    assert c.seed_diffs == pytest.approx([expected])
    assert c.result["difference"] == pytest.approx(expected)
    assert c.verdict == "holds"


def test_an_aligned_teachers_perplexity_pools_its_exact_positions_over_domains(pt):
    res = {
        "a": {
            "models": {},
            "cache_teachers": {
                "gemma3": {"perplexity_observed": math.e, "observed_positions": 30, "positions": 40}
            },
        },
        "b": {
            "models": {},
            "cache_teachers": {
                "gemma3": {"perplexity_observed": math.e**3, "observed_positions": 10, "positions": 40}
            },
        },
    }
    s = pt.Scores.from_results(res)
    assert s.observed_ppl("gemma3", "b") == pytest.approx((math.e**3, 0.25))
    assert s.observed_ppl("gemma3") == pytest.approx(
        (math.exp((30 * 1 + 10 * 3) / 40), 0.5)
    )  # token-weighted


def test_an_aligned_teacher_without_exact_positions_has_no_perplexity(pt):
    res = {
        "a": {
            "models": {},
            "cache_teachers": {"g": {"perplexity_observed": None, "observed_positions": 0, "positions": 40}},
        }
    }
    ppl, share = pt.Scores.from_results(res).observed_ppl("g")
    assert math.isnan(ppl) and share == 0.0


def _cli_config(command, root, table, argv):
    """The config the CLI builds from `argv` (its own options), without running the command."""
    from common.config_cli import build_config

    ctx = command.make_context(command.name, list(argv))
    return build_config(root, table, ctx, ctx.params)


def test_runs_made_with_the_old_command_lines_have_the_configs_the_runner_asks_for(pt, tmp_path):
    """Caches and students made before benchmarks/runner.py (by hand-built `cli.py` flags) stored the config
    these flags build; the runner's description of the same row must be equal, or they would not be reused."""
    import argparse

    from student.commands import TRAIN_OPTIONS, train_student_cmd
    from student.config import TrainConfig
    from teachers.commands import PRECOMPUTE_OPTIONS, precompute_cmd
    from teachers.config import PrecomputeConfig

    args = argparse.Namespace(steps=10, batch_size=4, lr=3e-4, seq_len=256, top_k=32, lambda_kd=0.5,
                              teacher_pool_layer=11, student_pool_layer=8)
    caches = [tmp_path / "caches" / n for n in ("smollm2", "smollm2-scripture")]
    student, tok = tmp_path / "student-init", tmp_path / "teachers/smollm2"
    old = ["--output", str(tmp_path / "runs/feat-s1"), "--student", str(student), "--tokenizer", str(tok),
           "--max-steps", "10", "--batch-size", "4", "--lr", "0.0003", "--warmup-steps", "1", "--seed", "1",
           "--eval-sequences", "0", "--eval-every", "0", "--log-every", "5", "--num-workers", "0", "--device", "cpu",
           *(x for c in caches for x in ("--teacher-data", str(c))), "--lambda-kd", "0.5", "--gamma-feat", "0.1",
           "--teacher-pool-layer", "11", "--student-pool-layer", "8"]
    loss = {"lambda_kd": 0.5, "gamma_feat": 0.1, "teacher_pool_layer": 11, "student_pool_layer": 8}
    run = pt.student_run("feat-s1", caches, loss, 1, args, student, tok, tmp_path / "runs")
    assert run.config == _cli_config(train_student_cmd, TrainConfig, TRAIN_OPTIONS, old)

    t = pt.Teacher("smollm2-scripture", tmp_path / "teachers/smollm2-scripture", pool_layer=11)
    out = tmp_path / "caches/smollm2-scripture"
    old = ["--teacher", str(t.path), "--teacher-name", t.name, "--dataset", str(tmp_path / "train.jsonl"),
           "--max-tokens", "18432", "--seq-len", "256", "--top-k", "32", "--pool-layers", "11", "--batch-size", "4",
           "--head-chunk-size", "256", "--shard-size", "128", "--device", "cpu", "--output", str(out)]
    run = pt.cache_run(t, tmp_path / "train.jsonl", 18432, out, args, tok, True)
    cli = _cli_config(precompute_cmd, PrecomputeConfig, PRECOMPUTE_OPTIONS, old)
    # precompute records its config with the slice resolved (1 slice here), as the runner asks for
    assert run.config == dataclasses.replace(cli, num_slices=1, slice_index=0)


def test_reports_and_cuts_made_with_the_old_arguments_have_the_configs_the_runner_asks_for(pt, tmp_path):
    """Reports and cuts made when the runner built `evaluate` / `init-student` flags from a dict of option values
    recorded the config these flags build; paper_table's configs must compare equal, or they would be computed
    again."""
    from student.commands import INIT_STUDENT_OPTIONS, init_student_cmd
    from student.config import InitStudentConfig
    from student.evaluation.command import EVAL_OPTIONS, evaluate_cmd
    from student.evaluation.config import EvalConfig

    models = {"k1-s0": tmp_path / "runs/k1-s0/final", "teacher:smollm2": tmp_path / "teachers/smollm2"}
    caches = [tmp_path / "caches/val-python" / n for n in ("smollm2", "smollm2-python")]
    old = ["--bleu-prompts", "0", "--bootstrap", "0", "--device", "cpu",
           *(x for c in caches for x in ("--teacher-data", str(c))),
           *(x for k, v in models.items() for x in ("--student", f"{k}={v}")),
           "--output", str(tmp_path / "eval-python-0.json")]
    stored = dataclasses.asdict(_cli_config(evaluate_cmd, EvalConfig, EVAL_OPTIONS, old))
    run = pt.runner.evaluate(pt.eval_config(models, caches, tmp_path / "eval-python.json"), tmp_path / "e.log")
    assert pt.runner.config_differences(run, stored, {}) == []

    tok, out = tmp_path / "teachers/smollm2", tmp_path / "student-init"
    old = ["--from", str(tok), "--keep-layers", "20", "--dataset", str(pt.ROOT / "data/corpus/train.jsonl"),
           "--calibration-tokens", "4096", "--seq-len", "256", "--output", str(out), "--overwrite"]
    cli = _cli_config(init_student_cmd, InitStudentConfig, INIT_STUDENT_OPTIONS, old)
    assert pt.cut_run(tok, out, "20", calibrate=True).config == cli
    weak = tmp_path / "teachers/weak"
    old = ["--from", str(tok), "--keep-layers", "0-5,24-29", "--output", str(weak), "--overwrite"]
    cli = _cli_config(init_student_cmd, InitStudentConfig, INIT_STUDENT_OPTIONS, old)
    assert pt.cut_run(tok, weak, "0-5,24-29", calibrate=False).config == cli
