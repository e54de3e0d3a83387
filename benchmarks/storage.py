"""Storage benchmark: bytes/token, write and read MB/s, random read latency, for every shard layout variant.

    python benchmarks/storage.py                 # L=512, k=64, vocab 49152, 256 sequences, float16 log-probs
    python benchmarks/storage.py --sequences 64  # quicker
    python benchmarks/storage.py --from-cache caches/smollm2 --remap-vocab 151936   # a real teacher's targets
    python benchmarks/storage.py --compare top64=caches/smollm2 --keep-k 8,32,64 \
        --compare sampled16=caches/smollm2-sampled16 ...          # bytes/token of several caches side by side

With --from-cache, the targets are those of an existing teacher cache (best written with
`precompute --logprob-dtype float32`, so the rounding variants start from exact values); --remap-vocab N maps
its token ids through a random one-to-one map into 0..N-1, to see what a larger vocabulary (Qwen: 151,936)
costs in id bytes.

With --compare NAME=DIR (repeatable), each cache's first --sequences sequences are re-written in the default
Parquet and Zarr layouts and bytes/token are reported per cache and per column; a top-k cache is also
written truncated to each --keep-k (the first k of a sorted top-K list are the top-k list); for a sampled
cache, a second Parquet layout (the N raw draws sorted, int32, no counts column) is measured beside the
default (distinct ids + uint16 counts).

Data is synthetic but LM-like (not uniform noise): input tokens follow a Zipf law over the vocab; each
position's next-token distribution is Zipf-like over ranks, p(r) ~ r^-s with a per-position sharpness s
(s ~ 1 + Exp(1.5): top-1 carries most of the mass at most positions, some positions are diffuse), with noise
on the log-probs; top-1 is the actual next token 60% of the time; top-k ids are distinct and drawn from the
Zipf token distribution; entropy is that of the Zipf law (float32); one pooled layer d=576 with
heavy-tailed per-dimension scales. MB/s are over the raw (uncompressed) array bytes. "write MB per CPU-s" divides
by the CPU time the process spent while writing (producer and writer threads together): what the writer
sustains per core when other jobs share the machine, where wall-clock MB/s only measures the contention.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shared import add_options  # noqa: E402
from storage import parquet, zarr_shard  # noqa: E402
from storage.manifest import SAMPLE_SEED_RULE, Manifest, TeacherInfo  # noqa: E402
from storage.reader import TeacherDataset  # noqa: E402
from storage.records import TeacherTargets  # noqa: E402
from storage.writer import TargetsWriter  # noqa: E402


def zipf_targets(n: int, L: int, k: int, vocab: int, d: int, seed: int = 0) -> TeacherTargets:
    rng = np.random.default_rng(seed)
    rank_to_id = rng.permutation(vocab).astype(np.int32)
    token_p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    token_cdf = np.cumsum(token_p / token_p.sum())

    def tokens(shape):
        return rank_to_id[np.minimum(np.searchsorted(token_cdf, rng.random(shape)), vocab - 1)]

    input_ids = tokens((n, L))
    # next-token distributions: log p(r) = -s log r - log Z(s), noisy, re-sorted
    s = 1.0 + rng.exponential(1.5, (n, L, 1))
    grid = np.linspace(1.0, s.max() + 1e-6, 512)
    log_r = np.log(np.arange(1, vocab + 1, dtype=np.float64))
    log_z = np.array([np.log(np.exp(-g * log_r).sum()) for g in grid])
    ent = np.array([(np.exp(-g * log_r - lz) * (g * log_r + lz)).sum() for g, lz in zip(grid, log_z, strict=True)])
    lz = np.interp(s, grid, log_z)
    logp = -s * log_r[:k] - lz + rng.normal(0.0, 0.3, (n, L, k)) * (np.arange(k) > 0)
    logp = -np.sort(-logp, axis=-1)
    entropy = np.interp(s[..., 0], grid, ent).astype(np.float32)
    # distinct top-k ids from the token distribution, top-1 = the actual next token 60% of the time
    ids = tokens((n, L, k))
    srt = np.sort(ids, axis=-1)
    dup = np.zeros_like(ids, dtype=bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    srt[dup] = rng.integers(0, vocab, int(dup.sum()), dtype=np.int32)
    ids = np.take_along_axis(srt, np.argsort(rng.random(srt.shape), axis=-1), axis=-1)
    nxt = np.concatenate([input_ids[:, 1:], tokens((n, 1))], axis=1)
    hit = rng.random((n, L)) < 0.6
    ids[..., 0] = np.where(hit, nxt, ids[..., 0])
    scale = np.exp(rng.normal(0.0, 1.0, d)).astype(np.float32)
    return TeacherTargets(
        seq_ids=np.arange(n, dtype=np.int64), input_ids=input_ids, topk_ids=ids.astype(np.int32),
        topk_logprobs=logp.astype(np.float16), entropy=entropy,
        pooled={12: (rng.standard_normal((n, d)).astype(np.float32) * scale)},
    )


def header(fmt: str, targets: TeacherTargets, vocab: int, shard_size: int, bits: int | None = None) -> Manifest:
    _, L, k = (targets.sample_ids if targets.sampled else targets.topk_ids).shape
    kind = dict(target_kind="sampled", samples=k, sample_seed=SAMPLE_SEED_RULE) if targets.sampled else {}
    return Manifest(format=fmt, teacher=TeacherInfo(name="bench", path="synthetic"), tokenizer_fingerprint="t",
                    vocab_size=vocab, seq_len=L, top_k=k, **kind, logprob_dtype="float16", logprob_mantissa_bits=bits,
                    entropy_kind="exact" if targets.entropy is not None else "absent",
                    pooled_layers=sorted(targets.pooled),
                    pooled_dims={layer: a.shape[1] for layer, a in targets.pooled.items()},
                    corpus_fingerprint="c", shard_size=shard_size)


def from_cache(path: str, sequences: int, remap_vocab: int | None) -> tuple[TeacherTargets, int]:
    """The first `sequences` sequences of a teacher cache (log-probs as stored) and its vocab size."""
    ds = TeacherDataset.open(path)
    t = ds.read(np.arange(min(sequences, len(ds))))
    vocab = ds.manifest.vocab_size
    if remap_vocab is not None:
        if remap_vocab < vocab:
            raise SystemExit(f"--remap-vocab {remap_vocab} is smaller than the cache's vocab {vocab}")
        mapping = np.random.default_rng(0).permutation(remap_vocab)[:vocab].astype(np.int32)
        t = dataclasses.replace(t, input_ids=mapping[t.input_ids], topk_ids=mapping[t.topk_ids])
        vocab = remap_vocab
    t = dataclasses.replace(t, seq_ids=np.arange(len(t), dtype=np.int64))
    return t, vocab


@contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _blosc(shuffle: str):
    from zarr.codecs import BloscCodec, Crc32cCodec

    return lambda: [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle), Crc32cCodec()]


VARIANTS = {
    # name: (format, module, attribute, value[, log-prob mantissa bits])
    "parquet / no BSS": ("parquet", parquet, "BYTE_STREAM_SPLIT", ()),
    "parquet / BSS floats": ("parquet", parquet, "BYTE_STREAM_SPLIT", ("topk_logprobs", "entropy", "pooled_*")),
    "parquet / BSS ints": ("parquet", parquet, "BYTE_STREAM_SPLIT", ("input_ids", "topk_ids")),
    "parquet / BSS all": ("parquet", parquet, "BYTE_STREAM_SPLIT",
                         ("input_ids", "topk_ids", "topk_logprobs", "entropy", "pooled_*")),
    "parquet / default (BSS on ints, log-probs, entropy)": ("parquet", parquet, "BYTE_STREAM_SPLIT", None),
    "parquet / default / 16 seq per row group": ("parquet", parquet, "ROWS_PER_ROW_GROUP", 16),
    "parquet / default, log-probs 8 mantissa bits": ("parquet", parquet, "BYTE_STREAM_SPLIT", None, 8),
    "parquet / default, log-probs 7 mantissa bits": ("parquet", parquet, "BYTE_STREAM_SPLIT", None, 7),
    "zarr / zstd + checksum": ("zarr", zarr_shard, "default_compressors", zarr_shard.zstd_compressors),
    "zarr / default (blosc-zstd shuffle + crc32c)": ("zarr", zarr_shard, "default_compressors", None),
    # the layout before the sharding codec: one file per chunk (per sequence and array)
    "zarr / default, unsharded (one file per chunk)": ("zarr", zarr_shard, "SHARDED", False),
    "zarr / default, 1 encoder thread": ("zarr", zarr_shard, "WRITE_THREADS", 1),
    "zarr / default, 2 encoder threads": ("zarr", zarr_shard, "WRITE_THREADS", 2),
    # zarr's own `arr[...] = data` instead of the direct encoder (same bytes)
    "zarr / default, zarr's own chunk writes": ("zarr", zarr_shard, "chunk_encoder", lambda arr: None),
    "zarr / blosc-zstd bitshuffle + crc32c": ("zarr", zarr_shard, "default_compressors", _blosc("bitshuffle")),
    "zarr / default, log-probs 8 mantissa bits": ("zarr", zarr_shard, "default_compressors", None, 8),
}


def run_variant(name: str, targets: TeacherTargets, args, root: str) -> dict:
    fmt, module, attr, value, *bits = VARIANTS[name]
    h = header(fmt, targets, args.vocab, args.shard_size, bits[0] if bits else None)
    out = os.path.join(root, "".join(c if c.isalnum() else "_" for c in name))
    raw = sum(a.nbytes for a in (targets.seq_ids, targets.input_ids, targets.topk_ids, targets.topk_logprobs,
                                 targets.sample_ids, targets.sample_counts, targets.entropy,
                                 *targets.pooled.values()) if a is not None)
    write_times, cpu_times = [], []
    with patched(module, attr, getattr(module, attr) if value is None else value):
        for rep in range(args.repeat):  # the synthetic producer: whole shards as fast as the writer takes them
            if rep:
                shutil.rmtree(out)
            t0, c0 = time.perf_counter(), time.process_time()
            with TargetsWriter(out, h) as w:
                for g in range(0, len(targets), args.shard_size):
                    w.write_shard(g // args.shard_size, targets.slice(g, g + args.shard_size))
            m = w.close()
            write_times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    write_s = float(np.median(write_times))
    ds = TeacherDataset.open(out, verify=False)
    t0 = time.perf_counter()
    for start in range(0, len(ds), 32):
        got = ds.read(np.arange(start, min(start + 32, len(ds))))
    read_s = time.perf_counter() - t0
    ids = "sample_ids" if targets.sampled else "topk_ids"
    assert np.array_equal(getattr(got, ids), getattr(targets, ids)[-len(got):])
    rng = np.random.default_rng(1)
    ds = TeacherDataset.open(out, verify=False)
    for shard in range(len(m.shards)):  # open every shard once: measure reads, not opens
        ds.read([shard * args.shard_size])
    picks = rng.integers(0, len(ds), args.random_reads)
    t0 = time.perf_counter()
    for p in picks:
        ds.read([int(p)])
    random_ms = (time.perf_counter() - t0) * 1000 / args.random_reads
    columns = _column_bytes(out, m) if fmt == "parquet" else {}
    shutil.rmtree(out)
    return {"variant": name, "bytes_per_token": m.total_bytes / m.num_tokens, "write_mb_s": raw / write_s / 1e6,
            "write_mb_s_range": (raw / max(write_times) / 1e6, raw / min(write_times) / 1e6),
            "write_mb_cpu_s": raw / float(np.median(cpu_times)) / 1e6,
            "read_mb_s": raw / read_s / 1e6, "random_ms": random_ms, "columns": columns, "tokens": m.num_tokens}


def _column_bytes(out: str, m: Manifest) -> dict[str, float]:
    """Compressed bytes per token of each column (Parquet footer), summed over shards."""
    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for s in m.shards:
        meta = pq.ParquetFile(os.path.join(out, s.file)).metadata
        for rg in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return {k: v / m.num_tokens for k, v in sizes.items()}


def raw_draws_bytes(targets: TeacherTargets) -> float:
    """Parquet bytes/token of a sampled cache's draws stored as N sorted raw ids per position (int32, no counts
    column), with the default options (zstd 3, BYTE_STREAM_SPLIT, one row group per sequence)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    n_seq, L, n = targets.sample_ids.shape
    # each row's counts sum to N: repeating every id by its count gives exactly N draws per position
    draws = np.repeat(targets.sample_ids.reshape(-1), targets.sample_counts.reshape(-1).astype(np.int64))
    draws = np.sort(draws.reshape(n_seq * L, n), axis=1).astype(np.int32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(draws.reshape(-1)), L * n)
    buf = io.BytesIO()
    pq.write_table(pa.table({"sample_draws": col}), buf, compression="zstd", compression_level=parquet.ZSTD_LEVEL,
                   use_dictionary=False, use_byte_stream_split=["sample_draws.list.element"],
                   write_statistics=False, row_group_size=parquet.ROWS_PER_ROW_GROUP)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    size = sum(meta.row_group(i).column(0).total_compressed_size for i in range(meta.num_row_groups))
    return size / (n_seq * L)


def compare(args) -> None:
    """bytes/token of several caches (--compare NAME=DIR), default Parquet and Zarr layouts, per column."""
    rows = []
    keep = [int(x) for x in args.keep_k.split(",")] if args.keep_k else []
    for spec in args.compare:
        name, _, path = spec.partition("=")
        targets, vocab = from_cache(path, args.sequences, None)
        args.vocab = vocab
        variants = [(name, targets)]
        if not targets.sampled and keep:
            variants = [(f"{name} top-{k}", dataclasses.replace(targets, topk_ids=targets.topk_ids[..., :k].copy(),
                                                                topk_logprobs=targets.topk_logprobs[..., :k].copy()))
                        for k in keep if k <= targets.topk_ids.shape[-1]]
        for label, t in variants:
            t = dataclasses.replace(t, topk_logprobs=None if t.topk_logprobs is None
                                    else t.topk_logprobs.astype(np.float16))
            args.shard_size = min(args.shard_size, len(t))
            pq_row = run_variant("parquet / default (BSS on ints, log-probs, entropy)", t, args, args.root)
            zr_row = run_variant("zarr / default (blosc-zstd shuffle + crc32c)", t, args, args.root)
            extra = ""
            if t.sampled:
                counts = t.sample_counts.astype(np.int64)
                distinct = (counts > 0).sum(-1)
                raw = raw_draws_bytes(t)
                stored = pq_row["columns"]["sample_ids"] + pq_row["columns"]["sample_counts"]
                extra = (f"mean distinct ids {distinct.mean():.1f} of {counts.shape[-1]}; ids+counts "
                         f"{stored:.1f} B/token vs raw sorted draws {raw:.1f}")
            rows.append((label, pq_row, zr_row, extra))
    print("\n| cache | Parquet bytes/token | Zarr bytes/token | Parquet per column (B/token) | notes |")
    print("|---|---:|---:|---|---|")
    for label, p, z, extra in rows:
        cols = ", ".join(f"{c} {v:.1f}" for c, v in p["columns"].items())
        print(f"| {label} | {p['bytes_per_token']:.1f} | {z['bytes_per_token']:.1f} | {cols} | {extra} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=256, help="sequences written per variant")
    add_options(ap, seq_len=512, top_k=64, vocab=49152)
    ap.add_argument("--dim", type=int, default=576, help="pooled hidden size d")
    ap.add_argument("--shard-size", type=int, default=128, help="sequences per shard")
    ap.add_argument("--repeat", type=int, default=1,
                    help="write each variant this many times: write MB/s is the median, with the range beside it")
    ap.add_argument("--random-reads", type=int, default=200, help="random single-sequence reads timed")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="subset of the variants, separated by ;")
    ap.add_argument("--from-cache", default=None, help="use the targets of this teacher cache, not synthetic ones")
    ap.add_argument("--remap-vocab", type=int, default=None,
                    help="with --from-cache: map token ids one-to-one into a vocab of this size")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                    help="compare the bytes/token of these caches (repeatable); skips the variant table")
    ap.add_argument("--keep-k", default=None, help="with --compare: also truncate top-k caches to these k (comma list)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.compare:
        args.root = args.dir or tempfile.mkdtemp(prefix="storage-bench-")
        compare(args)
        if args.dir is None:
            shutil.rmtree(args.root, ignore_errors=True)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        return
    if args.from_cache:
        targets, args.vocab = from_cache(args.from_cache, args.sequences, args.remap_vocab)
        source = f"teacher cache {args.from_cache}" + (f", ids remapped into {args.vocab}" if args.remap_vocab else "")
    else:
        targets = zipf_targets(args.sequences, args.seq_len, args.top_k, args.vocab, args.dim)
        source = "synthetic Zipf targets"
    n, L, k = targets.topk_ids.shape
    args.shard_size = min(args.shard_size, n)
    mass = np.exp(targets.topk_logprobs.astype(np.float64)).sum(-1)
    top1 = np.exp(targets.topk_logprobs[..., 0].astype(np.float64))
    entropy = f"{targets.entropy.mean():.2f} nats" if targets.entropy is not None else "absent"
    print(f"data ({source}): {n} x {L} tokens, k={k}, vocab={args.vocab}, "
          f"pooled {({layer: a.shape[1] for layer, a in targets.pooled.items()})}, log-probs {targets.topk_logprobs.dtype}; "
          f"median top-1 prob {np.median(top1):.2f}, median top-k mass {np.median(mass):.3f}, "
          f"mean entropy {entropy} ({time.perf_counter() - t0:.1f} s to load)")
    root = args.dir or tempfile.mkdtemp(prefix="storage-bench-")
    load0 = os.getloadavg()[0]
    rows = [run_variant(name, targets, args, root) for name in args.variants.split(";")]
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average before / after: {load0:.1f} / {os.getloadavg()[0]:.1f}; write MB/s: median of "
          f"{args.repeat} (min-max)")
    print("\n| variant | bytes/token | write MB/s | write MB per CPU-s | read MB/s | random read ms/seq |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["write_mb_s_range"]
        spread = f" ({lo:.0f}-{hi:.0f})" if args.repeat > 1 else ""
        print(f"| {r['variant']} | {r['bytes_per_token']:.1f} | {r['write_mb_s']:.0f}{spread} | "
              f"{r['write_mb_cpu_s']:.0f} | {r['read_mb_s']:.0f} | {r['random_ms']:.2f} |")
    parquet_rows = [r for r in rows if r["columns"]]
    if parquet_rows:
        names = list(parquet_rows[0]["columns"])
        print("\nParquet compressed bytes/token per column\n\n| variant | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for r in parquet_rows:
            print(f"| {r['variant']} | " + " | ".join(f"{r['columns'][n]:.2f}" for n in names) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
