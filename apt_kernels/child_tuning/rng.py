"""The Child-Tuning F-mode random stream, defined once so every backend draws the same masks.

Element ``e`` of parameter number ``i`` (its position when the optimizer's param groups are read in
order) at that parameter's step ``t`` (1 for its first update) is kept iff

    q, j = e div 4, e mod 4
    x = Philox4x32-10(counter = (q mod 2**32, q div 2**32, t, i), key = (seed mod 2**32, seed div 2**32))[j]
    (x >> 8) < keep_threshold(reserve_p) = floor(reserve_p * 2**24)

i.e. a 24-bit uniform integer below reserve_p * 2**24 (probability reserve_p up to 2**-24). One
generator call gives the bits of four consecutive elements (its four output words), so a kernel that
updates four elements per thread draws once for them. Philox4x32-10 is Salmon et al.'s counter-based
generator (Random123), the one Triton's ``tl.randint4x`` implements. The stream depends only on
(seed, step, parameter index, element index): not on the device, the backend, the launch shape or the
data-parallel rank, and a data-parallel shard that knows the global element index of its first element
draws exactly the bits the unsharded tensor would.

This module is the plain-PyTorch definition (uint32 arithmetic emulated in int64 without overflow). It is exact but
slow; the Triton and CUDA kernels draw the bits in-kernel (``triton_rng.philox_keep4``, ``keep_bits4`` in
csrc/child_tuning_kernel.cuh), and the "triton" and "cuda" backends of ``keep_mask`` expose those draws.
"""

from __future__ import annotations

import torch

from ..registry import Probe, registry

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
KEEP_BITS = 24


def keep_threshold(reserve_p: float) -> int:
    return int(reserve_p * (1 << KEEP_BITS))


def _mulhilo(a: int, b: torch.Tensor):
    """High and low 32-bit words of a * b, with every int64 intermediate below 2**49 (no overflow)."""
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def random_bits(seed: int, step: int, param_index: int, numel: int, device=None, offset: int = 0):
    """The 32-bit word x of elements offset .. offset + numel - 1 (int64 tensor): one generator call per
    group of four elements, whose four output words are the group's four elements in order."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    first, last = offset >> 2, (offset + numel - 1) >> 2
    q = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    seed &= (1 << 64) - 1
    words = philox4x32(q & MASK32, q >> 32, torch.tensor(step, device=device),
                       torch.tensor(param_index, device=device), seed & MASK32, seed >> 32)
    x = torch.stack(words, dim=1).reshape(-1)  # element 4 q + j is word j of group q
    return x[offset & 3:(offset & 3) + numel]


def keep_mask_torch(seed: int, step: int, param_index: int, shape, reserve_p: float, device=None,
                    offset: int = 0) -> torch.Tensor:
    shape = torch.Size(shape)
    x = random_bits(seed, step, param_index, shape.numel(), device, offset)
    return ((x >> 8) < keep_threshold(reserve_p)).view(shape)


REGISTRY = registry("child_tuning_keep_mask")
REGISTRY.register("reference")(keep_mask_torch)
REGISTRY.register("torch")(keep_mask_torch)


@REGISTRY.register("triton")
def _keep_mask_triton(*args, **kwargs):
    from .triton_rng import keep_mask_triton

    return keep_mask_triton(*args, **kwargs)


@REGISTRY.register("cuda")
def _keep_mask_cuda(seed: int, step: int, param_index: int, shape, reserve_p: float, device, offset: int = 0):
    """The bits of the CUDA update kernel's own draw (csrc/child_tuning_kernel.cuh, ``keep_bit``)."""
    from .. import _env

    shape = torch.Size(shape)
    device = torch.device(device)
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
    seed &= (1 << 64) - 1
    out = _env.cuda_extension().child_tuning_keep_mask(shape.numel(), offset, step, param_index, seed & MASK32,
                                                       seed >> 32, keep_threshold(reserve_p), index)
    return out.view(shape)


def keep_mask(seed: int, step: int, param_index: int, shape, reserve_p: float, device=None, offset: int = 0,
              *, backend: str = "auto") -> torch.Tensor:
    """The F-mode keep mask (bool, ``shape``) every backend draws for this parameter and step.

    ``offset`` is the global index of the first element (for a shard of a larger tensor).
    """
    device = torch.device("cpu" if device is None else device)
    _, fn = REGISTRY.select(backend, Probe(device, torch.bool))
    return fn(seed, step, param_index, shape, reserve_p, device, offset)
