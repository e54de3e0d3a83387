"""Targets head: top-k log-probs and exact entropy from final hidden states, one chunk of tokens at a time.

For a chunk of C tokens, `z = lm_head(h) / tau` ([C, V] float32) and `exp(z - max z)` are the only
vocab-wide tensors, so peak memory grows with `chunk_size * V` (about 2 x chunk x V x 4 bytes), never
with N * V. One exp pass over the vocab per token. Per token:

    lse     = logsumexp(z)                       # normaliser over the full vocab
    topk    = the k largest z, sorted descending
    logprob = topk_z - lse                       # true log-probs of softmax(z), not renormalised over k
    entropy = lse - sum_v p_v z_v  (p = softmax(z)), evaluated on z - max z so no large terms cancel

The matmul runs in the dtype of `hidden`/`weight` (bf16 on GPU, like the model's own lm_head); everything
after it runs in float32. Optional logit transforms are applied in the model's order before tau:
`+ bias`, `* logit_scale`, then soft-capping `cap * tanh(z / cap)`.

`compile=True` computes lse and entropy with a `torch.compile`d function (`_lse_entropy`): inductor fuses
max, exp and both sums into reductions over z, with no [C, V] temporaries. Same formulas, so results agree
with the eager path to float32 rounding (tests/teachers/test_head.py). That part measured 8x faster on CPU
(benchmarks/RESULTS.md); the team's reference notes report about 12x on an H100. The first call compiles
(~5 s with inductor's cache warm, ~17 s cold, on CPU), so it pays off on long runs only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def targets_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    compile: bool = False,
    kernel: str = "torch",
    next_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Top-k ids, top-k log-probs and exact entropies of softmax(lm_head(hidden) / temperature).

    hidden: [N, H] final hidden states (after the model's final norm); weight: [V, H] output embedding;
    bias: [V] or None; compile: lse and entropy through the compiled `_lse_entropy`; kernel: `torch` (this
    module) or `triton` (teachers/fused_head.py: never writes [C, V] logits; CUDA tensors only).
    Returns (topk_ids [N, k] int32, topk_logprobs [N, k] float32, entropy [N] float32), on hidden's device;
    ids within a row are sorted by descending log-prob. With next_ids [N] (int, any id at rows without a next
    token) a fourth tensor follows: observed [N] float32, log p(next_ids) over the full vocab (gathered from
    the same chunk logits; the triton kernel: `observed_from_top1`).
    """
    import torch

    if kernel == "triton":
        from teachers.fused_head import fused_targets_head

        out = fused_targets_head(hidden, weight, k=k, temperature=temperature, chunk_size=chunk_size, bias=bias,
                                 logit_scale=logit_scale, softcap=softcap)
        if next_ids is None:
            return out
        obs = observed_from_top1(hidden, weight, next_ids=next_ids, top_ids=out[0], top_logprobs=out[1],
                                 temperature=temperature, bias=bias, logit_scale=logit_scale, softcap=softcap)
        return (*out, obs)
    if kernel != "torch":
        raise ValueError(f"kernel must be 'torch' or 'triton', got {kernel!r}")

    chunks = logit_chunks(hidden, weight, temperature=temperature, chunk_size=chunk_size, bias=bias,
                          logit_scale=logit_scale, softcap=softcap)
    n, vocab = hidden.shape[0], weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    device = hidden.device
    out_ids = torch.empty((n, k), dtype=torch.int32, device=device)
    out_lp = torch.empty((n, k), dtype=torch.float32, device=device)
    out_ent = torch.empty((n,), dtype=torch.float32, device=device)
    out_obs = None if next_ids is None else torch.empty((n,), dtype=torch.float32, device=device)
    nxt = None if next_ids is None else next_ids.to(device=device, dtype=torch.long).unsqueeze(1)  # [N, 1]
    with torch.inference_mode():
        for start, stop, z in chunks:  # z [C, V] float32
            top_z, top_i = torch.topk(z, k, dim=-1, sorted=True)  # [C, k]
            out_ids[start:stop] = top_i.to(torch.int32)
            z_o = None if nxt is None else z.gather(1, nxt[start:stop]).squeeze(1)  # [C], before z changes
            if compile:
                lse, out_ent[start:stop] = _compiled_lse_entropy()(z)
                out_lp[start:stop] = top_z - lse.unsqueeze(-1)
                if out_obs is not None:
                    out_obs[start:stop] = z_o - lse
                continue
            peak = z.amax(dim=-1, keepdim=True)  # [C, 1]
            shifted = z.sub_(peak)  # in place, <= 0: z itself is not needed any more
            e = shifted.exp()  # [C, V], the only exp pass over the vocab
            total = e.sum(dim=-1)  # [C]
            log_total = total.log()
            # H = lse - sum p z, written with the shifted logits so no large terms cancel
            # sum(p z') in place over e (no [C, V] temporary); torch's sum is pairwise, unlike a float32 gemv
            # dot product whose sequential accumulation over ~50k terms loses ~1e-4 relative here
            out_ent[start:stop] = log_total - e.mul_(shifted).sum(dim=-1) / total
            out_lp[start:stop] = top_z - (peak + log_total.unsqueeze(-1))
            if out_obs is not None:
                out_obs[start:stop] = z_o - (peak.squeeze(-1) + log_total)
            del z, shifted, e
    if out_obs is not None:
        return out_ids, out_lp, out_ent, out_obs
    return out_ids, out_lp, out_ent


def observed_from_top1(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    next_ids: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(next_ids) [N] float32 for a head that returns no logits (the fused triton kernel):
    log p(o) = log p(top-1) + z_o - z_top1, both logits computed as `_chunk_logits` computes them (matmul dtype,
    then float32 transforms) from the two rows of `weight` only. hidden [N, H]; next_ids, top_ids[:, 0] [N]."""
    import torch

    with torch.inference_mode():
        h = hidden.to(weight.dtype)
        both = torch.stack([next_ids.to(weight.device).long(), top_ids[:, 0].to(weight.device).long()], dim=1)
        z = (h.unsqueeze(1) * weight[both]).sum(-1).float()  # [N, 2]
        if bias is not None:
            z = z + bias.float()[both]
        if logit_scale is not None:
            z = z * float(logit_scale)
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        z = z / float(temperature)
        return top_logprobs[:, 0].float().to(z.device) + z[:, 0] - z[:, 1]


def _lse_entropy(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp [C], entropy [C]) of softmax over the last axis of float32 logits z [C, V].

    The eager head's formulas (shifted by the row max; H = lse - sum p z on the shifted logits), written
    without in-place ops so that torch.compile can fuse them.
    """
    peak = z.amax(dim=-1, keepdim=True)
    shifted = z - peak
    e = shifted.exp()
    total = e.sum(dim=-1)
    log_total = total.log()
    return peak.squeeze(-1) + log_total, log_total - (e * shifted).sum(dim=-1) / total


_COMPILED = None


def _compiled_lse_entropy():
    """`_lse_entropy` compiled once per process (dynamic shapes: chunks of any length share the kernels)."""
    global _COMPILED
    if _COMPILED is None:
        import torch

        _COMPILED = torch.compile(_lse_entropy, dynamic=True)
    return _COMPILED


def logit_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The chunk loop every torch head runs: (start, stop, z [stop - start, V] float32 logits / tau) over rows
    of hidden [N, H]. Arguments are checked now, not at the first chunk; run it under `torch.inference_mode`."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H] and [V, H]")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size}, {temperature}")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    inv_tau = 1.0 / float(temperature)

    def chunks() -> Iterator[tuple[int, int, torch.Tensor]]:
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(hidden.shape[0], start + chunk_size)
            yield start, stop, _chunk_logits(hidden[start:stop], weight, bias, logit_scale, softcap, inv_tau)

    return chunks()


def _chunk_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float | None,
    softcap: float | None,
    inv_tau: float,
) -> torch.Tensor:
    """[C, V] float32 logits / tau for one chunk of hidden states [C, H]."""
    import torch

    z = h @ weight.T
    z = z.float() if z.dtype != torch.float32 else z
    if bias is not None:
        z.add_(bias.float())
    if logit_scale is not None:
        z.mul_(float(logit_scale))
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    return z


def dense_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive float64 reference (full [N, V] log-softmax); for tests and benchmarks only.

    Returns (topk_ids [N, k] int64, topk_logprobs [N, k] f64, entropy [N] f64, full log-probs [N, V] f64).
    """
    import torch

    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top_lp, top_i = torch.topk(logp, k, dim=-1)
    return top_i, top_lp, entropy, logp


def aligned_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    vocab_map: torch.Tensor,
    map_whole: torch.Tensor,
    student_vocab: int,
    k: int,
    project: torch.Tensor,
    next_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """The targets head for a teacher with another tokenizer, projected into the student's vocab S.

    hidden [N, H] and weight [V, H] as in `targets_head`; vocab_map [V] int64: the S id of each teacher id
    (-1: unmappable); map_whole [V] bool: the teacher token's text is that one whole S token; project [N]
    bool: rows whose projected distribution is wanted; next_ids [N] int64: the teacher token after each row
    (any id where unused). Per chunk of C rows, p = softmax(z / tau) over the teacher vocab ([C, V] float32)
    is scatter-added onto S ids ([C, |S| + 1] float32, the last column collecting unmappable mass); the
    mapped distribution q = p_S / (1 - unmapped) is then what top-k, log-probs and the exact entropy
    (-sum q log q) are taken over. No [N, V] or [N, |S|] tensor exists.

    Returns (topk_ids [N, k] int32, topk_logprobs [N, k] float32, entropy [N] float32, next_logprob [N]
    float32 = log p(next_ids), mass_whole [N], mass_unmapped [N] float32); rows with project False hold
    zeros in the projected outputs.
    """
    import torch

    n, vocab = hidden.shape[0], weight.shape[0]
    if vocab_map.shape != (vocab,) or map_whole.shape != (vocab,):
        raise ValueError(f"vocab_map {tuple(vocab_map.shape)} and map_whole must be [{vocab}]")
    if not 1 <= k <= student_vocab:
        raise ValueError(f"k must be in 1..{student_vocab}, got {k}")
    chunks = logit_chunks(hidden, weight, temperature=temperature, chunk_size=chunk_size, bias=bias,
                          logit_scale=logit_scale, softcap=softcap)
    device = hidden.device
    dest = torch.where(vocab_map >= 0, vocab_map, student_vocab).to(device)  # [V] int64, dump column |S|
    whole = map_whole.to(device, torch.float32)
    out_ids = torch.zeros((n, k), dtype=torch.int32, device=device)
    out_lp = torch.zeros((n, k), dtype=torch.float32, device=device)
    out_ent = torch.zeros((n,), dtype=torch.float32, device=device)
    out_next = torch.empty((n,), dtype=torch.float32, device=device)
    out_whole = torch.zeros((n,), dtype=torch.float32, device=device)
    out_unmapped = torch.zeros((n,), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for start, stop, z in chunks:  # z [C, V] float32
            lse = torch.logsumexp(z, dim=-1)  # [C]
            out_next[start:stop] = z.gather(1, next_ids[start:stop].to(device).long().unsqueeze(1)).squeeze(1) - lse
            rows = torch.nonzero(project[start:stop].to(device)).squeeze(1)  # [C'] chunk-local
            if rows.numel() == 0:
                continue
            p = (z.index_select(0, rows) - lse.index_select(0, rows).unsqueeze(1)).exp_()  # [C', V]
            del z
            q = torch.zeros((rows.numel(), student_vocab + 1), dtype=torch.float32, device=device)
            q.index_add_(1, dest, p)  # [C', |S| + 1]
            dst = rows + start
            out_whole[dst] = p @ whole
            del p
            dropped = q[:, student_vocab]
            mapped = 1.0 - dropped
            out_unmapped[dst] = dropped
            qs = q[:, :student_vocab].div_(mapped.unsqueeze(1))  # [C', |S|] rows sum to 1
            top_q, top_i = torch.topk(qs, k, dim=-1, sorted=True)
            out_ids[dst] = top_i.to(torch.int32)
            out_lp[dst] = top_q.log()
            out_ent[dst] = -torch.special.xlogy(qs, qs).sum(dim=-1)
            del q, qs
    return out_ids, out_lp, out_ent, out_next, out_whole, out_unmapped


def aligned_dense_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    vocab_map: torch.Tensor,
    student_vocab: int,
    k: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive float64 reference of `aligned_head` (dense [N, V] teacher softmax, dense [N, V, |S|] one-hot
    projection); for tests only. Returns (topk_ids, topk_logprobs, entropy, full teacher log-probs [N, V])."""
    import torch

    logp = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, dim=-1)  # [N, V]
    onehot = torch.zeros((weight.shape[0], student_vocab), dtype=torch.float64)
    valid = vocab_map >= 0
    onehot[torch.nonzero(valid).squeeze(1), vocab_map[valid]] = 1.0
    q = logp.exp() @ onehot  # [N, |S|]
    q = q / q.sum(dim=-1, keepdim=True)
    logq = q.log()
    entropy = -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)
    top_lp, top_i = torch.topk(logq, k, dim=-1)
    return top_i, top_lp, entropy, logp
