"""Shared helpers for storage tests: a small header, random targets that fit it, damage helpers."""

from __future__ import annotations

import numpy as np

from storage.manifest import SAMPLE_SEED_RULE, Manifest, TeacherInfo
from storage.records import TeacherTargets


def make_header(*, fmt: str = "parquet", seq_len: int = 16, top_k: int = 4, shard_size: int = 8,
                logprob_dtype: str = "float16", entropy_kind: str = "exact",
                pooled: dict[int, int] | None = None, slice_index: int = 0, num_slices: int = 1,
                **extra) -> Manifest:
    """A header for storage tests. A sliced header (num_slices > 1) defaults to schema v1, whose slice s of n
    owns shards g % n == s, so a few small shards spread over the slices; schema v2 (partition ownership)
    is exercised by the partition tests, which pass `schema_version=2, num_partitions=...`."""
    pooled = {2: 8, 5: 12} if pooled is None else pooled
    extra.setdefault("schema_version", 1 if num_slices > 1 else 2)
    if extra.get("target_kind") == "sampled":
        extra.setdefault("samples", top_k)
        extra.setdefault("sample_seed", SAMPLE_SEED_RULE)
    return Manifest(
        format=fmt, teacher=TeacherInfo(name="tiny", path="/models/tiny"), tokenizer_fingerprint="tok" * 4,
        vocab_size=100, seq_len=seq_len, top_k=top_k, logprob_dtype=logprob_dtype, entropy_kind=entropy_kind,
        pooled_layers=sorted(pooled), pooled_dims=dict(pooled), corpus_fingerprint="corpus" * 2,
        shard_size=shard_size, slice_index=slice_index, num_slices=num_slices, **extra,
    )


def make_targets(header: Manifest, index: int, rows: int | None = None, seed: int | None = None,
                 logprob_dtype: type = np.float32) -> TeacherTargets:
    """Random targets for global shard `index` (seq ids index*shard_size..), deterministic per seed."""
    rows = header.shard_size if rows is None else rows
    rng = np.random.default_rng(index if seed is None else seed)
    L, k, V = header.seq_len, header.top_k, header.vocab_size
    first = index * header.shard_size
    logits = rng.standard_normal((rows, L, k)) * 3
    logprobs = -np.sort(-(logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.5), axis=-1)
    common = dict(
        seq_ids=np.arange(first, first + rows, dtype=np.int64),
        input_ids=rng.integers(0, V, (rows, L), dtype=np.int32),
        entropy=None if header.entropy_kind == "absent" else rng.random((rows, L), dtype=np.float32) * 4,
        pooled={layer: rng.standard_normal((rows, d)).astype(np.float32)
                for layer, d in header.pooled_dims.items()},
    )
    if header.target_kind == "sampled":
        import torch

        from teachers.sampling import counts_of

        draws = torch.from_numpy(rng.integers(0, V, (rows * L, header.samples)))
        ids, counts = counts_of(draws)
        return TeacherTargets(**common, topk_ids=None, topk_logprobs=None,
                              sample_ids=ids.numpy().reshape(rows, L, k),
                              sample_counts=counts.numpy().astype(np.uint16).reshape(rows, L, k))
    return TeacherTargets(**common, topk_ids=rng.integers(0, V, (rows, L, k), dtype=np.int32),
                          topk_logprobs=logprobs.astype(logprob_dtype))


def write_run(output: str, header: Manifest, rows: list[int] | None = None,
              logprob_dtype: type = np.float32) -> tuple[Manifest, TeacherTargets]:
    """Write shards with the given row counts (default: two full shards and a partial one) through
    TargetsWriter; return the manifest and everything written, concatenated."""
    from storage.writer import TargetsWriter

    rows = [header.shard_size, header.shard_size, 3] if rows is None else rows
    parts = []
    with TargetsWriter(output, header) as writer:
        for index, n in enumerate(rows):
            if header.slice_of(index) != header.slice_index:
                continue
            part = make_targets(header, index, n, logprob_dtype=logprob_dtype)
            writer.write_shard(index, part)
            parts.append(part)
    return writer.close(), TeacherTargets.concat(parts)


def assert_targets_equal(got: TeacherTargets, want: TeacherTargets, header: Manifest) -> None:
    """Bit-for-bit equality (after the cast to the stored log-prob dtype)."""
    np.testing.assert_array_equal(got.seq_ids, want.seq_ids)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    if header.target_kind == "sampled":
        assert got.topk_ids is None and got.topk_logprobs is None
        assert got.sample_ids.dtype == np.int32 and got.sample_counts.dtype == np.uint16
        assert got.sample_ids.tobytes() == want.sample_ids.tobytes()
        assert got.sample_counts.tobytes() == want.sample_counts.tobytes()
        assert (got.sample_counts.sum(-1) == header.samples).all()
    else:
        stored = np.dtype(header.logprob_dtype)
        assert got.topk_logprobs.dtype == stored
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        assert got.topk_logprobs.tobytes() == want.topk_logprobs.astype(stored).tobytes()
    if want.entropy is None:
        assert got.entropy is None
    else:
        assert got.entropy.tobytes() == want.entropy.tobytes()
    assert sorted(got.pooled) == sorted(want.pooled)
    for layer in want.pooled:
        assert got.pooled[layer].tobytes() == want.pooled[layer].tobytes()


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate(path: str, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)
