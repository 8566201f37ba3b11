"""Triton side of the Child-Tuning random stream (definition: rng.py).

``philox_keep4`` is the in-kernel draw the fused optimizer step uses; ``keep_mask_triton`` wraps it in
a small kernel that writes the mask, so the stream can be checked against the PyTorch definition.
Import this module only when Triton is usable (see ``apt_kernels._env``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import on_device
from .._launch import FP_FUSION
from .._intmath import cdiv
from .rng import KEEP_BITS, keep_threshold

KEEP_BITS_C = tl.constexpr(KEEP_BITS)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (Random123's constants); returns the four output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def u32_like(x, like):
    """``x`` (a kernel argument: i32, u32, i64 or, when its value is 1, a constexpr Triton specialised it
    into) as a uint32 block shaped like ``like``. ``x.to(...)`` alone fails to compile for the constexpr."""
    return (tl.zeros_like(like) + x).to(tl.uint32)


@triton.jit
def philox_keep4(group, step, param_index, seed_lo, seed_hi, threshold):
    """Keep bits of the elements 4 q .. 4 q + 3 for the int64 group indices ``q`` (a 1-D block), per the
    stream of rng.py: one generator call per group, a (groups, 4) block whose column j is word j."""
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, u32_like(step, c0), u32_like(param_index, c0), u32_like(seed_lo, c0),
                                   u32_like(seed_hi, c0))
    j = tl.arange(0, 4)[None, :]
    x = tl.where(j == 0, x0[:, None], tl.where(j == 1, x1[:, None], tl.where(j == 2, x2[:, None], x3[:, None])))
    return (x >> (32 - KEEP_BITS_C)).to(tl.int64) < threshold


@triton.jit
def group_tile(first, GROUPS: tl.constexpr):
    """Element indices first .. first + 4 GROUPS - 1 as a (GROUPS, 4) block, row r holding group r."""
    return first + 4 * tl.arange(0, GROUPS)[:, None] + tl.arange(0, 4)[None, :]


@triton.jit
def _keep_mask_kernel(out_ptr, numel, offset, step, param_index, seed_lo, seed_hi, threshold,
                      BLOCK: tl.constexpr):
    # program p covers the global groups of elements [offset - offset % 4 + p BLOCK, ... + BLOCK)
    first_global = (offset - offset % 4) + tl.program_id(0).to(tl.int64) * BLOCK
    local = group_tile(first_global - offset, BLOCK // 4)
    keep = philox_keep4(first_global // 4 + tl.arange(0, BLOCK // 4), step, param_index, seed_lo, seed_hi, threshold)
    tl.store(out_ptr + local, keep.to(tl.int8), mask=(local >= 0) & (local < numel))


def keep_mask_triton(seed: int, step: int, param_index: int, shape, reserve_p: float, device,
                     offset: int = 0) -> torch.Tensor:
    shape = torch.Size(shape)
    numel = shape.numel()
    out = torch.empty(numel, dtype=torch.int8, device=device)
    if numel:
        seed &= (1 << 64) - 1
        block = 1024
        device = torch.device(device)
        with on_device(device):
            _keep_mask_kernel[(cdiv(numel + offset % 4, block),)](
                out, numel, offset, step, param_index, seed & 0xFFFFFFFF, seed >> 32,
                keep_threshold(reserve_p), BLOCK=block, **FP_FUSION)
    return out.view(shape).bool()
