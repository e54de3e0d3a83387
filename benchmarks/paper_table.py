"""The paper's Table 1 and Figure 2, at CPU scale, on the bundled corpus and real teachers.

    python scripts/build_teachers.py --output /work/teachers --finetune scripture --finetune python --finetune jargon
    python benchmarks/paper_table.py --teachers-dir /work/teachers --work /tmp/paper --write-results

Teachers (in this order, those present): smollm2 (SmolLM2-135M-Instruct), then its fine-tunes on the
scripture, python and jargon domains. Every teacher is precomputed once on the same packed training tokens;
every student row trains the same student preset from the same seed, on the same sequences, for the same
steps, and only the loss differs:

    CE only            lambda = 0 (the caches only supply the tokens)
    single-teacher KD  lambda, teacher 1 (smollm2)
    uniform multi      lambda, K teachers, alpha = 1/K
    entropy multi      lambda, K teachers, alpha ∝ 1/H per position
    + features         entropy multi + gamma * pooled-feature alignment
    DKD                decoupled KD on the entropy-fused target

and the sweep trains entropy-weighted students on the first 1..K teachers. All students are then judged by
`evaluate` on held-out text (data/corpus/validation.jsonl) against the K teacher models: perplexity, full
KL(P_T || P_S) to the entropy-fused target of all K teachers (the same target for every row), top-1
agreement, and BLEU of greedy continuations against the teachers' continuations and against the text.

Completed caches and runs are reused, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shared import add_options  # noqa: E402

TEACHER_ORDER = ("smollm2", "smollm2-scripture", "smollm2-python", "smollm2-jargon")
RESULTS = ROOT / "benchmarks/RESULTS.md"
REUSED: list[str] = []  # caches and runs found complete (their time is not in this invocation's wall time)
BEGIN, END = "<!-- paper_table:begin -->", "<!-- paper_table:end -->"


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run a CLI command; with `log`, its output goes to that file (parallel jobs) instead of the terminal."""
    print("$ " + " ".join(cmd) + (f"  > {log}" if log else ""), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: command failed ({proc.returncode}), see {log}")
    print(f"[paper] done: {log.stem}", flush=True)


def parallel(jobs: int, calls: list) -> list:
    """Run zero-argument callables, `jobs` at a time, keeping their order in the results."""
    if jobs <= 1:
        return [c() for c in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: c(), calls))


def precompute(teacher: Path, out: Path, args: argparse.Namespace) -> Path:
    if (out / "manifest.json").exists():
        print(f"[paper] cache {out} exists, reused")
        REUSED.append(out.name)
        return out
    run(
        [
            sys.executable,
            "cli.py",
            "precompute",
            "--teacher",
            str(teacher),
            "--teacher-name",
            teacher.name,
            "--dataset",
            str(ROOT / "data/corpus/train.jsonl"),
            "--max-tokens",
            str(args.train_tokens),
            "--seq-len",
            str(args.seq_len),
            "--top-k",
            str(args.top_k),
            "--pool-layers",
            "-1",
            "--batch-size",
            "8",
            "--shard-size",
            "128",
            "--device",
            "cpu",
            "--output",
            str(out),
        ],
        out.parent / f"{out.name}.log" if args.jobs > 1 else None,
    )
    return out


def run_name(label: str, seed: int) -> str:
    return label if seed == 0 else f"{label}-s{seed}"


def train(
    label: str, caches: list[Path], extra: list[str], args: argparse.Namespace, tokenizer: Path, seed: int
) -> Path:
    name = run_name(label, seed)
    out = Path(args.work) / "runs" / name
    if (out / "final" / "config.json").exists():
        print(f"[paper] run {out} exists, reused")
        REUSED.append(name)
        return out / "final"
    cmd = [
        sys.executable,
        "cli.py",
        "train-student",
        "--output",
        str(out),
        "--student",
        args.student,
        "--tokenizer",
        str(tokenizer),
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--warmup-steps",
        str(args.steps // 10),
        "--seed",
        str(seed),
        "--eval-every",
        "0",
        "--log-every",
        "10",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    for c in caches:
        cmd += ["--teacher-data", str(c)]
    run(cmd + extra, out.parent / f"{name}.log" if args.jobs > 1 else None)
    return out / "final"


def markdown(
    res: dict,
    rows: list[tuple[str, str, str]],
    sweep: list[tuple[int, str]],
    args: argparse.Namespace,
    teachers: list[str],
    wall: float,
) -> str:
    m = res["models"]
    ce_ppl = stats(res, "ce-only", args.seeds, "perplexity")[0]

    def cells(label: str) -> str:
        def pm(key: str, nd: int) -> str:
            mean, sd = stats(res, label, args.seeds, key)
            return f"{mean:.{nd}f}" + (f" ± {sd:.{nd}f}" if args.seeds > 1 else "")

        ppl = stats(res, label, args.seeds, "perplexity")[0]
        return (
            f"{pm('perplexity', 1)} | {100 * (ppl / ce_ppl - 1):+.1f}% | {pm('kl_fused', 3)} | "
            f"{pm('top1_agreement', 3)} | {stats(res, label, args.seeds, 'bleu.teachers')[0]:.1f} | "
            f"{stats(res, label, args.seeds, 'bleu.reference')[0]:.1f}"
        )

    lines = [
        f"CPU (2 cores), {time.strftime('%Y-%m-%d')}; `python benchmarks/paper_table.py "
        f"--teachers-dir {args.teachers_dir} --work {args.work} --seeds {args.seeds} --jobs {args.jobs} "
        f"--write-results` (wall {wall / 60:.0f} min"
        + (f"; {len(REUSED)} caches/runs reused from an earlier invocation" if REUSED else "")
        + ").",
        "",
        f"Student `{args.student}` (from scratch), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
        f"on {args.train_tokens} cached training tokens (~{args.steps * args.batch_size * args.seq_len / args.train_tokens:.0f} "
        f"epochs), lr {args.lr}, seeds 0..{args.seeds - 1} (mean ± sd over seeds; a seed fixes the init and the "
        f"data order, shared by all rows); lambda = {args.lambda_kd}, gamma = {args.gamma_feat}, top-k {args.top_k}. "
        f"Evaluated on the first {res['windows'] * res['seq_len']} tokens of data/corpus/validation.jsonl; KL is the "
        f"full-vocab KL(P_T || P_S) to the entropy-fused target of all {len(teachers)} teachers "
        f"({', '.join(teachers)}); BLEU of {res['bleu_prompts']} greedy 32-token continuations.",
        "",
        "| row | teachers | perplexity | vs CE | KL to fused | top-1 agree | BLEU vs teachers | BLEU vs text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {desc} | {tk} | {cells(label)} |" for label, desc, tk in rows]
    for t in teachers:
        lines.append(
            f"| teacher {t} | - | {m[t]['perplexity']:.1f} | | | | | {m[t]['bleu']['reference']:.1f} |"
        )
    lines += [
        "",
        "Sweep over the number of teachers (entropy-weighted, in the order above):",
        "",
        "| K | perplexity | vs CE | KL to fused | top-1 agree | BLEU vs teachers | BLEU vs text |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {cells(label)} |" for k, label in sweep]
    lines += ["", f"![perplexity and KL against the number of teachers]({Path(args.plot).name})"]
    return "\n".join(lines)


def stats(res: dict, label: str, seeds: int, key: str) -> tuple[float, float]:
    """Mean and sample standard deviation of a metric (dotted key) over the seeds of one row."""
    vals = []
    for seed in range(seeds):
        v = res["models"][run_name(label, seed)]
        for part in key.split("."):
            v = v[part]
        vals.append(float(v))
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, sd


def plot(res: dict, sweep: list[tuple[int, str]], path: str, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k, _ in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in (
        (axes[0], "perplexity", "held-out perplexity"),
        (axes[1], "kl_fused", "KL to fused target"),
    ):
        pts = [stats(res, label, seeds, key) for _, label in sweep]
        ax.errorbar(
            ks,
            [p[0] for p in pts],
            yerr=[p[1] for p in pts],
            fmt="o-",
            capsize=3,
            label="entropy-weighted KD",
        )
        ax.axhline(stats(res, "ce-only", seeds, key)[0], color="grey", ls="--", label="CE only")
        ax.set_xlabel("number of teachers")
        ax.set_xticks(ks)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[paper] wrote {path}")


def write_results(text: str) -> None:
    doc = RESULTS.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc:
        a, b = doc.index(BEGIN), doc.index(END) + len(END)
        doc = doc[:a] + block + doc[b:]
    else:
        head = "## Paper comparison (`benchmarks/paper_table.py`)\n"
        a = doc.index(head) + len(head)
        doc = doc[:a] + "\n" + block + "\n" + doc[a:]
    RESULTS.write_text(doc, encoding="utf-8")
    print(f"[paper] updated {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers-dir", required=True, help="output directory of scripts/build_teachers.py")
    ap.add_argument("--work", required=True, help="directory for caches, runs and evaluation JSON")
    ap.add_argument("--train-tokens", type=int, default=16384, help="cached training tokens per teacher")
    add_options(ap, seq_len=128, top_k=32)
    ap.add_argument("--student", default="tiny", help="student preset, config or directory")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per student")
    add_options(ap, batch_size=4)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--lambda-kd", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument(
        "--gamma-feat", type=float, default=0.1, help="weight of the feature term in the + features row"
    )
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for evaluation")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per row (init and data order)")
    ap.add_argument(
        "--jobs", type=int, default=1, help="precompute/training commands run at once (logs to files)"
    )
    ap.add_argument("--plot", default=str(ROOT / "benchmarks/paper_sweep.png"), help="PNG of the sweep")
    ap.add_argument(
        "--write-results", action="store_true", help="replace the tables in benchmarks/RESULTS.md"
    )
    args = ap.parse_args(argv)

    start = time.perf_counter()
    tdir, work = Path(args.teachers_dir), Path(args.work)
    teachers = [tdir / n for n in TEACHER_ORDER if (tdir / n / "config.json").exists()]
    if len(teachers) < 2:
        print(f"error: need at least 2 teachers in {tdir} (run scripts/build_teachers.py)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    caches = parallel(
        args.jobs, [lambda t=t: precompute(t, work / "caches" / t.name, args) for t in teachers]
    )
    names = [t.name for t in teachers]
    k = len(caches)
    lam = ["--lambda-kd", str(args.lambda_kd)]
    rows = [
        ("ce-only", "CE only", "-", ["--lambda-kd", "0"], caches[:1]),
        ("kd-single", "single-teacher KD", names[0], lam, caches[:1]),
        ("kd-uniform", "uniform multi-teacher", f"{k}", lam + ["--teacher-weighting", "uniform"], caches),
        (
            "kd-entropy",
            "entropy-weighted multi-teacher",
            f"{k}",
            lam + ["--teacher-weighting", "entropy"],
            caches,
        ),
        (
            "kd-entropy-feat",
            "+ feature alignment",
            f"{k}",
            lam + ["--gamma-feat", str(args.gamma_feat)],
            caches,
        ),
        ("dkd", "DKD (entropy-fused)", f"{k}", lam + ["--loss", "dkd"], caches),
    ]
    specs = [(label, cs, extra) for label, _, _, extra, cs in rows]
    specs += [(f"kd-entropy-k{n}", caches[:n], lam) for n in range(2, k)]
    jobs = [(label, cs, extra, seed) for seed in range(args.seeds) for label, cs, extra in specs]
    paths = parallel(args.jobs, [lambda j=j: train(j[0], j[1], j[2], args, teachers[0], j[3]) for j in jobs])
    finals = {run_name(j[0], j[3]): p for j, p in zip(jobs, paths, strict=True)}
    sweep = [(1, "kd-single"), *[(n, f"kd-entropy-k{n}") for n in range(2, k)], (k, "kd-entropy")]

    from student.evaluation import EvalConfig, format_table, run_evaluate

    cfg = EvalConfig(
        students=[f"{label}={path}" for label, path in finals.items()],
        teachers=[f"{t.name}={t}" for t in teachers],
        data=str(ROOT / "data/corpus/validation.jsonl"),
        seq_len=256,
        max_tokens=args.eval_tokens,
        top_k=1 << 30,  # each teacher's whole distribution kept (~8 bytes x vocab per token): the full-vocab KL
        bleu_prompts=16,
        output=str(work / "eval.json"),
    )
    res = run_evaluate(cfg)
    print(format_table(res))
    plot(res, sweep, args.plot, args.seeds)
    text = markdown(
        res,
        [(label, desc, tk) for label, desc, tk, _, _ in rows],
        sweep,
        args,
        names,
        time.perf_counter() - start,
    )
    print("\n" + text)
    if args.write_results:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
