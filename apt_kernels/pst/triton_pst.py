"""Triton kernels of PST: fused scores, exact radix selection, masked weight + packed bitmask, fused backward.

Design (details and the reasons in docs/pst.md):

* **Scores are never stored.** Every pass recomputes S tile by tile from W0, U, V, A, B, R, C in the
  order of :func:`apt_kernels.pst.reference.fused_order_scores` (float32, sequential fused
  multiply-adds over the rank, explicit ``tl.fma``; nothing else contracted: the score kernels are
  compiled with ``enable_fp_fusion=False``), so every score pass sees the same bits. The backward (compiled with fusion) recomputes W, which may
  differ in the last bit there; the mask is never recomputed: the backward reads the saved bits.
* **Selection** of the ``n_pruned``-th smallest score: a most-significant-digit radix select over the
  32-bit order-preserving keys of :func:`~apt_kernels.pst.reference.ordered_key` (as unsigned
  ``key + 2**31``), ``RADIX_BITS`` bits per pass. Each pass histograms, per tile, the digit of the
  entries whose higher digits equal the prefix chosen so far (``tl.histogram``) and adds it to a
  global histogram with atomics. The choice of the bucket (a cumulative sum over the bins) is
  recomputed from the histograms at the start of every later kernel, so nothing waits on the host.
* **Ties** at the threshold key T: with ``need`` = n_pruned - #(key < T) and ``count`` = #(key == T),
  all ties are pruned when ``need == count`` (kernels skip the work); otherwise the flat index
  ``F`` of the ``need``-th tie in row-major order is found (per-row tie counts with atomics, then one
  program scans the row counts and the one row where the count crosses ``need``), and a tie is
  pruned iff its flat index is below ``F + 1``. The mask pass is then fully parallel.
* **Mask pass**: W' = W * keep in W0's dtype and the packed bitmask (int32 words, LSB first, bit j of
  word w = element 32 w + j), stored directly when ``k % 32 == 0`` and by two atomic ORs per group of
  32 columns otherwise. Extra memory: one zeroed scratch buffer with 2 state words, the histograms and
  n row counters, and U and A transposed (``_columns``: a rank step of a tile is then a few vector loads).
* **Backward** (straight-through): per row block, a loop over column tiles recomputes W, reads G and
  the bits, forms dS = G W and dW = (M + |W|) G in registers and reduces them with ``tl.dot`` into
  dU, dA, dR (row accumulators, added once) and dV, dB, dC (atomically added per tile). Neither dS
  nor dW is written to memory (dW only when W0 itself requires a gradient). Float atomics make the
  low bits of the gradients depend on the order in which programs finish.

Import this module only when Triton is usable (see ``apt_kernels._env``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import on_device
from .._launch import FP_FUSION, run
from .._intmath import cdiv, next_power_of_2
from .reference import float_of_key

RADIX_BITS = 8
BINS = 1 << RADIX_BITS
NPASS = 32 // RADIX_BITS


# --------------------------------------------------------------------------------------------------
# Scores, tile by tile
# --------------------------------------------------------------------------------------------------

@triton.jit
def _weight_tile(w0_ptr, u_ptr, v_ptr, rows, cols, rmask, cmask, k, ldu, RW, beta,
                 BN: tl.constexpr, BK: tl.constexpr):
    """W = fma(beta, uv, W0) with uv = fma(U[:, j], V[j, :], uv) over j in order, on a (BN, BK) tile,
    float32 (the order of reference.fused_order_scores). ``u_ptr`` is U transposed, (RW, ldu), its rows
    zero-padded past every row a tile touches: U's column j is a contiguous, unmasked (vector) load."""
    rows64 = rows.to(tl.int64)
    m2 = rmask[:, None] & cmask[None, :]
    w = tl.load(w0_ptr + rows64[:, None] * k + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    uv = tl.zeros([BN, BK], dtype=tl.float32)
    for j in range(RW):
        uj = tl.load(u_ptr + j * ldu + rows64).to(tl.float32)
        vj = tl.load(v_ptr + j * k + cols, mask=cmask, other=0.0).to(tl.float32)
        uv = tl.fma(uj[:, None], vj[None, :], uv)
    return tl.fma(beta, uv, w)


@triton.jit
def _score_tile(w, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RS, alpha1, alpha2,
                BN: tl.constexpr, BK: tl.constexpr):
    """S = fma(alpha2, R + C, fma(alpha1, ab, |W|)) with ab = fma(A[:, j], B[j, :], ab) over j in order,
    float32 (the order of reference.fused_order_scores); ``a_ptr`` is A transposed and padded as U."""
    rows64 = rows.to(tl.int64)
    ab = tl.zeros([BN, BK], dtype=tl.float32)
    for j in range(RS):
        aj = tl.load(a_ptr + j * ldu + rows64).to(tl.float32)
        bj = tl.load(b_ptr + j * k + cols, mask=cmask, other=0.0).to(tl.float32)
        ab = tl.fma(aj[:, None], bj[None, :], ab)
    rr = tl.load(r_ptr + rows64, mask=rmask, other=0.0).to(tl.float32)
    cc = tl.load(c_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s = tl.fma(alpha1, ab, tl.abs(w))
    return tl.fma(alpha2, rr[:, None] + cc[None, :], s)


@triton.jit
def _ukey(s):
    """The ordered key of reference.ordered_key as an unsigned value in int64: key + 2**31."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where((bits & 0x7FFFFFFF) == 0, 0, key)  # -0.0 and +0.0: one key
    key = tl.where(s != s, 0x7FC00000, key)  # every NaN: the key of +NaN, above +inf
    return key.to(tl.int64) + 2147483648


@triton.jit
def _cast_out(x, out_ptr):
    """float32 -> the element type of out_ptr, rounded to nearest even as torch does.

    bf16 is rounded with integer operations (Triton's interpreter truncates; GPUs round): the same
    bits everywhere, NaN -> 0x7FC0 as c10::BFloat16.
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _radix_state(hist_ptr, k_target, NDONE: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr):
    """Walk the first NDONE histograms: (key prefix chosen so far, rank still needed in it, its count)."""
    bins = tl.arange(0, NBINS).to(tl.int64)
    need = tl.zeros([], dtype=tl.int64) + k_target
    prefix = tl.zeros([], dtype=tl.int64)
    count = tl.zeros([], dtype=tl.int64)
    for p in tl.static_range(NDONE):
        h = tl.load(hist_ptr + p * NBINS + bins).to(tl.int64)
        cs = tl.cumsum(h, axis=0)
        bucket = tl.sum((cs < need).to(tl.int64), axis=0)
        need = need - tl.sum(tl.where(bins < bucket, h, 0), axis=0)
        count = tl.sum(tl.where(bins == bucket, h, 0), axis=0)
        prefix = prefix | (bucket << (32 - BITS * (p + 1)))
    return prefix, need, count


@triton.jit
def _tile_col(k, BK: tl.constexpr):
    """The column-tile number of this program (1-D grid, row-tile major: no 65535 cap on either)."""
    return tl.program_id(0) % tl.cdiv(k, BK)


@triton.jit
def _tile_setup(n, k, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // tl.cdiv(k, BK)) * BN + tl.arange(0, BN)
    cols = _tile_col(k, BK) * BK + tl.arange(0, BK)
    return rows, cols, rows < n, cols < k


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _hist_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, hist_ptr, cache_ptr, n, k, ldu, RW, RS,
                 beta, alpha1, alpha2, k_target,
                 PASS: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 CACHE_BITS: tl.constexpr):
    """Histogram of digit PASS of the keys still in the running. The first pass also keeps the top
    CACHE_BITS bits of every key in ``cache_ptr`` (the W' buffer, free until the mask pass: 16 bits for
    a 16-bit W0, the whole key for float32); a later pass whose digit lies in those bits reads them
    instead of recomputing the scores."""
    rows, cols, rmask, cmask = _tile_setup(n, k, BN, BK)
    valid = rmask[:, None] & cmask[None, :]
    f = rows.to(tl.int64)[:, None] * k + cols[None, :]
    if PASS > 0 and BITS * (PASS + 1) <= CACHE_BITS:
        top = tl.load(cache_ptr + f, mask=valid, other=0).to(tl.int64) & ((1 << CACHE_BITS) - 1)
        ukey = top << (32 - CACHE_BITS)
    else:
        w = _weight_tile(w0_ptr, u_ptr, v_ptr, rows, cols, rmask, cmask, k, ldu, RW, beta, BN, BK)
        s = _score_tile(w, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RS, alpha1, alpha2, BN, BK)
        ukey = _ukey(s)
        if PASS == 0 and CACHE_BITS > 0:
            tl.store(cache_ptr + f, (ukey >> (32 - CACHE_BITS)).to(cache_ptr.dtype.element_ty), mask=valid)
    if PASS > 0:
        prefix, need, count = _radix_state(hist_ptr, k_target, PASS, BITS, NBINS)
        hi = 32 - BITS * PASS
        valid = valid & ((ukey >> hi) == (prefix >> hi))
    digit = ((ukey >> (32 - BITS * (PASS + 1))) & (NBINS - 1)).to(tl.int32)
    digit = tl.where(valid, digit, 0)
    # No mask for tl.histogram: on an H200 (Triton 3.6) the masked histogram counted about 0.3% of the first
    # pass's elements in bin 0 instead of their own bin, differently from run to run (benchmarks/results/
    # gpu-h200-2026-11-22.md). Every element is counted instead, the others in bin 0, and taken off again.
    # This form, barriers included, is the one checked there (15 of 15 selections exact; the masked forms,
    # with or without barriers: 10 of 15 wrong).
    n_out = BN * BK - tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0)
    flat = tl.reshape(digit, [BN * BK])
    tl.debug_barrier()
    h = tl.histogram(flat, NBINS)
    tl.debug_barrier()
    h = h - tl.where(tl.arange(0, NBINS) == 0, n_out, 0)
    tl.atomic_add(hist_ptr + PASS * NBINS + tl.arange(0, NBINS), h, mask=h > 0)


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _tie_rows_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, hist_ptr, rowcnt_ptr, n, k, ldu, RW, RS,
                     beta, alpha1, alpha2, k_target,
                     NDONE: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    """Per-row counts of entries whose key is the threshold T (only when the ties must be split)."""
    thr, need, count = _radix_state(hist_ptr, k_target, NDONE, BITS, NBINS)
    if need < count:
        rows, cols, rmask, cmask = _tile_setup(n, k, BN, BK)
        w = _weight_tile(w0_ptr, u_ptr, v_ptr, rows, cols, rmask, cmask, k, ldu, RW, beta, BN, BK)
        s = _score_tile(w, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RS, alpha1, alpha2, BN, BK)
        tie = rmask[:, None] & cmask[None, :] & (_ukey(s) == thr)
        per_row = tl.sum(tie.to(tl.int32), axis=1)
        tl.atomic_add(rowcnt_ptr + rows, per_row, mask=rmask & (per_row > 0))


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _cut_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, hist_ptr, rowcnt_ptr, state_ptr, n, k, ldu, RW, RS,
                beta, alpha1, alpha2, k_target,
                NDONE: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, ROWB: tl.constexpr,
                BK: tl.constexpr):
    """One program: state = (threshold key T, F) with ties pruned iff flat index < F."""
    thr, need, count = _radix_state(hist_ptr, k_target, NDONE, BITS, NBINS)
    f_excl = (tl.zeros([], dtype=tl.int64) + n) * k  # all ties pruned
    if need < count:
        # the row holding the need-th tie: the first whose inclusive cumulative tie count reaches need
        running = tl.zeros([], dtype=tl.int64)
        cut_row = tl.zeros([], dtype=tl.int64)
        before = tl.zeros([], dtype=tl.int64)
        for start in range(0, n, ROWB):
            rr = start + tl.arange(0, ROWB)
            rc = tl.load(rowcnt_ptr + rr, mask=rr < n, other=0).to(tl.int64)
            cs = running + tl.cumsum(rc, axis=0)
            lt = (cs < need) & (rr < n)
            cut_row += tl.sum(lt.to(tl.int64), axis=0)
            before += tl.sum(tl.where(lt, rc, 0), axis=0)
            running += tl.sum(rc, axis=0)
        m = need - before  # prune the first m ties of the cut row
        rows = cut_row + tl.arange(0, 2)  # a 2-row tile whose second row is masked off
        rmask = rows < cut_row + 1
        run = tl.zeros([], dtype=tl.int64)
        col_m = tl.zeros([], dtype=tl.int64)
        for start in range(0, k, BK):
            cols = start + tl.arange(0, BK)
            cmask = cols < k
            w = _weight_tile(w0_ptr, u_ptr, v_ptr, rows, cols, rmask, cmask, k, ldu, RW, beta, 2, BK)
            s = _score_tile(w, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RS, alpha1, alpha2, 2, BK)
            tie = rmask[:, None] & cmask[None, :] & (_ukey(s) == thr)
            t1 = tl.sum(tie.to(tl.int64), axis=0)
            cs = run + tl.cumsum(t1, axis=0)
            col_m += tl.sum(tl.where((t1 > 0) & (cs == m), cols.to(tl.int64), 0), axis=0)
            run += tl.sum(t1, axis=0)
        f_excl = cut_row * k + col_m + 1
    tl.store(state_ptr, thr)
    tl.store(state_ptr + 1, f_excl)


@triton.jit
def _mask_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, out_ptr, words_ptr, state_ptr, n, k, ldu, RW, RS,
                 beta, alpha1, alpha2,
                 NM_N: tl.constexpr, NM_M: tl.constexpr, ALIGNED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows, cols, rmask, cmask = _tile_setup(n, k, BN, BK)
    w = _weight_tile(w0_ptr, u_ptr, v_ptr, rows, cols, rmask, cmask, k, ldu, RW, beta, BN, BK)
    s = _score_tile(w, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RS, alpha1, alpha2, BN, BK)
    ukey = _ukey(s)
    valid = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    f = rows64[:, None] * k + cols[None, :]
    if NM_M > 0:
        # rank of each entry in its group of NM_M: entries before it in (key, index) order
        key3 = tl.reshape(ukey, [BN, BK // NM_M, NM_M])
        jidx = tl.arange(0, NM_M)[None, None, :]
        rank = tl.zeros([BN, BK // NM_M, NM_M], dtype=tl.int32)
        for j in tl.static_range(NM_M):
            kj = tl.sum(tl.where(jidx == j, key3, 0), axis=2)[:, :, None]
            rank += ((kj < key3) | ((kj == key3) & (jidx > j))).to(tl.int32)
        keep = tl.reshape(rank >= NM_M - NM_N, [BN, BK])
    else:
        thr = tl.load(state_ptr)
        f_excl = tl.load(state_ptr + 1)
        keep = (ukey > thr) | ((ukey == thr) & (f >= f_excl))
    keep = keep & valid
    out = w * keep.to(tl.float32)
    tl.store(out_ptr + f, _cast_out(out, out_ptr), mask=valid)
    kb = keep.to(tl.int64) << (f & 31)
    if ALIGNED:  # k % 32 == 0: every group of 32 columns is one whole word
        wv = tl.sum(tl.reshape(kb, [BN, BK // 32, 32]), axis=2)
        g0 = _tile_col(k, BK) * BK + 32 * tl.arange(0, BK // 32)
        widx = (rows64[:, None] * k + g0[None, :]) >> 5
        tl.store(words_ptr + widx, wv.to(tl.int32), mask=rmask[:, None] & (g0 < k)[None, :])
    else:  # a group of 32 columns straddles at most two words: OR both parts into the zeroed words
        f3 = tl.reshape(f, [BN, BK // 32, 32])
        kb3 = tl.reshape(kb, [BN, BK // 32, 32])
        lo_w = tl.min(f3, axis=2) >> 5
        is_lo = (f3 >> 5) == lo_w[:, :, None]
        lo = tl.sum(tl.where(is_lo, kb3, 0), axis=2)
        hi = tl.sum(tl.where(is_lo, 0, kb3), axis=2)
        tl.atomic_or(words_ptr + lo_w, lo.to(tl.int32), mask=lo != 0)
        tl.atomic_or(words_ptr + lo_w + 1, hi.to(tl.int32), mask=hi != 0)


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _threshold_kernel(hist_ptr, state_ptr, k_target, NDONE: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr):
    """One program: the unsigned key of the k_target-th smallest score, from the finished histograms."""
    thr, _, _ = _radix_state(hist_ptr, k_target, NDONE, BITS, NBINS)
    tl.store(state_ptr, thr)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_kernel(g_ptr, words_ptr, w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr,
                du_ptr, dv_ptr, da_ptr, db_ptr, dr_ptr, dc_ptr, dw0_ptr,
                n, k, ldu, RW, RS, beta, alpha1, alpha2, SPLIT,
                RWP: tl.constexpr, RSP: tl.constexpr, NEED_W0: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    jw = tl.arange(0, RWP)
    js = tl.arange(0, RSP)
    u_t = tl.load(u_ptr + jw[None, :] * ldu + rows64[:, None], mask=(jw < RW)[None, :], other=0.0).to(tl.float32)
    a_t = tl.load(a_ptr + js[None, :] * ldu + rows64[:, None], mask=(js < RS)[None, :], other=0.0).to(tl.float32)
    du_acc = tl.zeros([BN, RWP], dtype=tl.float32)
    da_acc = tl.zeros([BN, RSP], dtype=tl.float32)
    dr_acc = tl.zeros([BN], dtype=tl.float32)
    for t in range(pid_s, tl.cdiv(k, BK), SPLIT):
        cols = t * BK + tl.arange(0, BK)
        cmask = cols < k
        m2 = rmask[:, None] & cmask[None, :]
        f = rows64[:, None] * k + cols[None, :]
        w = _weight_tile(w0_ptr, u_ptr, v_ptr, rows, cols, rmask, cmask, k, ldu, RW, beta, BN, BK)
        g = tl.load(g_ptr + f, mask=m2, other=0.0).to(tl.float32)
        word = tl.load(words_ptr + (f >> 5), mask=m2, other=0)
        keep = ((word >> (f & 31).to(tl.int32)) & 1).to(tl.float32)
        ds = g * w
        dw = (keep + tl.abs(w)) * g
        if NEED_W0:
            tl.store(dw0_ptr + f, _cast_out(dw, dw0_ptr), mask=m2)
        v_t = tl.load(v_ptr + jw[:, None] * k + cols[None, :], mask=(jw < RW)[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        b_t = tl.load(b_ptr + js[:, None] * k + cols[None, :], mask=(js < RS)[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        du_acc += tl.dot(dw, tl.trans(v_t), input_precision="ieee")
        da_acc += tl.dot(ds, tl.trans(b_t), input_precision="ieee")
        dr_acc += tl.sum(ds, axis=1)
        dv_part = tl.dot(tl.trans(u_t), dw, input_precision="ieee")
        db_part = tl.dot(tl.trans(a_t), ds, input_precision="ieee")
        tl.atomic_add(dv_ptr + jw[:, None] * k + cols[None, :], beta * dv_part,
                      mask=(jw < RW)[:, None] & cmask[None, :])
        tl.atomic_add(db_ptr + js[:, None] * k + cols[None, :], alpha1 * db_part,
                      mask=(js < RS)[:, None] & cmask[None, :])
        tl.atomic_add(dc_ptr + cols, alpha2 * tl.sum(ds, axis=0), mask=cmask)
    tl.atomic_add(du_ptr + rows64[:, None] * RW + jw[None, :], beta * du_acc, mask=rmask[:, None] & (jw < RW)[None, :])
    tl.atomic_add(da_ptr + rows64[:, None] * RS + js[None, :], alpha1 * da_acc,
                  mask=rmask[:, None] & (js < RS)[None, :])
    tl.atomic_add(dr_ptr + rows, alpha2 * dr_acc, mask=rmask)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------

# Tile sizes. Tests may override them (small tiles exercise the edges on small matrices).
FWD_BLOCK = (32, 128)  # (rows, columns) of a forward tile; columns a multiple of 32
BWD_BLOCK = (32, 64)   # backward tile; both at least 16 (tl.dot)
BWD_WARPS = 8          # ptxas for sm_90: 4 warps need 255 registers and spill at rank 8; 8 warps do not
CUT_BLOCK = 1024       # columns per step of the one-program scan of the row holding the tie cut
BWD_SPLIT = None       # column splits of the backward grid (None: enough programs for the device)
ALLOC = None           # tests set a callable(tag, tensor) to see every tensor these wrappers allocate

_SCORE_OPTS = dict(enable_fp_fusion=False)  # only the written tl.fma: the documented evaluation order


def _alloc(tag: str, t: torch.Tensor) -> torch.Tensor:
    if ALLOC is not None:
        ALLOC(tag, t)
    return t


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, next_power_of_2(max(1, x)))


def _factor(t: torch.Tensor) -> torch.Tensor:
    """Contiguous (no copy when already); an empty factor becomes a 1-element dummy never read."""
    t = t.contiguous()
    return t if t.numel() else _alloc("dummy", torch.zeros(1, dtype=torch.float32, device=t.device))


def _columns(t: torch.Tensor, ldu: int) -> torch.Tensor:
    """An (n, r) factor (U or A) as its transpose (r, ldu), zero past row n: the rank loops of the tiles
    read column j as one contiguous, unmasked run of rows (vector loads; ldu a multiple of 32). Loading
    U[rows, j] from the (n, r) layout instead cost about three times the instructions of the multiply-adds
    (sm_90 SASS of the score passes: 160 against 55 per thread and rank step). A dummy when r == 0."""
    n, r = t.shape
    if r == 0:
        return _factor(t)
    out = _alloc("columns", torch.zeros(r, ldu, dtype=t.dtype, device=t.device))
    out[:, :n] = t.t()
    return out


def _ldu(n: int, bn: int) -> int:
    """Row stride of the transposed factors: past every row a tile of bn rows reaches (and n + 1, the
    tie cut's two-row tile), a multiple of 32."""
    m = max(32, bn)
    return (n + 1 + m - 1) // m * m


def _fwd_block(k: int, nm) -> tuple[int, int]:
    bn, bk = FWD_BLOCK
    bk = min(bk, _pow2_at_least(k, 32))
    if nm is not None:
        bk = max(bk, nm[1])
    return bn, bk


def forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm=None):
    """(W', packed keep bits) for n_pruned (global selection) or nm=(N, M)."""
    with on_device(w0.device):
        return _forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm)


def _radix_passes(grid, args, hist, cache, scal, k_target, cache_bits: int, bn: int, bk: int) -> None:
    """The NPASS histogram passes selecting the k_target-th smallest score (state in ``hist``)."""
    for p in range(NPASS):
        run(_hist_kernel, grid, (*args, hist, cache, *scal, k_target),
            dict(PASS=p, BITS=RADIX_BITS, NBINS=BINS, BN=bn, BK=bk, CACHE_BITS=cache_bits, **_SCORE_OPTS),
            args[0].device)


def _forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm):
    n, k = w0.shape
    numel = n * k
    if numel >= 2 ** 31:
        raise ValueError(f"the triton PST kernels count with int32 histograms: w0 of {numel} entries is too large")
    rw, rs = u.shape[1], a.shape[1]
    w0 = w0.contiguous()
    aligned = k % 32 == 0
    out = _alloc("out", torch.empty_like(w0))
    nwords = (numel + 31) // 32
    words = _alloc("words", torch.empty(nwords, dtype=torch.int32, device=w0.device) if aligned
                   else torch.zeros(nwords, dtype=torch.int32, device=w0.device))
    if numel == 0:
        return out, words
    select = nm is None and n_pruned > 0
    # One zeroed scratch buffer (one fill): the state (T, F) as int64, then, when selecting, the radix
    # histograms and the per-row tie counts as int32.
    n_int32 = NPASS * BINS + n if select else 0
    scratch = _alloc("scratch", torch.zeros(2 + (n_int32 + 1) // 2, dtype=torch.int64, device=w0.device))
    state = scratch[:2]
    bn, bk = _fwd_block(k, nm)
    ldu = _ldu(n, bn)
    args = [w0, _columns(u, ldu), _factor(v), _columns(a, ldu), _factor(b), _factor(r), _factor(c)]
    grid = (cdiv(n, bn) * cdiv(k, bk),)
    scal = (n, k, ldu, rw, rs, float(beta), float(alpha1), float(alpha2))
    if select:
        ints = scratch[2:].view(torch.int32)
        hist, rowcnt = ints[:NPASS * BINS], ints[NPASS * BINS:NPASS * BINS + n]
        # the first pass keeps the keys' top bits in W' (overwritten by the mask pass): 16 or all 32
        cache_bits = {2: 16, 4: 32}.get(out.element_size(), 0)
        cache = out.view({16: torch.int16, 32: torch.int32}[cache_bits]) if cache_bits else hist
        _radix_passes(grid, args, hist, cache, scal, n_pruned, cache_bits, bn, bk)
        run(_tie_rows_kernel, grid, (*args, hist, rowcnt, *scal, n_pruned),
            dict(NDONE=NPASS, BITS=RADIX_BITS, NBINS=BINS, BN=bn, BK=bk, **_SCORE_OPTS), w0.device)
        # one program scans the row counts, then the one row holding the cut: wide blocks, few iterations
        run(_cut_kernel, (1,), (*args, hist, rowcnt, state, *scal, n_pruned),
            dict(NDONE=NPASS, BITS=RADIX_BITS, NBINS=BINS, ROWB=1024, BK=max(bk, min(CUT_BLOCK, _pow2_at_least(k, 32))),
                 **_SCORE_OPTS), w0.device)
    # n_pruned == 0: state (T, F) = (0, 0) keeps everything (every key is >= 0 and every index >= 0)
    nm_n, nm_m = (0, 0) if nm is None else nm
    run(_mask_kernel, grid, (*args, out, words, state, *scal),
        dict(NM_N=nm_n, NM_M=nm_m, ALIGNED=aligned, BN=bn, BK=bk, **_SCORE_OPTS), w0.device)
    return out, words


def kth_smallest(values, ks: list[int]) -> list[float]:
    """The ks-th smallest (1-based) of the non-negative float32 ``values`` (a tensor, or a list of tensors
    on one device taken together), by the radix passes of the forward (its scores with zero factors are
    ``|W0|``): no sort, the values never leave the device; one 8-byte read-back per k. Used by
    ``apt_kernels.fisher_mask`` for its exact quantile. Costs one float32 copy of the values (laid out
    as rows of 4096, padded with +inf)."""
    parts = [values] if isinstance(values, torch.Tensor) else list(values)
    numel = sum(t.numel() for t in parts)
    if numel >= 2 ** 31:
        raise ValueError(f"kth_smallest counts with int32 histograms: {numel} values are too many")
    device = parts[0].device
    width = 4096
    rows = cdiv(numel, width)
    # a (rows, 4096) matrix padded with +inf (the largest: the ks-th smallest is unchanged for ks <= numel)
    flat = torch.empty(rows * width, dtype=torch.float32, device=device)
    torch.cat([t.reshape(-1) for t in parts], out=flat[:numel])
    flat[numel:].fill_(float("inf"))
    w0 = flat.view(rows, width)
    zeros_rows = torch.zeros(rows, dtype=torch.float32, device=device)
    zeros_cols = torch.zeros(width, dtype=torch.float32, device=device)
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    args = [w0, dummy, dummy, dummy, dummy, zeros_rows, zeros_cols]
    scal = (rows, width, 0, 0, 0, 0.0, 0.0, 0.0)  # rank 0: no factor is read
    bn, bk = FWD_BLOCK
    grid = (cdiv(rows, bn) * cdiv(width, bk),)
    out = []
    with on_device(device):
        for k in ks:
            if not 1 <= k <= numel:
                raise ValueError(f"k = {k} is outside 1 .. {numel}")
            hist = torch.zeros(NPASS * BINS, dtype=torch.int32, device=device)
            state = torch.zeros(1, dtype=torch.int64, device=device)
            _radix_passes(grid, args, hist, hist, scal, k, 0, bn, bk)  # no key cache: w0 is read again per k
            run(_threshold_kernel, (1,), (hist, state, k), dict(NDONE=NPASS, BITS=RADIX_BITS, NBINS=BINS, **FP_FUSION),
                w0.device)
            out.append(float_of_key(int(state.item())))
    return out


def _split(n_row_blocks: int, n_col_tiles: int, device: torch.device) -> int:
    if BWD_SPLIT is not None:
        return max(1, min(BWD_SPLIT, n_col_tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_col_tiles, cdiv(4 * sms, n_row_blocks)))


def backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    """Straight-through gradients (dW0, dU, dV, dA, dB, dR, dC) in float32 (dW0 in w0's dtype)."""
    with on_device(w0.device):
        return _backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs)


def _backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    n, k = w0.shape
    rw, rs = u.shape[1], a.shape[1]
    dev = w0.device
    # the six accumulators (the kernel adds into them) carved from one zeroed buffer: one fill
    sizes = (n * rw, rw * k, n * rs, rs * k, n, k)
    flat = _alloc("grads", torch.zeros(sum(sizes), dtype=torch.float32, device=dev))
    du, dv, da, db, dr, dc = (part.view(shape) for part, shape in zip(
        flat.split(sizes), ((n, rw), (rw, k), (n, rs), (rs, k), (n,), (k,))))
    dw0 = _alloc("dw0", torch.empty(w0.shape, dtype=w0.dtype, device=dev)) if needs[0] else None
    if n * k:
        bn, bk = BWD_BLOCK
        grad = grad.contiguous()
        ldu = _ldu(n, bn)
        ins = [w0.contiguous(), _columns(u, ldu), _factor(v), _columns(a, ldu), _factor(b)]
        outs = [t if t.numel() else _factor(t) for t in (du, dv, da, db, dr, dc)]
        split = _split(cdiv(n, bn), cdiv(k, bk), dev)
        run(_bwd_kernel, (cdiv(n, bn), split),
            (grad, words, *ins, *outs, dw0 if dw0 is not None else grad,
             n, k, ldu, rw, rs, float(beta), float(alpha1), float(alpha2), split),
            dict(RWP=_pow2_at_least(rw, 16), RSP=_pow2_at_least(rs, 16), NEED_W0=dw0 is not None, BN=bn, BK=bk,
                 num_warps=BWD_WARPS, **FP_FUSION), dev)
    grads = [dw0, du, dv, da, db, dr, dc]
    return [g if need else None for g, need in zip(grads, needs)]
