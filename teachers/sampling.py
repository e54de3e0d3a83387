"""Sampled targets: N draws per position from the teacher's full softmax, stored as distinct ids and counts.

The estimator (Sparse Logit Sampling, Anshumann et al., ACL 2025, "random-sampling KD"): draw x_1..x_N
i.i.d. from a proposal q and estimate the teacher distribution p by importance weights,

    p_hat(y) = (1/N) * sum_j 1[x_j = y] * p(y) / q(y),          E_q[p_hat(y)] = p(y) for every y with q(y) > 0.

We draw from the proposal q = p itself, the teacher's softmax at the cache temperature tau (the same tau the
student is trained at; the trainer refuses another), so every importance weight p/q is 1 and

    p_hat(y) = count(y) / N                                      (what a sampled cache stores)

is exactly unbiased: count(y) ~ Binomial(N, p(y)), so E[count(y) / N] = p(y) and Var = p(y)(1 - p(y)) / N.
With a tempered proposal (q ∝ p^(1/t), t != 1) the weights p(y)/q(y) would have to be stored per drawn id
as well; this implementation does not offer that. The paper's equation could not be checked offline at the
time of writing: the formula above is the textbook importance-sampling estimator its abstract describes,
and its unbiasedness follows from linearity of expectation as shown. The KD gradient of
sum_y -p_hat(y) log q_S(y) is linear in p_hat, so its expectation is the dense KD gradient
(tests/teachers/test_sampling.py checks both in float64).

Draws are inverse-CDF samples: per position, the float64 cumulative sum of exp(z - max z) over the vocab
and one binary search per draw. The uniforms come from a counter-based generator keyed by (corpus
fingerprint, teacher name, teacher path, seq id, position, draw index) (manifest.SAMPLE_SEED_RULE), so a
position's uniforms depend neither on the chunk size, nor on the batch it was computed in, nor on slicing or
resuming; given the same logits its draws are the same (precompute's batches never cross a shard boundary,
so re-runs, slices and resumes are byte-identical; a different --batch-size can move a logit by one float32
ulp through the matmul's blocking and so, rarely, a draw sitting on a CDF step). Beyond the head's own [C, V] float32 logits, one chunk needs a [C, V] float32 exp and a [C, V]
float64 cumulative sum (peak about 4 x chunk x V x 4 bytes); nothing grows with the number of tokens.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from storage.manifest import MAX_SAMPLES

if TYPE_CHECKING:
    import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014) of uint64 values, elementwise (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def sample_key(corpus_fingerprint: str, teacher_name: str, teacher_path: str) -> int:
    """The 64-bit key of a run's draws: first 8 bytes (little-endian) of sha256(fp NUL name NUL path)."""
    digest = hashlib.sha256(f"{corpus_fingerprint}\0{teacher_name}\0{teacher_path}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_uniforms(key: int, seq_ids: np.ndarray, seq_len: int, samples: int) -> np.ndarray:
    """[B * L, samples] float64 uniforms in [0, 1) for positions 0..L-1 of each of `seq_ids` [B] (row-major).

    Row (s, t) is the SplitMix64 stream seeded by r = mix(mix(mix(key) ^ s) ^ t): draw j is
    (mix(r + (j + 1) * golden) >> 11) * 2**-53. A function of (key, s, t, j) alone.
    """
    with np.errstate(over="ignore"):
        seq = np.asarray(seq_ids, dtype=np.int64).astype(np.uint64)  # [B]
        base = _mix(np.full(1, key, dtype=np.uint64))
        r = _mix(_mix(base ^ seq)[:, None] ^ np.arange(seq_len, dtype=np.uint64)[None, :]).reshape(-1, 1)
        counters = (np.arange(1, samples + 1, dtype=np.uint64) * _GOLDEN)[None, :]  # [1, S]
        bits = _mix(r + counters) >> np.uint64(11)  # [B * L, S], 53 random bits
    return bits.astype(np.float64) * (2.0 ** -53)


def draws_from_logits(z: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[C, S] int64 ids drawn from softmax(z) by inverse CDF; z [C, V] float32, uniforms [C, S] float64 in [0, 1).

    An id whose exp(z - max z) underflows to 0 is never drawn (its CDF step is empty).
    """
    import torch

    peak = z.amax(dim=-1, keepdim=True)
    return _draws_from_cdf((z - peak).exp_().to(torch.float64).cumsum_(dim=-1), uniforms)


def _draws_from_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[C, S] int64 inverse-CDF draws; cdf [C, V] float64 cumulative (unnormalised) mass, uniforms [C, S]."""
    import torch

    thresholds = uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1:]  # [C, S], < total
    # right=True: the first index whose cumulative mass exceeds the threshold
    idx = torch.searchsorted(cdf, thresholds, right=True)
    return idx.clamp_max_(cdf.shape[-1] - 1)


def counts_of(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids and their counts per row of `draws` [C, S] int64.

    Returns (ids [C, S] int32, counts [C, S] int32): distinct ids by descending count, ties by ascending id;
    the slots after the distinct ones repeat slot 0's id with count 0 (so a consumer that ignores counts of 0
    never sees an id that was not drawn).
    """
    import torch

    c, s = draws.shape
    srt, _ = draws.sort(dim=1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # [C, S]
    ids = torch.zeros((c, s), dtype=torch.int64, device=draws.device)
    ids.scatter_(1, slot, srt)  # duplicates write the same id
    counts = torch.zeros((c, s), dtype=torch.int64, device=draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(srt))
    vocab_bound = int(draws.max()) + 1 if draws.numel() else 1
    # sort key: count descending, then id ascending; padding (count 0) last
    key = (s - counts) * vocab_bound + ids
    order = key.argsort(dim=1)
    ids, counts = ids.gather(1, order), counts.gather(1, order)
    ids = torch.where(counts > 0, ids, ids[:, :1])
    return ids.to(torch.int32), counts.to(torch.int32)


def sampled_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    uniforms: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    compile: bool = False,
    next_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Sampled ids, their counts and exact entropies of softmax(lm_head(hidden) / temperature), in chunks.

    hidden [N, H]; weight [V, H]; uniforms [N, S] float64 in [0, 1) (`draw_uniforms`; S = draws per row);
    the logit transforms and `compile` are those of `teachers.head.targets_head`, whose chunked logits and
    entropy formulas this reuses. Returns (ids [N, S] int32, counts [N, S] int32, entropy [N] float32) on
    hidden's device (see `counts_of` for the slot order). With next_ids [N] a fourth tensor follows: observed
    [N] float32, log p(next_ids) over the full vocab, as `targets_head` gives it.
    """
    import torch

    from teachers.head import _compiled_lse_entropy, logit_chunks

    chunks = logit_chunks(hidden, weight, temperature=temperature, chunk_size=chunk_size, bias=bias,
                          logit_scale=logit_scale, softcap=softcap)
    n = hidden.shape[0]
    if uniforms.ndim != 2 or uniforms.shape[0] != n or not 1 <= uniforms.shape[1] <= MAX_SAMPLES:
        raise ValueError(f"uniforms {tuple(uniforms.shape)} must be [{n}, S] with 1 <= S <= {MAX_SAMPLES}")
    device, s = hidden.device, uniforms.shape[1]
    out_ids = torch.empty((n, s), dtype=torch.int32, device=device)
    out_counts = torch.empty((n, s), dtype=torch.int32, device=device)
    out_ent = torch.empty((n,), dtype=torch.float32, device=device)
    out_obs = None if next_ids is None else torch.empty((n,), dtype=torch.float32, device=device)
    nxt = None if next_ids is None else next_ids.to(device=device, dtype=torch.long).unsqueeze(1)  # [N, 1]
    with torch.inference_mode():
        for start, stop, z in chunks:  # z [C, V] float32
            z_o = None if nxt is None else z.gather(1, nxt[start:stop]).squeeze(1)  # [C], before z changes
            if compile:
                lse, out_ent[start:stop] = _compiled_lse_entropy()(z)
                draws = draws_from_logits(z, uniforms[start:stop])
            else:
                # the eager head's entropy formula, sharing its exp pass with the CDF
                peak = z.amax(dim=-1, keepdim=True)  # [C, 1]
                shifted = z.sub_(peak)  # [C, V], <= 0
                e = shifted.exp()
                total = e.sum(dim=-1)
                draws = _draws_from_cdf(e.to(torch.float64).cumsum_(dim=-1), uniforms[start:stop])
                out_ent[start:stop] = total.log() - e.mul_(shifted).sum(dim=-1) / total
                lse = peak.squeeze(-1) + total.log()
                del shifted, e
            if out_obs is not None:
                out_obs[start:stop] = z_o - lse
            out_ids[start:stop], out_counts[start:stop] = counts_of(draws)
            del z, draws
    if out_obs is not None:
        return out_ids, out_counts, out_ent, out_obs
    return out_ids, out_counts, out_ent
