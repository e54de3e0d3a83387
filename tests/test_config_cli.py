"""Options generated from the config dataclasses, and `--config FILE` replaying a run of train-student and
precompute bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
from click.core import UNSET

from cli import main
from common.config_cli import MISSING, check_table, field_default, leaf_paths
from student.commands import TRAIN_INTERNAL, TRAIN_OPTIONS
from student.config import TrainConfig
from teachers.commands import PRECOMPUTE_INTERNAL, PRECOMPUTE_OPTIONS
from teachers.config import PrecomputeConfig
from tests.helpers import one_error_line, run_cli

COMMANDS = [("train-student", TrainConfig, TRAIN_OPTIONS, TRAIN_INTERNAL),
            ("precompute", PrecomputeConfig, PRECOMPUTE_OPTIONS, PRECOMPUTE_INTERNAL)]


@pytest.mark.parametrize(("command", "root", "table", "internal"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_config_field_is_settable_or_internal(command, root, table, internal):
    assert check_table(root, table, internal) == []
    assert len(leaf_paths(root)) == len(table) + len(internal)
    params = {p.name: p for p in main.commands[command].params}
    for opt in table:  # the option's default is the dataclass field's (one source)
        default = field_default(root, opt.field)
        got = params[opt.name].default
        if default is MISSING or default is None or default is False or default == {}:
            assert got in (None, (), False) or got is UNSET, (opt.field, got)  # click's own "no default"
        elif opt.multiple or isinstance(default, list):
            assert tuple(got) == tuple(default), opt.field
        else:
            assert got == default, (opt.field, got, default)
        assert params[opt.name].help, opt.flag


def test_fields_that_had_no_option_are_set(tmp_path, monkeypatch):
    """betas, min_lr_ratio and entropy_eps reach the TrainConfig; bad values are one line."""
    import student.trainer

    seen = {}

    def stub(cfg):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(student.trainer, "run_train", stub)
    base = ["train-student", "--teacher-data", "a", "--output", tmp_path / "o"]
    r = run_cli(*base, "--betas", "0.8,0.99", "--min-lr-ratio", "0.25", "--entropy-eps", "0.02")
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert cfg.optim.betas == (0.8, 0.99) and cfg.optim.min_lr_ratio == 0.25 and cfg.loss.entropy_eps == 0.02
    assert cfg.teacher_data == ["a"] and cfg.optim.lr == TrainConfig.__dataclass_fields__["optim"].default_factory().lr
    one_error_line(run_cli(*base, "--betas", "0.9"), "--betas must be two values")
    one_error_line(run_cli(*base, "--betas", "0.9,1"), "--betas must be two values")
    one_error_line(run_cli(*base, "--min-lr-ratio", "2"), "--min-lr-ratio")
    one_error_line(run_cli(*base, "--entropy-eps", "1e300"), "--entropy-eps")
    one_error_line(run_cli(*base, "--entropy-eps", "0"), "--entropy-eps")


def test_config_file_errors_are_one_line(tmp_path):
    one_error_line(run_cli("train-student", "--output", tmp_path / "o"), "Missing option '--teacher-data'")
    one_error_line(run_cli("train-student", "--config", tmp_path / "absent.json"), "--config", "cannot read")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_error_line(run_cli("train-student", "--config", bad), "not valid JSON")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"teacher_data": ["a"], "output": "o", "loss": {"lamda_kd": 0.3}}))
    one_error_line(run_cli("train-student", "--config", unknown), "unknown LossConfig field(s) lamda_kd")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"teacher_data": ["a"]}))
    one_error_line(run_cli("train-student", "--config", partial), "Missing option '--output'")
    one_error_line(run_cli("precompute", "--config", partial), "unknown PrecomputeConfig field(s) teacher_data")


def test_hidden_alias_maps_onto_the_field(tmp_path, monkeypatch):
    """An Opt's hidden alias sets the same field; both spellings at once are refused."""
    from common.config_cli import Opt, build_config, config_options

    @dataclasses.dataclass(kw_only=True)
    class Cfg:
        num_slices: int = 1
        """Slices."""

    table = (Opt(field="num_slices", flag="--num-slices", type=int, help="Slices.", hidden_aliases=("--num-shards",)),)
    got = {}

    @click.command()
    @config_options(Cfg, table, config_help="Replay.")
    @click.pass_context
    def cmd(ctx, **kw):
        got["cfg"] = build_config(Cfg, table, ctx, kw)

    from click.testing import CliRunner

    assert CliRunner().invoke(cmd, ["--num-shards", "3"]).exit_code == 0 and got["cfg"].num_slices == 3
    assert CliRunner().invoke(cmd, []).exit_code == 0 and got["cfg"].num_slices == 1
    both = CliRunner().invoke(cmd, ["--num-shards", "3", "--num-slices", "2"])
    assert both.exit_code == 2 and "give --num-slices once" in both.output
    assert "--num-shards" not in CliRunner().invoke(cmd, ["--help"]).output


def test_typed_backend_options_survive_the_written_config():
    """A union of option classes is a leaf: the written dict becomes the backend's options class again."""
    from common.config_cli import from_dict
    from teachers.backend_options import VllmOptions
    from teachers.config import tiny

    cfg = dataclasses.replace(tiny("t", "c.jsonl", "out"), teacher=dataclasses.replace(
        tiny("t", "c.jsonl", "out").teacher, backend="vllm", backend_options={"hidden_from": "hf",
                                                                             "tensor_parallel_size": 2}))
    assert isinstance(cfg.teacher.backend_options, VllmOptions)
    back = from_dict(PrecomputeConfig, json.loads(json.dumps(dataclasses.asdict(cfg))), where="test")
    assert back == cfg and isinstance(back.teacher.backend_options, VllmOptions)
    assert back.teacher.backend_options.hidden_from == "hf" and back.teacher.backend_options.tensor_parallel_size == 2


# ---- replay ------------------------------------------------------------------------------------------
def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_state(a: object, b: object, where: str = "") -> None:
    import torch

    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_train_student_config_replays_the_checkpoint(tmp_path):
    import torch

    from tests.student.synthetic import make_cache

    a = make_cache(tmp_path / "a", name="a", seed=1, k=8, n=24, pooled={-1: 16})
    b = make_cache(tmp_path / "b", name="b", seed=2, k=4, n=24, pooled={-1: 8})
    first = tmp_path / "first"
    r = run_cli("train-student", "--teacher-data", a, "--teacher-data", b, "--output", first, "--max-steps", 4,
                "--batch-size", 4, "--grad-accum", 2, "--eval-sequences", 4, "--eval-every", 2, "--save-every", 2,
                "--log-every", 1, "--num-workers", 0, "--gamma-feat", 0.1, "--feat-weights", "1,0.5", "--lr", 3e-3,
                "--betas", "0.8,0.9", "--min-lr-ratio", 0.2, "--entropy-eps", 0.01, "--warmup-steps", 1,
                "--seed", 7, "--split-seed", 3, "--lambda-kd", 0.7, "--device", "cpu")
    assert r.exit_code == 0, r.output
    written = json.loads((first / "config.json").read_text())
    assert written["optim"]["betas"] == [0.8, 0.9] and written["loss"]["entropy_eps"] == 0.01
    again = tmp_path / "again"
    r = run_cli("train-student", "--config", first / "config.json", "--output", again)
    assert r.exit_code == 0, r.output
    assert {**json.loads((again / "config.json").read_text()), "output": str(first)} == written
    ta, tb = _tensors(first / "final" / "model.safetensors"), _tensors(again / "final" / "model.safetensors")
    assert set(ta) == set(tb) and len(ta) > 0
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    sa = torch.load(first / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)
    sb = torch.load(again / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)
    sa["config"]["output"] = sb["config"]["output"]
    _assert_same_state(sa, sb)  # model, projections, optimizer moments, scheduler, RNG, data position
    timing = ("tokens_per_s", "eval_seconds", "eval_share")
    ma = [{k: v for k, v in json.loads(x).items() if k not in timing} for x in (first / "metrics.jsonl").open()]
    mb = [{k: v for k, v in json.loads(x).items() if k not in timing} for x in (again / "metrics.jsonl").open()]
    assert ma == mb and len(ma) == 4 + 3


def test_precompute_config_replays_the_shards(tmp_path):
    from storage.reader import TeacherDataset
    from tests.helpers import make_tiny_setup

    teacher, corpus = make_tiny_setup(tmp_path / "setup", n_docs=60, vocab=300)
    first = tmp_path / "first"
    r = run_cli("precompute", "--teacher", teacher, "--dataset", corpus, "--output", first, "--seq-len", 16,
                "--top-k", 4, "--batch-size", 4, "--shard-size", 8, "--max-tokens", 256, "--head-chunk-size", 64,
                "--device", "cpu", "--compile-head", "off", "--no-progress", "--pool-layers", "0,-1",
                "--logprob-bits", 8, "--temperature", 2.0, "--partition-bytes", 4096)
    assert r.exit_code == 0, r.output
    config = first / "config-slice-00000-of-00001.json"
    written = json.loads(config.read_text())
    assert written["num_slices"] == 1 and written["slice_index"] == 0 and written["teacher"]["pool_layers"] == [0, -1]
    again = tmp_path / "again"
    r = run_cli("precompute", "--config", config, "--output", again)
    assert r.exit_code == 0, r.output
    replayed = json.loads((again / config.name).read_text())
    assert replayed["storage"]["output"] == str(again)
    replayed["storage"]["output"] = written["storage"]["output"]
    assert replayed == written
    ma, mb = TeacherDataset.open(str(first)).manifest, TeacherDataset.open(str(again)).manifest
    assert len(ma.shards) >= 2
    assert [(s.file, s.sha256, s.bytes) for s in ma.shards] == [(s.file, s.sha256, s.bytes) for s in mb.shards]
