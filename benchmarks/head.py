"""Peak memory and speed of the chunked targets head versus the naive dense head.

    python benchmarks/head.py                       # vocab 49152 and 151936, N = 2048 tokens, H = 576
    python benchmarks/head.py --tokens 1024 --vocab 49152 --chunks 256,1024
    python benchmarks/head.py --compiled 512        # adds chunk-512 rows with the compiled lse/entropy

Compiled rows (`targets_head(..., compile=True)`) compile on a warm-up call first; the compile time is
printed apart and not counted in seconds or peak.

Each configuration runs in a fresh child process; its peak memory is the growth of the process's peak
resident set (Linux VmHWM, reset through /proc/self/clear_refs right before the call) over its resident set
with the inputs already allocated, so it counts exactly what the head allocates. The dense head builds the
[N, V] float32 logits, their log-softmax and the entropy product, which is what "full logits" costs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shared import status_kib  # noqa: E402


def _dense(hidden, weight, k: int):
    import torch

    logits = (hidden @ weight.T).float()  # [N, V]
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    entropy = -(logp.exp() * logp).sum(-1)
    top_lp, top_ids = torch.topk(logp, k, dim=-1)
    return top_ids, top_lp, entropy


def _measure(n: int, vocab: int, hidden_size: int, k: int, chunk: int, compiled: bool, queue: mp.Queue) -> None:
    import torch

    from teachers.head import targets_head

    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.05
    run = (lambda: _dense(hidden, weight, k)) if chunk == 0 else (
        lambda: targets_head(hidden, weight, k=k, chunk_size=chunk, compile=compiled))
    compile_s = 0.0
    if compiled:
        t0 = time.perf_counter()
        targets_head(hidden[: min(n, 64)], weight, k=k, chunk_size=chunk, compile=True)
        compile_s = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode():
        run()
    seconds = time.perf_counter() - t0
    queue.put(((status_kib("VmHWM") - before) / 1024.0, seconds, compile_s))


def measure(n: int, vocab: int, hidden_size: int, k: int, chunk: int,
            compiled: bool = False) -> tuple[float, float, float]:
    """(peak MiB allocated by the head, seconds, compile seconds) in a fresh process; chunk 0 = dense."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(n, vocab, hidden_size, k, chunk, compiled, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens N (batch x seq_len)")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size H")
    ap.add_argument("--vocab", default="49152,151936", help="comma list of vocab sizes")
    ap.add_argument("--chunks", default="128,512,2048", help="comma list of chunk sizes")
    ap.add_argument("--k", type=int, default=64, help="top-k")
    ap.add_argument("--scale-tokens", type=int, default=8192,
                    help="also run the chunked head (chunk 512) at this many tokens, without dense (0: skip)")
    ap.add_argument("--compiled", default="", help="comma list of chunk sizes to run also with compile=True")
    ap.add_argument("--skip-dense", action="store_true", help="leave out the dense rows")
    args = ap.parse_args()
    print(f"targets head, N={args.tokens} tokens, H={args.hidden}, k={args.k}, CPU threads={os.cpu_count()}")
    print(f"{'vocab':>7} {'method':>21} {'tokens':>7} {'peak MiB':>9} {'N*V*4 MiB':>10} {'seconds':>8} "
          f"{'tok/s':>8} {'compile s':>10}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        configs = [] if args.skip_dense else [(args.tokens, 0, False)]
        configs += [(args.tokens, int(c), False) for c in args.chunks.split(",") if c]
        configs += [(args.tokens, int(c), True) for c in args.compiled.split(",") if c]
        if args.scale_tokens:
            configs.append((args.scale_tokens, 512, False))
        for n, chunk, compiled in configs:
            peak, seconds, compile_s = measure(n, vocab, args.hidden, args.k, chunk, compiled)
            name = "dense" if chunk == 0 else f"chunk {chunk}" + (" compiled" if compiled else "")
            print(f"{vocab:>7} {name:>21} {n:>7} {peak:>9.0f} {n * vocab * 4 / 2**20:>10.0f} {seconds:>8.2f} "
                  f"{n / seconds:>8.0f} {compile_s if compiled else float('nan'):>10.1f}", flush=True)


if __name__ == "__main__":
    main()
