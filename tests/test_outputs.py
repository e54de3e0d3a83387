"""Nothing overwritten that the user did not name (issue 25, defects 1-5, and the output rule).

Every command that writes refuses, with one `error:` line and exit code 2 and before any model loads, an
output that holds another kind of artifact (cache, shard, run directory, model or teacher directory,
evaluation report, figure, corpus file) or that is one of its own inputs; an existing output of its own
kind only with the flag that says what to do (`--resume`, `--overwrite`; precompute resumes its own cache).
A run directory is locked while train-student runs. Each refused cell leaves the bytes of the existing path
unchanged (a hash of the whole tree before and after).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    make_tiny_teacher,
    one_error_line,
    run_cli,
    sample_texts,
    train_tiny_tokenizer,
    write_jsonl_corpus,
)
from tests.student.synthetic import make_cache

VOCAB = 300
PRECOMPUTE_ARGS = ("--seq-len", "16", "--top-k", "4", "--batch-size", "4", "--shard-size", "8", "--max-tokens",
                   "128", "--head-chunk-size", "64", "--device", "cpu", "--compile-head", "off", "--no-progress")
TRAIN_ARGS = ("--max-steps", "2", "--batch-size", "4", "--eval-sequences", "4", "--eval-every", "0",
              "--log-every", "1", "--save-every", "1", "--num-workers", "0", "--device", "cpu")


def tree_hash(path: Path) -> str:
    """sha256 over every file under `path` (names and bytes), or of the file itself; 'absent' if missing."""
    path = Path(path)
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0" + f.read_bytes() + b"\n")
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One existing artifact of every kind, made by the commands themselves on tiny models (~10 s)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("outputs")
    texts = sample_texts(60, seed=5)
    tok = train_tiny_tokenizer(root / "tok", texts, vocab_size=VOCAB)
    w = {
        "root": root,
        "teacher": make_tiny_teacher(root / "teacher", VOCAB, seed=1, tokenizer_dir=tok, hidden_size=32),
        "teacher_b": make_tiny_teacher(root / "teacher_b", VOCAB, seed=2, tokenizer_dir=tok, hidden_size=32),
        "model": make_tiny_teacher(root / "model", VOCAB, seed=3, hidden_size=32),  # config + weights only
        "corpus": write_jsonl_corpus(root / "corpus.jsonl", texts),
        "corpus_b": write_jsonl_corpus(root / "corpus_b.jsonl", sample_texts(5, seed=9)),  # no command's input
        "synthetic": make_cache(root / "synthetic", name="s", seed=1, k=8, n=24),
    }
    w["cache"] = root / "cache"
    r = run_cli("precompute", "--teacher", w["teacher"], "--dataset", w["corpus"], "--output", w["cache"],
                *PRECOMPUTE_ARGS)
    assert r.exit_code == 0, r.output
    w["shard"] = w["cache"] / "shard-000000.parquet"
    w["run"] = root / "run"
    r = run_cli("train-student", "--teacher-data", w["synthetic"], "--output", w["run"], *TRAIN_ARGS)
    assert r.exit_code == 0, r.output
    w["report"] = root / "report.json"
    r = run_cli("evaluate", *_EVAL_ARGS(w), "--output", w["report"])
    assert r.exit_code == 0, r.output
    w["figure"] = root / "curves.png"
    r = run_cli("plot", w["run"], "--output", w["figure"])
    assert r.exit_code == 0, r.output
    return w


def _EVAL_ARGS(w: dict) -> tuple:  # noqa: N802 (a table of arguments, read like a constant)
    return ("--student", w["teacher"], "--dataset", w["corpus"], "--seq-len", "16", "--max-tokens", "64",
            "--bleu-prompts", "0", "--bootstrap", "0", "--device", "cpu")


def refused(result, path: Path, before: str, *needles: str) -> str:
    """One `error:` line, exit code 2, and the bytes under `path` unchanged."""
    line = one_error_line(result, *needles)
    assert tree_hash(path) == before, f"{path} changed"
    return line


# ---- defects 1-5 -------------------------------------------------------------------------------
def test_init_student_into_its_own_teacher_is_refused(world):
    """Defect 1: `init-student --from T --output T` replaced the teacher's weights and config, exit 0."""
    before = tree_hash(world["teacher"])
    refused(run_cli("init-student", "--from", world["teacher"], "--keep-layers", "0-1", "--output", world["teacher"]),
            world["teacher"], before, "--output", "input")


def test_init_student_into_a_run_directory_is_refused(world):
    """Defect 1: into another non-empty run directory it replaced that run's config.json."""
    before = tree_hash(world["run"])
    refused(run_cli("init-student", "--from", world["teacher"], "--keep-layers", "0-0", "--output", world["run"]),
            world["run"], before, "train-student run")


def test_evaluate_onto_a_cache_shard_is_refused(world):
    """Defect 2: `evaluate --output C/shard-000000.parquet` wrote the JSON report over the shard, exit 0."""
    before = tree_hash(world["cache"])
    refused(run_cli("evaluate", *_EVAL_ARGS(world), "--output", world["shard"]), world["cache"], before, "cache")


def _hold_run_lock(run: Path) -> subprocess.Popen:
    """Another live process holding `run`'s lock (as a running train-student does); it prints 'held'."""
    code = ("import sys; from storage import fs; from storage.lock import CacheLock; f, root = "
            "fs.resolve(sys.argv[1]); CacheLock(f, root, 'lock-run.json').acquire(); print('held', "
            "flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_train_student_on_the_same_output_is_refused(world, tmp_path):
    """Defect 3: two train-student processes with the same --output both ran. The second is refused with one
    line naming the holder's pid, host and start time; a dead holder's lock is taken over with a warning."""
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold_run_lock(run)
    try:
        lock = json.loads((run / "lock-run.json").read_text())
        before = tree_hash(run)
        line = refused(run_cli("train-student", "--teacher-data", world["synthetic"], "--output", run, *TRAIN_ARGS),
                       run, before, "locked", f"pid {holder.pid}", socket.gethostname(), lock["started"])
        assert "lock-run.json" in line
    finally:
        holder.stdin.close()
        holder.wait()
    # the holder died without releasing (it was killed): the lock names a dead process of this host
    (run / "lock-run.json").write_text(json.dumps({**lock, "pid": holder.pid}))
    with pytest.warns(UserWarning, match="stale lock"):
        r = run_cli("train-student", "--teacher-data", world["synthetic"], "--output", run, *TRAIN_ARGS)
    assert r.exit_code == 0, r.output
    assert (run / "final" / "model.safetensors").is_file() and not (run / "lock-run.json").exists()


def test_run_without_checkpoints_is_not_overwritten(world, tmp_path):
    """Defect 4: a run directory whose checkpoints/ were removed had its final/ overwritten by a new run
    without --resume; it is refused, and --resume does not retrain over its final/ either."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "checkpoints")
    before = tree_hash(run)
    refused(run_cli("train-student", "--teacher-data", world["synthetic"], "--output", run, *TRAIN_ARGS),
            run, before, "--resume")
    refused(run_cli("train-student", "--teacher-data", world["synthetic"], "--output", run, *TRAIN_ARGS, "--resume"),
            run, before, "no checkpoint", "final")


def test_train_student_into_its_own_teacher_data_is_refused(world):
    """Defect 5: `train-student --output` that is its own --teacher-data cache was accepted."""
    before = tree_hash(world["synthetic"])
    refused(run_cli("train-student", "--teacher-data", world["synthetic"], "--output", world["synthetic"],
                    *TRAIN_ARGS), world["synthetic"], before, "--teacher-data")


def test_precompute_into_a_run_or_its_teacher_is_refused(world):
    """Defect 5: `precompute --output` that is a run directory, or the teacher's model directory, was accepted."""
    for out, needle in ((world["run"], "train-student run"), (world["teacher"], "--teacher")):
        before = tree_hash(out)
        refused(run_cli("precompute", "--teacher", world["teacher"], "--dataset", world["corpus"], "--output", out,
                        *PRECOMPUTE_ARGS), out, before, needle)


# ---- the matrix: every command that writes x every kind of existing path as its output -------------------
KINDS = ("cache", "shard", "run", "model", "teacher", "corpus", "report", "figure", "input")
"""Existing paths given as the output: a cache directory, a shard file, a run directory, a model directory
(config and weights), a teacher directory (model and tokenizer), a corpus file, an evaluation report, a figure,
and the command's own input."""


def _command(name: str, w: dict, out: Path) -> list:
    """A valid invocation of command `name` writing `out`."""
    return {
        "precompute": ["precompute", "--teacher", w["teacher"], "--dataset", w["corpus"], "--output", out,
                       *PRECOMPUTE_ARGS],
        "train-student": ["train-student", "--teacher-data", w["synthetic"], "--output", out, *TRAIN_ARGS],
        "init-student": ["init-student", "--from", w["teacher"], "--keep-layers", "0-0", "--output", out],
        "evaluate": ["evaluate", *_EVAL_ARGS(w), "--output", out],
        "plot": ["plot", w["run"], "--output", out],
        "merge": ["merge", out],
    }[name]


OWN_INPUT = {"precompute": "teacher", "train-student": "synthetic", "init-student": "teacher",
             "evaluate": "corpus", "plot": "run", "merge": "cache"}
"""The input each command above reads that is given as its output in the 'input' column."""
ACCEPTED = {("precompute", "cache"), ("merge", "cache"), ("merge", "input")}
"""Cells the rule accepts without a flag: precompute resumes its own cache with the same settings, merge
writes its cache's manifest. Every other cell is refused (the own-kind ones need --resume or --overwrite,
checked in test_own_kind_is_replaced_only_with_its_flag)."""
COMMANDS = ("precompute", "train-student", "init-student", "evaluate", "plot", "merge")


def _matrix_path(w: dict, command: str, kind: str) -> Path:
    if kind == "input":
        return w[OWN_INPUT[command]]
    return {"teacher": w["teacher_b"], "corpus": w["corpus_b"]}.get(kind, w.get(kind))


def test_every_writing_command_is_in_the_matrix():
    """A command added to cli.py that takes --output (or writes into its argument) must join COMMANDS."""
    from cli import main

    writers = {name for name, cmd in main.commands.items() if any("--output" in p.opts for p in cmd.params)}
    assert writers | {"merge"} == set(COMMANDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_output_matrix(world, tmp_path, command, kind):
    """Each cell: refused with one line, exit code 2 and the existing path's bytes unchanged, before any model
    loads (no progress bar, no weights read); or, where ACCEPTED says so, a clean run on a copy of the path."""
    w = dict(world)
    path = _matrix_path(w, command, kind)
    if (command, kind) in ACCEPTED:
        copy = tmp_path / path.name
        shutil.copytree(path, copy)
        w.update({OWN_INPUT[command]: copy} if kind == "input" else {kind: copy})
        r = run_cli(*_command(command, w, copy))
        assert r.exit_code == 0, r.output
        return
    before = tree_hash(path)
    line = refused(run_cli(*_command(command, w, path)), path, before)
    print(f"{command} x {kind}: {line}")  # the messages, for -s


def test_own_kind_is_replaced_only_with_its_flag(world, tmp_path):
    """The own-kind cells of the matrix with the flag that says what to do: a run continues with --resume; a
    model, a report and a figure are replaced with --overwrite. --overwrite never lets a command write over its
    own input or another kind."""
    copies = {k: tmp_path / k for k in ("run", "model", "report", "figure")}
    for k, p in copies.items():
        (shutil.copytree if world[k].is_dir() else shutil.copy)(world[k], p)
    w = {**world, "run": copies["run"]}
    r = run_cli(*_command("train-student", w, copies["run"]), "--resume")  # a finished run: nothing to do
    assert r.exit_code == 0, r.output
    for name, kind in (("init-student", "model"), ("evaluate", "report"), ("plot", "figure")):
        r = run_cli(*_command(name, world, copies[kind]), "--overwrite")
        assert r.exit_code == 0, (name, r.output)
    assert json.loads(copies["report"].read_text())["windows"] > 0
    assert (copies["model"] / "init_student.json").is_file()
    before = tree_hash(world["teacher"])
    refused(run_cli(*_command("init-student", world, world["teacher"]), "--overwrite"), world["teacher"], before,
            "--from")
    before = tree_hash(world["cache"])
    refused(run_cli(*_command("evaluate", world, world["shard"]), "--overwrite"), world["cache"], before, "shard")


def test_outputs_inside_other_artifacts(world, tmp_path):
    """A new path inside a cache or a model directory, or a name a run directory owns, is refused; a new file
    beside a run's own files (a report, plot's default curves.png) is not."""
    cache_before, model_before = tree_hash(world["cache"]), tree_hash(world["model"])
    refused(run_cli(*_command("evaluate", world, world["cache"] / "eval.json")), world["cache"], cache_before,
            "teacher cache")
    refused(run_cli(*_command("init-student", world, world["model"] / "sub" / "cut")), world["model"], model_before,
            "model directory")
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = tree_hash(run)
    refused(run_cli(*_command("evaluate", world, run / "metrics.jsonl")), run, before, "owns")
    refused(run_cli(*_command("init-student", world, run / "final")), run, before, "owns")
    r = run_cli(*_command("evaluate", world, run / "eval.json"))
    assert r.exit_code == 0, r.output
    r = run_cli("plot", run)
    assert r.exit_code == 0 and (run / "curves.png").is_file(), r.output
    one_error_line(run_cli("plot", run), "--overwrite")  # the default figure is not replaced unasked either
