"""benchmarks/runner.py: a run is reused only when the config its output stored equals the requested one (defaults
filled in for fields an older file lacks, declared path moves applied); otherwise it is refused, or set aside and
computed again with `redo`; evaluate and init-student arguments come from one dict each."""

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
    with pytest.raises(SystemExit, match="loss.teacher_weighting: 'uniform' there, 'entropy' here"):
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


def test_evaluate_and_init_student_arguments_come_from_one_dict():
    args = runner.evaluate_args({"student": ["a=/x", "b=/y"], "teacher_data": [Path("/c")], "bootstrap": 0,
                                 "overwrite": True, "tokenizer": None, "observed_correction": False})
    assert args == ["evaluate", "--student", "a=/x", "--student", "b=/y", "--teacher-data", "/c",
                    "--bootstrap", "0", "--overwrite"]
    assert runner.init_student_args({"from": "/t", "keep_layers": "20"}) == [
        "init-student", "--from", "/t", "--keep-layers", "20"]


def test_an_evaluation_is_reused_only_with_the_same_options(tmp_path):
    out = tmp_path / "eval.json"
    report = {"models": {"a": {}}, "config": {"teacher_data": ["/c"], "bootstrap": 0, "data": None}}
    out.write_text(json.dumps(report))
    r = runner.Runner(reuse_only=True)
    assert r.evaluate({"teacher_data": ["/c"], "bootstrap": 0}, {"a": Path("/m")}, out) == report
    with pytest.raises(SystemExit, match="teacher_data: \\['/c'\\] there, \\['/d'\\] here"):
        r.evaluate({"teacher_data": ["/d"], "bootstrap": 0}, {"a": Path("/m")}, out)
    with pytest.raises(SystemExit, match="lacks b"):
        r.evaluate({"teacher_data": ["/c"]}, {"a": Path("/m"), "b": Path("/n")}, out)
