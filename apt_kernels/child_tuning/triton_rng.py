"""Triton side of the Child-Tuning random stream (definition: rng.py).

``philox_keep`` is the in-kernel draw the fused optimizer step uses; ``keep_mask_triton`` wraps it in
a small kernel that writes the mask, so the stream can be checked against the PyTorch definition.
Import this module only when Triton is usable (see ``apt_kernels._env``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def philox_keep(elem, step, param_index, seed_lo, seed_hi, threshold):
    """Keep bits for int64 element indices ``elem`` (a block), per the stream of rng.py."""
    c0 = (elem & 0xFFFFFFFF).to(tl.uint32)
    c1 = (elem >> 32).to(tl.uint32)
    x, _, _, _ = philox4x32_10(c0, c1, u32_like(step, c0), u32_like(param_index, c0), u32_like(seed_lo, c0),
                               u32_like(seed_hi, c0))
    return (x >> (32 - KEEP_BITS_C)).to(tl.int64) < threshold


@triton.jit
def _keep_mask_kernel(out_ptr, numel, offset, step, param_index, seed_lo, seed_hi, threshold,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = philox_keep(local + offset, step, param_index, seed_lo, seed_hi, threshold)
    tl.store(out_ptr + local, keep.to(tl.int8), mask=local < numel)


def keep_mask_triton(seed: int, step: int, param_index: int, shape, reserve_p: float, device,
                     offset: int = 0) -> torch.Tensor:
    shape = torch.Size(shape)
    numel = shape.numel()
    out = torch.empty(numel, dtype=torch.int8, device=device)
    if numel:
        seed &= (1 << 64) - 1
        block = 1024
        _keep_mask_kernel[(triton.cdiv(numel, block),)](
            out, numel, offset, step, param_index, seed & 0xFFFFFFFF, seed >> 32,
            keep_threshold(reserve_p), BLOCK=block)
    return out.view(shape).bool()
