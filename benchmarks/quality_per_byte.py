"""Quality per byte: the same cut student, same steps and data, trained on each storage setting of one teacher's
targets (top-k float16 at several k, sampled at several N), scored against the teacher's full distribution.

    python benchmarks/quality_per_byte.py --teacher demo/teachers/smollm2 --student-init demo/student-init \\
        --work /tmp/qpb --write-results

The teacher and the cut student are what scripts/demo.sh builds (`build_teachers.py`, `init-student`).
Stages, each reused when already complete under --work (an interrupted run resumes where it stopped):
  1. caches: WORK/caches/NAME for every setting, written by `run_precompute` exactly as `precompute` writes them
     (`--targets topk --top-k K` or `--targets sampled --samples N`, --pool-layers none), with the teacher
     forward computed once and reused for every setting (as benchmarks/sampled_caches.py does); bytes/token is
     the shard files' size on disk over the cached tokens.
  2. students: `train-student` from the same --student-init with identical options but the cache, per seed
     (the seed fixes init RNGs and data order) -> WORK/runs/NAME-sSEED. All settings of a seed before the next.
  3. evaluate: per seed, one `evaluate` of that seed's students with the live teacher at --top-k = vocab (the
     KL is then the full KL(P_teacher || P_student) at every held-out position) -> WORK/eval-sSEED.json.
  4. table: each setting minus the reference (top64) with 95% paired-bootstrap intervals over the held-out
     windows, per seed and pooled (per window, the mean over seeds), for perplexity and KL; the figure.

A setting is called "as good as" the reference (non-inferiority, --margin) when, for perplexity and for KL, every
seed's interval of setting - reference, and the pooled one, ends below margin x the reference's value (default
1%: a student at most 1% worse, at 95% confidence).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import runner, shared  # noqa: E402
from benchmarks.shared import add_options  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- quality_per_byte:begin -->", "<!-- quality_per_byte:end -->"
HEADER = "## Quality per byte (`benchmarks/quality_per_byte.py`)\n"
DEFAULT_SETTINGS = "top64,top8,top32,sampled8,sampled16,sampled32,sampled64"


class Setting(NamedTuple):
    """One storage setting of the teacher's targets."""

    name: str
    """top{K}, top{K}b{BITS} or sampled{N}: the cache and run names."""
    targets: str
    """`topk` or `sampled`, as `precompute --targets`."""
    size: int
    """K (top-k) or N (draws per position)."""
    bits: int | None = None
    """float16 mantissa bits kept (`--logprob-bits`); None: all 10."""

    @property
    def series(self) -> str:
        if self.targets == "sampled":
            return "sampled"
        return "top-k" if self.bits is None else f"top-k, {self.bits} mantissa bits"


def parse_setting(name: str) -> Setting:
    """`top64` -> top-64 float16; `top64b6` -> with 6 mantissa bits; `sampled16` -> 16 draws per position."""
    m = re.fullmatch(r"(top|sampled)(\d+)(?:b(\d+))?", name)
    if not m or (m.group(1) == "sampled" and m.group(3)) or int(m.group(2)) < 1:
        raise SystemExit(
            f"error: setting {name!r}: give topK, topKbBITS or sampledN (e.g. top64, top32b6, sampled16)"
        )
    bits = int(m.group(3)) if m.group(3) else None
    return Setting(
        name=name, targets="topk" if m.group(1) == "top" else "sampled", size=int(m.group(2)), bits=bits
    )


def cache_bytes(cache: Path) -> tuple[int, int]:
    """(bytes of the shard files on disk, cached tokens) of a finished cache (its manifest's shards)."""
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    size = 0
    for shard in manifest["shards"]:
        on_disk = (cache / shard["file"]).stat().st_size
        if on_disk != shard["bytes"]:
            raise RuntimeError(
                f"{cache / shard['file']}: {on_disk} bytes on disk, manifest says {shard['bytes']}"
            )
        size += on_disk
    return size, sum(s["rows"] for s in manifest["shards"]) * manifest["seq_len"]


def versus(
    values: dict[int, dict[str, list[float]]],
    name: str,
    reference: str,
    metric: str,
    *,
    replicates: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """`name` minus `reference` on `metric` (`perplexity` from per-window NLLs, or `kl`), with 95% paired-bootstrap
    intervals over the held-out windows: per seed (key "s{seed}") and pooled over the seeds (key "pooled": per
    window, the mean over seeds of each model's value, then the same bootstrap). values[seed][label] is the
    per-window list (same windows, same order, for every seed)."""
    from student.stats import mean, paired_bootstrap, perplexity_of_means

    stat = perplexity_of_means if metric == "perplexity" else mean
    out = {}
    seeds = sorted(values)
    for s in seeds:
        r = paired_bootstrap(values[s][name], values[s][reference], n=replicates, seed=seed, stat=stat)
        out[f"s{s}"] = {"difference": r.estimate, "low": r.low, "high": r.high}
    if len(seeds) > 1:
        a = np.mean([values[s][name] for s in seeds], axis=0)
        b = np.mean([values[s][reference] for s in seeds], axis=0)
        r = paired_bootstrap(a, b, n=replicates, seed=seed, stat=stat)
        out["pooled"] = {"difference": r.estimate, "low": r.low, "high": r.high}
    return out


def as_good(intervals: dict[str, dict[str, float]], reference: dict[str, float], margin: float) -> bool:
    """Non-inferiority: every interval of setting - reference (per seed, and pooled) ends below `margin` times
    the reference's own value in that seed (`reference[key]`; "pooled": the mean over seeds). A setting that is
    merely not shown worse, with an interval reaching far above the margin, is not "as good"."""
    return all(iv["high"] <= margin * reference[key] for key, iv in intervals.items())


def summarise(
    evals: dict[int, dict[str, Any]],
    settings: list[Setting],
    bytes_per_token: dict[str, float],
    reference: str,
    *,
    replicates: int,
    seed: int,
    margin: float = 0.01,
) -> list[dict[str, Any]]:
    """One row per setting: bytes/token, perplexity and KL per seed (and their mean), differences to the
    reference with intervals, and whether it is as good as the reference (`as_good`, relative `margin`).
    evals[seed] is that seed's `evaluate` JSON, students labelled NAME-sSEED."""
    seeds = sorted(evals)
    windows: dict[str, dict[int, dict[str, list[float]]]] = {"perplexity": {}, "kl": {}}
    for s in seeds:
        models = evals[s]["models"]
        windows["perplexity"][s] = {st.name: models[f"{st.name}-s{s}"]["window_nll"] for st in settings}
        windows["kl"][s] = {st.name: models[f"{st.name}-s{s}"]["window_kl_fused"] for st in settings}
    rows = []
    for st in settings:
        row: dict[str, Any] = {
            "setting": st.name,
            "series": st.series,
            "bytes_per_token": bytes_per_token[st.name],
        }
        for metric, key in (("perplexity", "perplexity"), ("kl", "kl_fused")):
            per_seed = {s: evals[s]["models"][f"{st.name}-s{s}"][key] for s in seeds}
            row[metric] = {"per_seed": per_seed, "mean": float(np.mean(list(per_seed.values())))}
            if st.name != reference:
                row[metric]["vs_reference"] = versus(
                    windows[metric], st.name, reference, metric, replicates=replicates, seed=seed
                )
        if st.name == reference:
            row["as_good"] = None
        else:
            ref_values = {}
            for metric, key in (("perplexity", "perplexity"), ("kl", "kl_fused")):
                per_seed = {f"s{s}": evals[s]["models"][f"{reference}-s{s}"][key] for s in seeds}
                ref_values[metric] = {**per_seed, "pooled": float(np.mean(list(per_seed.values())))}
            row["as_good"] = all(
                as_good(row[metric]["vs_reference"], ref_values[metric], margin)
                for metric in ("perplexity", "kl")
            )
        rows.append(row)
    return rows


def _iv(d: dict[str, float], nd: int) -> str:
    return f"{d['difference']:+.{nd}f} [{d['low']:+.{nd}f}, {d['high']:+.{nd}f}]"


def format_table(rows: list[dict[str, Any]], reference: str) -> str:
    """Markdown: setting, bytes/token, perplexity and KL (mean over seeds, then each seed), and each difference to
    the reference with its interval (per seed, pooled)."""
    seeds = sorted(rows[0]["perplexity"]["per_seed"])
    keys = [f"s{s}" for s in seeds] + (["pooled"] if len(seeds) > 1 else [])
    seed_names = "/".join(f"seed {s}" for s in seeds)
    head = ["setting", "B/token", f"ppl mean ({seed_names})", f"KL mean ({seed_names})"]
    head += [f"ppl - {reference} {k}" for k in keys] + [f"KL - {reference} {k}" for k in keys] + ["as good"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 3 + "---|" * (2 * len(keys) + 1)]
    for r in rows:
        ppl, kl = r["perplexity"], r["kl"]
        cells = [
            r["setting"],
            f"{r['bytes_per_token']:.1f}",
            f"{ppl['mean']:.2f} (" + "/".join(f"{v:.2f}" for v in ppl["per_seed"].values()) + ")",
            f"{kl['mean']:.4f} (" + "/".join(f"{v:.4f}" for v in kl["per_seed"].values()) + ")",
        ]
        if r["as_good"] is None:
            cells += ["reference"] * (2 * len(keys)) + ["-"]
        else:
            cells += [_iv(ppl["vs_reference"][k], 2) for k in keys] + [
                _iv(kl["vs_reference"][k], 4) for k in keys
            ]
            cells.append("yes" if r["as_good"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], reference: str, budget: float) -> str:
    """The goal's line: the cheapest setting at <= budget bytes/token that is as good as the reference."""
    ok = sorted(
        (r for r in rows if r["as_good"] and r["bytes_per_token"] <= budget),
        key=lambda r: r["bytes_per_token"],
    )
    ref = next(r for r in rows if r["setting"] == reference)
    if not ok:
        return (
            f"goal NOT reached: no setting at <= {budget:g} B/token is as good as {reference} "
            f"({ref['bytes_per_token']:.1f} B/token) on both perplexity and KL"
        )
    names = ", ".join(f"{r['setting']} ({r['bytes_per_token']:.1f} B/token)" for r in ok)
    return (
        f"goal reached: as good as {reference} ({ref['bytes_per_token']:.1f} B/token) at <= {budget:g} B/token: "
        f"{names}"
    )


def plot(rows: list[dict[str, Any]], reference: str, path: str, title: str) -> None:
    """Two panels, KL and perplexity minus the reference (pooled over seeds, 95% interval) against bytes/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(r for r in rows if r["setting"] == reference)
    xs_all = [r["bytes_per_token"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "kl", "KL to the teacher's full distribution"),
        (axes[1], "perplexity", "perplexity"),
    ):
        for series in dict.fromkeys(r["series"] for r in rows):
            marker = "s" if series == "sampled" else ("o" if series == "top-k" else "^")
            pts = sorted((r for r in rows if r["series"] == series), key=lambda r: r["bytes_per_token"])
            xs, ys, lo, hi = [], [], [], []
            for r in pts:
                xs.append(r["bytes_per_token"])
                if r["setting"] == reference:
                    ys.append(0.0)
                    lo.append(0.0)
                    hi.append(0.0)
                    continue
                ivs = r[metric]["vs_reference"]
                iv = ivs.get("pooled", next(iter(ivs.values())))
                ys.append(iv["difference"])
                lo.append(iv["difference"] - iv["low"])
                hi.append(iv["high"] - iv["difference"])
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=series)
            for r, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axvline(100.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ticks = [t for t in (10, 20, 30, 50, 100, 200, 300) if min(xs_all) / 1.5 <= t <= max(xs_all) * 1.5]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("cache bytes/token (Parquet, no pooled column)")
        ax.set_ylabel(f"{label} - {reference}'s ({ref[metric]['mean']:.4g})")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the stages ----------------------------------------------------------------------------------
class Times:
    """Wall seconds of each completed stage, kept in WORK/times.json so a resumed run reports them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, key: str, seconds: float) -> None:
        self.data[key] = seconds
        runner.write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")


def cache_run(args: argparse.Namespace, s: Setting, work: Path) -> runner.Run:
    """The `precompute` config of one setting's cache (`--targets topk --top-k K` or `--targets sampled --samples
    N`, --pool-layers none)."""
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig

    out = work / "caches" / s.name
    cfg = PrecomputeConfig(
        corpus=CorpusConfig(dataset=args.train_data, max_tokens=args.max_tokens),
        teacher=TeacherConfig(
            path=args.teacher, targets=s.targets, top_k=s.size if s.targets == "topk" else 64,
            samples=s.size if s.targets == "sampled" else 16, pool_layers=[], batch_size=args.precompute_batch_size,
            device=args.device,
        ),
        storage=StorageConfig(output=str(out), logprob_mantissa_bits=s.bits),
        seq_len=args.seq_len, num_slices=1, slice_index=0, progress=False,
    )
    return runner.precompute(cfg, work / "logs" / f"cache-{s.name}.log")


class SharedForward:
    """Computes caches in this process as `precompute` does (`run_precompute`, then the config file the CLI
    writes), with one teacher forward shared by all (memoised final hidden states, as
    benchmarks/sampled_caches.py does)."""

    def __init__(self, times: Times) -> None:
        self.times, self.memo, self.backend = times, {}, None

    def __call__(self, run: runner.Run) -> None:
        from benchmarks.sampled_caches import _memoised
        from teachers.backends import create_backend
        from teachers.precompute import run_precompute

        cfg = run.config
        if self.backend is None:
            self.backend = create_backend(cfg.teacher, seq_len=cfg.seq_len)
            self.backend.final_hidden = _memoised(self.backend.final_hidden, self.memo)
        self.backend.cfg = cfg.teacher  # the backend reads targets, top_k and samples from its config
        t0 = time.perf_counter()
        m = run_precompute(cfg, backend=self.backend)
        runner.record(run)
        self.times.record(f"cache {run.output.name}", time.perf_counter() - t0)
        print(f"[qpb] cache {run.output.name}: {m.num_sequences} sequences, "
              f"{m.total_bytes / m.num_tokens:.1f} B/token, {time.perf_counter() - t0:.0f} s", flush=True)


def student_run(args: argparse.Namespace, cache: Path, seed: int, out: Path) -> runner.Run:
    """The `train-student` config: identical for every setting but the cache (and the seed)."""
    from student.config import LossConfig, OptimConfig, TrainConfig

    warmup = args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps
    cfg = TrainConfig(
        teacher_data=[str(cache)], output=str(out), student=args.student_init,
        tokenizer=args.tokenizer or args.teacher,
        # one teacher gets weight 1 under any scheme; entropy keeps the configs equal to the recorded runs'
        loss=LossConfig(lambda_kd=args.lambda_kd, teacher_weighting="entropy"),
        optim=OptimConfig(lr=args.lr, warmup_steps=warmup), max_steps=args.max_steps, batch_size=args.batch_size,
        eval_sequences=8, eval_every=0, seed=seed, num_workers=0, device=args.device,
    )
    return runner.train(cfg, out.parent.parent / "logs" / f"train-{out.name}.log")


def train(run: runner.Runner, args: argparse.Namespace, settings: list[Setting], seed: int, work: Path,
          times: Times) -> None:
    for s in settings:
        t0 = time.perf_counter()
        spec = student_run(args, work / "caches" / s.name, seed, work / "runs" / f"{s.name}-s{seed}")
        computed = not spec.done()
        run.ensure(spec)
        if not computed:
            continue
        times.record(f"train {spec.output.name}", time.perf_counter() - t0)
        print(f"[qpb] student {spec.output.name}: {time.perf_counter() - t0:.0f} s", flush=True)


def evaluate(run: runner.Runner, args: argparse.Namespace, settings: list[Setting], seed: int, work: Path,
             times: Times) -> dict:
    """That seed's students against the live teacher at --top-k = vocab; the JSON reused when it has them all."""
    from student.evaluation.config import EvalConfig

    models = {f"{s.name}-s{seed}": work / "runs" / f"{s.name}-s{seed}" / "final" for s in settings}
    cfg = EvalConfig(
        students=[f"{k}={v}" for k, v in models.items()], teachers=[f"teacher={args.teacher}"],
        tokenizer=args.tokenizer or args.teacher, data=args.eval_data, max_tokens=args.eval_tokens,
        seq_len=args.seq_len, top_k=args.eval_top_k, bleu_prompts=0, bootstrap=args.bootstrap, device=args.device,
        output=str(work / f"eval-s{seed}.json"),
    )
    t0, reused = time.perf_counter(), len(run.reused)
    res = run.evaluate(cfg)
    if len(run.reused) == reused:  # scored now, not taken from an earlier report
        times.record(f"evaluate s{seed}", time.perf_counter() - t0)
    if res["kl_kind"] != "full":
        raise SystemExit(f"error: evaluate's KL is {res['kl_kind']!r}, not the full KL: raise --eval-top-k to the "
                         "teacher's vocab size")
    return res


def write_results(text: str) -> None:
    shared.replace_block(RESULTS, BEGIN, END, text, HEADER)
    print(f"[qpb] updated {RESULTS}")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {gpu}, torch {torch.__version__}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--teacher", required=True, help="teacher model directory (transformers), e.g. demo/teachers/smollm2"
    )
    ap.add_argument(
        "--student-init", required=True, help="the cut student (init-student output), e.g. demo/student-init"
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --teacher)")
    ap.add_argument(
        "--work", required=True, help="directory for caches, runs, logs and evaluation JSON (reused)"
    )
    ap.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="comma list of topK, topKbBITS (float16 with BITS mantissa bits), sampledN; must include "
        "--reference",
    )
    ap.add_argument("--reference", default="top64", help="the setting every other one is compared with")
    ap.add_argument("--budget", type=float, default=100.0, help="bytes/token of the goal line")
    ap.add_argument(
        "--margin",
        type=float,
        default=0.01,
        help="non-inferiority margin of 'as good as', relative to the reference's perplexity and KL",
    )
    ap.add_argument(
        "--train-data", default=str(ROOT / "data/corpus/train.jsonl"), help="corpus of the caches"
    )
    ap.add_argument("--max-tokens", type=int, default=18432, help="cached training tokens")
    ap.add_argument("--precompute-batch-size", type=int, default=4, help="sequences per teacher forward")
    add_options(ap, seq_len=256, batch_size=4, device="cpu")
    ap.add_argument("--seeds", default="0,1", help="comma list of student seeds (init RNGs and data order)")
    ap.add_argument("--max-steps", type=int, default=20, help="student optimizer steps")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--warmup-steps", type=int, default=None, help="warmup steps (default: max-steps // 10)")
    ap.add_argument("--lambda-kd", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument("--eval-data", default=str(ROOT / "data/corpus/validation.jsonl"), help="held-out text")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens")
    ap.add_argument(
        "--eval-top-k",
        type=int,
        default=49152,
        help="top-k of the live teacher in evaluate: the vocab size gives the full KL",
    )
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap replicates")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks/quality_per_byte.png"), help="PNG of the figure")
    ap.add_argument(
        "--write-results", action="store_true", help="replace the marked block in benchmarks/RESULTS.md"
    )
    runner.add_options(ap)
    return ap.parse_args(argv)


def report(args: argparse.Namespace, argv: list[str] | None, rows: list[dict[str, Any]], ev: dict, wall: float,
           times: Times) -> str:
    """The RESULTS block: machine and command, the setting, the table, the verdict and the figure."""
    cmd = "python benchmarks/quality_per_byte.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"{machine()}, {time.strftime('%Y-%m-%d')}; `{cmd}` (wall {wall / 60:.0f} min this invocation; "
        f"recorded stages {sum(times.data.values()) / 60:.0f} min in all).",
        "",
        f"Teacher {args.teacher} (float32); student {args.student_init}; caches of {args.max_tokens} tokens of "
        f"{Path(args.train_data).name} x seq_len {args.seq_len}, no pooled column; students: {args.max_steps} steps "
        f"of {args.batch_size} windows, lr {args.lr}, lambda_kd {args.lambda_kd}, seeds {args.seeds}. Held out: "
        f"{ev['windows']} windows x {ev['seq_len']} of {Path(args.eval_data).name}; KL = full KL(P_teacher || "
        f"P_student) (live teacher, top-k {ev['top_k']} = vocab, kl_kind {ev['kl_kind']}), mean over positions. "
        f"Differences are setting - {args.reference} with 95% paired-bootstrap intervals over windows "
        f'({args.bootstrap} replicates), per seed and pooled (per-window mean over seeds). "As good": every '
        f"interval's upper end below {100 * args.margin:g}% of {args.reference}'s value (non-inferiority).",
        "",
        format_table(rows, args.reference),
        "",
        verdict(rows, args.reference, args.budget) + ".",
        "",
        f"![quality against bytes/token]({Path(args.plot).name})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = [parse_setting(x) for x in args.settings.split(",") if x]
    names = [s.name for s in settings]
    if args.reference not in names:
        raise SystemExit(f"error: --reference {args.reference} is not among --settings {args.settings}")
    settings.sort(key=lambda s: s.name != args.reference)  # the reference first (evaluate compares with it)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    times = Times(work / "times.json")
    start = time.perf_counter()
    run = runner.from_args(args, "[qpb]")
    forward = SharedForward(times)
    for s in settings:
        run.ensure(cache_run(args, s, work), execute=forward)
    bpt = {}
    for s in settings:
        size, tokens = cache_bytes(work / "caches" / s.name)
        bpt[s.name] = size / tokens
    evals = {}
    for seed in seeds:
        train(run, args, settings, seed, work, times)
        evals[seed] = evaluate(run, args, settings, seed, work, times)
    rows = summarise(evals, settings, bpt, args.reference, replicates=args.bootstrap, seed=0, margin=args.margin)
    runner.write_atomic(work / "summary.json", json.dumps(rows, indent=1) + "\n")
    text = report(args, argv, rows, evals[seeds[0]], time.perf_counter() - start, times)
    print(text)
    plot(rows, args.reference, args.plot,
         f"{Path(args.student_init).name} trained {args.max_steps} steps on each cache, seeds {args.seeds}; "
         f"differences pooled over seeds, 95% paired bootstrap")
    print(f"[qpb] figure {args.plot}")
    if args.write_results:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
