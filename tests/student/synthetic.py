"""Synthetic teacher caches for stage-two tests, written with storage.writer.TargetsWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.manifest import Manifest, TeacherInfo
from storage.records import TeacherTargets


def make_cache(path: str | Path, *, name: str = "t", seed: int = 0, n: int = 24, seq_len: int = 16,
               vocab: int = 64, k: int = 8, data_seed: int = 123, entropy: bool = True,
               pooled: dict[int, int] | None = None, shard_size: int = 8, temperature: float = 1.0,
               tokenizer_fingerprint: str = "tok", corpus_fingerprint: str = "corpus",
               first_seq: int = 0, tamper_input_seq: int | None = None) -> Path:
    """A cache of `n` sequences: input_ids from `data_seed` (shared between teachers), targets from a
    random dense distribution per position (seed `seed`), top-k of it, exact entropy, pooled states."""
    from storage.writer import TargetsWriter

    pooled = pooled or {}
    rng_data = np.random.default_rng(data_seed)
    input_ids = rng_data.integers(0, vocab, size=(n, seq_len)).astype(np.int32)
    if tamper_input_seq is not None:
        input_ids[tamper_input_seq, 3] = (input_ids[tamper_input_seq, 3] + 1) % vocab
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, seq_len, vocab)) * (1.5 + seed % 3)
    logp = logits / temperature - np.log(np.exp(logits / temperature).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)[..., :k]
    topk_lp = np.take_along_axis(logp, order, axis=-1)
    ent = -(np.exp(logp) * logp).sum(-1)
    header = Manifest(
        teacher=TeacherInfo(name=name, path=f"synthetic/{name}"), tokenizer_fingerprint=tokenizer_fingerprint,
        vocab_size=vocab, seq_len=seq_len, top_k=k, temperature=temperature, logprob_dtype="float32",
        entropy_kind="exact" if entropy else "absent", pooled_layers=sorted(pooled), pooled_dims=dict(pooled),
        corpus_fingerprint=corpus_fingerprint, shard_size=shard_size,
    )
    seq_ids = np.arange(first_seq, first_seq + n, dtype=np.int64)
    assert first_seq % shard_size == 0
    with TargetsWriter(str(path), header, background=False) as w:
        for start in range(0, n, shard_size):
            stop = min(n, start + shard_size)
            w.write_shard(int(seq_ids[start]) // shard_size, TeacherTargets(
                seq_ids=seq_ids[start:stop], input_ids=input_ids[start:stop],
                topk_ids=order[start:stop].astype(np.int32), topk_logprobs=topk_lp[start:stop].astype(np.float32),
                entropy=ent[start:stop].astype(np.float32) if entropy else None,
                pooled={layer: rng.normal(size=(stop - start, d)).astype(np.float32) for layer, d in pooled.items()},
            ))
    return Path(path)
