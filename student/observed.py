"""Observed-token correction of an aligned teacher (a teacher with another tokenizer, see teachers/align.py).

An aligned cache stores, at position t, teacher k's first-token projection q (its top-k in the student's
vocab, and the exact entropy H of q) and, where available, the teacher's exact probability e of the observed
next token o = input_ids[t + 1] (the chunk likelihood of the characters o covers). The correction makes
e the teacher's probability of o and rescales everything else so the distribution still sums to one:

    q'(o) = e,    q'(v) = c q(v) for v != o,    c = (1 - e) / (1 - q(o))

On the coarse distribution training uses (teacher k's top-k plus its tail bucket) that means: o's entry is
set to e (o takes the smallest entry's slot when it was outside the top-k, that entry's mass joining the
tail), the other entries and the tail are scaled by c. **The entropy used for alpha follows**: it is the exact entropy of the full corrected distribution
q', which the stored exact entropy H and q(o) determine without the full vocab:

    H' = c (H + q(o) log q(o)) - (1 - e) log c - e log e

When o is outside the stored top-k, q(o) is not stored; it is taken as 0 there (so c = 1 - e), which
understates o's old share of H by at most q(o) <= the k-th probability. Positions without an exact value (NaN)
or without a next token (t = L - 1) are left unchanged.
"""

from __future__ import annotations

import numpy as np
import torch


def next_tokens(input_ids: np.ndarray) -> torch.Tensor:
    """[B * L] int64: the observed next token o of every position of windows [B, L]. A window's last position
    has none (its label is then any id: the observed log-prob there is NaN, see `observed_logprobs`)."""
    ids = np.asarray(input_ids)
    return torch.from_numpy(np.concatenate([ids[:, 1:], ids[:, :1]], axis=1).astype(np.int64)).reshape(-1)


def observed_logprobs(column: np.ndarray) -> torch.Tensor:
    """[B * L] float32: an aligned cache's `observed_logprob` column [B, L] as the correction reads it, NaN at
    each window's last position (its next token is outside the window)."""
    obs = torch.from_numpy(np.asarray(column, dtype=np.float32)).clone()
    obs[:, -1] = float("nan")
    return obs.reshape(-1)


def corrected_entropy(entropy: np.ndarray, q_o: np.ndarray, e: np.ndarray) -> np.ndarray:
    """H' of the module docstring (float64 numpy; all arguments broadcast). q_o: the projected q(o)
    (0 when unknown); e: the exact probability of o."""
    h, q, e = (np.asarray(x, dtype=np.float64) for x in (entropy, q_o, e))
    c = (1.0 - e) / np.maximum(1.0 - q, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        xq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        xe = np.where(e > 0, e * np.log(np.where(e > 0, e, 1.0)), 0.0)
        xc = np.where(c > 0, (1.0 - e) * np.log(np.where(c > 0, c, 1.0)), 0.0)
    return c * (h + xq) - xc - xe


def corrected_entropy_torch(entropy: torch.Tensor, q_o: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """`corrected_entropy` on float32/64 tensors (same formula, torch.special.xlogy for the 0 log 0 terms)."""
    c = (1.0 - e) / (1.0 - q_o).clamp_min(1e-12)
    return c * (entropy + torch.special.xlogy(q_o, q_o)) - torch.special.xlogy(1.0 - e, c) - torch.special.xlogy(e, e)


def apply_observed_correction(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    observed_logprob: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher k's corrected top-k list at N positions (see the module docstring).

    topk_ids [N, k] int (distinct per row, sorted by descending log-prob), topk_logprobs [N, k] float (log-probs
    over the full student vocab), entropy [N] or None, observed_logprob [N] float (NaN: unavailable), labels
    [N] int64 (the observed next token; anything where observed_logprob is NaN). Returns (ids [N, k] int64,
    logprobs [N, k] float32, entropy [N] float32 or None), ids still distinct per row.

    When o is in the top-k its entry becomes e and the others are scaled by c. When it is not, o takes the
    last (smallest) slot with e, the other k - 1 are scaled by c, and the replaced entry's scaled mass joins
    the tail bucket (1 - sum), which is then c (old tail + old last entry): the coarse view is exact for the
    corrected distribution on that partition.
    """
    ids = topk_ids.long()
    lp = topk_logprobs.float()
    obs = observed_logprob.float()
    use = ~torch.isnan(obs)  # [N]
    log_e = torch.where(use, obs, torch.zeros_like(obs)).clamp_max(0.0)
    e = log_e.exp()
    labels = labels.long()
    hit = ids == labels.unsqueeze(1)  # [N, k]
    inside = hit.any(1)
    q_o = torch.where(inside, (lp.exp() * hit).sum(1), torch.zeros_like(e))  # [N]
    c = (1.0 - e) / (1.0 - q_o).clamp_min(1e-12)
    slot = hit.clone()
    slot[:, -1] |= ~inside  # o's slot: its own entry, or the last one
    new_ids = torch.where(slot & use.unsqueeze(1), labels.unsqueeze(1), ids)
    new_lp = torch.where(slot, log_e.unsqueeze(1), lp + c.log().unsqueeze(1))
    new_lp = torch.where(use.unsqueeze(1), new_lp, lp)
    out_ent = None
    if entropy is not None:
        h = entropy.float()
        out_ent = torch.where(use, corrected_entropy_torch(h, q_o, e), h)
    return new_ids, new_lp, out_ent
