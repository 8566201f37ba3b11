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
* **Sampled bracket** (matrices of at least ``BRACKET_MIN`` entries; apt_kernels.pst.bracket): a sample of 1/16
  of the scores brackets the threshold, one mask pass over W decides every entry outside the bracket and lists
  those inside, and the exact selection and tie split run on that list, before the radix passes, which then do
  nothing (constexpr MODE: they run only when the bracket missed). Same results either way.
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
from . import bracket
from .reference import float_of_key

RADIX_BITS = 8
BINS = 1 << RADIX_BITS
NPASS = 32 // RADIX_BITS


# --------------------------------------------------------------------------------------------------
# Scores, tile by tile
# --------------------------------------------------------------------------------------------------

@triton.jit
def _weight_at(w0_ptr, u_ptr, v_ptr, rows, cols, cmask, valid, k, ldu, RW, beta):
    """W = fma(beta, uv, W0) with uv = fma(U[i, j], V[j, c], uv) over j in order, float32 (the order of
    reference.fused_order_scores), at the entries (rows, cols): int64 row and column indices that broadcast
    to one shape (a tile's (BN, 1) and (1, BK); a gather's, both of it). ``u_ptr`` is U transposed, (RW, ldu),
    its rows zero-padded past every row a tile touches: U's column j is read unmasked (vector loads of a
    tile's rows). ``cmask`` masks the reads of V, ``valid`` those of W0."""
    w = tl.load(w0_ptr + rows * k + cols, mask=valid, other=0.0).to(tl.float32)
    uv = tl.zeros_like(w)
    for j in range(RW):
        uj = tl.load(u_ptr + j * ldu + rows).to(tl.float32)
        vj = tl.load(v_ptr + j * k + cols, mask=cmask, other=0.0).to(tl.float32)
        uv = tl.fma(uj, vj, uv)
    return tl.fma(beta, uv, w)


@triton.jit
def _score_at(w, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RS, alpha1, alpha2):
    """S = fma(alpha2, R + C, fma(alpha1, ab, |W|)) with ab = fma(A[i, j], B[j, c], ab) over j in order,
    float32 (the order of reference.fused_order_scores), at the entries of W (indices as _weight_at's;
    ``a_ptr`` is A transposed and padded as U)."""
    ab = tl.zeros_like(w)
    for j in range(RS):
        aj = tl.load(a_ptr + j * ldu + rows).to(tl.float32)
        bj = tl.load(b_ptr + j * k + cols, mask=cmask, other=0.0).to(tl.float32)
        ab = tl.fma(aj, bj, ab)
    rr = tl.load(r_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    cc = tl.load(c_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s = tl.fma(alpha1, ab, tl.abs(w))
    return tl.fma(alpha2, rr + cc, s)


@triton.jit
def _tile_scores(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RW, RS,
                 beta, alpha1, alpha2):
    """(W, S) on the tile rows x cols (1-D indices and masks)."""
    r2, c2 = rows.to(tl.int64)[:, None], cols[None, :]
    rm2, cm2 = rmask[:, None], cmask[None, :]
    w = _weight_at(w0_ptr, u_ptr, v_ptr, r2, c2, cm2, rm2 & cm2, k, ldu, RW, beta)
    return w, _score_at(w, a_ptr, b_ptr, r_ptr, c_ptr, r2, c2, rm2, cm2, k, ldu, RS, alpha1, alpha2)


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


# Which selection a kernel serves (its MODE): the radix passes alone; the radix passes after the sampled bracket
# (they run only when it missed); the bracket's list (only when it held the threshold).
RADIX, AFTER_BRACKET, LISTED = 0, 1, 2


@triton.jit
def _bracket_held(bstate_ptr, n_pruned, cap):
    """(held, the threshold's rank in the list, the list's length): whether the bracket pass's list holds the
    threshold (every entry inside the bracket listed, below < n_pruned <= below + listed). bstate: the
    bracket (lo, hi, entries below it, entries inside it), int64."""
    below = tl.load(bstate_ptr + 2)
    listed = tl.load(bstate_ptr + 3)
    held = (listed <= cap) & (below < n_pruned) & (n_pruned <= below + listed)
    return held, n_pruned - below, tl.minimum(listed, cap)


@triton.jit
def _gate(bstate_ptr, k_target, cap, MODE: tl.constexpr):
    """(whether a kernel serving selection MODE runs, the rank it selects): RADIX always, k_target;
    AFTER_BRACKET when the bracket missed, k_target; LISTED when it held, the threshold's rank in the list."""
    if MODE == 0:
        active = tl.full([], 1, tl.int1)
        rank = tl.zeros([], dtype=tl.int64) + k_target
    else:
        held, in_list, _ = _bracket_held(bstate_ptr, k_target, cap)
        if MODE == 1:
            active = held == 0
            rank = tl.zeros([], dtype=tl.int64) + k_target
        else:
            active = held
            rank = in_list
    return active, rank


@triton.jit
def _kept(ukey, f, state_ptr):
    """The threshold's rule: keep a key above T, and a tie at T whose flat index f is at least F (state (T, F))."""
    thr = tl.load(state_ptr)
    f_excl = tl.load(state_ptr + 1)
    return (ukey > thr) | ((ukey == thr) & (f >= f_excl))


@triton.jit
def _listed_keys(keys_ptr, offs, valid):
    """Keys of a list (ordered keys, int32) as the kernels' unsigned keys in int64."""
    return tl.load(keys_ptr + offs, mask=valid, other=0).to(tl.int64) + 2147483648


@triton.jit
def _count_digits(hist_ptr, digit, valid, NBINS: tl.constexpr):
    """Adds to hist_ptr[0 .. NBINS) the histogram of ``digit`` (int32, a tile or 1-D) over its ``valid`` entries.

    No mask for tl.histogram: on an H200 (Triton 3.6) the masked histogram counted about 0.3% of the first
    pass's elements in bin 0 instead of their own bin, differently from run to run (benchmarks/results/
    gpu-h200-2026-11-22.md). Every element is counted instead, the others in bin 0, and taken off again.
    This form, barriers included, is the one checked there (15 of 15 selections exact; the masked forms,
    with or without barriers: 10 of 15 wrong)."""
    digit = tl.where(valid, digit, 0)
    if len(digit.shape) == 2:  # a tile: the sums as checked there
        n_out = digit.numel - tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0)
    else:
        n_out = digit.numel - tl.sum(valid.to(tl.int32), axis=0)
    flat = tl.reshape(digit, [digit.numel])
    tl.debug_barrier()
    h = tl.histogram(flat, NBINS)
    tl.debug_barrier()
    h = h - tl.where(tl.arange(0, NBINS) == 0, n_out, 0)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), h, mask=h > 0)


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _hist_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, hist_ptr, cache_ptr, bstate_ptr, n, k, ldu, RW,
                 RS, beta, alpha1, alpha2, k_target, cap,
                 PASS: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 CACHE_BITS: tl.constexpr, MODE: tl.constexpr):
    """Histogram of digit PASS of the keys still in the running. The first pass also keeps the top
    CACHE_BITS bits of every key in ``cache_ptr`` (the W' buffer, free until the mask pass: 16 bits for
    a 16-bit W0, the whole key for float32); a later pass whose digit lies in those bits reads them
    instead of recomputing the scores."""
    active, _ = _gate(bstate_ptr, k_target, cap, MODE)
    if active:
        rows, cols, rmask, cmask = _tile_setup(n, k, BN, BK)
        valid = rmask[:, None] & cmask[None, :]
        f = rows.to(tl.int64)[:, None] * k + cols[None, :]
        if PASS > 0 and BITS * (PASS + 1) <= CACHE_BITS:
            top = tl.load(cache_ptr + f, mask=valid, other=0).to(tl.int64) & ((1 << CACHE_BITS) - 1)
            ukey = top << (32 - CACHE_BITS)
        else:
            w, s = _tile_scores(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu,
                                RW, RS, beta, alpha1, alpha2)
            ukey = _ukey(s)
            if PASS == 0 and CACHE_BITS > 0:
                tl.store(cache_ptr + f, (ukey >> (32 - CACHE_BITS)).to(cache_ptr.dtype.element_ty), mask=valid)
        if PASS > 0:
            prefix, need, count = _radix_state(hist_ptr, k_target, PASS, BITS, NBINS)
            hi = 32 - BITS * PASS
            valid = valid & ((ukey >> hi) == (prefix >> hi))
        digit = ((ukey >> (32 - BITS * (PASS + 1))) & (NBINS - 1)).to(tl.int32)
        _count_digits(hist_ptr + PASS * NBINS, digit, valid, NBINS)


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _tie_rows_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, hist_ptr, rowcnt_ptr, bstate_ptr, n, k, ldu,
                     RW, RS, beta, alpha1, alpha2, k_target, cap,
                     NDONE: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, MODE: tl.constexpr):
    """Per-row counts of entries whose key is the threshold T (only when the ties must be split)."""
    active, _ = _gate(bstate_ptr, k_target, cap, MODE)
    if active:
        thr, need, count = _radix_state(hist_ptr, k_target, NDONE, BITS, NBINS)
        if need < count:
            rows, cols, rmask, cmask = _tile_setup(n, k, BN, BK)
            w, s = _tile_scores(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu,
                                RW, RS, beta, alpha1, alpha2)
            tie = rmask[:, None] & cmask[None, :] & (_ukey(s) == thr)
            per_row = tl.sum(tie.to(tl.int32), axis=1)
            tl.atomic_add(rowcnt_ptr + rows, per_row, mask=rmask & (per_row > 0))


@triton.jit(do_not_specialize=["k_target"])  # the schedule moves it: one compilation
def _cut_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, hist_ptr, rowcnt_ptr, state_ptr, bstate_ptr, n, k,
                ldu, RW, RS, beta, alpha1, alpha2, k_target, cap,
                NDONE: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, ROWB: tl.constexpr,
                BK: tl.constexpr, MODE: tl.constexpr):
    """One program: state = (threshold key T, F) with ties pruned iff flat index < F. ``hist_ptr``: the radix
    passes' histograms, or the bracket's list's (MODE LISTED)."""
    active, rank = _gate(bstate_ptr, k_target, cap, MODE)
    if active:
        thr, need, count = _radix_state(hist_ptr, rank, NDONE, BITS, NBINS)
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
                w, s = _tile_scores(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k,
                                    ldu, RW, RS, beta, alpha1, alpha2)
                tie = rmask[:, None] & cmask[None, :] & (_ukey(s) == thr)
                t1 = tl.sum(tie.to(tl.int64), axis=0)
                cs = run + tl.cumsum(t1, axis=0)
                col_m += tl.sum(tl.where((t1 > 0) & (cs == m), cols.to(tl.int64), 0), axis=0)
                run += tl.sum(t1, axis=0)
            f_excl = cut_row * k + col_m + 1
        tl.store(state_ptr, thr)
        tl.store(state_ptr + 1, f_excl)


@triton.jit
def _list_bracket(ukey, f, valid, lo, hi, bstate_ptr, keys_ptr, tags_ptr, cap):
    """The bracket pass's bookkeeping of a tile: the entries below ``lo`` counted, those in [lo, hi] appended to
    the list (ordered key and flat index, int32; every one counted, those past ``cap`` not written)."""
    below = tl.sum(tl.reshape((valid & (ukey < lo)).to(tl.int32), [ukey.numel]), axis=0)
    tl.atomic_add(bstate_ptr + 2, below.to(tl.int64), mask=below > 0)
    inside = tl.reshape((valid & (ukey >= lo) & (ukey <= hi)).to(tl.int32), [ukey.numel])
    count = tl.sum(inside, axis=0)
    if count > 0:
        base = tl.atomic_add(bstate_ptr + 3, count.to(tl.int64))
        slot = base + (tl.cumsum(inside, axis=0) - inside)
        put = (inside != 0) & (slot < cap)
        tl.store(keys_ptr + slot, (tl.reshape(ukey, [ukey.numel]) - 2147483648).to(tl.int32), mask=put)
        tl.store(tags_ptr + slot, tl.reshape(f, [ukey.numel]).to(tl.int32), mask=put)


@triton.jit(do_not_specialize=["n_pruned"])
def _mask_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, out_ptr, words_ptr, state_ptr, bstate_ptr, keys_ptr,
                 tags_ptr, n, k, ldu, RW, RS, beta, alpha1, alpha2, n_pruned, cap,
                 NM_N: tl.constexpr, NM_M: tl.constexpr, ALIGNED: tl.constexpr, BRACKET: tl.constexpr,
                 MODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """W' and the bits: N:M, or the threshold (T, F) in state. BRACKET: the sampled bracket's pass, before the
    threshold is known: keys above the bracket are kept, the others pruned for now; the entries below it are
    counted and those inside it listed (for _fixup_kernel to keep those above the threshold)."""
    active, _ = _gate(bstate_ptr, n_pruned, cap, MODE)
    if active:
        rows, cols, rmask, cmask = _tile_setup(n, k, BN, BK)
        w, s = _tile_scores(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, rows, cols, rmask, cmask, k, ldu, RW,
                            RS, beta, alpha1, alpha2)
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
        elif BRACKET:
            hi = tl.load(bstate_ptr + 1)
            keep = ukey > hi
            _list_bracket(ukey, f, valid, tl.load(bstate_ptr), hi, bstate_ptr, keys_ptr, tags_ptr, cap)
        else:
            keep = _kept(ukey, f, state_ptr)
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
# The sampled bracket (host side and constants: apt_kernels.pst.bracket)
# --------------------------------------------------------------------------------------------------

SAMPLE_BITS = 11  # the sample's two radix passes: 22-bit prefixes, as csrc/pst.cu's
SAMPLE_BINS = 1 << SAMPLE_BITS
SAMPLE_PASSES = 2


@triton.jit
def _mix64(x):
    """splitmix64's finaliser on uint64 (apt_kernels.pst.bracket.mix64)."""
    x = x + 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _sample_kernel(w0_ptr, u_ptr, v_ptr, a_ptr, b_ptr, r_ptr, c_ptr, keys_ptr, numel, k, ldu, RW, RS,
                   beta, alpha1, alpha2, runs, RUNS: tl.constexpr, RUN: tl.constexpr):
    """The sample's ordered keys (int32): run s of ``runs`` is RUN consecutive entries (row-major, wrapping to
    the start) from a hashed position in the s-th of ``runs`` equal strata of the flat index,
    keys[RUN s + lane]. RUNS runs per program."""
    s = (tl.program_id(0) * RUNS + tl.arange(0, RUNS)).to(tl.int64)
    s_ok = s < runs
    f0 = s * numel // runs
    span = tl.where(s_ok, (s + 1) * numel // runs - f0, 1)
    start = f0 + (_mix64(s.to(tl.uint64)) % span.to(tl.uint64)).to(tl.int64)
    g = (start[:, None] + tl.arange(0, RUN)[None, :]) % numel
    i = g // k
    c = g - i * k
    valid = s_ok[:, None] & (g >= 0)
    w = _weight_at(w0_ptr, u_ptr, v_ptr, i, c, valid, valid, k, ldu, RW, beta)
    sc = _score_at(w, a_ptr, b_ptr, r_ptr, c_ptr, i, c, valid, valid, k, ldu, RS, alpha1, alpha2)
    tl.store(keys_ptr + s[:, None] * RUN + tl.arange(0, RUN)[None, :], (_ukey(sc) - 2147483648).to(tl.int32),
             mask=valid)


@triton.jit(do_not_specialize=["k_a", "k_b"])
def _keys_hist_kernel(keys_ptr, hist_ptr, bstate_ptr, length, cap, k_a, k_b,
                      PASS: tl.constexpr, PASSES: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr,
                      NSEL: tl.constexpr, LIST: tl.constexpr, BLOCK: tl.constexpr):
    """One radix pass over an array of ordered keys (int32) for NSEL selections at once (ranks k_a, k_b), selection
    j's PASSES histograms at hist_ptr + j PASSES NBINS. LIST: the bracket's list (its length and the rank of the
    threshold in it read on the device; nothing to do unless the bracket held); else ``length`` keys."""
    if LIST:
        active, rank_a, length = _bracket_held(bstate_ptr, k_a, cap)
    else:
        active = tl.full([], 1, tl.int1)
        rank_a = tl.zeros([], dtype=tl.int64) + k_a
    start = tl.program_id(0) * BLOCK
    if active & (start < length):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < length
        ukey = _listed_keys(keys_ptr, offs, valid)
        digit = ((ukey >> (32 - BITS * (PASS + 1))) & (NBINS - 1)).to(tl.int32)
        for j in tl.static_range(NSEL):
            hist_j = hist_ptr + j * PASSES * NBINS
            ok = valid
            if PASS > 0:
                if j == 0:
                    prefix, _, _ = _radix_state(hist_j, rank_a, PASS, BITS, NBINS)
                else:
                    prefix, _, _ = _radix_state(hist_j, k_b, PASS, BITS, NBINS)
                ok = ok & ((ukey >> (32 - BITS * PASS)) == (prefix >> (32 - BITS * PASS)))
            _count_digits(hist_j + PASS * NBINS, digit, ok, NBINS)


@triton.jit(do_not_specialize=["r_lo", "r_hi"])
def _bounds_kernel(hist_ptr, bstate_ptr, r_lo, r_hi, LO_OPEN: tl.constexpr, HI_OPEN: tl.constexpr,
                   PASSES: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr):
    """One program: the bracket [lo, hi] from the sample's keys at ranks r_lo and r_hi (their prefixes of
    PASSES * BITS bits: every key of the lower one's bucket, up to every key of the upper one's); an open side
    reaches the smallest (largest) key."""
    lo, _, _ = _radix_state(hist_ptr, r_lo, PASSES, BITS, NBINS)
    hi, _, _ = _radix_state(hist_ptr + PASSES * NBINS, r_hi, PASSES, BITS, NBINS)
    hi = hi | ((1 << (32 - BITS * PASSES)) - 1)
    if LO_OPEN:
        lo = tl.zeros([], dtype=tl.int64)
    if HI_OPEN:
        hi = tl.zeros([], dtype=tl.int64) + 4294967295
    tl.store(bstate_ptr, lo)
    tl.store(bstate_ptr + 1, hi)


@triton.jit(do_not_specialize=["n_pruned"])
def _list_ties_kernel(keys_ptr, tags_ptr, hist_ptr, bstate_ptr, rowcnt_ptr, k, n_pruned, cap,
                      BITS: tl.constexpr, NBINS: tl.constexpr, BLOCK: tl.constexpr):
    """When the bracket held and the threshold's ties are split: the per-row counts of the listed ties."""
    held, rank, length = _bracket_held(bstate_ptr, n_pruned, cap)
    start = tl.program_id(0) * BLOCK
    if held & (start < length):
        thr, need, count = _radix_state(hist_ptr, rank, 32 // BITS, BITS, NBINS)
        if need < count:
            offs = start + tl.arange(0, BLOCK)
            valid = offs < length
            ukey = _listed_keys(keys_ptr, offs, valid)
            f = tl.load(tags_ptr + offs, mask=valid, other=0).to(tl.int64)
            tl.atomic_add(rowcnt_ptr + f // k, tl.full([BLOCK], 1, tl.int32), mask=valid & (ukey == thr))


@triton.jit(do_not_specialize=["n_pruned"])
def _fixup_kernel(w0_ptr, u_ptr, v_ptr, out_ptr, words_ptr, state_ptr, bstate_ptr, keys_ptr, tags_ptr, k, ldu, RW,
                  beta, n_pruned, cap, BLOCK: tl.constexpr):
    """When the bracket held: the listed entries the threshold keeps get W' = W (the bracket pass wrote W * 0)
    and their bit."""
    held, _, length = _bracket_held(bstate_ptr, n_pruned, cap)
    start = tl.program_id(0) * BLOCK
    if held & (start < length):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < length
        ukey = _listed_keys(keys_ptr, offs, valid)
        f = tl.load(tags_ptr + offs, mask=valid, other=0).to(tl.int64)
        keep = valid & _kept(ukey, f, state_ptr)
        i = f // k
        w = _weight_at(w0_ptr, u_ptr, v_ptr, i, f - i * k, keep, keep, k, ldu, RW, beta)
        tl.store(out_ptr + f, _cast_out(w * 1.0, out_ptr), mask=keep)
        tl.atomic_or(words_ptr + (f >> 5), (tl.full([BLOCK], 1, tl.int64) << (f & 31)).to(tl.int32), mask=keep)


@triton.jit(do_not_specialize=["n_pruned"])
def _clear_words_kernel(words_ptr, nwords, bstate_ptr, n_pruned, cap, BLOCK: tl.constexpr):
    """When the bracket missed and k % 32 != 0: its bits cleared for the radix passes' mask pass, which ORs
    into zeroed words."""
    active, _ = _gate(bstate_ptr, n_pruned, cap, 1)
    if active:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(words_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=offs < nwords)


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
        w = _weight_at(w0_ptr, u_ptr, v_ptr, rows64[:, None], cols[None, :], cmask[None, :], m2, k, ldu, RW, beta)
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
BRACKET_MIN = bracket.BRACKET_MIN  # the sampled bracket from this many entries (-1: never; tests set 0)

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


def _radix_passes(grid, args, hist, cache, bstate, scal, k_target, cap: int, cache_bits: int, bn: int, bk: int,
                  mode: int = RADIX) -> None:
    """The NPASS histogram passes selecting the k_target-th smallest score (state in ``hist``)."""
    for p in range(NPASS):
        run(_hist_kernel, grid, (*args, hist, cache, bstate, *scal, k_target, cap),
            dict(PASS=p, BITS=RADIX_BITS, NBINS=BINS, BN=bn, BK=bk, CACHE_BITS=cache_bits, MODE=mode, **_SCORE_OPTS),
            args[0].device)


SAMPLE_RUNS_PER_PROGRAM = 64  # runs of 32 entries a program of _sample_kernel scores
KEYS_BLOCK = 4096             # keys a program of the list and sample kernels takes


def _bracket_passes(grid, args, scal, out, words, bstate, sample_hist, list_hist, rowcnt, state, keys, tags,
                    cap: int, n_pruned: int, bn: int, bk: int) -> None:
    """The sampled bracket (apt_kernels.pst.bracket), before the radix passes, which then return at once when it
    held: the sample's keys (in W''s buffer), its two radix passes and the bracket; the bracket pass over W; the
    list's radix passes, tie counts and cut; the fixup of its kept entries; and, when it missed with k % 32 != 0,
    its bits cleared."""
    dev = args[0].device
    n, k, ldu, rw, rs, beta, alpha1, alpha2 = scal
    numel = n * k
    runs = bracket.sample_runs(numel)
    size = runs * bracket.SAMPLE_RUN
    r_lo, r_hi, lo_open, hi_open = bracket.sample_ranks(numel, n_pruned)
    sample = out.reshape(-1).view(torch.uint8)[:4 * size].view(torch.int32)  # free until the bracket pass
    run(_sample_kernel, (cdiv(runs, SAMPLE_RUNS_PER_PROGRAM),),
        (*args, sample, numel, k, ldu, rw, rs, beta, alpha1, alpha2, runs),
        dict(RUNS=SAMPLE_RUNS_PER_PROGRAM, RUN=bracket.SAMPLE_RUN, **_SCORE_OPTS), dev)
    sample_common = dict(PASSES=SAMPLE_PASSES, BITS=SAMPLE_BITS, NBINS=SAMPLE_BINS)
    for p in range(SAMPLE_PASSES):
        run(_keys_hist_kernel, (cdiv(size, KEYS_BLOCK),), (sample, sample_hist, bstate, size, cap, r_lo, r_hi),
            dict(PASS=p, NSEL=2, LIST=False, BLOCK=KEYS_BLOCK, **sample_common, **FP_FUSION), dev)
    run(_bounds_kernel, (1,), (sample_hist, bstate, r_lo, r_hi),
        dict(LO_OPEN=lo_open, HI_OPEN=hi_open, **sample_common, **FP_FUSION), dev)
    run(_mask_kernel, grid, (*args, out, words, state, bstate, keys, tags, *scal, n_pruned, cap),
        dict(NM_N=0, NM_M=0, ALIGNED=k % 32 == 0, BRACKET=True, MODE=RADIX, BN=bn, BK=bk, **_SCORE_OPTS), dev)
    list_grid = (cdiv(cap, KEYS_BLOCK),)
    for p in range(NPASS):
        run(_keys_hist_kernel, list_grid, (keys, list_hist, bstate, 0, cap, n_pruned, 0),
            dict(PASS=p, PASSES=NPASS, BITS=RADIX_BITS, NBINS=BINS, NSEL=1, LIST=True, BLOCK=KEYS_BLOCK,
                 **FP_FUSION), dev)
    run(_list_ties_kernel, list_grid, (keys, tags, list_hist, bstate, rowcnt, k, n_pruned, cap),
        dict(BITS=RADIX_BITS, NBINS=BINS, BLOCK=KEYS_BLOCK, **FP_FUSION), dev)
    _cut(args, list_hist, rowcnt, state, bstate, scal, n_pruned, cap, bk, LISTED)
    run(_fixup_kernel, list_grid, (*args[:3], out, words, state, bstate, keys, tags, k, ldu, rw, beta, n_pruned, cap),
        dict(BLOCK=KEYS_BLOCK, **_SCORE_OPTS), dev)
    if k % 32:
        nwords = words.numel()
        run(_clear_words_kernel, (cdiv(nwords, KEYS_BLOCK),), (words, nwords, bstate, n_pruned, cap),
            dict(BLOCK=KEYS_BLOCK, **FP_FUSION), dev)


def _cut(args, hist, rowcnt, state, bstate, scal, n_pruned, cap, bk, mode) -> None:
    """The cut kernel: one program scans the row counts, then the one row holding the cut (wide blocks, few
    iterations)."""
    k = scal[1]
    run(_cut_kernel, (1,), (*args, hist, rowcnt, state, bstate, *scal, n_pruned, cap),
        dict(NDONE=NPASS, BITS=RADIX_BITS, NBINS=BINS, ROWB=1024, BK=max(bk, min(CUT_BLOCK, _pow2_at_least(k, 32))),
             MODE=mode, **_SCORE_OPTS), args[0].device)


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
    bracketed = select and bracket.applies(numel, n_pruned, BRACKET_MIN, 2 ** 31 - 1)
    # One zeroed scratch buffer (one fill): the state (T, F) and the bracket's (lo, hi, below, listed) as int64,
    # then, when selecting, the radix histograms and the per-row tie counts as int32, and the bracket's
    # histograms (the sample's two selections, the list's).
    sizes = [NPASS * BINS, n] + ([2 * SAMPLE_PASSES * SAMPLE_BINS, NPASS * BINS] if bracketed else [])
    n_int32 = sum(sizes) if select else 0
    scratch = _alloc("scratch", torch.zeros(6 + (n_int32 + 1) // 2, dtype=torch.int64, device=w0.device))
    state, bstate = scratch[:2], scratch[2:6]
    bn, bk = _fwd_block(k, nm)
    ldu = _ldu(n, bn)
    args = [w0, _columns(u, ldu), _factor(v), _columns(a, ldu), _factor(b), _factor(r), _factor(c)]
    grid = (cdiv(n, bn) * cdiv(k, bk),)
    scal = (n, k, ldu, rw, rs, float(beta), float(alpha1), float(alpha2))
    cap = bracket.list_cap(n, k) if bracketed else 0
    mode = AFTER_BRACKET if bracketed else RADIX
    keys = tags = words  # (pointers never read without the bracket)
    if select:
        hist, rowcnt, *bracket_hists = scratch[6:].view(torch.int32)[:n_int32].split(sizes)
        if bracketed:
            sample_hist, list_hist = bracket_hists
            keys, tags = _alloc("list", torch.empty(2, cap, dtype=torch.int32, device=w0.device)).unbind(0)
            _bracket_passes(grid, args, scal, out, words, bstate, sample_hist, list_hist, rowcnt, state, keys, tags,
                            cap, n_pruned, bn, bk)
        # the first pass keeps the keys' top bits in W' (overwritten by the mask pass): 16 or all 32
        cache_bits = {2: 16, 4: 32}.get(out.element_size(), 0)
        cache = out.view({16: torch.int16, 32: torch.int32}[cache_bits]) if cache_bits else hist
        _radix_passes(grid, args, hist, cache, bstate, scal, n_pruned, cap, cache_bits, bn, bk, mode)
        run(_tie_rows_kernel, grid, (*args, hist, rowcnt, bstate, *scal, n_pruned, cap),
            dict(NDONE=NPASS, BITS=RADIX_BITS, NBINS=BINS, BN=bn, BK=bk, MODE=mode, **_SCORE_OPTS), w0.device)
        _cut(args, hist, rowcnt, state, bstate, scal, n_pruned, cap, bk, mode)
    # n_pruned == 0: state (T, F) = (0, 0) keeps everything (every key is >= 0 and every index >= 0)
    nm_n, nm_m = (0, 0) if nm is None else nm
    run(_mask_kernel, grid, (*args, out, words, state, bstate, keys, tags, *scal, n_pruned, cap),
        dict(NM_N=nm_n, NM_M=nm_m, ALIGNED=aligned, BRACKET=False, MODE=mode, BN=bn, BK=bk, **_SCORE_OPTS), w0.device)
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
            _radix_passes(grid, args, hist, hist, hist, scal, k, 0, 0, bn, bk)  # no key cache: w0 is read per k
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
