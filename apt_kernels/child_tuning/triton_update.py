"""The fused Child-Tuning AdamW step in Triton: one launch over a table of tensors (see fused.py).

One kernel, specialised by compile-time constants: the parameter dtype, the mask mode (none / F drawn
in-kernel with ``triton_rng.philox_keep4``, one draw per group of four elements / D read from packed
bits), the semantics ("official" or "torch") and whether weight decay applies. Program ``i`` updates
chunk ``i`` of fused.py's chunk table: ``CHUNK`` consecutive elements of one tensor, ``BLOCK`` at a
time as (BLOCK / 4, 4) tiles whose rows are the random stream's groups of four. Tensors are found
through fused.py's tensor table of raw addresses (int64, the CUDA kernel's table too), so a single
launch covers every tensor of a dtype group whatever their sizes (not one launch per tensor); this
works compiled and in Triton's CPU interpreter alike, so the tests run the very kernel a GPU runs.
Tensors whose base addresses are all 16-byte aligned and whose element offset is a multiple of 4
(normally all) share a launch with vectorised accesses; any others get a second launch.

Import this module only when Triton is usable (see ``apt_kernels._env``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import on_device
from .._launch import FP_FUSION, run
from .fused import MODE_D, MODE_F, ROW_WORDS, Hyper, Kernel, Steps, Tables
from .triton_rng import group_tile, philox_keep4

BLOCK = 1024  # elements per inner iteration of a program
CHUNK = 8192  # elements per program (a multiple of BLOCK)

MODE_F_C = tl.constexpr(MODE_F)
MODE_D_C = tl.constexpr(MODE_D)
ROW_WORDS_C = tl.constexpr(ROW_WORDS)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round_to(w, P_DTYPE: tl.constexpr):
    """float32 -> P_DTYPE rounded to nearest even, as torch's ``copy_`` rounds.

    bfloat16 is rounded by hand on the float32 bits (NaN kept a quiet NaN): compiled, ``.to`` does the
    same (cvt.rn), but Triton's interpreter truncates, and the tests run there.
    """
    if P_DTYPE == tl.bfloat16:
        u = w.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        b = tl.where(w != w, 0x7FC0, u >> 16).to(tl.uint16)
        return b.to(tl.bfloat16, bitcast=True)
    else:
        return w.to(P_DTYPE)


@triton.jit
def _update_range(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, first, bound, offset, step, index, step_size, bc2_sqrt,
                  beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
                  seed_lo, seed_hi, threshold,
                  P_DTYPE: tl.constexpr, MODE: tl.constexpr, OFFICIAL: tl.constexpr, HAS_DECAY: tl.constexpr,
                  LOWER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [first, first + CHUNK) of one tensor that lie in [0, bound), BLOCK at a time as
    (BLOCK / 4, 4) tiles whose rows are the stream's groups of four (``first + offset`` is a multiple of 4).
    LOWER: mask the indices below 0 too (only a chunk of a tensor whose offset is not a multiple of 4)."""
    for s in range(0, CHUNK, BLOCK):
        idx = group_tile(first + s, BLOCK // 4)
        ok = idx < bound
        if LOWER:
            ok = ok & (idx >= 0)
        w = tl.load(p_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + idx, mask=ok, other=0.0)
        v = tl.load(v_ptr + idx, mask=ok, other=0.0)
        if MODE == MODE_F_C:  # F: keep ~ Bernoulli(reserve_p) from the counter-based stream, rescaled
            group = (first + s + offset) // 4 + tl.arange(0, BLOCK // 4)
            keep = philox_keep4(group, step, index, seed_lo, seed_hi, threshold)
            g = g * tl.where(keep, inv_reserve_p, 0.0)  # (not keep * inv: 0 * inf is NaN for a tiny reserve_p)
        elif MODE == MODE_D_C:  # D: bit idx of the packed words, LSB first
            word = tl.load(b_ptr + (idx >> 5), mask=ok, other=0)
            g = g * ((word >> (idx & 31).to(tl.int32)) & 1).to(tl.float32)
        if OFFICIAL:  # the paper's optimizer: eps before bias correction, decay after the step
            m = beta1 * m + one_minus_beta1 * g
            v = beta2 * v + one_minus_beta2 * (g * g)
            w = w - step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps)
            if HAS_DECAY:
                w = w + decay * w
        else:  # torch.optim.AdamW
            if HAS_DECAY:
                w = w * decay
            m = m + one_minus_beta1 * (g - m)
            v = beta2 * v + one_minus_beta2 * (g * g)
            w = w - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
        tl.store(m_ptr + idx, m, mask=ok)
        tl.store(v_ptr + idx, v, mask=ok)
        tl.store(p_ptr + idx, _round_to(w, P_DTYPE), mask=ok)


@triton.jit(do_not_specialize=["step0"])
def _child_tuning_adamw_kernel(
        rows,  # int64 [T, ROW_WORDS]: fused.py's tensor table (csrc/child_tuning.cuh's TensorRow)
        chunks,  # int32 [programs, 2]: tensor row, chunk index within the tensor
        step0, step_size0, bc2_sqrt0,  # the step all rows share and its scalars; step0 == 0: the rows' own
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
        seed_lo, seed_hi, threshold,
        P_DTYPE: tl.constexpr, MODE: tl.constexpr, OFFICIAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = rows + ROW_WORDS_C * tl.load(chunks + 2 * pid).to(tl.int64)
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int32))
    if ALIGNED:  # the launcher checked: every base address is 16-byte aligned
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    numel = tl.load(row + 5)
    offset = tl.load(row + 6)
    index_step = tl.load(row + 7)  # parameter index | step << 32
    scalars = tl.load(row + 8)  # float32 bits: step size | sqrt(1 - beta2^step) << 32
    index = index_step & 0xFFFFFFFF
    shared = step0 != 0
    step = tl.where(shared, step0, (index_step >> 32) & 0xFFFFFFFF)
    step_size = tl.where(shared, step_size0, (scalars & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True))
    bc2_sqrt = tl.where(shared, bc2_sqrt0, (scalars >> 32).to(tl.int32).to(tl.float32, bitcast=True))
    if ALIGNED:  # the launcher checked: the offset is a multiple of 4, so chunks start at multiples of CHUNK
        start = tl.load(chunks + 2 * pid + 1).to(tl.int64) * CHUNK
        # A full chunk gets the bound start + CHUNK, a multiple of CHUNK the compiler can see, so its
        # accesses vectorise; only a tensor's last chunk is bounded by its numel.
        if start + CHUNK <= numel:
            _update_range(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, start, start + CHUNK, offset, step, index, step_size,
                          bc2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
                          seed_lo, seed_hi, threshold, P_DTYPE, MODE, OFFICIAL, HAS_DECAY, False, CHUNK, BLOCK)
        else:
            _update_range(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, start, numel, offset, step, index, step_size,
                          bc2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
                          seed_lo, seed_hi, threshold, P_DTYPE, MODE, OFFICIAL, HAS_DECAY, False, CHUNK, BLOCK)
    else:  # chunks cut the stream's groups of four: chunk c starts at local element c CHUNK - offset % 4
        start = tl.load(chunks + 2 * pid + 1).to(tl.int64) * CHUNK - offset % 4
        _update_range(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, start, numel, offset, step, index, step_size,
                      bc2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
                      seed_lo, seed_hi, threshold, P_DTYPE, MODE, OFFICIAL, HAS_DECAY, True, CHUNK, BLOCK)


def _launch(t: Tables, h: Hyper, s: Steps) -> None:
    with on_device(t.device):
        run(_child_tuning_adamw_kernel, (t.chunks.shape[0],),
            (t.rows, t.chunks, s.step, s.step_size, s.bc2_sqrt,
             h.beta1, h.one_minus_beta1, h.beta2, h.one_minus_beta2, h.eps, h.decay, h.inv_reserve_p,
             h.seed_lo, h.seed_hi, h.threshold),
            dict(P_DTYPE=_TL_DTYPE[t.dtype], MODE=t.mode, OFFICIAL=h.official, HAS_DECAY=h.has_decay,
                 ALIGNED=t.vector, CHUNK=CHUNK, BLOCK=BLOCK, **FP_FUSION), t.device)


def kernel() -> Kernel:
    """This backend for :func:`apt_kernels.child_tuning.fused.run`: chunks of CHUNK elements that start on
    the stream's groups of four, vectorisable tensors in a launch of their own."""
    return Kernel(chunk=CHUNK, group_chunks=True, split_vector=True, launch=_launch)


assert CHUNK % BLOCK == 0
