"""The one runner of the benchmarks' experiments: a run is the config the CLI replays, executed by the CLI.

A `Run` is a command (`precompute`, `train-student`, `init-student` or `evaluate`) and its config dataclass
(`PrecomputeConfig`, `TrainConfig`, `InitStudentConfig`, `EvalConfig`), exactly what
`python cli.py COMMAND --config FILE` replays. `Runner.ensure(run)`:

- reuses a finished output (a cache's `manifest.json`, a run's `final/`, a cut's `init_student.json`) only when
  the config it stored (`config-slice-00000-of-00001.json`, `RUN/config.json`, the `config` member of
  `init_student.json`, all written by the CLI itself) equals the requested one, field by field, defaults filled
  in for fields the stored file predates (the adoption of outputs made before this runner: their recorded CLI
  config is compared the same way; a cut made before init-student recorded its config is compared by the
  fields its card records). `same_paths` maps path prefixes the user declares equal (a work directory copied or
  moved elsewhere). A different finished output is refused with the differing fields, or set aside (renamed,
  never overwritten in place) and computed again with `redo`; `reuse_only` refuses to compute anything;
- otherwise writes the config beside the log (`LOG.config.json`, atomically) and runs
  `python cli.py COMMAND --config LOG.config.json` at the repository root, its output in the log; an
  interrupted train-student run continues from its last checkpoint (`resume`).

`Runner.evaluate(config)` is the report `config.output` of the `config.students` (`LABEL=PATH`): reused when the
config it records (the report's `config`) equals the requested one field by field (the students, output and
overwrite, which name one call's models and file, left out) and it holds every label; otherwise only the
missing models are scored, by one more `evaluate --config` run (OUT stem + -N), and merged into the report. The
paired bootstrap over held-out windows is benchmarks/scores.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import shared

ROOT = shared.ROOT
IGNORED = {"precompute": ("progress",), "train-student": ("resume",), "init-student": ("overwrite",),
           "evaluate": ("students", "output", "overwrite")}
"""Fields that say how a run is shown or started, or (evaluate) which models and file one call has, not what it
computes: not compared on reuse."""
ALONE = ("init-student",)
"""Commands run one at a time (a cut comes before the runs that start from it): given every core."""


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
        """The file the CLI writes its config into (what a finished output is compared by): the report itself
        for evaluate."""
        if self.command == "precompute":
            from teachers.commands import config_file_name

            return self.output / config_file_name(0, 1)
        if self.command == "init-student":
            from student.pruning import CARD

            return self.output / CARD
        if self.command == "evaluate":
            return self.output
        from storage.artifacts import RUN_CONFIG

        return self.output / RUN_CONFIG

    @property
    def result(self) -> Path:
        """What a finished run gives: the cache, the run's final model, the cut student or the report."""
        from storage.artifacts import RUN_FINAL

        return self.output / RUN_FINAL if self.command == "train-student" else self.output

    def done(self) -> bool:
        """A cache with its merged manifest, a run with its final model, a cut with its card, a report."""
        from storage.artifacts import RUN_CONFIG

        if self.command == "precompute":
            return (self.output / "manifest.json").exists()
        return (self.result / RUN_CONFIG if self.command == "train-student" else self.stored).exists()

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


def init_student(config: Any, log: Path) -> Run:
    """An `init-student` run (`InitStudentConfig`): the cut student in `config.output`."""
    return Run("init-student", config, log)


def evaluate(config: Any, log: Path) -> Run:
    """An `evaluate` run (`EvalConfig`): the report `config.output` (`Runner.evaluate` merges reports)."""
    return Run("evaluate", config, log)


def record(run: Run) -> None:
    """Write the config file the CLI writes into an output, for a run computed in this process (precompute or
    train-student: init-student and evaluate keep their config inside the card or report they write)."""
    from storage import fs as sfs

    if member(run.command) is not None:
        raise ValueError(f"{run.command} records its config inside {run.stored.name}: run it through the CLI")
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


def config_differences(run: Run, stored: dict[str, Any], same_paths: dict[str, str], *,
                       partial: bool = False) -> list[tuple]:
    """How the config a finished output stored differs from the run's (fields of `IGNORED` left out); a
    `partial` one (an old card's fields) is compared on the fields it has."""
    want = tree(run.config)
    have = {**want, **moved(stored, same_paths)} if partial else moved(filled(type(run.config), stored), same_paths)
    for name in IGNORED[run.command]:
        have.pop(name, None)
        want.pop(name, None)
    return differences(have, want)


def member(command: str) -> str | None:
    """The member holding the config in what `command` writes (init-student's card, evaluate's report); None
    for a command that writes its config as a file of its own."""
    if command == "init-student":
        from student.pruning import CARD_CONFIG

        return CARD_CONFIG
    if command == "evaluate":
        from student.evaluation.report import REPORT_CONFIG

        return REPORT_CONFIG
    return None


CARD_FIELDS = ("teacher", "gguf_file", "revision", "keep_layers")
"""InitStudentConfig fields an `init_student.json` written before its `config` member names at its top level."""


def cli_command(args: list[str]) -> list[str]:
    """The command line of `python cli.py ARGS` (run at the repository root), for a caller that launches it
    itself (to measure it, say)."""
    return [sys.executable, "cli.py", *args]


def stored_config(run: Run) -> tuple[dict[str, Any] | None, bool]:
    """(the config a finished output recorded, whether it is partial); (None, False) when it recorded none.

    The file `run.stored`, or its `config` member (init-student's card, evaluate's report). A card written before
    init-student recorded its config gives the fields it names (CARD_FIELDS, and its calibration's dataset and
    seq_len: no dataset without one), compared alone: the others were not recorded."""
    if not run.stored.exists():
        return None, False
    data = read_json(run.stored)
    key = member(run.command)
    if key is None:
        return data, False
    if isinstance(data.get(key), dict):
        return data[key], False
    if run.command != "init-student" or "kept_blocks" not in data:
        return None, False
    calibration = data.get("calibration")
    fields = {k: data.get(k) for k in CARD_FIELDS}
    fields["dataset"] = calibration["dataset"] if calibration else None
    if calibration:
        fields["seq_len"] = calibration["seq_len"]
    return fields, True


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


def publish(run: Run, text: str, path: Path, *, write_results: bool, results: Path, begin: str, end: str,
            header: str | None = None) -> None:
    """The end of a benchmark's `main`: print its markdown `text`, write it to `path` (atomically) and, with
    `write_results` (its --write-results), put it between the `begin` and `end` markers of `results`
    (`shared.replace_block`, under `header` when the markers are missing)."""
    print("\n" + text, flush=True)
    write_atomic(path, text + "\n")
    if write_results:
        shared.replace_block(results, begin, end, text, header=header)
        run.say(f"updated {results}")


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

    def cli(self, args: list[str], log: Path, threads: int | None = None) -> None:
        """`python cli.py ARGS` at the repository root with `threads` torch threads, output in `log`."""
        cmd = [sys.executable, "cli.py", *args]
        print("$ " + " ".join(cmd) + f"  > {log}", flush=True)
        n = str(threads or self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
        t0 = time.perf_counter()
        shared.run_logged(cmd, log, env)
        self.say(f"done in {time.perf_counter() - t0:.0f} s: {log.stem}")

    def check_reuse(self, run: Run) -> bool:
        """True when the finished output can be reused; set aside with `redo`, else refused, when it differs
        (or stored no config: made in process before the runner recorded one)."""
        text = self.difference(run)
        if text is None:
            return True
        if not self.redo:
            raise SystemExit(f"error: {run.output} was computed with another config ({text}): remove it, use "
                             "another work directory, or --redo to set it aside and compute it again")
        self.set_aside(run.output, text)
        return False

    def difference(self, run: Run) -> str | None:
        """How the config a finished output stored differs from the run's, in words (None: equal)."""
        stored, partial = stored_config(run)
        if stored is None:
            key = member(run.command)
            return f"it has no {f'{key} in ' if key else ''}{run.stored.name} to compare with"
        diff = config_differences(run, stored, self.same_paths, partial=partial)
        return "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diff) if diff else None

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
        if execute is None:
            self.launch(dataclasses.replace(run, config=config))
        else:
            write_atomic(run.request, json.dumps(tree(config), indent=2) + "\n")
            execute(run)
        return run.result

    def launch(self, run: Run) -> None:
        """Write the run's config atomically as its `--config` file and run `cli.py COMMAND --config FILE`."""
        write_atomic(run.request, json.dumps(tree(run.config), indent=2) + "\n")
        threads = self.threads * self.jobs if run.command in ALONE else None
        self.cli([run.command, "--config", str(run.request)], run.log, threads)

    def ensure_all(self, runs: Sequence[Run]) -> list[Path]:
        return parallel(self.jobs, [lambda r=r: self.ensure(r) for r in runs])

    def evaluate(self, config: Any) -> dict:
        """The `evaluate` report `config.output` of the `config.students` (LABEL=PATH): reused when the config it
        records equals `config` (IGNORED fields left out) and it holds every label; else the missing students
        are scored by one more run (OUT stem + -N, `evaluate --config`) and merged into the report (a new file
        renamed over it)."""
        from student.evaluation.sources import split_label

        out = Path(config.output)
        res = read_json(out) if out.exists() else None
        if res is not None:
            text = self.difference(evaluate(config, out.with_suffix(".log")))
            if text is not None:
                raise SystemExit(f"error: {out} was evaluated with another config ({text}): remove it or use "
                                 "another work directory")
        missing = [s for s in config.students if res is None or split_label(s)[0] not in res["models"]]
        if not missing:
            self.say(f"evaluation {out} holds every model, reused")
            self.reused.append(str(out))
            return res
        if self.reuse_only:
            labels = ", ".join(split_label(s)[0] for s in missing)
            raise SystemExit(f"error: {out} lacks {labels}, and reuse only was asked for")
        n = 0
        while out.with_name(f"{out.stem}-{n}.json").exists():
            n += 1
        part = out.with_name(f"{out.stem}-{n}.json")
        self.launch(evaluate(dataclasses.replace(config, students=missing, output=str(part)), part.with_suffix(".log")))
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
