"""Fused targets head: top-k log-probs and exact entropy without writing [tokens, vocab] logits to memory.

`fused_targets_head` returns what `teachers.head.targets_head` returns (topk_ids [N, k] int32, topk_logprobs
[N, k] float32 over the full vocab at temperature tau, entropy [N] float32), from two Triton kernels
(teachers/fused_head_kernels.py) that tile the vocab (T = ceil(V / BLOCK_N) tiles) and recompute logits
tile by tile from hidden [N, H] and weight [V, H], with float32 accumulation:

1. pass 1, per (row block, vocab split): the matmul of a block of rows with each vocab tile, the logit
   transforms, then an online max / sum-exp / sum p*z per row (the entropy numerator, rescaled when the max
   grows, as in online softmax), and each tile's row max ([N, T], 1/BLOCK_N of the logits). The splits'
   partial sums are merged here: lse = m + log s, entropy = log s - t / s (s, t over z - m).
2. top-k: the k tiles with the largest tile maxima hold every one of the k largest logits (a logit in any
   other tile is below k tile maxima, i.e. below k distinct logits; with ties the selected values are still
   exactly the k largest). Pass 2 recomputes only tiles some row of a block selected and stores each row's
   selected tiles side by side ([N, k * BLOCK_N] candidates, e.g. 8,192 wide instead of 151,936);
   `torch.topk` over the candidates gives ids and values. Memory per chunk of C rows: C x (k x BLOCK_N + 2 T)
   x 4 bytes (C = 4096, V = 151,936: 147 MiB) instead of 2 x C x V x 4 (4.6 GiB).

Differences from the torch head: logits are never rounded to bf16 between the matmul and the reductions
(the torch head rounds the bf16 matmul output), so on bf16 weights this head is closer to the float64
reference; float32 inputs use IEEE float32 products (no TF32). Offsets are 32-bit: V x H and C x k x BLOCK_N
must stay below 2^31.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, for tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK_M = 64
"""Rows (tokens) per program."""
BLOCK_N = 128
"""Vocab entries per tile (also the granularity of the top-k candidates)."""
BLOCK_K = 64
"""Hidden-size step of the tile matmul."""


def triton_available() -> bool:
    """True when Triton can be imported (the kernel additionally needs CUDA, or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    """The kernels module, rebuilt when TRITON_INTERPRET changed since it was imported."""
    from teachers import fused_head_kernels as mod

    if mod.INTERPRET != interpret_requested():
        mod = importlib.reload(mod)
    return mod


def fused_targets_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, top-k log-probs and exact entropies of softmax(lm_head(hidden) / temperature), fused.

    hidden: [N, H], weight: [V, H] (same dtype after casting hidden; bf16, fp16 or fp32), bias: [V] or None.
    chunk_size: rows per launch pair (bounds the candidate buffer); splits: vocab splits per row block
    (default: enough programs to fill the GPU). Block sizes are powers of two >= 16 (default: the module's
    BLOCK_M, BLOCK_N, BLOCK_K, read at call time).
    Returns (topk_ids [N, k] int32, topk_logprobs [N, k] float32, entropy [N] float32), ids sorted by
    descending log-prob.
    """
    import torch

    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H] and [V, H]")
    n, vocab = hidden.shape[0], weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0, got {chunk_size}, {temperature}")
    block_m = BLOCK_M if block_m is None else block_m
    block_n = BLOCK_N if block_n is None else block_n
    block_k = BLOCK_K if block_k is None else block_k
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if not (hidden.is_cuda or interpret_requested()):
        raise ValueError("the fused head runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    kern = _kernels()
    device = hidden.device
    hidden = hidden.to(weight.dtype).contiguous()
    weight = weight.contiguous()
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else weight  # never read when HAS_BIAS is False
    n_tiles = -(-vocab // block_n)
    kt = min(k, n_tiles)  # tiles whose candidates are kept per row
    flags = dict(HAS_BIAS=has_bias, HAS_SCALE=logit_scale is not None, HAS_SOFTCAP=softcap is not None,
                 IEEE=weight.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    scalars = (float(logit_scale) if logit_scale is not None else 1.0, float(softcap) if softcap is not None else 1.0,
               1.0 / float(temperature))
    out_ids = torch.empty((n, k), dtype=torch.int32, device=device)
    out_lp = torch.empty((n, k), dtype=torch.float32, device=device)
    out_ent = torch.empty((n,), dtype=torch.float32, device=device)
    for start in range(0, n, chunk_size):
        h = hidden[start:start + chunk_size]
        c = h.shape[0]
        row_blocks = -(-c // block_m)
        if splits is None:  # about 4 programs per SM, at least one tile per split
            sms = torch.cuda.get_device_properties(device).multi_processor_count if h.is_cuda else 1
            n_split = max(1, min(n_tiles, -(-4 * sms // row_blocks)))
        else:
            n_split = max(1, min(n_tiles, splits))
        per_split = -(-n_tiles // n_split)
        n_split = -(-n_tiles // per_split)
        grid = (row_blocks, n_split)
        tile_max = torch.empty((c, n_tiles), dtype=torch.float32, device=device)
        part = torch.empty((n_split, 3, c), dtype=torch.float32, device=device)
        kern.stats_kernel[grid](h, weight, bias_arg, tile_max, part, c, vocab, h.shape[1], h.stride(0),
                                weight.stride(0), tile_max.stride(0), per_split, *scalars, **flags)
        # merge the splits: s, t rescaled to the common max
        m_all, s_all, t_all = part[:, 0], part[:, 1], part[:, 2]  # [splits, C]
        peak = m_all.amax(dim=0)  # [C]
        scale = torch.exp(m_all - peak)
        total = (scale * s_all).sum(dim=0)
        tz = (scale * (t_all + (m_all - peak) * s_all)).sum(dim=0)
        log_total = total.log()
        lse = peak + log_total
        out_ent[start:start + c] = log_total - tz / total
        # pass 2: candidates of the kt tiles with the largest maxima, per row
        sel = torch.topk(tile_max, kt, dim=1, sorted=False).indices  # [C, kt] tile ids
        slot = torch.full((c, n_tiles), -1, dtype=torch.int32, device=device)
        slot.scatter_(1, sel, torch.arange(kt, dtype=torch.int32, device=device).expand(c, kt).contiguous())
        cand = torch.empty((c, kt * block_n), dtype=torch.float32, device=device)
        kern.candidates_kernel[grid](h, weight, bias_arg, slot, cand, c, vocab, h.shape[1], h.stride(0),
                                     weight.stride(0), slot.stride(0), cand.stride(0), per_split, *scalars, **flags)
        top_z, pos = torch.topk(cand, k, dim=1, sorted=True)  # [C, k]
        ids = sel.gather(1, pos // block_n) * block_n + pos % block_n
        out_ids[start:start + c] = ids.to(torch.int32)
        out_lp[start:start + c] = top_z - lse.unsqueeze(-1)
        del tile_max, part, slot, cand
    return out_ids, out_lp, out_ent
