"""Write sampled caches for several N with one teacher forward (for benchmarks/storage.py --compare).

    python benchmarks/sampled_caches.py --teacher "$SMOL" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dataset data/corpus/validation.jsonl --seq-len 512 --max-tokens 16384 --samples 8,16,32,64 \\
        --output /tmp/sampled      # -> /tmp/sampled/n8, /tmp/sampled/n16, ...

Each cache is what `precompute --targets sampled --samples N` writes with the same options: the same
run_precompute, backend, targets head, seed rule and writer; only the teacher's final hidden states are
computed once (for the first N) and reused for the others, which changes no stored byte because the head
sees the same hidden states in the same batches. On a shared CPU the forward dominates, so this saves
(len(samples) - 1) forwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _memoised(forward, memo: dict):
    """`forward(input_ids)` computed once per distinct batch of ids (keyed by their bytes)."""

    def final_hidden(input_ids):
        key = input_ids.cpu().numpy().tobytes()
        if key not in memo:
            memo[key] = forward(input_ids)
        return memo[key]

    return final_hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher directory or hub id")
    ap.add_argument("--gguf-file", default=None, help="GGUF file inside --teacher")
    ap.add_argument("--dataset", required=True, help="corpus (as for precompute)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--max-tokens", type=int, default=16384, help="tokens of the corpus used")
    ap.add_argument("--samples", default="8,16,32,64", help="comma list of N")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    ap.add_argument("--output", required=True, help="parent directory; cache N goes to OUTPUT/nN")
    args = ap.parse_args()

    import torch

    from common.corpus import CorpusConfig
    from teachers.backends import create_backend
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    ns = [int(x) for x in args.samples.split(",")]
    memo: dict[bytes, torch.Tensor] = {}
    backend = None
    for n in ns:
        cfg = PrecomputeConfig(
            corpus=CorpusConfig(dataset=args.dataset, max_tokens=args.max_tokens),
            teacher=TeacherConfig(path=args.teacher, gguf_file=args.gguf_file, targets="sampled", samples=n,
                                  batch_size=args.batch_size, device="cpu"),
            storage=StorageConfig(output=os.path.join(args.output, f"n{n}")),
            seq_len=args.seq_len, num_slices=1, slice_index=0, progress=False)
        if backend is None:
            backend = create_backend(cfg.teacher, seq_len=args.seq_len)
            backend.final_hidden = _memoised(backend.final_hidden, memo)
        backend.cfg = cfg.teacher  # the backend reads targets and samples from its config
        t0 = time.perf_counter()
        m = run_precompute(cfg, backend=backend)
        print(f"N={n}: {m.num_sequences} sequences, {m.total_bytes / m.num_tokens:.1f} bytes/token, "
              f"{time.perf_counter() - t0:.0f} s -> {cfg.storage.output}", flush=True)


if __name__ == "__main__":
    main()
