"""Fuzz every numeric option of every command with hostile values.

The numeric options are enumerated from the click commands themselves, so an option added later is fuzzed
without touching this file (and a command with numeric options that this file does not know fails
`test_every_command_with_numeric_options_is_fuzzed`). Each invocation must end in exit code 0 with finite
outputs, or exit code 2 with exactly one `error:` line: never a traceback, never a NaN artefact.

Two tiers:
- every (command, option, value): the command runs up to its `run_*` call, which is replaced by a stub that
  checks the config it receives holds only finite numbers (all validation, no work: fast);
- a seeded sample of well-typed values runs for real on tiny caches and models (train-student, evaluate,
  precompute, inspect), and their files are then checked for non-finite numbers. A huge --max-steps or
  --grad-accum is left out of this tier: it is a valid request for endless work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import main
from common.params import FiniteFloat, FloatList

HUGE_INT = str(10**30)
VALUES = ["nan", "inf", "-inf", "-1", "0", "1", "3", "0.5", "1e300", "-1e300", HUGE_INT, "", "abc", "1,2", "nan,1"]
"""Hostile values tried on every numeric option (wrong types included: '', 'abc', '0.5' for an integer)."""

# command -> (module.attribute of its run function, stubbed in tier one)
RUN_FUNCTIONS = {
    "train-student": ("student.trainer", "run_train"),
    "evaluate": ("student.evaluation.command", "run_evaluate"),
    "precompute": ("teachers.precompute", "run_precompute"),
    "inspect": ("storage.describe", "describe"),
    "init-student": ("student.pruning", "run_init_student"),
}


def numeric_options(cmd: click.Command) -> list[click.Option]:
    """The options of `cmd` whose values are numbers or lists of numbers."""
    numeric = (click.types._NumberParamTypeBase, FiniteFloat, FloatList)
    return [p for p in cmd.params if isinstance(p, click.Option) and isinstance(p.type, numeric)]


def test_every_float_option_rejects_non_finite_values():
    """click's own FLOAT accepts 'nan' and 'inf': every float option must use FINITE_FLOAT or FLOAT_LIST."""
    plain = [f"{name} {p.opts[0]}" for name, cmd in main.commands.items() for p in cmd.params
             if isinstance(p.type, (click.types.FloatParamType, click.types.FloatRange))]
    assert not plain, plain


def test_every_command_with_numeric_options_is_fuzzed():
    missing = [name for name, cmd in main.commands.items() if numeric_options(cmd) and name not in RUN_FUNCTIONS]
    assert not missing, f"add {missing} to RUN_FUNCTIONS and _base_args"


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Two tiny synthetic caches (stage two), a tiny teacher with its tokenizer and a corpus (stage one,
    evaluate)."""
    import torch

    from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer, write_jsonl_corpus
    from tests.student.synthetic import make_cache

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz")
    texts = sample_texts(60, seed=5)
    tok = train_tiny_tokenizer(root / "tok", texts, vocab_size=300)
    teacher = make_tiny_teacher(root / "teacher", 300, seed=1, tokenizer_dir=tok, hidden_size=32, num_layers=1)
    return {
        "root": root,
        "a": str(make_cache(root / "a", name="a", seed=1, k=8, n=24, pooled={-1: 16})),
        "b": str(make_cache(root / "b", name="b", seed=2, k=4, n=24, pooled={-1: 8})),
        "teacher": str(teacher),
        "corpus": str(write_jsonl_corpus(root / "corpus.jsonl", texts)),
    }


def _base_args(command: str, env: dict, out: Path, option: str) -> list[str]:
    """A small valid invocation of `command` (writing under `out`), with what `option` needs to matter."""
    if command == "train-student":
        extra = ["--teacher-weighting", "fixed"] if option == "--teacher-weights" else []
        extra += ["--loss", "dkd"] if option.startswith("--dkd") else []
        return ["--teacher-data", env["a"], "--teacher-data", env["b"], "--output", str(out / "run"),
                "--max-steps", "3", "--batch-size", "4", "--eval-sequences", "4", "--eval-every", "2",
                "--log-every", "1", "--save-every", "1", "--num-workers", "0", "--gamma-feat", "0.1", *extra]
    if command == "evaluate":
        extra = ["--teacher-weighting", "fixed"] if option == "--teacher-weights" else []
        return ["--student", env["teacher"], "--teacher", f"t1={env['teacher']}", "--teacher",
                f"t2={env['teacher']}", "--data", env["corpus"], "--seq-len", "16", "--max-tokens", "64",
                "--bleu-prompts", "1", "--prompt-tokens", "4", "--new-tokens", "4", "--output",
                str(out / "eval.json"), *extra]
    if command == "precompute":
        return ["--teacher", env["teacher"], "--dataset", env["corpus"], "--output", str(out / "cache"),
                "--seq-len", "16", "--top-k", "4", "--batch-size", "4", "--shard-size", "8", "--max-tokens", "128",
                "--head-chunk-size", "64", "--device", "cpu", "--compile-head", "off", "--no-progress"]
    if command == "inspect":
        return [env["a"]]
    if command == "init-student":
        return ["--from", env["teacher"], "--keep-layers", "1", "--dataset", env["corpus"], "--output",
                str(out / "cut"), "--calibration-tokens", "64", "--seq-len", "16"]
    raise AssertionError(command)


def _cases() -> list[tuple[str, str, str]]:
    return [(name, p.opts[0], v) for name, cmd in sorted(main.commands.items()) for p in numeric_options(cmd)
            for v in VALUES]



def _assert_one_error_line(result) -> None:
    assert "Traceback" not in result.output, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.output


def _non_finite(obj: object) -> bool:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_non_finite(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, dict):
        return any(_non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_non_finite(v) for v in obj)
    return False


class _Accepted(Exception):
    def __init__(self, cfg: object) -> None:
        super().__init__("accepted")
        self.cfg = cfg


# ---- tier one: every option and value, validation only -----------------------------------------
def test_validation_of_every_numeric_option(env, tmp_path, monkeypatch):
    import importlib

    def stub(cfg, *args, **kwargs):
        raise _Accepted(cfg)

    for module, attr in RUN_FUNCTIONS.values():
        monkeypatch.setattr(importlib.import_module(module), attr, stub)
    outcomes = {"accepted": 0, "refused": 0}
    for command, option, value in _cases():
        r = CliRunner().invoke(main, [command, *_base_args(command, env, tmp_path, option), option, value])
        where = f"{command} {option} {value!r}"
        if isinstance(r.exception, _Accepted):
            assert not _non_finite(r.exception.cfg), f"{where}: a non-finite number reached {r.exception.cfg}"
            outcomes["accepted"] += 1
        else:
            assert r.exit_code == 2, f"{where}: exit {r.exit_code}: {r.output} {r.exception!r}"
            _assert_one_error_line(r)
            outcomes["refused"] += 1
    print(outcomes)
    assert outcomes["accepted"] and outcomes["refused"]


# ---- tier two: a seeded sample run for real ----------------------------------------------------
def _strict_json(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-finite {token} in JSON output")

    return json.loads(text, parse_constant=refuse)


def _check_artefacts(command: str, out: Path) -> None:
    """Every number the command wrote under `out` is finite."""
    import numpy as np
    import torch

    for path in out.rglob("*.json*"):
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            if line.strip():
                assert not _non_finite(_strict_json(line)), path
    for path in out.rglob("state.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
    for path in out.rglob("model.safetensors"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(v).all() for v in load_file(str(path)).values()), path
    if command == "precompute" and list((out / "cache").glob("manifest*.json")):
        from storage.reader import TeacherDataset

        ds = TeacherDataset.open(str(out / "cache"))
        cols = ds.read_columns(list(range(len(ds))), ["topk_logprobs", "entropy"])
        assert all(bool(np.isfinite(c).all()) for c in cols.values())
        ds.close()


REAL_VALUES = {"int": ["-1", "0", "1", "3", HUGE_INT], "float": ["0", "0.5", "3", "1e300", "-1e300", "1e-300"],
               "list": ["1,2", "0,1", "1e300,1", "0,0", "3"]}
"""Values of the right type tried in real runs (tier one shows the others are refused while parsing)."""
ENDLESS = {("train-student", "--max-steps"), ("train-student", "--grad-accum")}
"""Options whose huge values are valid requests for endless work: no huge value in real runs."""


def _kind(command: str, option: str) -> str:
    param = next(p for p in main.commands[command].params if option in p.opts)
    return "list" if isinstance(param.type, FloatList) else "float" if isinstance(param.type, FiniteFloat) else "int"


def _sample(seed: int, per_command: dict[str, int]) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    picked = []
    for command, n in per_command.items():
        mine = [(command, p.opts[0], v) for p in numeric_options(main.commands[command])
                for v in REAL_VALUES[_kind(command, p.opts[0])]
                if not (v == HUGE_INT and (command, p.opts[0]) in ENDLESS)]
        picked += rng.sample(mine, min(n, len(mine)))
    return picked


@pytest.mark.parametrize("case", _sample(0, {"train-student": 16, "evaluate": 8, "precompute": 5, "inspect": 3}),
                         ids=lambda c: f"{c[0]} {c[1]} {c[2]!r}")
def test_real_runs_are_finite_or_refused(env, tmp_path, case):
    command, option, value = case
    r = CliRunner().invoke(main, [command, *_base_args(command, env, tmp_path, option), option, value])
    if r.exit_code == 0:
        _check_artefacts(command, tmp_path)
    else:
        assert r.exit_code == 2, f"exit {r.exit_code}: {r.output} {r.exception!r}"
        _assert_one_error_line(r)
        _check_artefacts(command, tmp_path)
