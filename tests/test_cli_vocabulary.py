"""One flag vocabulary across the click commands: --output, --device (auto/cpu/cuda/cuda:N), --dataset,
--verify/--no-verify; old spellings stay as hidden aliases."""

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
    for name in ("precompute", "evaluate"):
        assert _option(main.commands[name], "--dataset") is not None, name
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
