"""Triton kernels of the fused targets head (see teachers/fused_head.py for the algorithm and the wrapper).

Kept apart from the wrapper because Triton decides at decoration time whether a kernel runs compiled or in
its CPU interpreter (`TRITON_INTERPRET=1`): the wrapper reloads this module when that setting changed since
it was imported. `INTERPRET` records the setting the kernels below were built with.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # triton >= 3.4 reads its settings through knobs
    from triton import knobs

    INTERPRET: bool = bool(knobs.runtime.interpret)
except ImportError:
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden, stride_h, stride_w,
                 scale, softcap, inv_tau,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 logits / tau of rows x vocab columns; -inf in columns past the vocab."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:  # float32 inputs: full float32 products, not TF32
            acc += tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc = acc * scale
    if HAS_SOFTCAP:  # cap * tanh(z / cap), tanh(x) = 1 - 2 / (exp(2x) + 1) (saturates cleanly at +-1)
        acc = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (acc / softcap)) + 1.0))
    acc = acc * inv_tau
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def stats_kernel(h_ptr, w_ptr, b_ptr, tile_max_ptr, part_ptr,
                 n_rows, vocab, hidden, stride_h, stride_w, stride_tm, tiles_per_split,
                 scale, softcap, inv_tau,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1, program (row block, vocab split): over the split's vocab tiles, each tile's row max into
    tile_max [n_rows, tiles], and the split's online (max m, sum_v e^(z-m), sum_v e^(z-m) (z-m)) per row into
    part [splits, 3, n_rows]."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # finite: (m - m_new) * s stays 0 before the first tile
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_tiles = tl.cdiv(vocab, BLOCK_N)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < vocab
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden, stride_h, stride_w,
                         scale, softcap, inv_tau, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        z_max = tl.max(z, axis=1)
        tl.store(tile_max_ptr + rows * stride_tm + tile, z_max, mask=row_ok)
        m_new = tl.maximum(m, z_max)
        shifted = z - m_new[:, None]
        p = tl.exp(shifted)
        alpha = tl.exp(m - m_new)
        # sum p (z - m_new) = e^(m - m_new) [t + (m - m_new) s] over the earlier tiles, plus this tile's
        t = alpha * (t + (m - m_new) * s) + tl.sum(p * tl.where(p > 0.0, shifted, 0.0), axis=1)  # 0 * -inf: 0
        s = alpha * s + tl.sum(p, axis=1)
        m = m_new
    base = part_ptr + split * 3 * n_rows
    tl.store(base + rows, m, mask=row_ok)
    tl.store(base + n_rows + rows, s, mask=row_ok)
    tl.store(base + 2 * n_rows + rows, t, mask=row_ok)


@triton.jit
def candidates_kernel(h_ptr, w_ptr, b_ptr, slot_ptr, cand_ptr,
                      n_rows, vocab, hidden, stride_h, stride_w, stride_slot, stride_cand, tiles_per_split,
                      scale, softcap, inv_tau,
                      HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 2, program (row block, vocab split): for each tile of the split that some row of the block selected
    (slot [n_rows, tiles] >= 0), recompute its logits and store them into that row's candidate slot:
    cand[row, slot * BLOCK_N + j] = z[row, tile * BLOCK_N + j]. Tiles no row selected are skipped."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    n_tiles = tl.cdiv(vocab, BLOCK_N)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    js = tl.arange(0, BLOCK_N)
    for tile in range(first, last):
        slots = tl.load(slot_ptr + rows * stride_slot + tile, mask=row_ok, other=-1)
        if tl.max(slots, axis=0) >= 0:
            cols = tile * BLOCK_N + js
            col_ok = cols < vocab
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden, stride_h, stride_w,
                             scale, softcap, inv_tau, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, IEEE,
                             BLOCK_M, BLOCK_N, BLOCK_K)
            dst = cand_ptr + rows[:, None] * stride_cand + slots[:, None] * BLOCK_N + js[None, :]
            tl.store(dst, z, mask=(row_ok & (slots >= 0))[:, None])
