"""Fused gated-prefix attention in Triton: forward and backward kernels, launchers, torch custom op.

Design (docs/attention.md has the long form):

* Forward: FlashAttention-2 tiling. A program owns BLOCK_M query rows of one (batch, query head).
  It streams the prefix tiles (read straight from prefix_k/prefix_v; a shared prefix has batch
  stride 0, so it is never expanded) and then the token tiles through one online softmax. Prefix
  scores are multiplied by the gate tile, and so are the prefix probabilities before they meet
  the prefix values (the gate scales keys *and* values). ``_fwd_tiles`` is that loop, compiled
  for the prefix tiles and for the token tiles (PART constexpr: gates there, masks and causality
  here), the latter twice: interior tiles, then EDGE tiles (the last, partial tile and those the
  causal diagonal crosses), so only the few edge tiles pay for the range and causal selects.
* Backward: delta = rowsum(dO * O) - dlse; then a key-side kernel (one program per key tile and
  (batch, kv head), looping over the query heads of its group and all query tiles: dk, dv; for
  prefix tiles also dgate, added into the program's own slice of a float32 buffer) launched once
  for the prefix and once for the tokens, and a query-side kernel for dq, whose token loop is
  split into interior and edge tiles as the forward's is. A shared prefix's gradient is summed over
  the batch, and the gate's over its broadcast dims, from small float32 buffers.
* Dropout: 16-bit uniforms from Philox4x32-10 keyed on (seed), one draw per 8 key columns of a row,
  counter (column // 8, row, batch * Hq + head, 0x41505400 + part); forward and backward regenerate the
  same bits (``_dropout_keep``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .. import _launch as launches
from .._env import on_device
from .._launch import FP_FUSION, run
from .._intmath import cdiv, next_power_of_2
from ..child_tuning.triton_rng import philox4x32_10, u32_like

DROPOUT_TAG = tl.constexpr(0x41505400)
LOG2E = tl.constexpr(1.4426950408889634)  # the kernels' scores are in base 2 (exp2)
# About the largest float-mask value whose base-2 score stays finite (float32 max / log2 e = 2.3587e38): finite entries
# beyond it saturate there (an entry of -3e38 would otherwise become -inf and hide its key, +3e38 NaN).
MASK_LIM = tl.constexpr(2.35e38)
LN2 = tl.constexpr(0.6931471805599453)


KEEP_BITS = 16  # a 16-bit uniform per entry: one Philox draw (4 x 32 bits) serves 8 entries


def keep_threshold(dropout_p: float) -> int:
    return int((1.0 - dropout_p) * (1 << KEEP_BITS))


@triton.jit
def _dropout_keep(seed_lo, seed_hi, bh, row0, start, PART: tl.constexpr, threshold, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Keep bits of the (BLOCK_M, BLOCK_N) score tile of rows row0 .. and key columns start .. (a multiple
    of 8) in part PART (0 prefix, 1 tokens). Columns 8 g .. 8 g + 7 of a row share one Philox4x32-10 draw,
    counter (g, row, batch * Hq + head, TAG + PART): column 8 g + j is the low (j even) or high (j odd)
    16 bits of word j // 2, kept iff below ``threshold``. Every kernel regenerates the same bits whatever
    its tile sizes (tiles start at multiples of 8). The draws are made on a flat block of BLOCK_M * BLOCK_N / 8
    counters (one per thread slot, no replicated work), then spread to the tile."""
    G: tl.constexpr = BLOCK_N // 8
    idx = tl.arange(0, BLOCK_M * G)
    c1 = (row0 + idx // G).to(tl.uint32)
    c0 = (start // 8 + idx % G).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (DROPOUT_TAG + PART)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, u32_like(bh, c0), c3, u32_like(seed_lo, c0), u32_like(seed_hi, c0))
    w = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # (n, 2, 2): flat order x0, x1, x2, x3
    halves = tl.join(w & 0xFFFF, w >> 16)  # (n, 2, 2, 2): flat order lo0, hi0, lo1, hi1, ...
    return tl.reshape(halves.to(tl.int32) < threshold, [BLOCK_M, BLOCK_N])


@triton.jit
def _load_rows(base, rows, offs_d, s_row, s_d, row_ok, d_ok):
    """A (rows, BLOCK_D) tile at ``base`` with the given strides; 0 outside the valid rows and head dims.
    Row offsets in int64: the key-side backward's query rows come from a 32-bit loop, and (N - 1) * s_row
    passes 2**31 at N = 524289 for a (B, N, 32 x 128) layout."""
    return tl.load(base + rows.to(tl.int64)[:, None] * s_row + offs_d[None, :] * s_d,
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _q_axis(x, KEY_MAJOR: tl.constexpr):
    """A vector over a score tile's query rows, broadcast along its key axis: (BLOCK_M, 1), or (1, BLOCK_M) in a
    key-major tile (the key-side backward's, (BLOCK_N, BLOCK_M))."""
    if KEY_MAJOR:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _k_axis(x, KEY_MAJOR: tl.constexpr):
    """A vector over a score tile's key columns, broadcast along its query axis: (1, BLOCK_N), or (BLOCK_N, 1)
    in a key-major tile (the other axis of ``_q_axis``)."""
    return _q_axis(x, not KEY_MAJOR)


@triton.jit
def _scores(q, k_tile, G, offs_m, offs_n, m_ok, n_ok, gb, gh, sg_n, sg_p, Mk, mb, mh, sm_n, sm_m, mask_min,
            N, M, qk2, IS_PREFIX: tl.constexpr, HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr,
            MASK_KIND: tl.constexpr, MASK_N1: tl.constexpr, CAUSAL: tl.constexpr, EDGE: tl.constexpr,
            PREC: tl.constexpr, KEY_MAJOR: tl.constexpr = False):
    """Base-2 scores of a (BLOCK_M, BLOCK_N) tile (``qk2`` is the softmax scale times log2(e): every kernel
    exponentiates with exp2, one multiply fewer per score), -inf where hidden; also the raw scaled dot
    (base 2 too) and the gate. KEY_MAJOR: the transposed tile, (BLOCK_N, BLOCK_M), as K Q^T (the key-side
    backward's orientation: its dots then all have the key tile as their rows, with no transposes of
    register tiles).
    A gate or mask that is the same for every query row (GATE_N1 / MASK_N1: row stride 0, e.g. a (B, M)
    padding mask or a (B, 1, 1, P) gate) is loaded as one row and broadcast: a (BLOCK_M, BLOCK_N) tile of
    addresses would cost registers the dots need (ptxas spills otherwise). Only EDGE tiles (crossing the
    end of the keys or the causal diagonal) pay for the key-range and causal selects; an interior tile
    has every key in range and visible to every row of its query tile."""
    g = 1.0
    if IS_PREFIX and HAS_GATE and not GATE_N1:
        # loaded before the dot, kept in its dtype until after it: its tile of addresses is dead by then
        # (loaded after, the addresses and the dot's operands were live together: ptxas spilled)
        g = tl.load(G + gb + gh + _q_axis(offs_m.to(tl.int64) * sg_n, KEY_MAJOR) + _k_axis(offs_n * sg_p, KEY_MAJOR),
                    mask=_q_axis(m_ok, KEY_MAJOR) & _k_axis(n_ok, KEY_MAJOR), other=0.0)
    if KEY_MAJOR:
        raw = tl.dot(k_tile, tl.trans(q), input_precision=PREC) * qk2
    else:
        raw = tl.dot(q, tl.trans(k_tile), input_precision=PREC) * qk2
    s = raw
    if IS_PREFIX:
        if HAS_GATE:
            if GATE_N1:
                g = _k_axis(tl.load(G + gb + gh + offs_n * sg_p, mask=n_ok, other=0.0).to(tl.float32), KEY_MAJOR)
            else:
                g = g.to(tl.float32)
            s = raw * g
    else:
        if MASK_KIND != 0:
            if MASK_N1:
                mk = _k_axis(tl.load(Mk + mb + mh + offs_n * sm_m, mask=n_ok, other=1 if MASK_KIND == 1 else 0.0),
                             KEY_MAJOR)
            else:
                # int64 rows: a (B, 1, N, M) mask's (N - 1) * M passes 2**31 at N = M = 46342 (long-context
                # Hugging Face masks that are not plain causal come materialised)
                mk = tl.load(Mk + mb + mh + _q_axis(offs_m.to(tl.int64) * sm_n, KEY_MAJOR)
                             + _k_axis(offs_n * sm_m, KEY_MAJOR),
                             mask=_q_axis(m_ok, KEY_MAJOR) & _k_axis(n_ok, KEY_MAJOR),
                             other=1 if MASK_KIND == 1 else 0.0)
            if MASK_KIND == 1:
                s = tl.where(mk != 0, s, float("-inf"))
            else:
                add = mk.to(tl.float32)
                sat = tl.where(add < -MASK_LIM, -MASK_LIM, tl.where(add > MASK_LIM, MASK_LIM, add))  # NaN stays
                s = s + tl.where(add <= mask_min, float("-inf"), sat) * LOG2E
        if CAUSAL and EDGE:
            s = tl.where(_k_axis(offs_n, KEY_MAJOR) <= _q_axis(offs_m, KEY_MAJOR) + (M - N), s, float("-inf"))
    if EDGE:
        s = tl.where(_k_axis(n_ok, KEY_MAJOR), s, float("-inf"))
    return s, raw, g


@triton.jit
def _kv_tiles(IS_PREFIX: tl.constexpr, b, kvh, K, V, PK, PV, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
              spk_b, spk_h, spk_n, spk_d, spv_b, spv_h, spv_n, spv_d, pid_m, N, M, P, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Where query tile ``pid_m``'s key/value tiles come from: the prefix of kv head ``kvh`` (batch stride 0
    when shared) or its tokens. Returns the K and V bases, their row/column strides, the number of rows,
    where the interior token tiles end (``mid``: before it every tile is whole and, with causal masking,
    seen entirely by every row of the query tile) and where the loop ends (``hi``: all P prefix rows; with
    causal masking, the last token some row of the tile can see). Tiles from ``mid`` to ``hi`` are EDGE
    tiles; all prefix tiles are (``mid`` = 0): a prefix is a tile or two, not worth a second loop."""
    if IS_PREFIX:
        Kp = PK + b * spk_b + kvh * spk_h
        Vp = PV + b * spv_b + kvh * spv_h
        skn, skd, svn, svd, L, hi = spk_n, spk_d, spv_n, spv_d, P, P
        mid = 0
    else:
        Kp = K + b * sk_b + kvh * sk_h
        Vp = V + b * sv_b + kvh * sv_h
        skn, skd, svn, svd, L, hi = sk_n, sk_d, sv_n, sv_d, M, M
        mid = M // BLOCK_N * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + (M - N), 0), M)
            # the tile's first row sees keys up to pid_m * BLOCK_M + (M - N)
            mid = tl.minimum(M, tl.maximum(pid_m * BLOCK_M + (M - N) + 1, 0)) // BLOCK_N * BLOCK_N
    return Kp, Vp, skn, skd, svn, svd, L, mid, hi


@triton.jit
def _query_tile(Hq, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's query tile: its (batch, head), rows and head dims, and which of them are in range.
    The grid is 1-D, (query tiles) x (B Hq) with the tiles of one head adjacent (they share its K/V in
    L2); a 2-D grid would cap B Hq at 65535, the limit of CUDA's second grid dimension."""
    pid = tl.program_id(0).to(tl.int64)  # int64: b * stride may pass 2**31 on big inputs (4-D masks)
    n_tiles = tl.cdiv(N, BLOCK_M)
    pid_m = pid % n_tiles
    bh = pid // n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_m, bh, bh // Hq, bh % Hq, offs_m, offs_d, offs_m < N, offs_d < D


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, Kp, Vp, skn, skd, svn, svd, L, lo, hi, G, Mk, offs_m, offs_d, m_ok, d_ok,
               gb, gh, sg_n, sg_p, mb, mh, sm_n, sm_m, mask_min, N, M, qk2, seed_lo, seed_hi, keep_thr, inv_keep,
               bh, row0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr, EDGE: tl.constexpr,
               HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr, MASK_KIND: tl.constexpr, MASK_N1: tl.constexpr,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """The forward's online softmax over key tiles lo, lo + BLOCK_N, .. < hi of one part (0 prefix, 1 tokens),
    in base 2 (``qk2`` = scale log2(e))."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kt = _load_rows(Kp, offs_n, offs_d, skn, skd, n_ok, d_ok)
        s, raw, g = _scores(q, kt, G, offs_m, offs_n, m_ok, n_ok, gb, gh, sg_n, sg_p, Mk, mb, mh, sm_n,
                            sm_m, mask_min, N, M, qk2, PART == 0, HAS_GATE, GATE_N1, MASK_KIND, MASK_N1,
                            CAUSAL, EDGE, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, bh, row0, start, PART, keep_thr, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * inv_keep, 0.0)
        if PART == 0:
            if HAS_GATE:
                p = p * g
        vt = _load_rows(Vp, offs_n, offs_d, svn, svd, n_ok, d_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])  # per-call dropout seeds: one compilation
def _fwd_kernel(Q, K, V, PK, PV, G, Mk, Out, Lse, Stat,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                spk_b, spk_h, spk_n, spk_d, spv_b, spv_h, spv_n, spv_d,
                sg_b, sg_h, sg_n, sg_p, sm_b, sm_h, sm_n, sm_m,
                so_b, so_h, so_n, so_d,
                Hq, N, M, P, REP, scale, mask_min, seed_lo, seed_hi, keep_thr, inv_keep, seq_bucket,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PW: tl.constexpr, HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr, MASK_KIND: tl.constexpr,
                MASK_N1: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    pid_m, bh, b, h, offs_m, offs_d, m_ok, d_ok = _query_tile(Hq, N, D, BLOCK_M, BLOCK_D)
    kvh = h // REP
    # prefix tiles no wider than the prefix (PW: its next power of two, at least 16): P = 16 in 64-wide tiles
    # would spend 3/4 of the prefix tile on empty columns
    BLOCK_P: tl.constexpr = PW if PW < BLOCK_N else BLOCK_N
    q = _load_rows(Q + b * sq_b + h * sq_h, offs_m, offs_d, sq_n, sq_d, m_ok, d_ok)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    gb = b * sg_b
    gh = h * sg_h
    mb = b * sm_b
    mh = h * sm_h
    for part in tl.static_range(2):  # prefix tiles, then token tiles
        Kp, Vp, skn, skd, svn, svd, L, mid, hi = _kv_tiles(
            part == 0, b, kvh, K, V, PK, PV, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
            spk_b, spk_h, spk_n, spk_d, spv_b, spv_h, spv_n, spv_d, pid_m, N, M, P, BLOCK_M, BLOCK_N, CAUSAL)
        for edge in tl.static_range(1 - part, 2):  # interior token tiles (no selects), then the edge tiles
            acc, m_i, l_i = _fwd_tiles(
                acc, m_i, l_i, q, Kp, Vp, skn, skd, svn, svd, L, mid if edge else 0, hi if edge else mid,
                G, Mk, offs_m, offs_d, m_ok, d_ok, gb, gh, sg_n, sg_p, mb, mh, sm_n, sm_m, mask_min, N, M,
                scale * LOG2E,
                seed_lo, seed_hi, keep_thr, inv_keep, bh, pid_m * BLOCK_M, BLOCK_M,
                BLOCK_P if part == 0 else BLOCK_N, part, edge == 1, HAS_GATE, GATE_N1, MASK_KIND, MASK_N1, CAUSAL,
                DROPOUT, PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # The base-2 lse m + log2(l) as an unevaluated float32 sum hi + lo (TwoSum), kept for the backward: with
    # huge finite mask offsets on every key of a row, hi alone drops log2(l) (ulp 128 at m = -1.44e9)
    m = tl.where(empty, 0.0, m_i)
    t = tl.log2(tl.where(empty, 1.0, l_i))
    hi = m + t
    bb = hi - m
    lo = (m - (hi - bb)) + (t - bb)
    tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * N + offs_m, tl.where(empty, float("-inf"), hi * LN2), mask=m_ok)
    # rows that saw no key: hi = +inf, every probability exp2(s - inf) = 0
    tl.store(Stat + 2 * (bh * N + offs_m), tl.where(empty, float("inf"), hi), mask=m_ok)
    tl.store(Stat + 2 * (bh * N + offs_m) + 1, tl.where(empty, 0.0, lo), mask=m_ok)


@triton.jit
def _row_stat(Stat, bh, N, offs_m, m_ok):
    """Rows' base-2 lse as the forward left it, hi + lo (``Stat``: (B, Hq, N, 2) float32)."""
    at = Stat + 2 * (bh * N + offs_m)
    return tl.load(at, mask=m_ok, other=float("inf")), tl.load(at + 1, mask=m_ok, other=0.0)


@triton.jit
def _probs(s2, lse_hi, lse_lo, MASK_KIND: tl.constexpr, KEY_MAJOR: tl.constexpr = False):
    """Softmax probabilities of the base-2 score tile s2 given its rows' lse hi + lo: one subtraction (fused
    with the score's scaling where nothing comes between) and one exp2 per score; with a float mask (the only
    way to huge score offsets) a second subtraction, of lo, after hi's exact one."""
    if MASK_KIND == 2:
        return tl.exp2((s2 - _q_axis(lse_hi, KEY_MAJOR)) - _q_axis(lse_lo, KEY_MAJOR))
    return tl.exp2(s2 - _q_axis(lse_hi, KEY_MAJOR))


@triton.jit
def _sum_segment(Src, Dst, R1, A, R2, C, blk, BLOCK: tl.constexpr):
    """Dst[a, c] = sum over r1 < R1, r2 < R2 of Src[r1, a, r2, c] (contiguous, float32), in that order, cast to
    Dst's dtype: outputs blk * BLOCK .. of the flattened (A, C)."""
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < A * C
    a = offs // C
    c = offs - a * C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r1 in range(0, R1):
        for r2 in range(0, R2):
            acc += tl.load(Src + ((r1 * A + a) * R2 + r2) * C + c, mask=ok, other=0.0)
    tl.store(Dst + offs, acc.to(Dst.dtype.element_ty), mask=ok)


@triton.jit
def _sums_kernel(S0, D0, R1_0, A_0, R2_0, C_0, N_0, S1, D1, R1_1, A_1, R2_1, C_1, N_1, S2, D2, R1_2, A_2, R2_2, C_2,
                 BLOCK: tl.constexpr):
    """Up to three _sum_segment reductions in one launch: programs 0 .. N_0 - 1 the first, the next N_1 the
    second, the rest the third (the backward's dprefix_k, dprefix_v and dgate)."""
    pid = tl.program_id(0)
    if pid < N_0:
        _sum_segment(S0, D0, R1_0, A_0, R2_0, C_0, pid, BLOCK)
    elif pid < N_0 + N_1:
        _sum_segment(S1, D1, R1_1, A_1, R2_1, C_1, pid - N_0, BLOCK)
    else:
        _sum_segment(S2, D2, R1_2, A_2, R2_2, C_2, pid - N_0 - N_1, BLOCK)


@triton.jit
def _dkv_tiles(dk, dv, kt, vt, lo, hi, Qh, DOh, G, Mk, DG, sq_n, sq_d, sdo_n, sdo_d, gb, gh, sg_n, sg_p, mb, mh,
               sm_n, sm_m, dg_base, sdg_n, sdg_p, Stat, Delta, bh, offs_n, offs_d, n_ok, d_ok, col0, N, M, qk2,
               mask_min, seed_lo, seed_hi, keep_thr, inv_keep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_PREFIX: tl.constexpr, EDGE: tl.constexpr, HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr,
               MASK_KIND: tl.constexpr, MASK_N1: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               PREC: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """dk (unscaled), dv of one key tile accumulated over query tiles lo, lo + BLOCK_M, .. < hi of one query
    head (bases Qh, DOh; row bh of Stat/Delta); for a gated prefix also its dgate, added at ``dg_base``.
    EDGE: apply the causal select (see ``_scores``). KEY_MAJOR: the score tiles are (keys, queries), so that
    dv += P^T dO and dk += dS^T Q take P^T and dS^T as they are (otherwise the (queries, keys) tiles are
    transposed in registers for those two dots, and their rows are only BLOCK_N = the key tile)."""
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q = _load_rows(Qh, offs_m, offs_d, sq_n, sq_d, m_ok, d_ok)
        do = _load_rows(DOh, offs_m, offs_d, sdo_n, sdo_d, m_ok, d_ok)
        lse_hi, lse_lo = _row_stat(Stat, bh, N, offs_m, m_ok)
        delta = tl.load(Delta + bh * N + offs_m, mask=m_ok, other=0.0)
        s, raw, g = _scores(q, kt, G, offs_m, offs_n, m_ok, n_ok, gb, gh, sg_n, sg_p, Mk, mb, mh, sm_n, sm_m,
                            mask_min, N, M, qk2, IS_PREFIX, HAS_GATE, GATE_N1, MASK_KIND, MASK_N1, CAUSAL, EDGE,
                            PREC, KEY_MAJOR)
        # (a prefix launch's rows all see the prefix: no huge offsets, lo is noise there)
        p = _probs(s, lse_hi, lse_lo, 0 if IS_PREFIX else MASK_KIND, KEY_MAJOR)
        if KEY_MAJOR:
            u = tl.dot(vt, tl.trans(do), input_precision=PREC)  # <v_j, dO_i>
        else:
            u = tl.dot(do, tl.trans(vt), input_precision=PREC)  # <dO_i, v_j>
        z = tl.zeros_like(p) + 1.0
        if DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, bh, start, col0, 0 if IS_PREFIX else 1, keep_thr, BLOCK_M, BLOCK_N)
            if KEY_MAJOR:
                keep = tl.trans(keep)
            z = tl.where(keep, inv_keep, 0.0)
        pz = p * z
        dp = z * u
        if IS_PREFIX:
            if HAS_GATE:
                pz = pz * g
                dp = dp * g
        if KEY_MAJOR:
            dv = tl.dot(pz.to(do.dtype), do, dv, input_precision=PREC)
        else:
            dv = tl.dot(tl.trans(pz.to(do.dtype)), do, dv, input_precision=PREC)
        ds = p * (dp - _q_axis(delta, KEY_MAJOR))
        if IS_PREFIX:
            if HAS_GATE:
                # d out / d G_ij through the score (ds * raw, raw back in natural units) and through the
                # value (p z <dO, pv>).
                # Each program owns its (batch, kv head, key tile) slice of the buffer: the
                # atomics never contend; they only make the read-add-write safe across loops.
                tile_ok = _q_axis(m_ok, KEY_MAJOR) & _k_axis(n_ok, KEY_MAJOR)
                dgt = tl.where(tile_ok, ds * (raw * LN2) + p * z * u, 0.0)
                ds = ds * g
                if GATE_N1:
                    tl.atomic_add(DG + dg_base + offs_n * sdg_p, tl.sum(dgt, 1 if KEY_MAJOR else 0), mask=n_ok)
                else:
                    tl.atomic_add(DG + dg_base + _q_axis(offs_m * sdg_n, KEY_MAJOR) + _k_axis(offs_n * sdg_p, KEY_MAJOR),
                                  dgt, mask=tile_ok)
        if KEY_MAJOR:
            dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PREC)  # accumulates in place
        else:
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])  # per-call dropout seeds: one compilation
def _bwd_kv_kernel(Q, K, V, G, Mk, DO, Stat, Delta, DK, DV, DG,
                   sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                   sg_b, sg_h, sg_n, sg_p, sm_b, sm_h, sm_n, sm_m, sdo_b, sdo_h, sdo_n, sdo_d,
                   sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d, sdg_b, sdg_h, sdg_n, sdg_p,
                   splits, sdk_s, sdv_s, sdg_s,
                   Hq, Hkv, N, M, L, REP, scale, mask_min, seed_lo, seed_hi, keep_thr, inv_keep, seq_bucket,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_PREFIX: tl.constexpr, HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr, GATE_H1: tl.constexpr,
                   MASK_KIND: tl.constexpr, MASK_N1: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   PREC: tl.constexpr, SPLIT: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """dK, dV of one key tile (prefix or tokens) of one (batch, kv head); for the prefix also dgate.
    SPLIT (prefix launches only): a program covers one of ``splits`` runs of query tiles and writes its
    partial dK, dV at split stride ``sdk_s``/``sdv_s`` (and a row-shared dgate at ``sdg_s``); the caller
    sums the partials. Without SPLIT the code is the unsplit kernel's: the query loop from a literal 0."""
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid: (splits) x (key tiles) x (B Hkv); int64 offsets
    sp = 0
    if SPLIT:
        sp = (pid % splits).to(tl.int32)  # int32: the query loop's bounds stay 32-bit (64-bit ones spill)
        pid = pid // splits
    n_tiles = tl.cdiv(L, BLOCK_N)
    pid_n = pid % n_tiles
    bg = pid // n_tiles
    b = bg // Hkv
    kvh = bg % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < D
    kt = _load_rows(K + b * sk_b + kvh * sk_h, offs_n, offs_d, sk_n, sk_d, n_ok, d_ok)
    vt = _load_rows(V + b * sv_b + kvh * sv_h, offs_n, offs_d, sv_n, sv_d, n_ok, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Only the causal token tiles need the selects (EDGE): key columns past L load as 0 and only feed
    # dk/dv rows (and dgate entries, masked) that are never stored. Unlike the forward, the loop is not
    # split into interior and edge query tiles: by the sm_90 ptxas reports, a second loop here costs up
    # to ~500 B of spills per thread in the causal configurations. The loop starts at a literal 0 or a
    # visible multiple of BLOCK_M (Triton's alignment analysis then keeps the row loads vectorised).
    lo = 0
    hi = N
    if SPLIT:  # this split's run of query tiles; rows past N are masked
        run = tl.cdiv(tl.cdiv(N, BLOCK_M), splits)
        lo = sp * run * BLOCK_M
        hi = lo + run * BLOCK_M
    if CAUSAL:
        if not IS_PREFIX:  # row i sees key t iff t <= i + (M - N)
            lo = tl.maximum(pid_n * BLOCK_N - (M - N), 0) // BLOCK_M * BLOCK_M
    for hh in range(0, REP):
        h = kvh * REP + hh
        dk, dv = _dkv_tiles(
            dk, dv, kt, vt, lo, hi, Q + b * sq_b + h * sq_h, DO + b * sdo_b + h * sdo_h, G, Mk, DG, sq_n, sq_d,
            sdo_n, sdo_d, b * sg_b, h * sg_h, sg_n, sg_p, b * sm_b, h * sm_h, sm_n, sm_m,
            (sp * sdg_s if SPLIT else 0) + b * sdg_b + (kvh if GATE_H1 else h) * sdg_h, sdg_n, sdg_p, Stat, Delta,
            b * Hq + h, offs_n, offs_d, n_ok,
            d_ok, pid_n * BLOCK_N, N, M, scale * LOG2E, mask_min, seed_lo, seed_hi, keep_thr, inv_keep,
            BLOCK_M, BLOCK_N,
            IS_PREFIX, CAUSAL and not IS_PREFIX, HAS_GATE, GATE_N1, MASK_KIND, MASK_N1, CAUSAL, DROPOUT, PREC,
            KEY_MAJOR)
    dk = dk * scale  # once, not per tile: the dot then adds into its accumulator (no extra tile)
    if SPLIT:
        DK += sp * sdk_s
        DV += sp * sdv_s
    tl.store(DK + b * sdk_b + kvh * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * sdv_b + kvh * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :] * sdv_d,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _dq_tiles(dq, q, do, lse_hi, lse_lo, delta, Kp, Vp, skn, skd, svn, svd, L, lo, hi, G, Mk, offs_m, offs_d, m_ok, d_ok,
              gb, gh, sg_n, sg_p, mb, mh, sm_n, sm_m, mask_min, N, M, qk2, seed_lo, seed_hi, keep_thr, inv_keep,
              bh, row0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr, EDGE: tl.constexpr,
              HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr, MASK_KIND: tl.constexpr, MASK_N1: tl.constexpr,
              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """dq (unscaled) accumulated over key tiles lo, lo + BLOCK_N, .. < hi of one part (0 prefix, 1 tokens)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kt = _load_rows(Kp, offs_n, offs_d, skn, skd, n_ok, d_ok)
        vt = _load_rows(Vp, offs_n, offs_d, svn, svd, n_ok, d_ok)
        s, raw, g = _scores(q, kt, G, offs_m, offs_n, m_ok, n_ok, gb, gh, sg_n, sg_p, Mk, mb, mh, sm_n, sm_m,
                            mask_min, N, M, qk2, PART == 0, HAS_GATE, GATE_N1, MASK_KIND, MASK_N1, CAUSAL, EDGE,
                            PREC)
        p = _probs(s, lse_hi, lse_lo, MASK_KIND)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, bh, row0, start, PART, keep_thr, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        if PART == 0:
            if HAS_GATE:
                dp = dp * g
        ds = p * (dp - delta[:, None])
        if PART == 0:
            if HAS_GATE:
                ds = ds * g
        dq = tl.dot(ds.to(kt.dtype), kt, dq, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])  # per-call dropout seeds: one compilation
def _bwd_q_kernel(Q, K, V, PK, PV, G, Mk, DO, Out, DLse, Stat, Delta, DQ,
                  sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  spk_b, spk_h, spk_n, spk_d, spv_b, spv_h, spv_n, spv_d,
                  sg_b, sg_h, sg_n, sg_p, sm_b, sm_h, sm_n, sm_m, sdo_b, sdo_h, sdo_n, sdo_d,
                  so_b, so_h, so_n, so_d, sdq_b, sdq_h, sdq_n, sdq_d,
                  Hq, N, M, P, REP, scale, mask_min, seed_lo, seed_hi, keep_thr, inv_keep, seq_bucket,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PW: tl.constexpr, HAS_GATE: tl.constexpr, GATE_N1: tl.constexpr, MASK_KIND: tl.constexpr,
                  MASK_N1: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                  HAS_DLSE: tl.constexpr):
    """dq of one query tile; first the tile's rows of delta = rowsum(dO * O) - dlse (float32), kept for dq and
    stored for the key-side launches, which run after this one (no pre-pass launch of its own)."""
    pid_m, bh, b, h, offs_m, offs_d, m_ok, d_ok = _query_tile(Hq, N, D, BLOCK_M, BLOCK_D)
    kvh = h // REP
    BLOCK_P: tl.constexpr = PW if PW < BLOCK_N else BLOCK_N  # prefix tiles no wider than the prefix
    do = _load_rows(DO + b * sdo_b + h * sdo_h, offs_m, offs_d, sdo_n, sdo_d, m_ok, d_ok)
    o = _load_rows(Out + b * so_b + h * so_h, offs_m, offs_d, so_n, so_d, m_ok, d_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + bh * N + offs_m, mask=m_ok, other=0.0)
    tl.store(Delta + bh * N + offs_m, delta, mask=m_ok)
    q = _load_rows(Q + b * sq_b + h * sq_h, offs_m, offs_d, sq_n, sq_d, m_ok, d_ok)
    lse_hi, lse_lo = _row_stat(Stat, bh, N, offs_m, m_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in tl.static_range(2):  # prefix tiles, then token tiles
        Kp, Vp, skn, skd, svn, svd, L, mid, hi = _kv_tiles(
            part == 0, b, kvh, K, V, PK, PV, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
            spk_b, spk_h, spk_n, spk_d, spv_b, spv_h, spv_n, spv_d, pid_m, N, M, P, BLOCK_M, BLOCK_N, CAUSAL)
        for edge in tl.static_range(1 - part, 2):  # interior token tiles, then the edge tiles
            dq = _dq_tiles(dq, q, do, lse_hi, lse_lo, delta, Kp, Vp, skn, skd, svn, svd, L, mid if edge else 0,
                           hi if edge else mid, G, Mk, offs_m, offs_d, m_ok, d_ok, b * sg_b, h * sg_h, sg_n, sg_p,
                           b * sm_b, h * sm_h, sm_n, sm_m, mask_min, N, M, scale * LOG2E, seed_lo, seed_hi, keep_thr,
                           inv_keep, bh, pid_m * BLOCK_M, BLOCK_M, BLOCK_P if part == 0 else BLOCK_N, part,
                           edge == 1, HAS_GATE, GATE_N1, MASK_KIND, MASK_N1, CAUSAL, DROPOUT, PREC)
    dq = dq * scale  # once, as dk
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


def _strides(t: torch.Tensor | None, ndim: int = 4):
    """Strides with 0 on size-1 (broadcast) dims; zeros for a missing tensor."""
    if t is None:
        return (0,) * ndim
    n, st = t.shape, t.stride()
    if len(n) == 4:  # (the launchers' host time: unrolled for the common case)
        return (0 if n[0] == 1 else st[0], 0 if n[1] == 1 else st[1], 0 if n[2] == 1 else st[2],
                0 if n[3] == 1 else st[3])
    return tuple([0 if s == 1 else x for s, x in zip(n, st)])


# Block configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages), per head-dim class (64, 128, 256).
# On a GPU the kernels are autotuned over these (key: head dim, sequence-length bucket, features,
# dtypes; APT_KERNELS_AUTOTUNE=0 at import, or AUTOTUNE = False, turns it off); the first of each list is the
# fixed choice then.
# For tensor-core dots (fp16, bf16): starting points from the FlashAttention-2 Triton tutorial, not yet
# measured on hardware; at head dim 64 the first entries are ones that compile for sm_90 without register
# spills at the benchmark feature sets (the tutorial's 128 x 64 / 4 warps forward and 64 x 64 backward
# spill 150-450 bytes per thread with the prefix loop, gate and dropout).
# (At head dim 64 the last entry, 128 x 32 on 8 warps, compiles to 128 registers without spills at the BERT
# feature set, two blocks per SM where the others hold one; added after the H200 run, not yet timed.)
_FWD_TABLE = {64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
              128: [(128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
              256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)]}
# The query-side backward's (the key side has its own tables below). The last entry of the 64 and 128 classes,
# 128 query rows by 32 keys on 8 warps (the FlashAttention-2 Triton tutorial's dq tiles), compiles for sm_90
# to all-wgmma dots without spills: 124 registers at the BERT feature set (two blocks per SM), 255 at the
# decoder's; added after the H200 run, not yet timed.
_BWD_TABLE = {64: [(32, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
              128: [(64, 32, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
              256: [(64, 16, 8, 1), (32, 32, 8, 1), (32, 16, 4, 1)]}
# For float32's IEEE dots, which Triton lowers to FMA loops holding a whole reduction row of an operand
# per thread: the tiles above compile for sm_90 to 255 registers and 0.5-16 KB of spills per thread
# (ptxas drops to 32 registers and keeps the tiles in local memory in most of the key-side backward's
# configurations). With these narrower ones every kernel has configurations that compile with no spills
# or a few dozen bytes at head dims 64 and 128 (the first entries among them where one config serves all);
# at 256 each still spills about 2 KB (the QK^T dot's reduction is the head dim). Static evidence from
# `python -m benchmarks.kernel_resources` (benchmarks/results/), not yet timed.
_FWD_TABLE_IEEE = {64: [(64, 16, 8, 1), (32, 16, 8, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
                   128: [(32, 16, 8, 1), (64, 16, 8, 1), (16, 16, 4, 1), (32, 16, 4, 1)],
                   256: [(32, 16, 8, 1), (16, 16, 4, 1), (64, 16, 8, 1)]}
_BWD_TABLE_IEEE = {64: [(32, 16, 8, 1), (64, 16, 8, 1), (16, 16, 4, 1), (16, 32, 4, 1)],
                   128: [(32, 16, 8, 1), (16, 16, 4, 1), (64, 16, 8, 1), (32, 32, 4, 2)],
                   256: [(32, 16, 8, 1), (16, 16, 4, 1)]}
# The key-side backward's own tables: the entries it shared with the query side until the H200 run (the
# backward table then, first entry the fixed choice), which compute its score tiles as (queries, keys)
# and transpose P and dS in registers for dV += P^T dO and dK += dS^T Q (last field False), and key-major ones
# (True): the tiles computed as K Q^T, (keys, queries), so that all four dots take their operands as they
# are and have the key tile as their rows. Compiled for sm_90 (Triton 3.6), a row dimension of 32 keys
# cannot use Hopper's warpgroup MMA (64 rows per warpgroup): the backward's fixed choice at head dim 128
# (64 x 32, 8 warps) issues half of its dots as mma.sync; the key-major 32 x 128 ones issue all four as
# wgmma, at 244-255 registers and 0-64 bytes of spills per thread at the benchmark feature sets (the
# FlashAttention-2 Triton tutorial's key-side tiles are 32 x 128 too). Static evidence
# (`python -m benchmarks.kernel_resources`), not yet timed: the autotuner decides between the two.
_KV_TABLE = {64: [(32, 64, 4, 2, False), (64, 64, 4, 2, False), (64, 32, 4, 2, False), (128, 64, 8, 2, False),
                   (32, 128, 8, 2, True), (32, 64, 4, 2, True)],
             128: [(64, 32, 8, 1, False), (64, 64, 8, 1, False), (32, 32, 4, 2, False), (64, 32, 4, 2, False),
                   (32, 128, 8, 2, True), (64, 128, 8, 1, True)],
             256: [(64, 16, 8, 1, False), (32, 32, 8, 1, False), (32, 16, 4, 1, False)]}
# IEEE dots (FMA loops) have no row minimum; key-major tiles there compile with fewer spills in some cases
# (16 x 32, 4 warps: none at head dims 64 and 128, where the query-major one spills 8-216 bytes)
_KV_TABLE_IEEE = {cls: [c + (False,) for c in cfgs] + ([(16, 32, 4, 1, True)] if cls < 256 else [])
                  for cls, cfgs in _BWD_TABLE_IEEE.items()}
_TUNE_KEY = ["D", "PW", "seq_bucket", "CAUSAL", "HAS_GATE", "MASK_KIND", "MASK_N1", "DROPOUT", "IS_PREFIX", "GATE_N1",
             "GATE_H1", "SPLIT"]


def _tables(prec: str) -> tuple[dict, dict, dict, str]:
    """(forward table, query-side backward table, key-side backward table, autotuner tag) for the kernels' dot
    precision."""
    if prec == "ieee":
        return _FWD_TABLE_IEEE, _BWD_TABLE_IEEE, _KV_TABLE_IEEE, "ieee"
    return _FWD_TABLE, _BWD_TABLE, _KV_TABLE, ""


@functools.lru_cache(maxsize=None)
def _prefix_table(width: int, prec: str = "tf32") -> dict:
    """The key-side backward's table for prefix tiles: the key-side table of ``prec`` with key tiles no
    wider than ``width``, the prefix length's next power of two (at least 16). A P = 16 prefix in 64-wide
    tiles would spend 3/4 of that launch on empty columns."""
    return {cls: list(dict.fromkeys((m, min(n, width), *rest) for m, n, *rest in cfgs))
            for cls, cfgs in _tables(prec)[2].items()}


def _meta(entry: tuple) -> dict:
    """The kernel constants of a table entry (BLOCK_M, BLOCK_N, num_warps, num_stages[, KEY_MAJOR])."""
    meta = dict(BLOCK_M=entry[0], BLOCK_N=entry[1])
    if len(entry) > 4:
        meta["KEY_MAJOR"] = entry[4]
    return meta


def _entry(config) -> tuple:
    """The table entry of an autotuning configuration (the inverse of ``_meta``)."""
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages) + (
        (kw["KEY_MAJOR"],) if "KEY_MAJOR" in kw else ())


def _block_d(D: int) -> int:
    """The head-dim tile: D's next power of two, at least 16."""
    return max(16, next_power_of_2(D))


def _dclass(D: int) -> int:
    block_d = _block_d(D)
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _blocks(D: int, device: torch.device, table=None):
    """(block sizes, launch options) of the fixed choice: the table's first entry on a GPU, 16 x 16 tiles
    (in the first entry's orientation) in the interpreter."""
    block_d = _block_d(D)
    entry = (table or _FWD_TABLE)[_dclass(D)][0]
    if not launches.compiled(device):
        return dict(BLOCK_D=block_d, **_meta((16, 16) + entry[2:])), dict(num_warps=1)
    return dict(BLOCK_D=block_d, **_meta(entry)), dict(num_warps=entry[2], num_stages=entry[3])


def _autotuned(kernel, table, reset=()):
    configs = sorted({c for cfgs in table.values() for c in cfgs})

    def prune(configs, nargs, **kwargs):
        want = table[_dclass(kwargs["D"])]
        return [c for c in configs if _entry(c) in want]

    return triton.autotune([triton.Config(_meta(c), num_warps=c[2], num_stages=c[3]) for c in configs],
                           key=[k for k in _TUNE_KEY if k in kernel.arg_names],
                           prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=list(reset))(kernel)


_TUNED = {}  # (kernel name, tag) -> its autotuner; tag names a table other than the kernel's default ("")
# Read once (a launch's host time counts: short sequences pay it in full); tests set the attribute.
AUTOTUNE = os.environ.get("APT_KERNELS_AUTOTUNE", "1") != "0"


def autotune_choices() -> dict[str, dict[str, str]]:
    """{kernel name: {autotuning key: picked configuration}} of the kernels autotuned so far in this process
    (for the benchmark reports: which tiles won on this GPU)."""
    return {name + (f"[{tag}]" if tag else ""): {str(k): str(cfg) for k, cfg in tuner.cache.items()}
            for (name, tag), tuner in _TUNED.items() if getattr(tuner, "cache", None)}


def _launch(kernel, table, grid_of, args, consts, device, reset=(), tag=""):
    """Launch ``kernel`` on the grid ``grid_of(BLOCK_M, BLOCK_N)``: autotuned over ``table`` on a GPU
    (one autotuner per kernel and ``tag``, the name of a table other than the kernel's usual one), else
    with the fixed blocks. ``reset`` names buffers the kernel accumulates into (zeroed between autotuning
    trials)."""
    D = consts["D"]
    seq_bucket = min(next_power_of_2(max(args[-1], 1)), 1 << 14)  # args end with the longest length
    args = args[:-1] + (seq_bucket,)
    if AUTOTUNE and launches.compiled(device):
        key = (kernel.__name__, tag)  # (a JITFunction's own hash is Python code, under a lock)
        tuner = _TUNED.get(key)
        if tuner is None:
            tuner = _TUNED[key] = _autotuned(kernel, table, reset)
        run(tuner, lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"]), args,
            dict(BLOCK_D=_block_d(D), **consts, **FP_FUSION), device)
        return
    blocks, options = _blocks(D, device, table)
    run(kernel, grid_of(blocks["BLOCK_M"], blocks["BLOCK_N"]), args, dict(**blocks, **consts, **options, **FP_FUSION),
        device)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


class _Prepared:
    """Kernel-ready views of the op's arguments: mask kind, dummy pointers, strides, dropout keys."""

    def __init__(self, q, k, v, pk, pv, gate, mask, dropout_p, seed):
        self.B, self.Hq, self.N, self.D = q.shape
        self.Hkv, self.M = k.shape[1], k.shape[2]
        self.P = 0 if pk is None else pk.shape[2]
        self.REP = self.Hq // self.Hkv
        self.q_strides, self.k_strides, self.v_strides = _strides(q), _strides(k), _strides(v)
        dummy = q  # the pointer of an absent tensor: its kernel branches are compiled out, never read
        self.pk = dummy if pk is None else pk
        self.pv = dummy if pv is None else pv
        self.pk_strides = (0, 0, 0, 0) if pk is None else _strides(pk)
        self.pv_strides = (0, 0, 0, 0) if pv is None else _strides(pv)
        self.has_gate = gate is not None and self.P > 0
        self.gate = gate if self.has_gate else dummy
        self.g_strides = _strides(gate) if self.has_gate else (0, 0, 0, 0)
        self.gate_n1 = self.has_gate and gate.shape[2] == 1  # the same gate row for every query
        self.mask_min = 0.0
        self.m_strides = _strides(mask)
        if mask is None:
            self.mask_kind, self.mask = 0, dummy
        elif mask.dtype == torch.bool:
            self.mask_kind, self.mask = 1, mask.view(torch.uint8)
        elif mask.dtype in (torch.float16, torch.bfloat16, torch.float32):
            self.mask_kind, self.mask, self.mask_min = 2, mask, float(torch.finfo(mask.dtype).min)
        else:  # float64: a float32 copy, finite values saturated at float32's range (a plain cast would make
            # -1e300 an -inf, hiding its key) and only -inf hiding a key
            f32 = torch.finfo(torch.float32).max
            m = mask.clamp(-f32, f32).float().masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))
            # the copy's own strides (it may be laid out anew), 0 where the mask is broadcast (equal values)
            self.m_strides = tuple(0 if so == 0 else sm for so, sm in zip(self.m_strides, _strides(m)))
            self.mask_kind, self.mask, self.mask_min = 2, m, float("-inf")
        self.mask_n1 = mask is not None and self.m_strides[2] == 0  # one mask row for every query (padding)
        self.dropout = dropout_p > 0.0
        self.keep_thr = keep_threshold(dropout_p) if self.dropout else 0
        self.inv_keep = 1.0 / (1.0 - dropout_p) if self.dropout else 1.0
        seed &= (1 << 64) - 1
        self.seed_lo, self.seed_hi = seed & 0xFFFFFFFF, seed >> 32


def attention_forward(q, k, v, pk, pv, gate, mask, causal: bool, scale: float, dropout_p: float, seed: int):
    """(out, lse, stat) from the fused forward kernel; stat (B, Hq, N, 2) float32 holds each row's base-2 lse as
    hi + lo for the backward (the kernels' own; lse is the user's, in natural units)."""
    with on_device(q.device):
        return _attention_forward(q, k, v, pk, pv, gate, mask, causal, scale, dropout_p, seed)


def _attention_forward(q, k, v, pk, pv, gate, mask, causal, scale, dropout_p, seed):
    a = _Prepared(q, k, v, pk, pv, gate, mask, dropout_p, seed)
    # in q's memory layout: Hugging Face's (B, N, H, D) projections viewed as (B, H, N, D) get an output whose
    # transpose back is contiguous, so the caller's .transpose(1, 2).contiguous() copies nothing (as SDPA's)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    stat = torch.empty(q.shape[:3] + (2,), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse, stat
    prec = _precision(q.dtype)
    table, _, _, tag = _tables(prec)
    _launch(_fwd_kernel, table, lambda bm, bn: (cdiv(a.N, bm) * a.B * a.Hq,),
            (q, k, v, a.pk, a.pv, a.gate, a.mask, out, lse, stat,
             *a.q_strides, *a.k_strides, *a.v_strides, *a.pk_strides, *a.pv_strides,
             *a.g_strides, *a.m_strides, *out.stride(),
             a.Hq, a.N, a.M, a.P, a.REP, scale, a.mask_min, a.seed_lo, a.seed_hi, a.keep_thr, a.inv_keep,
             max(a.N, a.M + a.P)),
            dict(D=a.D, PW=_prefix_width(a.P), HAS_GATE=a.has_gate, GATE_N1=a.gate_n1, MASK_KIND=a.mask_kind,
                 MASK_N1=a.mask_n1, CAUSAL=causal, DROPOUT=a.dropout, PREC=prec), q.device, tag=tag)
    return out, lse, stat


def attention_backward(grad_out, grad_lse, q, k, v, pk, pv, gate, mask, out, stat, causal: bool, scale: float,
                       dropout_p: float, seed: int):
    """(dq, dk, dv, dprefix_k, dprefix_v, dgate), each reduced to its input's (broadcast) shape."""
    with on_device(q.device):
        return _attention_backward(grad_out, grad_lse, q, k, v, pk, pv, gate, mask, out, stat, causal, scale,
                                   dropout_p, seed)


def _attention_backward(grad_out, grad_lse, q, k, v, pk, pv, gate, mask, out, stat, causal, scale, dropout_p, seed):
    a = _Prepared(q, k, v, pk, pv, gate, mask, dropout_p, seed)
    B, Hq, N, D, Hkv, M, P = a.B, a.Hq, a.N, a.D, a.Hkv, a.M, a.P
    stat = stat.contiguous()
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    do = grad_out
    # The kernels write every element of dq, dk, dv and the prefix buffers (plain stores); only the gate's
    # buffer is accumulated into. With nothing to attend to (no keys at all) the gradients are zero.
    if q.numel() == 0 or (M == 0 and P == 0):
        return _backward_result(torch.zeros_like(q), *_key_side_buffers(a, q, k, v, gate, 1, zero=True)[:5], a,
                                pk, pv, gate)
    # The query side first, with only what it needs allocated: the GPU starts on it while the host prepares
    # the key side (short sequences are host-bound).
    dq = torch.empty_like(q)  # in q's memory layout (as out: no copy after)
    delta = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)  # written here, read by the key side
    dlse = stat if grad_lse is None else grad_lse.float().contiguous()  # a dummy pointer when there is none
    do_strides = _strides(do)
    prec = _precision(q.dtype)
    _, bwd_table, kv_table, tag = _tables(prec)
    common = dict(D=D, MASK_KIND=a.mask_kind, MASK_N1=a.mask_n1, CAUSAL=causal, DROPOUT=a.dropout, PREC=prec)
    tail = (scale, a.mask_min, a.seed_lo, a.seed_hi, a.keep_thr, a.inv_keep, max(N, M + P))
    width = _prefix_width(P)  # the prefix launch's key tiles: no wider than the prefix
    _launch(_bwd_q_kernel, bwd_table, lambda bm, bn: (cdiv(N, bm) * B * Hq,),
            (q, k, v, a.pk, a.pv, a.gate, a.mask, do, out, dlse, stat, delta, dq,
             *a.q_strides, *a.k_strides, *a.v_strides, *a.pk_strides, *a.pv_strides,
             *a.g_strides, *a.m_strides, *do_strides, *_strides(out), *dq.stride(),
             Hq, N, M, P, a.REP, *tail),
            dict(common, PW=width, HAS_GATE=a.has_gate, GATE_N1=a.gate_n1, HAS_DLSE=grad_lse is not None), q.device,
            tag=tag)
    # the prefix launch's query splits (each writes partial dprefix_k/v, summed after): a prefix has one or two
    # key tiles per (batch, kv head), too few programs to fill a GPU at decoder batch sizes
    splits = _prefix_splits(cdiv(P, width) * B * Hkv, N, q.device) if P else 1
    dk, dv, dpk_parts, dpv_parts, dg_buf, dg_dummy, gate_h1 = _key_side_buffers(a, q, k, v, gate, splits)
    prefix_table = (_prefix_table(width, prec), ",".join(filter(None, (tag, f"prefix<={width}"))))
    # The prefix launch on a side stream (forked after the query side, which writes delta; joined below): its
    # few programs then share the GPU with the token launch's instead of running alone after them.
    side = _side_stream(q.device) if P and M and PREFIX_STREAM else None
    if side is not None:
        main = torch.cuda.current_stream(q.device)
        side.wait_stream(main)
    for is_prefix in (True, False):
        L = P if is_prefix else M
        if L == 0:
            continue
        Kt, Vt = (a.pk, a.pv) if is_prefix else (k, v)
        # The token launch never touches the gate buffer, but the autotuner zeroes every buffer named
        # DG before and after its trials: it must not see the one the prefix launch has just filled.
        DGt = dg_buf if is_prefix else dg_dummy
        k_st, v_st = (a.pk_strides, a.pv_strides) if is_prefix else (a.k_strides, a.v_strides)
        # prefix: the (splits, B, Hkv, P, D) partials; tokens: dk, dv themselves (split stride 0)
        DKt, DVt = (dpk_parts, dpv_parts) if is_prefix else (dk.unsqueeze(0), dv.unsqueeze(0))
        n_split = splits if is_prefix else 1
        table, kv_tag = prefix_table if is_prefix else (kv_table, tag)
        with torch.cuda.stream(side) if is_prefix and side is not None else contextlib.nullcontext():
            _launch(_bwd_kv_kernel, table,
                    lambda bm, bn, L=L, n_split=n_split: (n_split * cdiv(L, bn) * B * Hkv,),
                    (q, Kt, Vt, a.gate, a.mask, do, stat, delta, DKt, DVt, DGt,
                     *a.q_strides, *k_st, *v_st, *a.g_strides, *a.m_strides, *do_strides,
                     *DKt.stride()[1:], *DVt.stride()[1:], *_strides(DGt[0]),
                     n_split, DKt.stride(0), DVt.stride(0), DGt.stride(0) if DGt.shape[0] > 1 else 0,
                     Hq, Hkv, N, M, L, a.REP, *tail),
                    dict(common, IS_PREFIX=is_prefix, HAS_GATE=a.has_gate and is_prefix, GATE_N1=a.gate_n1,
                         GATE_H1=gate_h1, SPLIT=n_split > 1), q.device, reset=("DG",), tag=kv_tag)
    if side is not None:  # every tensor the side stream touched outlives this join: no record_stream needed
        main.wait_stream(side)
    return _backward_result(dq, dk, dv, dpk_parts, dpv_parts, dg_buf, a, pk, pv, gate)


def _key_side_buffers(a, q, k, v, gate, splits: int, zero: bool = False):
    """(dk, dv, the dprefix_k and dprefix_v partials of ``splits`` query splits, the gate buffer, a 1-element
    stand-in, whether the gate is shared by the heads) for the key-side launches; all zeros with ``zero`` (no
    kernel runs). dk and dv in their inputs' memory layouts (as out: no copies after)."""
    B, Hq, N, D, Hkv, P = a.B, a.Hq, a.N, a.D, a.Hkv, a.P
    alloc_like, alloc = (torch.zeros_like, torch.zeros) if zero else (torch.empty_like, torch.empty)
    dk, dv = alloc_like(k), alloc_like(v)
    dpk_parts = dpv_parts = None
    gate_h1 = False
    if P:
        dpk_parts = alloc((splits, B, Hkv, P, D), dtype=torch.float32, device=q.device)
        dpv_parts = alloc_like(dpk_parts)
    # a 1-element stand-in where no gate gradient is made (the token launch, or no gate at all)
    dg_dummy = dg_buf = q.new_empty((1, 1, 1, 1, 1), dtype=torch.float32)
    if a.has_gate:  # (accumulated into: zeroed in any case)
        gate_h1 = gate.shape[1] == 1
        # a row-shared gate's gradient is a sum over the query rows: one partial per split
        dg_splits = splits if a.gate_n1 else 1
        dg_buf = torch.zeros((dg_splits, B, Hkv if gate_h1 else Hq, 1 if a.gate_n1 else N, P),
                             dtype=torch.float32, device=q.device)
    return dk, dv, dpk_parts, dpv_parts, dg_buf, dg_dummy, gate_h1


# Whether the backward's prefix launch runs on a side stream (APT_KERNELS_PREFIX_STREAM=0 at import, or
# PREFIX_STREAM = False, keeps every launch on the caller's stream; the benchmarks time both).
PREFIX_STREAM = os.environ.get("APT_KERNELS_PREFIX_STREAM", "1") != "0"
_SIDE: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device):
    """This process's side stream on ``device`` (one per device, made on first use); None where the kernels do
    not run compiled on a CUDA device (the interpreter; CPU tensors standing in for CUDA ones)."""
    if device.type != "cuda" or not launches.compiled(device):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE.get(index)
    if stream is None:
        stream = _SIDE[index] = torch.cuda.Stream(device=index)
    return stream


_SUM_BLOCK = 1024


def _backward_result(dq, dk, dv, dpk_parts, dpv_parts, dg_parts, a, pk, pv, gate):
    """The gradients, each reduced to its input's shape and dtype. The prefix launch leaves float32 partials
    (per query split, per batch and head); their sums over the splits and the broadcast dims and the casts
    run as one launch of _sums_kernel (a fixed order: no atomics, the same bits every run) instead of a torch
    sum and cast per gradient (up to six launches' host time, which short sequences pay in full)."""
    # a gate shared along the prefix (last dim 1, P > 1; rare) is summed over P by torch below, in float32
    gate_p1 = a.has_gate and gate.shape[3] == 1 and dg_parts.shape[-1] != 1
    specs = [_prefix_spec(dpk_parts, pk), _prefix_spec(dpv_parts, pv),
             _gate_spec(dg_parts, gate) if a.has_gate and not gate_p1 else None]
    outs, segs = [], []
    for spec in specs:
        if spec is None:
            outs.append(None)
            continue
        src, r1, a_, r2, c, shape, dtype = spec
        if r1 == 1 and r2 == 1 and dtype == torch.float32:  # nothing to sum or cast
            outs.append(src.view(shape))
            continue
        out = torch.empty(shape, dtype=dtype, device=src.device)
        outs.append(out)
        segs.append((src, out, r1, a_, r2, c, cdiv(a_ * c, _SUM_BLOCK)))
    if any(seg[-1] for seg in segs):
        dummy = (dq, dq, 0, 0, 0, 0, 0)
        args = [x for seg in (segs + [dummy] * 3)[:3] for x in seg]
        run(_sums_kernel, (sum(seg[-1] for seg in segs),), tuple(args[:-1]),
            dict(BLOCK=_SUM_BLOCK, num_warps=4, **FP_FUSION), dq.device)
    dpk, dpv, dg = outs
    if gate_p1:
        dg = dg_parts.sum(0).sum_to_size(gate.shape).to(gate.dtype)
    if gate is not None:
        dg = torch.zeros_like(gate) if dg is None else dg if dg.shape == gate.shape else dg.expand(gate.shape)
    return dq, dk, dv, dpk, dpv, dg


def _prefix_spec(parts, prefix):
    """(partials, R1, A, R2, C, shape, dtype) of a prefix gradient: the (splits, B, Hkv, P, D) partials summed
    over the splits, and over the batch for a shared prefix."""
    if prefix is None:
        return None
    S, B = parts.shape[:2]
    if prefix.shape[0] == 1:
        return parts, S * B, 1, 1, math.prod(parts.shape[2:]), prefix.shape, prefix.dtype
    return parts, S, 1, 1, math.prod(parts.shape[1:]), prefix.shape, prefix.dtype


def _gate_spec(parts, gate):
    """The same for the gate's (splits, B, H, N or 1, P) partials: summed over the splits, the batch where the
    gate is shared by the batch and the heads where it is shared by them (H: Hkv or Hq, as the kernel wrote)."""
    S, B, H, n1, P = parts.shape
    red_b, red_h = gate.shape[0] == 1 and B != 1, gate.shape[1] == 1 and H != 1
    if red_h and not red_b:  # (S, B, H, C) -> (B, C): sums over the first and third dims
        return parts, S, B, H, n1 * P, (B, 1, n1, P), gate.dtype
    keep_b, keep_h = 1 if red_b else B, 1 if red_h else H
    r1 = S * (B if red_b else 1) * (H if red_h else 1)
    return parts, r1, 1, 1, keep_b * keep_h * n1 * P, (keep_b, keep_h, n1, P), gate.dtype


def _prefix_width(P: int) -> int:
    """The widest key tile of the prefix launch: P's next power of two, at least 16."""
    return max(16, next_power_of_2(P))


PREFIX_SPLITS = None  # tests set a fixed number of query splits for the prefix launch


def _prefix_splits(programs: int, N: int, device: torch.device) -> int:
    """Query splits of the prefix launch: enough programs for two per SM on a GPU (at most 32 splits, at
    least 16 query rows each); 1 in the interpreter."""
    if PREFIX_SPLITS is not None:
        return max(1, PREFIX_SPLITS)
    if not launches.compiled(device):
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(32, cdiv(2 * sms, programs), cdiv(N, 16)))


# ----------------------------------------------------------------------------------------------
# torch custom ops: traceable by torch.compile (fake implementations) with autograd attached.

_EMPTY = (0,)


@torch.library.custom_op("apt_kernels::gated_prefix_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
            prefix_v: torch.Tensor | None, gate: torch.Tensor | None, attn_mask: torch.Tensor | None,
            causal: bool, scale: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, seed)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, seed):
    return (torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32),
            q.new_empty(q.shape[:3] + (2,), dtype=torch.float32))


@torch.library.custom_op("apt_kernels::gated_prefix_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, gate: torch.Tensor | None,
            attn_mask: torch.Tensor | None, out: torch.Tensor, stat: torch.Tensor, causal: bool, scale: float,
            dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    grads = attention_backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, gate, attn_mask, out, stat,
                               causal, scale, dropout_p, seed)
    # custom ops return tensors only: an absent gradient travels as an empty tensor
    return tuple(q.new_empty(_EMPTY) if g is None else g for g in grads)


@_bwd_op.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, gate, attn_mask, out, stat, causal, scale,
              dropout_p, seed):
    # dq, dk, dv in their inputs' layouts (as attention_backward allocates them); the rest contiguous
    return (*(torch.empty_like(t) for t in (q, k, v)),
            *(q.new_empty(_EMPTY) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
              for t in (prefix_k, prefix_v, gate)))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, seed = inputs
    out, _, stat = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, attn_mask, out, stat)
    ctx.args = (causal, scale, dropout_p, seed)
    ctx.present = tuple(t is not None for t in (prefix_k, prefix_v, gate))


def _no_double_backward():
    """The kernels' gradients are not themselves differentiable. A backward asked to build a graph
    (create_graph=True, e.g. a gradient penalty) would give gradients without the attention's second-order
    terms, silently: refuse instead. (once_differentiable would not: its error node is never reached when
    the differentiated inputs are also used elsewhere.)"""
    if torch.is_grad_enabled():
        raise RuntimeError("gated_prefix_attention: the triton backend has no double backward (a backward with "
                           "create_graph=True); use backend='torch' or 'reference' for higher-order gradients")


def _input_grads(backward, ctx, grad_out, grad_lse):
    """The gradients of the eleven forward inputs from ``backward`` (attention_backward, or the custom op over
    it, which returns an empty tensor for an absent input's gradient)."""
    _no_double_backward()
    q, k, v, prefix_k, prefix_v, gate, attn_mask, out, stat = ctx.saved_tensors
    dq, dk, dv, *opt = backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, gate, attn_mask, out, stat,
                                *ctx.args)
    opt = [g if present else None for g, present in zip(opt, ctx.present)]
    dmask = _mask_grad(ctx, grad_out, grad_lse, q, k, v, attn_mask, out, stat)
    return (dq, dk, dv, *opt, dmask, None, None, None, None)


def _backward(ctx, grad_out, grad_lse, grad_stat=None):  # (stat is the kernels' own: never differentiated)
    return _input_grads(_bwd_op, ctx, grad_out, grad_lse)


def _mask_grad(ctx, grad_out, grad_lse, q, k, v, attn_mask, out, stat):
    """dL/d(attn_mask) of a float mask that needs one (DeBERTa's relative-position bias, a learned bias):
    the token scores' gradient dS = P (dO V^T - rowsum(dO O)) (+ dlse P), summed to the mask's shape. The
    kernels do not produce dS; this recomputes it with torch matmuls in float32, O(B Hq N M) memory, as a
    materialised mask needs anyway. None when the mask needs no gradient (the usual case: no cost).
    The probabilities are the kernels' own: base-2 scores, the mask saturated as they read it, normalised by
    the forward's hi + lo (a row whose every key carries -1e9 needs every bit of its log-sum-exp)."""
    if not ctx.needs_input_grad[6] or attn_mask is None or not attn_mask.is_floating_point():
        return None
    causal, scale, dropout_p, _ = ctx.args
    if dropout_p > 0:  # refused up front (the registry): the kernels' dropout mask is not reproduced here
        raise RuntimeError("gated_prefix_attention: the triton backend has no attn_mask gradient with dropout")
    from .reference import additive_mask

    B, Hq, N, _ = q.shape
    rep = Hq // k.shape[1]
    kf, vf = (t.float().repeat_interleave(rep, 1) for t in (k, v))
    add = additive_mask(attn_mask, causal, N, k.shape[2], torch.float32, q.device)
    add = torch.where(add == float("-inf"), add, add.clamp(-MASK_LIM.value, MASK_LIM.value))
    s2 = (q.float() @ kf.transpose(-1, -2)) * (scale * LOG2E.value) + add * LOG2E.value
    p = torch.exp2((s2 - stat[..., :1]) - stat[..., 1:])  # the token probabilities (0 on rows that saw no key)
    ds = torch.zeros_like(p)
    if grad_out is not None:
        do = grad_out.float()
        ds = p * (do @ vf.transpose(-1, -2) - (do * out.float()).sum(-1, keepdim=True))
    if grad_lse is not None:
        ds = ds + p * grad_lse.float()[..., None]
    return ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)


def _setup_op_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.mark_non_differentiable(output[2])  # the kernels' row statistics


torch.library.register_autograd("apt_kernels::gated_prefix_attention_fwd", _backward, setup_context=_setup_op_context)


class _EagerAttention(torch.autograd.Function):
    """The same kernels without the custom op's dispatch (about 50 us of host time per call saved, which
    is most of a short sequence's forward): used in eager mode; torch.compile traces the custom op."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, seed):
        out, lse, stat = attention_forward(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p,
                                           seed)
        ctx.set_materialize_grads(False)  # an unused lse (or out) brings None, not a tensor of zeros
        _setup_context(ctx, (q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, seed),
                       (out, lse, stat))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _input_grads(attention_backward, ctx, grad_out, grad_lse)


def triton_attention(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, return_lse):
    """The "triton" backend: arguments as normalised by apt_kernels.gated_prefix_attention."""
    seed = int(torch.randint(0, 2 ** 62, (), device="cpu")) if dropout_p > 0 else 0
    args = (q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, float(scale), float(dropout_p), seed)
    if torch.compiler.is_compiling():
        out, lse, _ = torch.ops.apt_kernels.gated_prefix_attention_fwd(*args)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7]):
        out, lse = _EagerAttention.apply(*args)
    else:  # nothing to differentiate (inference, evaluation): the kernel without an autograd node's host time
        out, lse, _ = attention_forward(*args)
    return (out, lse) if return_lse else out
