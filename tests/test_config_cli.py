"""Options generated from the config dataclasses, and `--config FILE` replaying a run of train-student,
precompute, evaluate and init-student bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import click
import pytest
from click.core import UNSET

from cli import main
from common.config_cli import MISSING, check_table, field_default, leaf_paths
from storage.commands import INSPECT_OPTIONS, MERGE_OPTIONS
from storage.config import InspectConfig, MergeConfig
from student.commands import (
    INIT_STUDENT_INTERNAL,
    INIT_STUDENT_OPTIONS,
    PLOT_OPTIONS,
    TRAIN_INTERNAL,
    TRAIN_OPTIONS,
)
from student.config import InitStudentConfig, PlotConfig, TrainConfig
from student.evaluation.command import EVAL_INTERNAL, EVAL_OPTIONS
from student.evaluation.config import EvalConfig
from teachers.commands import PRECOMPUTE_INTERNAL, PRECOMPUTE_OPTIONS
from teachers.config import PrecomputeConfig
from tests.helpers import one_error_line, run_cli

COMMANDS = [("train-student", TrainConfig, TRAIN_OPTIONS, TRAIN_INTERNAL),
            ("precompute", PrecomputeConfig, PRECOMPUTE_OPTIONS, PRECOMPUTE_INTERNAL),
            ("evaluate", EvalConfig, EVAL_OPTIONS, EVAL_INTERNAL),
            ("init-student", InitStudentConfig, INIT_STUDENT_OPTIONS, INIT_STUDENT_INTERNAL)]


@pytest.mark.parametrize(("command", "root", "table", "internal"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_config_field_is_settable_or_internal(command, root, table, internal):
    assert check_table(root, table, internal) == []
    assert len(leaf_paths(root)) == len(table) + len(internal)
    params = {p.name: p for p in main.commands[command].params}
    for opt in table:  # the option's default is the dataclass field's (one source)
        default = field_default(root, opt.field)
        got = params[opt.name].default
        if default is MISSING or default is None or default is False or default in ({}, []):
            assert got in (None, (), False) or got is UNSET, (opt.field, got)  # click's own "no default"
        elif opt.multiple or isinstance(default, list):
            assert tuple(got) == tuple(default), opt.field
        else:
            assert got == default, (opt.field, got, default)
        assert params[opt.name].help, opt.flag


# commands that write no config to replay: options (and arguments) from their configs too, no --config
PLAIN = [("inspect", InspectConfig, INSPECT_OPTIONS), ("merge", MergeConfig, MERGE_OPTIONS),
         ("plot", PlotConfig, PLOT_OPTIONS)]


@pytest.mark.parametrize(("command", "root", "table"), PLAIN, ids=[c[0] for c in PLAIN])
def test_commands_without_replay_take_every_field_from_their_config(command, root, table):
    assert check_table(root, table) == [] and len(leaf_paths(root)) == len(table)
    params = {p.name: p for p in main.commands[command].params}
    assert "config_file" not in params
    for opt in table:
        default, param = field_default(root, opt.field), params[opt.name]
        if opt.argument:
            assert isinstance(param, click.Argument) and param.required and default is MISSING, opt.field
        else:
            assert param.default == (None if default is MISSING else default), (opt.field, param.default)
            assert param.help == opt.help, opt.field


def test_every_option_of_every_command_comes_from_a_table():
    """One mechanism: each click parameter is a table row, one of its hidden aliases, or --config."""
    tables = {name: table for name, _, table, _ in COMMANDS} | {name: table for name, _, table in PLAIN}
    assert sorted(tables) == sorted(main.commands)
    for name, cmd in main.commands.items():
        names = {o.name for o in tables[name]} | {o.alias_name(i) for o in tables[name]
                                                   for i in range(len(o.hidden_aliases))}
        extra = {p.name for p in cmd.params} - names - {"config_file"}
        assert not extra, (name, extra)


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


def _models(root: Path) -> tuple[Path, Path, Path]:
    """A tiny 3-block model (student / teacher to cut), a second model sharing its tokenizer, and a corpus."""
    from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer, write_jsonl_corpus

    texts = sample_texts(60, seed=4)
    tok = train_tiny_tokenizer(root / "tok", texts, vocab_size=300)
    a = make_tiny_teacher(root / "a", 300, seed=1, tokenizer_dir=tok, hidden_size=32, num_layers=3)
    b = make_tiny_teacher(root / "b", 300, seed=2, tokenizer_dir=tok, hidden_size=32, num_layers=1)
    return a, b, write_jsonl_corpus(root / "held.jsonl", texts)


def test_evaluate_config_replays_the_report(tmp_path):
    """The report keeps the config under `config`; `evaluate --config REPORT --output OTHER` gives the same
    report (all but its timing and output path); a file of EvalConfig fields replays the same way."""
    student, teacher, held = _models(tmp_path)
    first = tmp_path / "first.json"
    r = run_cli("evaluate", "--student", f"s={student}", "--teacher", f"t={teacher}", "--dataset", held,
                "--seq-len", 16, "--max-tokens", 256, "--batch-size", 3, "--top-k", 8, "--bleu-prompts", 2,
                "--prompt-tokens", 4, "--new-tokens", 4, "--teacher-weighting", "uniform", "--device", "cpu",
                "--output", first)
    assert r.exit_code == 0, r.output
    written = json.loads(first.read_text())
    assert written["config"]["top_k"] == 8 and written["config"]["teacher_weighting"] == "uniform"
    again = tmp_path / "again.json"
    r2 = run_cli("evaluate", "--config", first, "--output", again)
    assert r2.exit_code == 0, r2.output
    replayed = json.loads(again.read_text())
    assert replayed["config"] == {**written["config"], "output": str(again)}
    for report in (written, replayed):
        report.pop("seconds"), report.pop("config")
    assert replayed == written and written["models"]["s"]["kl"]["t"] > 0
    table = [[line for line in x.stdout.splitlines() if line.startswith("|")] for x in (r, r2)]
    assert table[0] == table[1] and len(table[0]) >= 3  # the same table
    fields = tmp_path / "fields.json"
    fields.write_text(json.dumps({**json.loads(first.read_text())["config"], "output": None}))
    r3 = run_cli("evaluate", "--config", fields, "--top-k", 300)
    assert r3.exit_code == 0, r3.output
    assert json.loads(first.read_text()) != json.loads(again.read_text())  # nothing rewritten in place
    assert "| s (student) |" in r3.stdout and "results written" not in r3.stdout  # output None: no report


def test_init_student_config_replays_the_cut(tmp_path):
    """init_student.json keeps the config under `config`; `init-student --config DIR/init_student.json --output
    OTHER` cuts the same blocks with the same scores and weights."""
    import torch

    teacher, _, corpus = _models(tmp_path)
    first = tmp_path / "first"
    r = run_cli("init-student", "--from", teacher, "--keep-layers", 2, "--dataset", corpus,
                "--calibration-tokens", 64, "--seq-len", 16, "--batch-size", 2, "--output", first)
    assert r.exit_code == 0, r.output
    card = json.loads((first / "init_student.json").read_text())
    assert card["config"]["calibration_tokens"] == 64 and len(card["kept_blocks"]) == 2
    again = tmp_path / "again"
    r = run_cli("init-student", "--config", first / "init_student.json", "--output", again)
    assert r.exit_code == 0, r.output
    replayed = json.loads((again / "init_student.json").read_text())
    assert replayed["config"] == {**card["config"], "output": str(again)}
    assert {**replayed, "config": None} == {**card, "config": None}
    ta, tb = _tensors(first / "model.safetensors"), _tensors(again / "model.safetensors")
    assert set(ta) == set(tb) and len(ta) > 0
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_a_config_member_that_is_not_an_object_is_one_line(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"models": {}, "windows": 1, "seq_len": 8, "config": [1]}))
    one_error_line(run_cli("evaluate", "--config", report), f"--config {report}", "'config' member")
    card = tmp_path / "init_student.json"
    card.write_text(json.dumps({"config": {"teacher": "t", "output": "o", "keep_layers": 3.5}}))
    one_error_line(run_cli("init-student", "--config", card), "field keep_layers must be a string, got 3.5")
    one_error_line(run_cli("init-student", "--config", report, "--output", tmp_path / "o"), "'config' member")


# ---- --config typing (issue 25, defect 7) ------------------------------------------------------------
# The wrong values are generated from each field's annotation by this file's own model of JSON kinds (not by
# the checker under test), so a field added later is fuzzed without touching this file.
_POOL: list[object] = [True, False, 0, 3, -2, 1.5, "abc", "false", "", None, [], [1], ["a"], {}, {"a": 1}]
_ALL_KINDS = {"bool", "int", "float", "str", "null", "list", "object"}
RUN_FUNCTIONS = {"train-student": ("student.trainer", "run_train"),
                 "precompute": ("teachers.precompute", "run_precompute"),
                 "evaluate": ("student.evaluation.command", "run_evaluate"),
                 "init-student": ("student.pruning", "run_init_student")}
CONFIGS = {"train-student": TrainConfig, "precompute": PrecomputeConfig, "evaluate": EvalConfig,
           "init-student": InitStudentConfig}


def _kind(value: object) -> str:
    for kind, types_ in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list),
                         ("object", dict)):
        if isinstance(value, types_):
            return kind
    assert value is None, value
    return "null"


def _alternatives(tp: object) -> tuple:
    import types
    import typing

    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _kinds(tp: object) -> set[str]:
    """The JSON kinds a value of annotation `tp` may have."""
    import typing

    out: set[str] = set()
    for alt in _alternatives(tp):
        origin = typing.get_origin(alt) or alt
        if alt is type(None):
            out.add("null")
        elif alt is object or alt is typing.Any:
            out |= _ALL_KINDS
        elif alt is float:
            out |= {"int", "float"}
        elif origin in (list, tuple):
            out.add("list")
        elif origin is dict or dataclasses.is_dataclass(alt):
            out.add("object")
        else:
            out.add({bool: "bool", int: "int", str: "str"}[alt])
    return out


def wrong_values(tp: object) -> list[object]:
    """JSON values that do not fit annotation `tp`: every pool value of another kind, plus for list fields a
    list with one element of a wrong kind, and for fixed-length tuples a list of the wrong length."""
    import typing

    kinds = _kinds(tp)
    out = [v for v in _POOL if _kind(v) not in kinds]
    for alt in _alternatives(tp):
        if (typing.get_origin(alt) or alt) not in (list, tuple) or not typing.get_args(alt):
            continue
        args = typing.get_args(alt)
        element = next(v for v in _POOL if _kind(v) not in _kinds(args[0]))
        fixed = len(args) if (typing.get_origin(alt) or alt) is tuple and args[-1] is not Ellipsis else None
        if fixed is None:
            out.append([element])
        else:
            good = next(v for v in _POOL if _kind(v) in _kinds(args[0]))
            out += [[good] * (fixed - 1) + [element], [good] * (fixed + 1)]
    return out


def field_types(root: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted path, annotation) of every field below `root`, nested config objects included."""
    import typing

    out = []
    for f in dataclasses.fields(root):
        tp = typing.get_type_hints(root)[f.name]
        out.append((f"{prefix}{f.name}", tp))
        if dataclasses.is_dataclass(tp):
            out += field_types(tp, f"{prefix}{f.name}.")
    return out


def _valid_configs(tmp_path: Path) -> dict[str, dict]:
    """A valid written config of each command that replays, its output under `tmp_path/out-*`."""
    from student.config import tiny as train_tiny
    from teachers.config import tiny as precompute_tiny

    return {"train-student": dataclasses.asdict(train_tiny(["cache-a", "cache-b"], str(tmp_path / "out-run"))),
            "precompute": dataclasses.asdict(precompute_tiny("teacher", "corpus.jsonl", str(tmp_path / "out-cache"))),
            "evaluate": dataclasses.asdict(EvalConfig(students=["student"], teachers=["teacher"], data="held.jsonl",
                                                      output=str(tmp_path / "out-report.json"))),
            "init-student": dataclasses.asdict(InitStudentConfig(teacher="teacher", keep_layers="0-1",
                                                                 output=str(tmp_path / "out-model")))}


def _put(tree: dict, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


class _Accepted(Exception):
    def __init__(self, cfg: object) -> None:
        super().__init__("accepted")
        self.cfg = cfg


@pytest.fixture
def stubbed_runs(monkeypatch):
    """run_* replaced by a stub raising _Accepted(cfg): a config that passes validation does no work."""
    import importlib

    def stub(cfg, *args, **kwargs):
        raise _Accepted(cfg)

    for module, attr in RUN_FUNCTIONS.values():
        monkeypatch.setattr(importlib.import_module(module), attr, stub)


def test_every_command_with_config_replay_is_fuzzed():
    """Every command built from a config dataclass replays it with --config and joins the fuzz below."""
    replaying = sorted(n for n, c in main.commands.items() if any(p.name == "config_file" for p in c.params))
    assert replaying == sorted(RUN_FUNCTIONS) == sorted(CONFIGS) == sorted(c[0] for c in COMMANDS)


@pytest.mark.parametrize(("command", "root"), list(CONFIGS.items()), ids=list(CONFIGS))
def test_every_field_refuses_values_of_the_wrong_type(tmp_path, stubbed_runs, command, root):
    """Each field of the config, nested configs included, set to each JSON value its annotation does not
    allow: one `error:` line naming the file, the field and the expected type; exit 2; nothing written."""
    import copy

    base = _valid_configs(tmp_path)[command]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base))
    ok = run_cli(command, "--config", path)
    assert isinstance(ok.exception, _Accepted), ok.output  # the base config itself is valid
    cases = 0
    for field, tp in field_types(root):
        for value in wrong_values(tp):
            tree = copy.deepcopy(base)
            _put(tree, field, value)
            path.write_text(json.dumps(tree))
            r = run_cli(command, "--config", path)
            where = f"{command} {field}={json.dumps(value)}"
            assert not isinstance(r.exception, _Accepted), f"{where}: accepted as {r.exception.cfg}"
            assert r.exit_code == 2, f"{where}: exit {r.exit_code}: {r.output} {r.exception!r}"
            line = one_error_line(r)
            assert str(path) in line and f"field {field}" in line and "must be" in line, (where, line)
            assert not any(p.name.startswith("out-") for p in tmp_path.iterdir()), where
            cases += 1
    assert cases > 5 * len(field_types(root))
    print(command, cases, "cases")


@pytest.mark.parametrize(("command", "field", "value", "needle"), [
    ("precompute", "teacher.trust_remote_code", "false", "field teacher.trust_remote_code must be true or false"),
    ("precompute", "storage.output", 5, "field storage.output must be a string, got 5"),
    ("precompute", "teacher.pool_layers", "abc", "field teacher.pool_layers must be a list of integers"),
    ("precompute", "teacher.pool_layers", [1, 2.5], "field teacher.pool_layers[1] must be an integer, got 2.5"),
    ("train-student", "max_steps", 3.5, "field max_steps must be an integer, got 3.5"),
    ("train-student", "loss", "kd", "field loss must be an object (LossConfig), got \"kd\""),
    ("train-student", "loss", None, "field loss must be an object (LossConfig), got null"),
    ("train-student", "num_workers", 1.5, "field num_workers must be an integer"),
    ("train-student", "output", ["a"], "field output must be a string"),
    ("train-student", "student", 123, "field student must be a string"),
    ("train-student", "optim.betas", [0.9], "field optim.betas must be a list of 2 numbers"),
    ("train-student", "resume", 1, "field resume must be true or false, got 1"),
    ("evaluate", "students", "s", "field students must be a list of strings, got \"s\""),
    ("evaluate", "teacher_weights", [1, "x"], "field teacher_weights must be a list of numbers or null"),
    ("evaluate", "bootstrap", 2.0, "field bootstrap must be an integer, got 2.0"),
    ("init-student", "keep_layers", 3, "field keep_layers must be a string, got 3"),
    ("init-student", "trust_remote_code", "no", "field trust_remote_code must be true or false"),
])
def test_the_reported_cases(tmp_path, stubbed_runs, command, field, value, needle):
    tree = _valid_configs(tmp_path)[command]
    _put(tree, field, value)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tree))
    line = one_error_line(run_cli(command, "--config", path), f"--config {path}: ", needle)
    assert "Traceback" not in line and not any(p.name.startswith("out-") for p in tmp_path.iterdir())


def test_numbers_in_float_fields_and_lists_in_tuple_fields_replay_equal(tmp_path, stubbed_runs):
    """A JSON integer is a number: in a float field it becomes that float, so the replayed config equals
    the one whose fields it names; JSON lists become the tuples the fields declare."""
    tree = _valid_configs(tmp_path)["train-student"]
    tree["optim"]["lr"], tree["loss"]["lambda_kd"], tree["optim"]["betas"] = 1, 1, [0, 0.5]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tree))
    cfg = run_cli("train-student", "--config", path).exception.cfg
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0 and type(cfg.loss.lambda_kd) is float
    assert cfg.optim.betas == (0.0, 0.5) and all(type(b) is float for b in cfg.optim.betas)


def test_checker_rules_for_annotations_no_command_uses_yet():
    """Literal members (compared with their type), dict values and mixed fixed tuples."""
    from common.config_types import check_types
    from common.errors import ConfigError

    @dataclasses.dataclass(kw_only=True)
    class Cfg:
        mode: Literal["a", "b", 1] = "a"
        """A choice."""
        widths: dict[str, int] = dataclasses.field(default_factory=dict)
        """Per name."""
        pair: tuple[str, float] = ("x", 1.0)
        """Mixed."""

    assert check_types(Cfg, {"mode": 1, "widths": {"q": 2}, "pair": ["y", 2]}, where="f") == \
        {"mode": 1, "widths": {"q": 2}, "pair": ("y", 2.0)}
    for data, needle in (({"mode": True}, 'field mode must be one of "a", "b", 1, got true'),
                         ({"mode": "c"}, "field mode must be one of"),
                         ({"widths": {"q": 2.5}}, "field widths.q must be an integer, got 2.5"),
                         ({"pair": [1, 2]}, "field pair[0] must be a string, got 1"),
                         ({"pair": ["y"]}, "field pair must be a list [a string, a number], got [\"y\"]")):
        with pytest.raises(ConfigError) as err:
            check_types(Cfg, data, where="f")
        assert str(err.value).startswith("f: ") and needle in str(err.value), str(err.value)
