"""The fused Child-Tuning AdamW step in Triton: one launch over a table of tensors (see fused.py).

One kernel, specialised by compile-time constants: the parameter dtype, the mask mode (none / F drawn
in-kernel with ``triton_rng.philox_keep4``, one draw per group of four elements / D read from packed
bits), the semantics ("official" or "torch") and whether weight decay applies. Program ``i`` updates
chunk ``work[i] = (tensor, chunk)``: ``CHUNK`` consecutive elements of one tensor, ``BLOCK`` at a time
as (BLOCK / 4, 4) tiles whose rows are the random stream's groups of four. Tensors are found through
tables of raw addresses (int64), so a single launch covers every tensor of a dtype group whatever their
sizes (not one launch per tensor); this works compiled and in Triton's CPU interpreter alike, so the
tests run the very kernel a GPU runs. Tensors whose base addresses are all 16-byte aligned and whose
element offset is a multiple of 4 (normally all) share a launch with vectorised accesses; any others
get a second launch.

Import this module only when Triton is usable (see ``apt_kernels._env``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import on_device
from .fused import MODE_D, MODE_F, Hyper, Launch
from .triton_rng import group_tile, philox_keep4

BLOCK = 1024  # elements per inner iteration of a program
CHUNK = 8192  # elements per program (a multiple of BLOCK)
ALIGN = 16  # bytes: every base address a multiple of this lets the compiler vectorise the accesses

MODE_F_C = tl.constexpr(MODE_F)
MODE_D_C = tl.constexpr(MODE_D)
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
            g = g * (keep.to(tl.float32) * inv_reserve_p)
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


@triton.jit
def _child_tuning_adamw_kernel(
        ptrs,  # int64 [T, 5]: addresses of param, grad, exp_avg, exp_avg_sq, packed mask bits (0 if none)
        meta,  # int64 [T, 4]: numel, element offset, parameter index, step
        scal,  # float32 [T, 2]: step size, sqrt(1 - beta2^step)
        work,  # int32 [programs, 2]: tensor row, chunk index within the tensor
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
        seed_lo, seed_hi, threshold,
        P_DTYPE: tl.constexpr, MODE: tl.constexpr, OFFICIAL: tl.constexpr, HAS_DECAY: tl.constexpr,
        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(work + 2 * pid).to(tl.int64)
    p_ptr = tl.load(ptrs + 5 * row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(ptrs + 5 * row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(ptrs + 5 * row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(ptrs + 5 * row + 3).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(ptrs + 5 * row + 4).to(tl.pointer_type(tl.int32))
    if ALIGNED:  # the launcher checked: every base address is 16-byte aligned
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    numel = tl.load(meta + 4 * row)
    offset = tl.load(meta + 4 * row + 1)
    index = tl.load(meta + 4 * row + 2)
    step = tl.load(meta + 4 * row + 3)
    step_size = tl.load(scal + 2 * row)
    bc2_sqrt = tl.load(scal + 2 * row + 1)
    if ALIGNED:  # the launcher checked: the offset is a multiple of 4, so chunks start at multiples of CHUNK
        start = tl.load(work + 2 * pid + 1).to(tl.int64) * CHUNK
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
        start = tl.load(work + 2 * pid + 1).to(tl.int64) * CHUNK - offset % 4
        _update_range(p_ptr, g_ptr, m_ptr, v_ptr, b_ptr, start, numel, offset, step, index, step_size,
                      bc2_sqrt, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
                      seed_lo, seed_hi, threshold, P_DTYPE, MODE, OFFICIAL, HAS_DECAY, True, CHUNK, BLOCK)


def _addresses(launch: Launch) -> list[tuple[int, int, int, int]]:
    """(param, grad, exp_avg, exp_avg_sq) addresses of every tensor: read once per step (host time)."""
    return [(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
            for p, g, m, v in zip(launch.params, launch.grads, launch.exp_avgs, launch.exp_avg_sqs)]


def _tables(launch: Launch, device: torch.device, addresses: list[tuple[int, int, int, int]]):
    if launch.mode == MODE_D:
        rows = [(*a, b.data_ptr()) for a, b in zip(addresses, launch.bits)]
    else:
        rows = [(*a, 0) for a in addresses]
    numels = [p.numel() for p in launch.params]
    meta = list(zip(numels, launch.offsets, launch.indices, launch.steps))
    chunks = torch.tensor([(n + o % 4 + CHUNK - 1) // CHUNK for n, o in zip(numels, launch.offsets)],
                          dtype=torch.int64)
    tensor_of = torch.repeat_interleave(torch.arange(len(numels)), chunks)
    first = torch.cumsum(chunks, 0) - chunks
    work = torch.stack([tensor_of, torch.arange(tensor_of.numel()) - first[tensor_of]], 1).to(torch.int32)
    tables = (torch.tensor(rows, dtype=torch.int64), torch.tensor(meta, dtype=torch.int64),
              torch.tensor(list(zip(launch.step_sizes, launch.bc2_sqrts)), dtype=torch.float32), work)
    # One buffer and views of it (every table's size is a multiple of 8 bytes: every view stays aligned);
    # on a GPU one pinned buffer and one asynchronous copy (from pinned memory the host does not wait for
    # the GPU's queued work, so the next step is planned while this one runs). The CPU tests read the
    # same views.
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tables])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    out, at = [], 0
    for t in tables:
        size = t.numel() * t.element_size()
        out.append(flat[at:at + size].view(t.dtype).view(t.shape))
        at += size
    return out


def launch(launch: Launch, h: Hyper) -> None:
    """Run one fused launch (the ``launch_fn`` of :func:`apt_kernels.child_tuning.fused.run`): one kernel
    for the tensors whose addresses are all 16-byte aligned (vectorised), one for the others, if any."""
    addresses = _addresses(launch)
    # all four addresses multiples of ALIGN (a power of two) iff their bitwise or is
    aligned = [not (p | g | m | v) % ALIGN and o % 4 == 0 for (p, g, m, v), o in zip(addresses, launch.offsets)]
    for flag in (True, False):
        part = [j for j, a in enumerate(aligned) if a == flag]
        if len(part) == len(launch):
            _launch(launch, h, flag, addresses)
        elif part:
            _launch(launch.subset(part), h, flag, [addresses[j] for j in part])


def _launch(launch: Launch, h: Hyper, aligned: bool, addresses: list[tuple[int, int, int, int]]) -> None:
    ptrs, meta, scal, work = _tables(launch, launch.device, addresses)
    grid = (work.shape[0],)
    with on_device(launch.device):
        _child_tuning_adamw_kernel[grid](
            ptrs, meta, scal, work,
            h.beta1, h.one_minus_beta1, h.beta2, h.one_minus_beta2, h.eps, h.decay, h.inv_reserve_p,
            h.seed_lo, h.seed_hi, h.threshold,
            P_DTYPE=_TL_DTYPE[launch.dtype], MODE=launch.mode, OFFICIAL=h.official, HAS_DECAY=h.has_decay,
            ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK)


assert CHUNK % BLOCK == 0
