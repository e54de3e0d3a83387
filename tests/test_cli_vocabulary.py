"""One flag vocabulary across the click commands: --output, --device (auto/cpu/cuda/cuda:N), --dataset with
--dataset-config/--split, --teacher + --gguf-file, --teacher-weighting, --verify; old spellings stay as hidden
aliases. A flag shared by several commands has one type and default unless `DELIBERATE` says why not.

The traps of "Commands disagree" and where each is checked:
- --dataset/--dataset-config/--split vs --data: test_text_corpora_are_named_dataset;
- GGUF teachers as --teacher DIR --gguf-file F: test_gguf_models_are_a_directory_and_a_file (and
  tests/student/test_evaluation_sources.py for both spellings);
- --device: test_device_is_one_type_everywhere;
- --seq-len 2048 vs 256: test_seq_len_defaults_agree (evaluate derives it: test_evaluation_sources.py);
- plot --out: test_old_spellings_are_hidden_aliases; inspect/merge --verify: test_verify_is_one_flag_pair;
- --student without hub ids: test_students_take_hub_ids;
- the final student without a tokenizer: tests/student/test_train.py::test_final_student_gets_the_caches_tokenizer_by_default;
- any other shared flag whose default or type drifts: test_shared_flags_agree.
"""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from cli import main
from common.devices import DeviceParam


def _option(command: click.Command, flag: str) -> click.Option | None:
    for param in command.params:
        if isinstance(param, click.Option) and (flag in param.opts or flag in param.secondary_opts):
            return param
    return None


def _visible_flags(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) and not p.hidden
            for o in [*p.opts, *p.secondary_opts]}


def test_commands_that_write_a_file_take_output() -> None:
    for name in ("precompute", "train-student", "evaluate", "plot"):
        assert _option(main.commands[name], "--output") is not None, name


def test_device_is_one_type_everywhere() -> None:
    with_device = [name for name, cmd in main.commands.items() if _option(cmd, "--device") is not None]
    assert sorted(with_device) == ["evaluate", "precompute", "train-student"]
    for name in with_device:
        opt = _option(main.commands[name], "--device")
        assert isinstance(opt.type, DeviceParam) and opt.default == "auto", name
    ptype = DeviceParam()
    assert [ptype.convert(v, None, None) for v in ("auto", "cpu", "cuda", "cuda:3")] == ["auto", "cpu", "cuda", "cuda:3"]
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(click.BadParameter):
            ptype.convert(bad, None, None)


def test_text_corpora_are_named_dataset() -> None:
    for name in ("precompute", "evaluate", "init-student"):
        for flag in ("--dataset", "--dataset-config", "--split", "--text-field"):
            assert _option(main.commands[name], flag) is not None, (name, flag)
    for name, cmd in main.commands.items():
        assert not {"--data", "--out"} & _visible_flags(cmd), name


def test_verify_is_one_flag_pair() -> None:
    for name, default in (("inspect", True), ("merge", False)):
        opt = _option(main.commands[name], "--verify")
        assert opt.is_flag and opt.secondary_opts == ["--no-verify"] and opt.default is default, name
    train = _option(main.commands["train-student"], "--verify")
    assert list(train.type.choices) == ["full", "stamp", "off"] and train.default == "stamp"


def test_old_spellings_are_hidden_aliases(tmp_path) -> None:
    assert _option(main.commands["plot"], "--out").hidden
    assert _option(main.commands["evaluate"], "--data").hidden
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 1, "split": "train", "loss": 2.0, "kd": 1.0, "ce": 3.0, "feat": 0.0, "lr": 1e-3,
         "tokens_per_s": 100.0},
        {"step": 2, "split": "train", "loss": 1.5, "kd": 0.8, "ce": 2.5, "feat": 0.0, "lr": 1e-3,
         "tokens_per_s": 100.0},
        {"step": 2, "split": "eval", "eval_kl": 0.5, "eval_ce": 2.6, "eval_ppl": 13.5})) + "\n")
    runner = CliRunner()
    for flag, name in (("--output", "a.png"), ("--out", "b.png")):
        result = runner.invoke(main, ["plot", str(run), flag, str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).stat().st_size > 0
    both = runner.invoke(main, ["plot", str(run), "--output", "x.png", "--out", "y.png"])
    assert both.exit_code == 2 and "give --output once" in both.output


def test_slices_are_named_slices(monkeypatch) -> None:
    """"Shard" is a file, "slice" a node's part of a run: --num-slices/--slice-index, with the old
    --num-shards/--shard-index as hidden aliases that set the same fields."""
    import teachers.precompute
    from tests.helpers import one_error_line, run_cli

    cmd = main.commands["precompute"]
    assert not {"--num-shards", "--shard-index"} & _visible_flags(cmd)
    assert _option(cmd, "--num-shards").hidden and _option(cmd, "--shard-index").hidden
    seen = []

    def fake_run(cfg, **kw):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(teachers.precompute, "run_precompute", fake_run)
    base = ("precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o")
    for flags in (("--num-slices", 4, "--slice-index", 3), ("--num-shards", 4, "--shard-index", 3),
                  ("--num-slices", 4, "--shard-index", 3)):
        assert run_cli(*base, *flags).exit_code == 0
        assert (seen[-1].num_slices, seen[-1].slice_index) == (4, 3), flags
    one_error_line(run_cli(*base, "--num-slices", 2, "--num-shards", 2), "give --num-slices once")
    one_error_line(run_cli(*base, "--slice-index", 0, "--shard-index", 1), "give --slice-index once")


DELIBERATE = {
    "--batch-size": "sequences per teacher forward, training micro-batch, evaluation or calibration windows",
    "--dataset": "required where text is the only input; optional where caches or a layer list can replace it",
    "--dtype": "evaluate offers auto, float32 and bfloat16 (metrics from float32 logits); precompute float16 too",
    "--gguf-file": "evaluate takes several teachers, so LABEL=FILE, repeatable",
    "--output": "required where the file is the product; optional where the table printed is the result",
    "--seq-len": "evaluate derives it from the caches or the models; init-student's is a calibration window",
    "--split": "evaluate reads held-out text: validation",
    "--student": "evaluate compares several students; train-student builds one (a preset by default)",
    "--teacher": "evaluate scores several teachers",
    "--temperature": "train-student defaults to the caches' temperature",
    "--verify": "a flag pair where checking is all there is (inspect, merge), full/stamp/off where it is a cost",
}
"""Flags shared by several commands whose default, type or multiplicity differ on purpose, and why."""


def _signature(p: click.Option) -> tuple:
    kind = tuple(p.type.choices) if isinstance(p.type, click.Choice) else type(p.type).__name__
    return p.default, kind, p.multiple, p.is_flag


def test_shared_flags_agree() -> None:
    by_flag: dict[str, dict[str, tuple]] = {}
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                by_flag.setdefault(p.opts[0], {})[name] = _signature(p)
    differing = {f for f, sigs in by_flag.items() if len(set(sigs.values())) > 1}
    assert differing - set(DELIBERATE) == set(), {f: by_flag[f] for f in differing - set(DELIBERATE)}
    assert set(DELIBERATE) - differing == set(), "stale entries: these flags agree now"


def test_gguf_models_are_a_directory_and_a_file() -> None:
    for name, model_flag in (("precompute", "--teacher"), ("evaluate", "--teacher"), ("init-student", "--from")):
        cmd = main.commands[name]
        assert _option(cmd, model_flag) is not None and _option(cmd, "--gguf-file") is not None, name
    assert "DIR/FILE.gguf" in _option(main.commands["evaluate"], "--teacher").help  # the older form, documented


def test_seq_len_defaults_agree() -> None:
    from student.evaluation.config import DEFAULT_SEQ_LEN

    precompute = _option(main.commands["precompute"], "--seq-len")
    evaluate = _option(main.commands["evaluate"], "--seq-len")
    assert precompute.default == DEFAULT_SEQ_LEN == 2048
    assert evaluate.default is None and "2048" in evaluate.help and "caches' seq_len" in evaluate.help
    assert _option(main.commands["train-student"], "--seq-len") is None  # the caches carry it


def test_teacher_weighting_is_one_option() -> None:
    train, evaluate = main.commands["train-student"], main.commands["evaluate"]
    for flag in ("--teacher-weighting", "--teacher-weights"):
        a, b = _option(train, flag), _option(evaluate, flag)
        assert _signature(a) == _signature(b) and not b.hidden, flag
    assert _option(evaluate, "--weighting").hidden
    import dataclasses

    from student.config import LossConfig
    from student.evaluation import EvalConfig

    shared = {f.name for f in dataclasses.fields(EvalConfig)} & {f.name for f in dataclasses.fields(LossConfig)}
    assert {"teacher_weighting", "teacher_weights"} <= shared  # one name in both configs


def test_dtype_and_device_say_what_auto_means() -> None:
    for name in ("precompute", "evaluate"):
        opt = _option(main.commands[name], "--dtype")
        assert opt.default == "auto" and "bfloat16" in opt.help, name
    assert "bfloat16 on CUDA and float32 on CPU" in _option(main.commands["evaluate"], "--dtype").help


def test_students_take_hub_ids() -> None:
    from common.errors import ConfigError
    from student.evaluation.sources import ModelSpec, _check_exists
    from student.model import is_hub_id

    for name in ("train-student", "evaluate"):
        assert "hub id" in _option(main.commands[name], "--student").help, name
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M") and not is_hub_id("/models/s") and not is_hub_id("runs/a/b")
    _check_exists(ModelSpec("s", "HuggingFaceTB/SmolLM2-135M"))  # left to the hub loader, not refused
    with pytest.raises(ConfigError, match="does not exist"):
        _check_exists(ModelSpec("s", "/no/such/student"))
