"""benchmarks/runner.py: a run is reused only when the config its output stored equals the requested one (defaults
filled in for fields an older file lacks, declared path moves applied); otherwise it is refused, or set aside and
computed again with `redo`; evaluate and init-student are configs run with `--config` like the others, and their
reports and cuts made before (by the old argument path, or before init-student recorded its config) are adopted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import runner
from student.config import LossConfig, OptimConfig, TrainConfig


def _train(tmp_path: Path, **loss) -> runner.Run:
    cfg = TrainConfig(teacher_data=[str(tmp_path / "caches/a"), str(tmp_path / "caches/b")],
                      output=str(tmp_path / "runs/k2-s0"), student=str(tmp_path / "student"),
                      loss=LossConfig(lambda_kd=0.5, **loss), optim=OptimConfig(lr=3e-4, warmup_steps=1),
                      max_steps=10, batch_size=4, seed=0, num_workers=0, device="cpu")
    return runner.train(cfg, tmp_path / "runs/k2-s0.log")


def _finish(run: runner.Run, stored: dict) -> None:
    """What train-student leaves: RUN/config.json (asdict) and final/."""
    (run.output / "final").mkdir(parents=True)
    (run.output / "final" / "config.json").write_text("{}")
    (run.output / "config.json").write_text(json.dumps(stored, indent=2))


class Calls:
    def __init__(self) -> None:
        self.runs: list[runner.Run] = []

    def __call__(self, run: runner.Run) -> None:
        self.runs.append(run)
        _finish(run, dataclasses.asdict(run.config))


def test_a_finished_run_with_the_same_config_is_reused_without_running(tmp_path):
    run = _train(tmp_path)
    _finish(run, dataclasses.asdict(run.config))
    r = runner.Runner(reuse_only=True)
    assert r.ensure(run) == run.output / "final" and r.reused == [str(run.output)]


def test_another_config_is_refused_naming_the_field_or_set_aside_with_redo(tmp_path):
    run = _train(tmp_path)
    _finish(run, dataclasses.asdict(_train(tmp_path, teacher_weighting="uniform").config))
    with pytest.raises(SystemExit, match="loss.teacher_weighting: 'uniform' there, 'min-ce-seq' here"):
        runner.Runner().ensure(run)
    calls = Calls()
    runner.Runner(redo=True).ensure(run, execute=calls)
    assert [c.output for c in calls.runs] == [run.output]
    aside = run.output.with_name("k2-s0.replaced-0")
    assert json.loads((aside / "config.json").read_text())["loss"]["teacher_weighting"] == "uniform"
    assert json.loads(run.request.read_text()) == runner.tree(run.config)  # the --config file of the CLI


def test_reuse_only_computes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="would be computed"):
        runner.Runner(reuse_only=True).ensure(_train(tmp_path), execute=Calls())


def test_an_older_config_is_adopted_with_defaults_and_moved_paths(tmp_path):
    """A run made elsewhere (paths under OLD) by a version without `weight_floor`, resumed once: reused when the
    paths are declared the same and the missing field had today's default; a changed default is a difference."""
    run = _train(tmp_path)
    old = json.loads(json.dumps(dataclasses.asdict(run.config)).replace(str(tmp_path), "/elsewhere"))
    del old["loss"]["weight_floor"]
    old["resume"] = True  # how the run was started, not what it computed
    _finish(run, old)
    with pytest.raises(SystemExit, match="teacher_data"):
        runner.Runner().ensure(run)
    r = runner.Runner(same_paths={"/elsewhere": str(tmp_path)}, reuse_only=True)
    assert r.ensure(run) == run.output / "final"
    with pytest.raises(SystemExit, match=r"loss.weight_floor: 0.0 there, 0.5 here"):
        r.ensure(_train(tmp_path, weight_floor=0.5))


def test_an_output_without_a_stored_config_is_not_reused(tmp_path):
    run = _train(tmp_path)
    _finish(run, {})
    (run.output / "config.json").unlink()
    with pytest.raises(SystemExit, match="no config.json to compare with"):
        runner.Runner().ensure(run)


def test_interrupted_runs_are_resumed(tmp_path):
    run = _train(tmp_path)
    run.output.mkdir(parents=True)  # started, no final model
    calls = Calls()
    runner.Runner().ensure(run, execute=calls)
    assert json.loads(run.request.read_text())["resume"] is True


def test_precompute_runs_are_one_slice_and_compared_by_their_slice_config(tmp_path):
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig

    def cfg(top_k=8):
        return PrecomputeConfig(corpus=CorpusConfig(dataset=str(tmp_path / "c.jsonl"), max_tokens=64),
                                teacher=TeacherConfig(path="tiny", top_k=top_k, pool_layers=[]),
                                storage=StorageConfig(output=str(tmp_path / "cache")), seq_len=16, num_slices=1,
                                slice_index=0)

    with pytest.raises(ValueError, match="one slice"):
        runner.precompute(dataclasses.replace(cfg(), num_slices=None), tmp_path / "c.log")
    run = runner.precompute(cfg(), tmp_path / "cache.log")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    runner.record(run)  # as the CLI writes it
    assert run.stored.name == "config-slice-00000-of-00001.json"
    assert runner.Runner(reuse_only=True).ensure(run) == tmp_path / "cache"
    with pytest.raises(SystemExit, match="teacher.top_k: 8 there, 16 here"):
        runner.Runner().ensure(runner.precompute(cfg(top_k=16), tmp_path / "cache.log"))


def _cli_config(command, root, table, argv, member=None):
    """The config the CLI builds from `argv`, without running the command."""
    from common.config_cli import build_config

    ctx = command.make_context(command.name, list(argv))
    return build_config(root, table, ctx, ctx.params, member=member)


def _eval_config(tmp_path: Path, students: list[str], caches=("c",), **kw):
    from student.evaluation.config import EvalConfig

    return EvalConfig(students=students, teacher_data=[str(tmp_path / c) for c in caches], bleu_prompts=0,
                      bootstrap=0, device="cpu", output=str(tmp_path / "eval.json"), **kw)


def _old_report(tmp_path: Path) -> dict:
    """A report made when the runner built `evaluate` flags from a dict of option values (`cli_options`): the
    config those flags give, as evaluate records it."""
    from student.evaluation.command import EVAL_OPTIONS, evaluate_cmd
    from student.evaluation.config import EvalConfig

    argv = ["--bleu-prompts", "0", "--bootstrap", "0", "--device", "cpu", "--teacher-data", str(tmp_path / "c"),
            "--student", f"a={tmp_path / 'a'}", "--output", str(tmp_path / "eval-0.json")]
    cfg = _cli_config(evaluate_cmd, EvalConfig, EVAL_OPTIONS, argv)
    return {"models": {"a": {"perplexity": 9.0}}, "windows": 3, "seq_len": 16, "teachers": ["c"],
            "config": dataclasses.asdict(cfg)}


def test_an_evaluation_made_by_the_old_argument_path_is_reused_without_scoring(tmp_path):
    out = tmp_path / "eval.json"
    report = _old_report(tmp_path)
    out.write_text(json.dumps(report))
    r = runner.Runner(reuse_only=True)
    assert r.evaluate(_eval_config(tmp_path, [f"a={tmp_path / 'a'}"])) == report
    assert r.reused == [str(out)]
    # the students' paths, the output and overwrite name one call; the report holds the label
    assert r.evaluate(_eval_config(tmp_path, [f"a={tmp_path / 'elsewhere'}"], overwrite=True)) == report
    with pytest.raises(SystemExit, match=r"teacher_data: \['.*/c'\] there, \['.*/d'\] here"):
        r.evaluate(_eval_config(tmp_path, ["a=/m"], caches=("d",)))
    with pytest.raises(SystemExit, match="top_k: 64 there, 8 here"):
        r.evaluate(_eval_config(tmp_path, ["a=/m"], top_k=8))
    with pytest.raises(SystemExit, match="lacks b"):
        r.evaluate(_eval_config(tmp_path, ["a=/m", "b=/n"]))
    del report["config"]["weight_floor"]  # a report older than a field: its default
    out.write_text(json.dumps(report))
    assert r.evaluate(_eval_config(tmp_path, ["a=/m"])) == report
    del report["config"]
    out.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="no config in eval.json"):
        r.evaluate(_eval_config(tmp_path, ["a=/m"]))


def test_missing_models_are_scored_by_evaluate_with_a_config_file_and_merged(tmp_path, monkeypatch):
    from student.evaluation.command import EVAL_OPTIONS, evaluate_cmd
    from student.evaluation.config import EvalConfig
    from student.evaluation.report import REPORT_CONFIG

    out = tmp_path / "eval.json"
    out.write_text(json.dumps(_old_report(tmp_path)))
    (tmp_path / "eval-0.json").write_text("{}")  # an earlier part
    calls = []

    def cli(self, args, log, threads=None):
        calls.append((args, log))
        cfg = _cli_config(evaluate_cmd, EvalConfig, EVAL_OPTIONS, args[1:], member=REPORT_CONFIG)
        Path(cfg.output).write_text(json.dumps({"models": {"b": {"perplexity": 8.0}}, "windows": 3, "seq_len": 16,
                                                "teachers": ["c"], "config": dataclasses.asdict(cfg)}))

    monkeypatch.setattr(runner.Runner, "cli", cli)
    wanted = _eval_config(tmp_path, [f"a={tmp_path / 'a'}", "b=/n"])
    res = runner.Runner().evaluate(wanted)
    part = tmp_path / "eval-1.json"
    assert calls == [(["evaluate", "--config", str(tmp_path / "eval-1.config.json")], tmp_path / "eval-1.log")]
    # the --config file replays the requested config for the missing student, into the next part
    assert json.loads(part.read_text())["config"] == runner.tree(
        dataclasses.replace(wanted, students=["b=/n"], output=str(part)))
    assert set(res["models"]) == {"a", "b"} and json.loads(out.read_text()) == res
    assert runner.Runner(reuse_only=True).evaluate(wanted) == res


def _cut(tmp_path: Path, keep_layers: str = "20", **kw):
    from student.config import InitStudentConfig

    out = tmp_path / "student-init"
    cfg = InitStudentConfig(teacher=str(tmp_path / "teacher"), keep_layers=keep_layers, output=str(out),
                            dataset=str(tmp_path / "train.jsonl"), calibration_tokens=4096, seq_len=256,
                            overwrite=True, **kw)
    return runner.init_student(cfg, tmp_path / "student-init.log")


def test_a_cut_made_before_init_student_recorded_its_config_is_adopted_by_the_fields_its_card_names(tmp_path):
    run = _cut(tmp_path)
    run.output.mkdir()
    card = {"teacher": str(tmp_path / "teacher"), "gguf_file": None, "revision": None, "keep_layers": "20",
            "teacher_blocks": 30, "kept_blocks": list(range(20)),
            "calibration": {"dataset": str(tmp_path / "train.jsonl"), "tokens": 4096, "seq_len": 256}}
    (run.output / "init_student.json").write_text(json.dumps(card))
    r = runner.Runner(reuse_only=True)
    assert r.ensure(run) == run.output and r.reused == [str(run.output)]
    with pytest.raises(SystemExit, match="keep_layers: '20' there, '12' here"):
        r.ensure(_cut(tmp_path, "12"))
    with pytest.raises(SystemExit, match="seq_len: 256 there, 128 here"):
        r.ensure(dataclasses.replace(run, config=dataclasses.replace(run.config, seq_len=128)))


def test_a_cut_is_run_with_a_config_file_and_compared_by_the_config_its_card_records(tmp_path, monkeypatch):
    from student.commands import INIT_STUDENT_OPTIONS, init_student_cmd
    from student.config import InitStudentConfig
    from student.pruning import CARD_CONFIG

    calls = []

    def cli(self, args, log, threads=None):
        calls.append((args, log, threads))
        cfg = _cli_config(init_student_cmd, InitStudentConfig, INIT_STUDENT_OPTIONS, args[1:], member=CARD_CONFIG)
        Path(cfg.output).mkdir(exist_ok=True)
        (Path(cfg.output) / "init_student.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))

    monkeypatch.setattr(runner.Runner, "cli", cli)
    run = _cut(tmp_path)
    r = runner.Runner(jobs=2)
    assert r.ensure(run) == run.output and r.reused == []
    assert calls == [(["init-student", "--config", str(tmp_path / "student-init.config.json")], run.log,
                      r.threads * 2)]  # a cut runs alone, on every core
    assert r.ensure(dataclasses.replace(run, config=dataclasses.replace(run.config, overwrite=False))) == run.output
    with pytest.raises(SystemExit, match="calibration_tokens: 4096 there, 8192 here"):
        r.ensure(dataclasses.replace(run, config=dataclasses.replace(run.config, calibration_tokens=8192)))
    runner.Runner(redo=True).ensure(_cut(tmp_path, "12"))
    assert (tmp_path / "student-init.replaced-0" / "init_student.json").exists() and len(calls) == 2
