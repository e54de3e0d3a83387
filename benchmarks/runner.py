"""The one runner of the benchmarks' experiments: a run is the config the CLI replays, executed by the CLI.

A `Run` is a command (`precompute` or `train-student`) and its config dataclass (`PrecomputeConfig`,
`TrainConfig`), exactly what `python cli.py COMMAND --config FILE` replays. `Runner.ensure(run)`:

- reuses a finished output (a cache's `manifest.json`, a run's `final/`) only when the config it stored
  (`config-slice-00000-of-00001.json`, `RUN/config.json`, both written by the CLI itself) equals the requested
  one, field by field, defaults filled in for fields the stored file predates (the adoption of outputs made
  before this runner: their recorded CLI config is compared the same way). `same_paths` maps path prefixes
  the user declares equal (a work directory copied or moved elsewhere). A different finished output is refused
  with the differing fields, or set aside (renamed, never overwritten in place) and computed again with
  `redo`; `reuse_only` refuses to compute anything;
- otherwise writes the config beside the log (`LOG.config.json`, atomically) and runs
  `python cli.py COMMAND --config LOG.config.json` at the repository root, its output in the log; an
  interrupted train-student run continues from its last checkpoint (`resume`).

`evaluate` and `init-student` have no `--config` replay yet: their arguments are built in one place each
(`evaluate_args`, `init_student_args`) from a dict of option values; `Runner.evaluate` reuses a report when
the config it records (the report's `config`) has the requested values and it holds the models, and scores
only the missing models otherwise (merged into the report). The paired bootstrap over held-out windows is
benchmarks/scores.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import shared

ROOT = shared.ROOT
IGNORED = {"precompute": ("progress",), "train-student": ("resume",)}
"""Fields that say how a run is shown or started, not what it computes: not compared on reuse."""


# --------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Run:
    """One CLI run: `command` with `config` (the command's config dataclass), its output in `log`."""

    command: str
    config: Any
    log: Path

    @property
    def output(self) -> Path:
        storage = getattr(self.config, "storage", None)
        return Path(storage.output if storage is not None else self.config.output)

    @property
    def stored(self) -> Path:
        """The config file the CLI writes into the output (what a finished output is compared by)."""
        if self.command == "precompute":
            from teachers.commands import config_file_name

            return self.output / config_file_name(0, 1)
        return self.output / "config.json"

    @property
    def result(self) -> Path:
        """What a finished run gives: the cache, or the run's final model."""
        return self.output if self.command == "precompute" else self.output / "final"

    def done(self) -> bool:
        marker = "manifest.json" if self.command == "precompute" else "final/config.json"
        return (self.output / marker).exists()

    @property
    def request(self) -> Path:
        """The `--config` file the runner writes for the CLI."""
        return self.log.with_suffix(".config.json")


def precompute(config: Any, log: Path) -> Run:
    """A `precompute` run of one slice (the benchmarks never slice): `num_slices` 1, `slice_index` 0."""
    if (config.num_slices, config.slice_index) != (1, 0):
        raise ValueError("a benchmark precompute is one slice: num_slices=1, slice_index=0")
    return Run("precompute", config, log)


def train(config: Any, log: Path) -> Run:
    return Run("train-student", config, log)


def record(run: Run) -> None:
    """Write the config file the CLI writes into an output, for a run computed in this process."""
    from storage import fs as sfs

    fs, path = sfs.resolve(str(run.stored))
    sfs.atomic_write_json(fs, path, dataclasses.asdict(run.config))


def tree(config: Any) -> dict[str, Any]:
    """A config as the CLI writes it (`dataclasses.asdict` through JSON: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def filled(cls: type, stored: dict[str, Any]) -> dict[str, Any]:
    """`stored` with the dataclass defaults of the fields it lacks (a file written before they existed)."""
    hints = typing.get_type_hints(cls)
    out = dict(stored)
    for f in dataclasses.fields(cls):
        inner = hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
        if f.name in out:
            if inner is not None and isinstance(out[f.name], dict):
                out[f.name] = filled(inner, out[f.name])
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(out))


def moved(value: Any, same_paths: dict[str, str]) -> Any:
    """`value` with each path prefix of `same_paths` (old -> new) replaced, in every string it holds."""
    if isinstance(value, dict):
        return {k: moved(v, same_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [moved(v, same_paths) for v in value]
    if isinstance(value, str):
        for old, new in same_paths.items():
            if value == old or value.startswith(old.rstrip("/") + "/"):
                return new.rstrip("/") + value[len(old.rstrip("/")):]
    return value


def differences(stored: Any, wanted: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """(field, stored, wanted) for every leaf that differs between two JSON trees."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(set(stored) | set(wanted), key=str):
            missing = "(absent)"
            out += differences(stored.get(k, missing), wanted.get(k, missing), f"{where}{k}" + ".")
        return out
    return [] if stored == wanted else [(where.rstrip("."), stored, wanted)]


def config_differences(run: Run, stored: dict[str, Any], same_paths: dict[str, str]) -> list[tuple]:
    """How the config a finished output stored differs from the run's (fields of `IGNORED` left out)."""
    have = moved(filled(type(run.config), stored), same_paths)
    want = tree(run.config)
    for name in IGNORED[run.command]:
        have.pop(name, None)
        want.pop(name, None)
    return differences(have, want)


# ---- evaluate and init-student: no `--config` replay yet. Their arguments are built here only, from a dict of
# ---- option values; when their --config lands, write the config and pass `--config FILE` as for the others.
def cli_options(options: dict[str, Any]) -> list[str]:
    """`{"teacher_data": [a, b], "bootstrap": 0, "overwrite": True}` -> `--teacher-data a --teacher-data b
    --bootstrap 0 --overwrite` (a list repeats its option, True is a flag, False and None leave it out)."""
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is True:
                out.append(flag)
            elif v is not None and v is not False:
                out += [flag, str(v)]
    return out


def cli_command(args: list[str]) -> list[str]:
    """The command line of `python cli.py ARGS` (run at the repository root), for a caller that launches it
    itself (to measure it, say)."""
    return [sys.executable, "cli.py", *args]


def evaluate_args(options: dict[str, Any]) -> list[str]:
    """`cli.py evaluate` arguments (`student` a list of LABEL=PATH, `teacher_data` of caches, ...)."""
    return ["evaluate", *cli_options(options)]


def init_student_args(options: dict[str, Any]) -> list[str]:
    """`cli.py init-student` arguments (`from`, `keep_layers`, `output`, ...)."""
    return ["init-student", *cli_options(options)]


PER_CALL = ("student", "output", "overwrite")
"""Evaluate options that name one call's models and report, not the held-out windows or the scoring."""
REPORT_FIELDS = {"dataset": "data", "teacher": "teachers", "gguf_file": "gguf_files"}
"""Evaluate options whose field in the report's `config` has another name (the rest: the option's name)."""


def parallel(jobs: int, calls: Sequence[Callable[[], object]]) -> list:
    """Run zero-argument callables, `jobs` at a time, keeping their order in the results."""
    if jobs <= 1:
        return [c() for c in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: c(), calls))


def write_atomic(path: Path, text: str) -> None:
    """A new file renamed over `path` (never a write into an existing file, which may be a hard link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- the runner
def add_options(ap: Any) -> None:
    """The runner's options of a benchmark script (argparse): --jobs, --redo, --reuse-only, --same-path."""
    ap.add_argument("--jobs", type=int, default=1, help="commands run at once (each gets cores / jobs threads)")
    ap.add_argument("--redo", action="store_true",
                    help="set aside (rename) a finished output whose stored config differs, and compute it again")
    ap.add_argument("--reuse-only", action="store_true",
                    help="compute nothing: stop at the first output that is missing or differs")
    ap.add_argument("--same-path", action="append", default=[], metavar="OLD=NEW",
                    help="paths under OLD in stored configs are the ones under NEW (outputs copied or moved)")


def from_args(args: Any, tag: str) -> Runner:
    pairs = [p.split("=", 1) for p in args.same_path]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("error: --same-path takes OLD=NEW")
    return Runner(tag=tag, jobs=args.jobs, redo=args.redo, reuse_only=args.reuse_only,
                  same_paths={str(Path(a).resolve()): str(Path(b).resolve()) for a, b in pairs})


@dataclass
class Runner:
    """Executes runs through the CLI, `jobs` at a time with cores / jobs torch threads each."""

    tag: str = "[runner]"
    jobs: int = 1
    redo: bool = False
    """Set aside a finished output whose stored config differs, and compute it again (else refuse)."""
    reuse_only: bool = False
    """Compute nothing: a missing or different output is an error."""
    same_paths: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    @property
    def threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def say(self, text: str) -> None:
        print(f"{self.tag} {text}", flush=True)

    def cli(self, args: list[str], log: Path | None, threads: int | None = None) -> None:
        """`python cli.py ARGS` at the repository root with `threads` torch threads, output in `log`."""
        cmd = [sys.executable, "cli.py", *args]
        print("$ " + " ".join(cmd) + (f"  > {log}" if log else ""), flush=True)
        n = str(threads or self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
        t0 = time.perf_counter()
        if log is None:
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        else:
            shared.run_logged(cmd, log, env)
        self.say(f"done in {time.perf_counter() - t0:.0f} s: {log.stem if log else args[0]}")

    def check_reuse(self, run: Run) -> bool:
        """True when the finished output can be reused; set aside with `redo`, else refused, when it differs
        (or stored no config: made in process before the runner recorded one)."""
        if run.stored.exists():
            diff = config_differences(run, read_json(run.stored), self.same_paths)
            if not diff:
                return True
            text = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diff)
        else:
            text = f"it has no {run.stored.name} to compare with"
        if not self.redo:
            raise SystemExit(f"error: {run.output} was computed with another config ({text}): remove it, use "
                             "another work directory, or --redo to set it aside and compute it again")
        self.set_aside(run.output, text)
        return False

    def set_aside(self, path: Path, why: str) -> None:
        n = 0
        while path.with_name(f"{path.name}.replaced-{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.replaced-{n}"))
        self.say(f"{path} set aside as {path.name}.replaced-{n} ({why})")

    def ensure(self, run: Run, execute: Callable[[Run], None] | None = None) -> Path:
        """The run's result: reused when finished with an equal config, else computed (by `execute(run)` when
        given, which must write what the CLI writes, else by the CLI with the config as `--config`)."""
        if run.done() and self.check_reuse(run):
            self.say(f"{run.output} exists with the same config, reused")
            self.reused.append(str(run.output))
            return run.result
        if self.reuse_only:
            raise SystemExit(f"error: {run.output} would be computed, and reuse only was asked for")
        config = run.config
        if run.command == "train-student" and run.output.exists():  # interrupted: continue it
            config = dataclasses.replace(config, resume=True)
        write_atomic(run.request, json.dumps(tree(config), indent=2) + "\n")
        if execute is None:
            self.cli([run.command, "--config", str(run.request)], run.log)
        else:
            execute(run)
        return run.result

    def ensure_all(self, runs: Sequence[Run]) -> list[Path]:
        return parallel(self.jobs, [lambda r=r: self.ensure(r) for r in runs])

    def init_student(self, options: dict[str, Any], marker: str = "init_student.json") -> Path:
        """`init-student` into `options["output"]` unless its `marker` is there (a cut made before)."""
        out = Path(options["output"])
        if (out / marker).exists():
            return out
        if self.reuse_only:
            raise SystemExit(f"error: {out} would be computed, and reuse only was asked for")
        self.cli(init_student_args(options), None, self.threads * self.jobs)
        return out

    def evaluate(self, options: dict[str, Any], models: dict[str, Path], out: Path) -> dict:
        """The `evaluate` report `out` of `models` with `options`: reused when its recorded config has the
        options and it holds every model; else the missing models are scored by one more call (OUT stem + -N)
        and merged into `out` (a new file renamed over it)."""
        res = read_json(out) if out.exists() else None
        if res is not None:
            self.check_report(res, options, out)
        missing = {k: v for k, v in models.items() if res is None or k not in res["models"]}
        if not missing:
            self.say(f"evaluation {out} holds every model, reused")
            self.reused.append(str(out))
            return res
        if self.reuse_only:
            raise SystemExit(f"error: {out} lacks {', '.join(missing)}, and reuse only was asked for")
        part = out.with_name(f"{out.stem}-{len(list(out.parent.glob(out.stem + '-*.json')))}.json")
        call = {**options, "student": [f"{k}={v}" for k, v in missing.items()], "output": str(part)}
        self.cli(evaluate_args(call), part.with_suffix(".log"))
        new = read_json(part)
        if res is None:
            res = new
        else:
            if (new["windows"], new["seq_len"], new["teachers"]) != (res["windows"], res["seq_len"],
                                                                       res["teachers"]):
                raise SystemExit(f"error: {part} was evaluated on other windows or teachers than {out}")
            self.reused.append(f"{out} ({len(res['models'])} models)")
            res["models"].update(new["models"])
            res.setdefault("cache_teachers", new.get("cache_teachers", {}))
        write_atomic(out, json.dumps(res))
        return res

    def check_report(self, res: dict, options: dict[str, Any], out: Path) -> None:
        """Refuse a report whose recorded config differs from `options` (per-call options left out)."""
        have = moved(res.get("config", {}), self.same_paths)
        want = {REPORT_FIELDS.get(k, k): v for k, v in options.items() if k not in PER_CALL}
        want = json.loads(json.dumps(want, default=str))
        diff = differences({k: have.get(k, "(absent)") for k in want}, want)
        if diff:
            text = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diff)
            raise SystemExit(f"error: {out} was evaluated with other options ({text}): remove it or use "
                             "another work directory")
