"""Sparse KD loss overhead: a student step (forward + backward) with CE only vs CE + sparse KD, and loss memory.

    python benchmarks/loss_overhead.py                          # tiny and small presets, V=49152, 4 x 256, CPU
    python benchmarks/loss_overhead.py --presets small --steps 9 --teachers 3 --top-k 64

Times, on the same batch, `loss.backward()` of (a) `next_token_ce` alone and (b) `0.5 * CE + 0.5 * sparse_kl`
against K teachers' top-k (each teacher's own top-k plus its own tail bucket, entropy weights), as the
trainer's `DistillLoss` composes them. Steps alternate between (a) and (b) so a noisy machine slows both alike;
each figure is the median over --steps steps after one warm-up step each. The fusion itself runs in the data
loader workers, off the step, and is timed separately.

Memory: with the logits [B, L, V] given (a leaf that requires grad), the growth of the process RSS above its
level before the loss (sampled every 0.5 ms in a thread; large tensors are mmapped by glibc, so they show in
RSS while alive) during loss forward + backward, for CE only, sparse KD only and CE + KD, in bytes and in
units of B x L x V x 4 bytes (one float32 copy of the logits). The logits and their gradient buffer are
counted in that growth only for the gradient (the logits exist before).

Allocator: with glibc's default malloc every tensor above 32 MiB is a fresh mmap, so each [B, L, V] temporary
costs page faults that can dominate a CPU step (high system time). To time the arithmetic instead, keep
freed memory in the heap: `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python ...`; the RSS
figures are only meaningful with the default allocator (memory freed to the OS when a tensor dies).

Chunked loss (`--loss-chunk-size`, student/loss/chunked.py): the same CE + KD computed from the final hidden states
in chunks of --chunk-size positions under activation checkpointing; its step time is the third column, and
the memory table compares CE + KD from given hidden states [B, L, H] and lm_head weight (H = 256), unchunked
(logits = h @ W.T materialised) against chunked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shared import add_options  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS growth over the `with` block, sampled in a thread."""

    def __enter__(self) -> PeakRSS:
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def make_fused(n: int, vocab: int, teachers: int, k: int, seed: int):
    """Fused targets of `teachers` synthetic teachers whose top-k lists overlap like related LMs do."""
    import torch

    from student.fusion import fuse_topk, teacher_weights

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, vocab, generator=g) * 2.5
    ids, lps, ents = [], [], []
    for _ in range(teachers):
        z = base + torch.randn(n, vocab, generator=g)
        logp = torch.log_softmax(z, dim=-1)
        lp, i = torch.topk(logp, k, dim=-1)
        ids.append(i.int())
        lps.append(lp.half())
        ents.append(-(logp.exp() * logp).sum(-1))
        del z, logp
    t0 = time.perf_counter()
    fused = fuse_topk(ids, lps, teacher_weights(torch.stack(ents, dim=1), "entropy"))
    return fused, time.perf_counter() - t0


@dataclass
class Bench:
    """The batch, the fused targets and the options every measurement shares."""

    args: argparse.Namespace
    input_ids: object  # [B, L] int64
    fused: object  # FusedTargets over B x L positions
    g: object  # torch.Generator of the random logits and hidden states

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, L, V = self.args.batch_size, self.args.seq_len, self.args.vocab
        return b, L, V, b * L

    def ce_loss(self, logits):
        from student.loss.terms import next_token_ce

        return next_token_ce(logits, self.input_ids)

    def kd_loss(self, logits):
        from student.loss.terms import next_token_ce, sparse_kl

        n, V = self.shape[3], self.shape[2]
        return 0.5 * next_token_ce(logits, self.input_ids) + 0.5 * sparse_kl(logits.reshape(n, V), self.fused)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], help="student presets (student/model.py)")
    add_options(ap, vocab=49152, seq_len=256, batch_size=4)
    ap.add_argument("--teachers", type=int, default=3, help="teachers fused")
    add_options(ap, top_k=64)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant (median)")
    add_options(ap, threads=1)
    ap.add_argument("--chunk-size", type=int, default=256, help="positions per chunk for the chunked loss")
    return ap.parse_args()


def main() -> None:
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    b, L, V = args.batch_size, args.seq_len, args.vocab
    n = b * L
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, V, (b, L), generator=g)
    fused, fuse_s = make_fused(n, V, args.teachers, args.top_k, seed=1)
    print(f"CPU, torch {torch.__version__}, threads={torch.get_num_threads()}, cores={os.cpu_count()}; "
          f"batch {b} x {L}, vocab {V}; {args.teachers} teachers x top-{args.top_k} = {fused.ids.shape[1]} "
          f"slots + {fused.num_teachers} tails (fusion {fuse_s * 1e3:.0f} ms, in the loader workers); "
          f"median of {args.steps} steps")
    bench = Bench(args, input_ids, fused, g)
    step_times(bench)
    peak_given_logits(bench)
    peak_given_hidden(bench)


def step_times(bench: Bench) -> None:
    """Per preset: the median step time of CE, CE + KD and chunked CE + KD, and the KD term alone."""
    import torch

    from student.loss.chunked import chunked_ce_kd
    from student.loss.terms import sparse_kl
    from student.model import PRESETS, build_student

    args, input_ids, fused, g = bench.args, bench.input_ids, bench.fused, bench.g
    b, L, V, n = bench.shape
    ce_loss, kd_loss = bench.ce_loss, bench.kd_loss
    print()
    print(f"{'student':<34} {'params':>8} {'CE step ms':>11} {'CE+KD step ms':>14} {'overhead':>9} "
          f"{'KD loss f+b ms':>15} {'chunked CE+KD ms':>17} {'overhead':>9}")

    def chunked_step(model) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        ce, kd = chunked_ce_kd(hidden, model.get_output_embeddings().weight, input_ids, fused,
                               chunk_size=args.chunk_size)
        (0.5 * ce + 0.5 * kd).backward()
        return time.perf_counter() - t0

    for preset in args.presets:
        model = build_student(preset, vocab_size=V, seq_len=L, seed=0)
        model.train()
        params = sum(p.numel() for p in model.parameters())
        cfg = PRESETS[preset]

        def step(model, loss_fn) -> float:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logits = model(input_ids=input_ids, use_cache=False).logits
            loss_fn(logits).backward()
            return time.perf_counter() - t0

        step(model, ce_loss), step(model, kd_loss), chunked_step(model)  # warm-up
        ce_t, kd_t, ch_t = [], [], []
        for _ in range(args.steps):
            ce_t.append(step(model, ce_loss))
            kd_t.append(step(model, kd_loss))
            ch_t.append(chunked_step(model))
        # the KD term alone on given logits (forward + backward), for reference
        leaf = torch.randn(b, L, V, generator=g, requires_grad=True)
        kl_t = []
        for _ in range(args.steps):
            leaf.grad = None
            t0 = time.perf_counter()
            sparse_kl(leaf.reshape(n, V), fused).backward()
            kl_t.append(time.perf_counter() - t0)
        ce_m, kd_m, ch_m = statistics.median(ce_t), statistics.median(kd_t), statistics.median(ch_t)
        name = f"{preset} (H={cfg['hidden_size']}, {cfg['num_hidden_layers']} layers)"
        print(f"{name:<34} {params / 1e6:>7.1f}M {ce_m * 1e3:>11.0f} {kd_m * 1e3:>14.0f} "
              f"{100 * (kd_m - ce_m) / ce_m:>8.1f}% {statistics.median(kl_t) * 1e3:>15.0f} "
              f"{ch_m * 1e3:>17.0f} {100 * (ch_m - ce_m) / ce_m:>8.1f}%")
        del model, leaf


def peak_given_logits(bench: Bench) -> None:
    """Peak RSS growth of each loss term, forward + backward on given logits [B, L, V] float32."""
    import torch

    from student.loss.terms import sparse_kl

    fused, g = bench.fused, bench.g
    b, L, V, n = bench.shape
    unit = b * L * V * 4
    ce_loss, kd_loss = bench.ce_loss, bench.kd_loss
    print()
    print(f"peak RSS growth of the loss terms, forward + backward on given logits [B, L, V] float32 "
          f"(B x L x V x 4 = {unit / 2**20:.0f} MiB)")
    print(f"{'loss':<16} {'MiB':>8} {'x BLV4':>8}")
    for name, fn in (("CE only", ce_loss), ("sparse KD only", lambda x: sparse_kl(x.reshape(n, V), fused)),
                     ("CE + KD", kd_loss)):
        growths = []
        for _ in range(3):
            leaf = torch.randn(b, L, V, generator=g, requires_grad=True)
            with PeakRSS() as m:
                fn(leaf).backward()
            growths.append(m.growth)
            del leaf
        peak = min(growths)  # least disturbed by allocator noise
        print(f"{name:<16} {peak / 2**20:>8.0f} {peak / unit:>8.2f}")


def peak_given_hidden(bench: Bench) -> None:
    """Peak RSS growth of CE + KD from given hidden states and lm_head weight, unchunked and chunked."""
    import torch

    from student.loss.chunked import chunked_ce_kd
    from student.loss.terms import next_token_ce, sparse_kl

    args, input_ids, fused, g = bench.args, bench.input_ids, bench.fused, bench.g
    b, L, V, n = bench.shape
    unit = b * L * V * 4
    width = 256
    print()
    print(f"peak RSS growth, CE + KD from given hidden states [B, L, {width}] and lm_head weight [V, {width}], "
          f"forward + backward (the [B, L, V] logits are part of the loss here)")
    print(f"{'loss':<34} {'MiB':>8} {'x BLV4':>8}")

    def from_hidden(h, w):
        logits = h @ w.T
        return 0.5 * next_token_ce(logits, input_ids) + 0.5 * sparse_kl(logits.reshape(n, V), fused)

    def from_hidden_chunked(h, w):
        ce, kd = chunked_ce_kd(h, w, input_ids, fused, chunk_size=args.chunk_size)
        return 0.5 * ce + 0.5 * kd

    for name, fn in (("unchunked", from_hidden), (f"chunked ({args.chunk_size} positions)", from_hidden_chunked)):
        growths = []
        for _ in range(3):
            h = torch.randn(b, L, width, generator=g, requires_grad=True)
            w = (torch.randn(V, width, generator=g) * 0.05).requires_grad_()
            with PeakRSS() as m:
                fn(h, w).backward()
            growths.append(m.growth)
            del h, w
        peak = min(growths)
        print(f"{name:<34} {peak / 2**20:>8.0f} {peak / unit:>8.2f}")


if __name__ == "__main__":
    main()
