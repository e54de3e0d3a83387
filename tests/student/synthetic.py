"""Synthetic teacher caches for stage-two tests, written with storage.writer.TargetsWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.manifest import ALIGNMENT_STATS, Manifest, TeacherInfo
from storage.records import TeacherTargets


def make_cache(path: str | Path, *, name: str = "t", seed: int = 0, n: int = 24, seq_len: int = 16,
               vocab: int = 64, k: int = 8, data_seed: int = 123, entropy: bool = True,
               pooled: dict[int, int] | None = None, shard_size: int = 8, temperature: float = 1.0,
               tokenizer_fingerprint: str = "tok", corpus_fingerprint: str = "corpus",
               first_seq: int = 0, tamper_input_seq: int | None = None, observed: bool = False,
               aligned: bool = False) -> Path:
    """A cache of `n` sequences: input_ids from `data_seed` (shared between teachers), targets from a
    random dense distribution per position (seed `seed`), top-k of it, exact entropy, pooled states.

    observed: also store `observed_logprob` (the dense log-prob of the next input id, NaN at the last position),
    as precompute now does. aligned: an aligned cache (manifest `alignment`): a seeded ~70% of positions have a
    target (`target_mask`; elsewhere ids 0..k-1, log-probs -inf, entropy NaN) and `observed_logprob` is exact at
    a seeded ~80% of those, NaN elsewhere."""
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
    nxt = np.concatenate([input_ids[:, 1:], input_ids[:, :1]], axis=1)
    obs = np.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]  # [n, L] exact log p(o)
    obs[:, -1] = np.nan
    mask = None
    if aligned:
        rng_mask = np.random.default_rng(seed + 1000)
        mask = (rng_mask.random((n, seq_len)) < 0.7).astype(np.uint8)
        order = np.where(mask[..., None] != 0, order, np.arange(k))
        topk_lp = np.where(mask[..., None] != 0, topk_lp, -np.inf)
        ent = np.where(mask != 0, ent, np.nan)
        obs = np.where((mask != 0) & (rng_mask.random((n, seq_len)) < 0.8), obs, np.nan)
    extra = dict(alignment={"tokenizer": "s", "teacher_tokenizer_fingerprint": "t"}) if aligned else {}
    header = Manifest(
        teacher=TeacherInfo(name=name, path=f"synthetic/{name}"), tokenizer_fingerprint=tokenizer_fingerprint,
        vocab_size=vocab, seq_len=seq_len, top_k=k, temperature=temperature, logprob_dtype="float32",
        entropy_kind="exact" if entropy else "absent", pooled_layers=sorted(pooled), pooled_dims=dict(pooled),
        corpus_fingerprint=corpus_fingerprint, shard_size=shard_size, observed_logprob=observed and not aligned,
        **extra,
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
                observed_logprob=obs[start:stop].astype(np.float32) if observed or aligned else None,
                target_mask=None if mask is None else mask[start:stop],
                stats=None if mask is None else {key: np.zeros(stop - start) for key in ALIGNMENT_STATS},
            ))
    return Path(path)
