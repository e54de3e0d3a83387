"""A student smaller than SmolLM2, distilled from SmolLM2 and Gemma on the whole bundled corpus: one long CPU run.

    python benchmarks/long_run.py --work /work/exp/long [--teachers-dir DIR] [--write-results]

Every stage of the product, end to end, each reused when its output exists with the same config (the runs go
through benchmarks/runner.py), so an interrupted invocation continues where it stopped:

1. teachers: SmolLM2-135M-Instruct and Gemma 3 270M (`scripts/build_teachers.py --gemma --eval-tokens 0` into
   WORK/teachers, unless --teachers-dir holds `smollm2/` and `gemma3/`); each caches the WHOLE training file
   (--train-tokens: a prefix) with `precompute`, top-32 log-probs, no pooled layer, windows of 256; Gemma
   through `--align-tokenizer` onto SmolLM2's tokens (as scripts/demo.sh does);
2. the student: `init-student` cuts 20 of SmolLM2's 30 blocks by Block Influence (--keep-layers);
3. tuning: lr and lambda (the KD weight) chosen on a tuning slice cut from the TRAINING windows (the trainer's
   held-out sequences, --tune-windows, drawn by its split seed; never the validation file): one short run per
   point of --grid (LR:LAMBDA pairs, --tune-steps steps each), the lowest CE on the slice wins;
4. training: the distilled student (--weighting, a scheme of student/weighting.py) and its CE-only twin (same
   cut, data, lr, schedule, steps and seed, lambda 0), --epochs over every cached window (--steps overrides),
   linear warmup and cosine decay to --min-lr-ratio of the peak. Each trains in chunks of --curve-every steps
   (`stop_after`, resumed from the chunk's checkpoint), and after each chunk both students are saved as models
   (from the checkpoint) and evaluated: the learning curve;
5. evaluation on every held-out window of 256 tokens of data/corpus/validation.jsonl, per domain (the `url`
   prefix; each domain's documents packed apart, paper_table.py's split): perplexity of both students, the
   untrained cut, SmolLM2 and Gemma (through its aligned cache of the same windows, over the positions where
   its log-prob of the next SmolLM2 token is exact); paired-bootstrap intervals over windows (resampled within
   domains, benchmarks/scores.py) of distilled - SmolLM2, distilled - CE-only and CE-only - SmolLM2; greedy
   continuations of the demo's prompts (the first 6,144 validation tokens, 3 prompts of 24 tokens);
6. the figure (held-out perplexity against training tokens) and the table, with each stage's wall time and
   the peak resident memory of its largest command (WORK/usage.jsonl, one line per command run, so a resumed
   invocation still reports the stages an earlier one finished). --write-results replaces the marked block of
   benchmarks/RESULTS.md.

The plan (tokens, steps, estimated hours at the rates of a quiet 2-core CPU) is printed before anything runs.
--train-tokens, --eval-tokens, --steps/--epochs, --tune-steps, --grid, --seq-len, --curve-every and
--keep-layers scale it down to a run of seconds on tiny models (tests/test_long_run.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the packages first: benchmarks/storage.py is not storage/

import paper_table as pt  # noqa: E402

from benchmarks import runner, scores  # noqa: E402

RESULTS = ROOT / "benchmarks/RESULTS.md"
BEGIN, END = "<!-- long_run:begin -->", "<!-- long_run:end -->"
HEADER = "## One long CPU run, end to end (`benchmarks/long_run.py`)"
TRAIN_JSONL = ROOT / "data/corpus/train.jsonl"
VAL_JSONL = ROOT / "data/corpus/validation.jsonl"
BYTES_PER_TOKEN = 4.3
"""SmolLM2 tokens of the bundled corpus: ~330k for its 1.42 MB (the plan's estimate before the caches exist)."""
RATES = {"gemma": 110.0, "smollm2": 360.0, "student": 180.0, "eval": 500.0}
"""Tokens per second on a quiet 2-core CPU: Gemma's aligned precompute, SmolLM2's precompute, student training,
and one model's held-out forward (the plan's estimate)."""
LOAD_S = 30.0
"""Seconds one command spends starting and loading its models (the plan's estimate)."""
DEMO_PROMPTS = {"max_tokens": 6144, "bleu_prompts": 3, "prompt_tokens": 24, "new_tokens": 24}
"""scripts/demo.sh's continuations: 3 prompts of 24 tokens, evenly spaced over its 6,144 held-out tokens."""
BATCH = 4
"""Windows per student step (the demo's)."""


# --------------------------------------------------------------------------------------- usage per command
@dataclass
class MeasuredRunner(runner.Runner):
    """The benchmarks' runner, each command's wall time and peak resident memory appended to `ledger` (one JSON
    line per command: stage, run, wall_s, peak_rss_mib) under the stage being run."""

    ledger: Path | None = None
    stage: str = ""

    def cli(self, args: list[str], log: Path | None, threads: int | None = None) -> None:
        n = str(threads or self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
        name = args[0] if log is None else str(log.with_suffix("").relative_to(self.ledger.parent)
                                               if self.ledger and log.is_relative_to(self.ledger.parent) else log.stem)
        measured(runner.cli_command(args), log, env, self, name)


def measured(cmd: list[str], log: Path | None, env: dict[str, str] | None, run: MeasuredRunner, name: str) -> None:
    """Run `cmd` at the repository root (output in `log`), and record its wall time and the peak RSS of it and its
    children (wait4's rusage) in the runner's ledger; on failure exit with the log's last lines."""
    print("$ " + " ".join(cmd) + (f"  > {log}" if log else ""), flush=True)
    t0 = time.perf_counter()
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "w")  # noqa: SIM115 (closed below, after the child)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if out is not None:
            out.close()
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-20:] if log else []
        raise SystemExit(f"error: command failed (exit {proc.returncode})" + (f"; last lines of {log}:\n" if log
                                                                              else "") + "\n".join(tail))
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    if run.ledger is not None:
        line = {"stage": run.stage, "run": name, "wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1)}
        with open(run.ledger, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    run.say(f"done in {wall:.0f} s, peak RSS {peak:.0f} MiB: {name}")


def stage_usage(ledger: Path) -> dict[str, dict[str, float]]:
    """{stage: {wall_s (sum over its commands), peak_rss_mib (the largest), commands}} from the ledger (a command
    killed before it finished is not in it: a resumed stage counts the part after the kill)."""
    out: dict[str, dict[str, float]] = {}
    if not ledger.exists():
        return out
    for line in ledger.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        s = out.setdefault(r["stage"], {"wall_s": 0.0, "peak_rss_mib": 0.0, "commands": 0})
        s["wall_s"] += r["wall_s"]
        s["peak_rss_mib"] = max(s["peak_rss_mib"], r["peak_rss_mib"])
        s["commands"] += 1
    return out


# ------------------------------------------------------------------------------------------------ options
def grid(text: str) -> tuple[tuple[float, float], ...]:
    """'3e-4:0.5,1e-3:0.8' -> ((3e-4, 0.5), (1e-3, 0.8)): the (lr, lambda) points of the tuning runs."""
    try:
        points = tuple((float(a), float(b)) for a, b in (p.split(":") for p in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid takes LR:LAMBDA pairs separated by commas, got {text!r}") from None
    if not points or any(not lr > 0 or not 0.0 < lam <= 1.0 for lr, lam in points):
        raise argparse.ArgumentTypeError(f"--grid: lr > 0 and lambda in (0, 1] in every pair, got {text!r}")
    return points


def parse(argv: list[str] | None) -> argparse.Namespace:
    from student.config import LossConfig
    from student.weighting import NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="directory of every output (resumed)")
    ap.add_argument("--teachers-dir", default=None,
                    help="smollm2/ and gemma3/ (build_teachers.py --gemma); default: built into WORK/teachers")
    ap.add_argument("--train-tokens", type=int, default=None, help="cached training tokens (default: all)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain (default: all)")
    ap.add_argument("--seq-len", type=int, default=256, help="window length, training and evaluation")
    ap.add_argument("--top-k", type=int, default=32, help="top-k stored per position and teacher")
    ap.add_argument("--keep-layers", default="20", help="init-student --keep-layers (blocks of SmolLM2 kept)")
    ap.add_argument("--calibration-tokens", type=int, default=4096, help="Block Influence calibration tokens")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the cached windows")
    ap.add_argument("--steps", type=int, default=None, help="student steps (default: from --epochs)")
    ap.add_argument("--weighting", default=LossConfig.teacher_weighting, choices=NAMES,
                    help="--teacher-weighting of the student (default: train-student's)")
    ap.add_argument("--grid", type=grid, default=grid("3e-4:0.5,3e-4:0.8,1e-3:0.5,1e-3:0.8"),
                    help="LR:LAMBDA points of the tuning runs")
    ap.add_argument("--tune-steps", type=int, default=40, help="steps of each tuning run")
    ap.add_argument("--tune-windows", type=int, default=64, help="training windows held out as the tuning slice")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="floor of the cosine decay (share of peak)")
    ap.add_argument("--curve-every", type=int, default=40, help="steps between two points of the learning curve")
    ap.add_argument("--save-every", type=int, default=20, help="student checkpoint every N steps (resume)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of both students")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap replicates")
    ap.add_argument("--plot", default=None, help="PNG of the learning curve (default: WORK/long_run.png; "
                    "benchmarks/long_run.png with --write-results)")
    ap.add_argument("--write-results", action="store_true", help="replace the marked block of RESULTS.md")
    ap.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    runner.add_options(ap)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------- the stages
def teachers(args: argparse.Namespace, run: MeasuredRunner, work: Path) -> Path:
    """The teachers' directory: --teachers-dir, or WORK/teachers built once by build_teachers.py --gemma."""
    tdir = Path(args.teachers_dir).resolve() if args.teachers_dir else work / "teachers"
    if not all((tdir / t / "config.json").exists() for t in ("smollm2", "gemma3")):
        if args.teachers_dir:
            raise SystemExit(f"error: {tdir} lacks smollm2/ or gemma3/ (scripts/build_teachers.py --gemma)")
        if run.reuse_only:
            raise SystemExit(f"error: {tdir} would be built, and reuse only was asked for")
        cmd = [sys.executable, "scripts/build_teachers.py", "--output", str(tdir), "--gemma", "--eval-tokens", "0"]
        measured(cmd, work / "logs" / "build_teachers.log", None, run, "build_teachers")
    return tdir


def cut(args: argparse.Namespace, run: MeasuredRunner, tok: Path, work: Path) -> Path:
    """`init-student`: --keep-layers of SmolLM2's blocks by Block Influence on the first training tokens."""
    return run.ensure(pt.cut_run(tok, work / "student-init", args.keep_layers, calibrate=True,
                                 calibration_tokens=args.calibration_tokens, seq_len=args.seq_len))


def caches(args: argparse.Namespace, run: MeasuredRunner, tdir: Path, work: Path) -> tuple[list[Path], dict]:
    """Training caches of SmolLM2 and Gemma (aligned) over the training file, and Gemma's aligned cache of each
    domain's held-out documents (its windows are the evaluated ones)."""
    tok, val = tdir / "smollm2", pt.split_validation(work)
    smol, gemma = pt.Teacher("smollm2", tok), pt.Teacher("gemma3", tdir / "gemma3", align=True)
    train = [work / "caches" / t.name for t in (smol, gemma)]
    runs = [pt.cache_run(t, TRAIN_JSONL, args.train_tokens, c, args, tok, False)
            for t, c in zip((smol, gemma), train, strict=True)]
    held = {d: work / "caches" / f"val-{d}" / "gemma3" for d in pt.DOMAINS}
    runs += [pt.cache_run(gemma, val[d], args.eval_tokens, held[d], args, tok, False) for d in pt.DOMAINS]
    run.ensure_all(runs)
    return train, {d: [c] for d, c in held.items()}


def cache_windows(cache: Path) -> int:
    """Windows (sequences) a finished cache holds, from its manifest."""
    return sum(s["rows"] for s in runner.read_json(cache / "manifest.json")["shards"])


def student_config(args: argparse.Namespace, train: list[Path], student: Path, tok: Path, out: Path, *,
                   lr: float, lambda_kd: float, steps: int, eval_sequences: int) -> Any:
    """The `train-student` config every student run shares but for lr, lambda, steps and its held-out slice."""
    from student.config import LossConfig, OptimConfig, TrainConfig

    return TrainConfig(
        teacher_data=[str(c) for c in train], output=str(out), student=str(student), tokenizer=str(tok),
        loss=LossConfig(lambda_kd=lambda_kd, teacher_weighting=args.weighting),
        optim=OptimConfig(lr=lr, warmup_steps=max(1, steps // 10), min_lr_ratio=args.min_lr_ratio),
        max_steps=steps, batch_size=BATCH, eval_sequences=eval_sequences, eval_every=0, log_every=5,
        save_every=args.save_every, seed=args.seed, num_workers=0, device="cpu",
    )


def tune(args: argparse.Namespace, run: MeasuredRunner, train: list[Path], student: Path, tok: Path,
         work: Path) -> tuple[list[dict], dict]:
    """One short run per grid point, the tuning slice (--tune-windows training windows) held out; returns every
    run's row (lr, lambda, CE and perplexity on the slice) and the chosen one (the lowest CE)."""
    runs = []
    for lr, lam in args.grid:
        out = work / "tune" / f"lr{lr:g}-lambda{lam:g}"
        cfg = student_config(args, train, student, tok, out, lr=lr, lambda_kd=lam, steps=args.tune_steps,
                             eval_sequences=args.tune_windows)
        runs.append(runner.train(cfg, out.parent / f"{out.name}.log"))
    run.ensure_all(runs)
    rows = []
    for r, (lr, lam) in zip(runs, args.grid, strict=True):
        evals = [m for m in map(json.loads, (r.output / "metrics.jsonl").read_text().splitlines())
                 if m.get("split") == "eval"]
        rows.append({"lr": lr, "lambda": lam, "ce": evals[-1]["eval_ce"], "ppl": evals[-1]["eval_ppl"],
                     "run": str(r.output)})
    best = min(rows, key=lambda x: (x["ce"], x["lr"], x["lambda"]))
    return rows, best


# ------------------------------------------------------------------------------------- training and curve
def curve_steps(steps: int, every: int) -> list[int]:
    """The chunk ends: every `every` steps, then the last step."""
    return [*range(every, steps, every), steps] if every > 0 else [steps]


def last_checkpoint(out: Path) -> int:
    """The newest checkpoint's step in a run directory (0: none)."""
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-" + "[0-9]" * 7)]
    return max(steps, default=0)


def train_chunk(run: MeasuredRunner, cfg: Any, log: Path, stop: int) -> None:
    """Train the run up to step `stop` (its last chunk: to the end, a finished run reused as the runner does);
    a chunk the run already passed is skipped (its stored config has a later stop)."""
    out = Path(cfg.output)
    if stop >= cfg.max_steps:
        run.ensure(runner.train(cfg, log))
    elif not (out / "final" / "config.json").exists() and last_checkpoint(out) < stop:
        run.ensure(runner.train(dataclasses.replace(cfg, stop_after=stop), log))


def snapshot(run_dir: Path, step: int, init: Path, tok: Path, out: Path) -> Path:
    """The student of checkpoint `step` of a run, saved as a model directory (as train-student saves final/)."""
    import torch
    from transformers import AutoModelForCausalLM

    from student.model import save_student

    state = torch.load(run_dir / "checkpoints" / f"step-{step:07d}" / "state.pt", map_location="cpu",
                       weights_only=True, mmap=True)["model"]
    model = AutoModelForCausalLM.from_pretrained(init, torch_dtype=torch.float32)
    model.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    save_student(model, str(out), str(tok))
    return out


def evaluate(run: MeasuredRunner, models: dict[str, Path], val: dict[str, list[Path]], work: Path) -> None:
    """`evaluate` of `models` on each domain's held-out windows (WORK/eval/eval-DOMAIN.json, one report per
    domain holding every model scored so far: a model already there is not scored again)."""
    runner.parallel(min(run.jobs, len(pt.DOMAINS)), [
        lambda d=d: run.evaluate(pt.eval_config(models, val[d], work / "eval" / f"eval-{d}.json"))
        for d in pt.DOMAINS])


def scored(work: Path, labels: list[str]) -> bool:
    """Every domain's report holds every label."""
    reports = [work / "eval" / f"eval-{d}.json" for d in pt.DOMAINS]
    return all(p.exists() and set(labels) <= set(runner.read_json(p)["models"]) for p in reports)


def train_students(args: argparse.Namespace, run: MeasuredRunner, cfgs: dict[str, Any], init: Path, tok: Path,
                   val: dict[str, list[Path]], work: Path) -> dict[str, Path]:
    """Both students, chunk by chunk; after each chunk but the last, both are evaluated as models of that step
    (labels LABEL-stepS; the model directories are removed once scored). Returns {label: final model}."""
    steps = next(iter(cfgs.values())).max_steps
    for stop in curve_steps(steps, args.curve_every):
        run.stage = "training"
        runner.parallel(run.jobs, [lambda label=label, cfg=cfg, stop=stop: train_chunk(
            run, cfg, work / "runs" / f"{label}.log", stop) for label, cfg in cfgs.items()])
        if stop == steps:
            break
        labels = {f"{label}-step{stop}": label for label in cfgs}
        if scored(work, list(labels)):
            continue
        ckpts = [Path(cfgs[src].output) / "checkpoints" / f"step-{stop:07d}" for src in labels.values()]
        if not all(c.exists() for c in ckpts):  # rotated away (the runs finished before this point was scored)
            run.say(f"step {stop}: a checkpoint is gone, the learning curve has no point there")
            continue
        snaps = {lab: snapshot(Path(cfgs[src].output), stop, init, tok, work / "curve" / lab)
                 for lab, src in labels.items()}
        run.stage = "learning curve"
        evaluate(run, snaps, val, work)
        for p in snaps.values():
            shutil.rmtree(p)
    return {label: Path(cfg.output) / "final" for label, cfg in cfgs.items()}


def continuations(args: argparse.Namespace, run: MeasuredRunner, models: dict[str, Path], work: Path) -> dict:
    """Greedy continuations of the demo's prompts (its held-out windows of the whole validation file)."""
    from student.evaluation.config import EvalConfig

    opts = {**DEMO_PROMPTS}
    if args.eval_tokens is not None:
        opts["max_tokens"] = min(opts["max_tokens"], args.eval_tokens)
    cfg = EvalConfig(students=[f"{k}={v}" for k, v in models.items()], data=str(VAL_JSONL), seq_len=args.seq_len,
                     bootstrap=0, device="cpu", output=str(work / "eval" / "continuations.json"), **opts)
    return run.evaluate(cfg)["continuations"]


# ------------------------------------------------------------------------------------------------ results
def param_count(model_dir: Path) -> int:
    """Parameters stored in a model directory's safetensors files (a tied head counted once), from their
    headers."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def load_scores(work: Path) -> scores.Scores:
    return scores.Scores.from_results({d: runner.read_json(work / "eval" / f"eval-{d}.json") for d in pt.DOMAINS})


COMPARISONS = (("distilled", "smollm2"), ("distilled", "ce-only"), ("ce-only", "smollm2"))


def intervals(s: scores.Scores, replicates: int) -> list[tuple[str, str, dict[str, float]]]:
    """The paired-bootstrap perplexity differences the claims rest on (windows resampled within domains)."""
    return [(a, b, scores.paired_bootstrap(s.windows(a), s.windows(b), s.strata(), n=replicates))
            for a, b in COMPARISONS]


def curve(s: scores.Scores, steps: int, every: int, tokens_per_step: int) -> dict[str, list[tuple[int, float]]]:
    """(training tokens, held-out perplexity) of each student: the cut student at 0, each chunk's end, the end."""
    out = {}
    for label in ("distilled", "ce-only"):
        pts = [(0, scores.ppl(s.windows("init")))]
        for stop in curve_steps(steps, every):
            lab = label if stop == steps else f"{label}-step{stop}"
            if lab in s.nll:
                pts.append((stop * tokens_per_step, scores.ppl(s.windows(lab))))
        out[label] = pts
    return out


def plot(points: dict[str, list[tuple[int, float]]], smollm2: float, gemma: float, path: Path) -> None:
    """Held-out perplexity against training tokens: both students, SmolLM2 and Gemma as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in points.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{label} student")
    ax.axhline(smollm2, color="black", ls="--", lw=1, label="SmolLM2-135M-Instruct")
    if math.isfinite(gemma):
        ax.axhline(gemma, color="grey", ls=":", lw=1, label="Gemma 3 270M (its exact positions)")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity (all validation windows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[long] wrote {path}", flush=True)


def machine() -> str:
    """The CPU (its model name from /proc/cpuinfo where there is one), core count and load average."""
    name = platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        name = names[0] if names else name
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core CPU ({name}), no GPU used, load average {load} at the end"


def command(argv: list[str] | None) -> str:
    return "python benchmarks/long_run.py " + " ".join(argv if argv is not None else sys.argv[1:])


def model_rows(s: scores.Scores, params: dict[str, int]) -> list[str]:
    """Held-out perplexity of every model, overall and per domain (Gemma: over its exact positions)."""
    doms = s.domains
    lines = ["| model | parameters | perplexity | " + " | ".join(doms) + " |", "|---|---|---|" + "---|" * len(doms)]
    names = {"init": "cut student, untrained", "distilled": "distilled student", "ce-only": "CE-only twin",
             "smollm2": "SmolLM2-135M-Instruct"}
    for lab, name in names.items():
        cells = [scores.ppl(s.windows(lab))] + [scores.ppl(s.windows(lab, d)) for d in doms]
        lines.append(f"| {name} | {params[lab] / 1e6:.1f}M | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    if "gemma3" in s.observed:
        cells = ["{:.2f}* ({:.0%})".format(*s.observed_ppl("gemma3", d)) for d in (None, *doms)]
        lines.append(f"| Gemma 3 270M | {params['gemma3'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return lines


def interval_rows(ivs: list[tuple[str, str, dict[str, float]]]) -> list[str]:
    """Each difference with its interval and the verdict on "the first has the lower perplexity" (holds: the
    interval lies below zero; does not hold: above zero)."""
    lines = ["| difference | perplexity [95%] | relative [95%] | first is better |", "|---|---|---|---|"]
    for a, b, r in ivs:
        verdict = scores.verdict_better(r["low"], r["high"], [r["difference"]])
        lines.append(f"| {a} - {b} | {scores.interval_cells(r)} | **{verdict}** |")
    return lines


def stage_rows(usage: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| stage | commands | wall | peak RSS of its largest command |", "|---|---|---|---|"]
    for name, u in usage.items():
        lines.append(f"| {name} | {u['commands']} | {u['wall_s'] / 60:.1f} min | {u['peak_rss_mib']:.0f} MiB |")
    return lines


def markdown(r: dict[str, Any], argv: list[str] | None) -> str:
    """The results block: command and machine, scale, tuning, perplexities, intervals, curve, continuations and
    the stages' wall time and memory."""
    a, s = r["args"], r["scores"]
    tuning = ["| lr | lambda | CE on the tuning slice | perplexity | |", "|---|---|---|---|---|"]
    tuning += [f"| {t['lr']:g} | {t['lambda']:g} | {t['ce']:.4f} | {t['ppl']:.2f} | "
               f"{'**chosen**' if t is r['best'] else ''} |" for t in r["tuning"]]
    curve_lines = [f"- {label}: " + ", ".join(f"{x:,} tok: {y:.2f}" for x, y in pts) for label, pts in r["curve"].items()]
    cont = r["continuations"]
    texts = []
    for i, prompt in enumerate(cont.get("prompts", [])):
        texts.append(f"- prompt {prompt!r}")
        texts += [f"  - {lab}: {cont[lab][i]!r}" for lab in ("reference", "smollm2", "distilled", "ce-only") if lab in cont]
    windows = len(s.strata())
    out = [
        f"{machine()}, {time.strftime('%Y-%m-%d')}; `{command(argv)}`; this invocation {r['wall'] / 60:.1f} min "
        f"(the runner reused {len(r['reused'])} outputs or reports).",
        "",
        f"Scale: {r['tokens']:,} cached training tokens per teacher ({r['tokens'] // a.seq_len:,} windows of "
        f"{a.seq_len}, top-{a.top_k}; SmolLM2 and Gemma, Gemma aligned onto SmolLM2's tokens); student: "
        f"SmolLM2 cut to {a.keep_layers} blocks by Block Influence, {r['params']['distilled'] / 1e6:.1f}M "
        f"parameters against SmolLM2's {r['params']['smollm2'] / 1e6:.1f}M; {r['steps']} steps x {BATCH} x "
        f"{a.seq_len} tokens ({r['steps'] * BATCH * a.seq_len / r['tokens']:.2f} epochs), warmup "
        f"{max(1, r['steps'] // 10)} steps, cosine to {a.min_lr_ratio:g} of lr, seed {a.seed}, weighting "
        f"`{a.weighting}`. Held out: {windows} windows of data/corpus/validation.jsonl, each domain packed apart; "
        f"{a.bootstrap} paired-bootstrap replicates (windows resampled within domains).",
        "",
        f"**Tuning** (lr, lambda) on {a.tune_windows} training windows held out by the trainer, {a.tune_steps} "
        "steps each; the validation file is never used:",
        "", *tuning, "",
        "**Held-out perplexity** (* Gemma over the positions where its log-prob of the next SmolLM2 token is "
        "exact, their share in brackets):",
        "", *model_rows(s, r["params"]), "",
        "**Paired-bootstrap intervals** (perplexity of the first minus the second, every validation window):",
        "", *interval_rows(r["intervals"]), "",
        "**Learning curve** (held-out perplexity against training tokens):", "", *curve_lines, "",
        f"![held-out perplexity against training tokens]({Path(r['plot']).name})", "",
        "**Greedy continuations** of the demo's prompts:", "", *texts, "",
        "**Stages** (wall time: the sum over the commands each ran, earlier invocations included):", "",
        *stage_rows(r["usage"]),
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- main
def plan(args: argparse.Namespace, work: Path) -> dict[str, int]:
    """The work ahead, printed before anything runs (token counts from the manifests when the caches exist)."""
    cache = work / "caches" / "smollm2"
    if (cache / "manifest.json").exists():
        tokens, how = cache_windows(cache) * args.seq_len, "from the cache's manifest"
    else:
        est = int(TRAIN_JSONL.stat().st_size / BYTES_PER_TOKEN)
        tokens, how = min(est, args.train_tokens or est), f"estimated at {BYTES_PER_TOKEN} bytes per token"
    windows = tokens // args.seq_len
    steps = args.steps or max(1, math.ceil(args.epochs * windows / BATCH))
    held = int(VAL_JSONL.stat().st_size / BYTES_PER_TOKEN)
    held = min(held, 3 * args.eval_tokens) if args.eval_tokens else held
    tps = BATCH * args.seq_len
    points = len(curve_steps(steps, args.curve_every))
    hours = {
        "precompute SmolLM2": tokens / RATES["smollm2"], "precompute Gemma (aligned)": (tokens + held) / RATES["gemma"],
        f"tuning ({len(args.grid)} runs x {args.tune_steps} steps)": len(args.grid) * args.tune_steps * tps
        / RATES["student"],
        f"training (2 students x {steps} steps)": 2 * steps * tps / RATES["student"],
        f"evaluation ({2 * points + 2} models, 3 domains)": (2 * points + 2) * held / RATES["eval"],
    }
    commands = 1 + 5 + len(args.grid) + 2 * points + 3 * (points - 1) + 4
    hours[f"starting and loading ({commands} commands, ~{LOAD_S:g} s each)"] = commands * LOAD_S
    print(f"[long] plan: {tokens:,} training tokens ({how}) = {windows:,} windows of {args.seq_len}; "
          f"~{held:,} held-out tokens; students: {steps} steps x {BATCH} windows = {steps * tps:,} tokens "
          f"({steps * tps / max(tokens, 1):.2f} epochs), {points} curve points", flush=True)
    for name, sec in hours.items():
        print(f"[long]   {name}: ~{sec / 3600:.2f} h", flush=True)
    if not args.teachers_dir:
        print("[long]   (before them, build_teachers.py --gemma: a few minutes)", flush=True)
    print(f"[long]   total ~{sum(hours.values()) / 3600:.1f} h at {RATES['gemma']:g} tok/s (Gemma precompute), "
          f"{RATES['smollm2']:g} (SmolLM2), {RATES['student']:g} (student training), {RATES['eval']:g} (evaluation); "
          "finished outputs are reused", flush=True)
    return {"tokens": tokens, "steps": steps}


def stages(args: argparse.Namespace, run: MeasuredRunner, work: Path) -> dict[str, Any]:
    """Teachers, the cut, the caches, the tuning runs and both students (each reused when finished)."""
    run.stage = "teachers"
    tdir = teachers(args, run, work)
    tok = tdir / "smollm2"
    run.stage = "student"
    init = cut(args, run, tok, work)
    params = {"init": param_count(init), "smollm2": param_count(tok), "gemma3": param_count(tdir / "gemma3")}
    run.say(f"student: {params['init']:,} parameters (SmolLM2: {params['smollm2']:,})")
    run.stage = "caches"
    train, val = caches(args, run, tdir, work)
    tokens = cache_windows(train[0]) * args.seq_len
    steps = args.steps or max(1, math.ceil(args.epochs * tokens / args.seq_len / BATCH))
    run.say(f"cached {tokens:,} training tokens per teacher (from the manifest); {steps} steps per student")
    run.stage = "tuning"
    tuning, best = tune(args, run, train, init, tok, work)
    for t in tuning:
        run.say(f"tuning lr {t['lr']:g} lambda {t['lambda']:g}: CE {t['ce']:.4f} on the tuning slice"
                + ("  <- chosen" if t is best else ""))
    cfgs = {label: student_config(args, train, init, tok, work / "runs" / label, lr=best["lr"], lambda_kd=lam,
                                  steps=steps, eval_sequences=0)
            for label, lam in (("distilled", best["lambda"]), ("ce-only", 0.0))}
    finals = train_students(args, run, cfgs, init, tok, val, work)
    params.update({label: param_count(p) for label, p in finals.items()})
    return {"tok": tok, "init": init, "val": val, "finals": finals, "params": params, "tokens": tokens,
            "steps": steps, "tuning": tuning, "best": best}


def main(argv: list[str] | None = None) -> int:
    args, t0 = parse(argv), time.perf_counter()
    work = Path(args.work).resolve()
    if not args.plan_only:
        work.mkdir(parents=True, exist_ok=True)
    base = runner.from_args(args, "[long]")
    run = MeasuredRunner(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                         ledger=work / "usage.jsonl")
    plan(args, work)
    if args.plan_only:
        return 0
    r = stages(args, run, work)
    run.stage = "evaluation"
    finals, tok = r["finals"], r["tok"]
    evaluate(run, {"init": r["init"], "smollm2": tok, **finals}, r["val"], work)
    cont = continuations(args, run, {"smollm2": tok, **finals}, work)
    s = load_scores(work)
    plot_path = Path(args.plot) if args.plot else (ROOT / "benchmarks/long_run.png" if args.write_results
                                                   else work / "long_run.png")
    points = curve(s, r["steps"], args.curve_every, BATCH * args.seq_len)
    plot(points, scores.ppl(s.windows("smollm2")), s.observed_ppl("gemma3")[0] if "gemma3" in s.observed
         else math.nan, plot_path)
    r.update(args=args, scores=s, intervals=intervals(s, args.bootstrap), curve=points, continuations=cont,
             plot=plot_path, reused=run.reused, usage=stage_usage(work / "usage.jsonl"), wall=time.perf_counter() - t0)
    text = markdown(r, argv)
    runner.write_atomic(work / "long_run.json", json.dumps(
        {"models": {lab: scores.ppl(s.windows(lab)) for lab in s.nll}, "intervals": r["intervals"],
         "tuning": r["tuning"], "tokens": r["tokens"], "steps": r["steps"], "params": r["params"],
         "curve": points, "usage": r["usage"]}, indent=1) + "\n")
    runner.publish(run, text, work / "long_run.md", write_results=args.write_results,
                   results=RESULTS, begin=BEGIN, end=END, header=HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
