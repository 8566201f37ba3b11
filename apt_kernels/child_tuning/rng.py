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

This module holds the plain-PyTorch definition (``philox4x32``: uint32 arithmetic emulated in int64 without
overflow; the "reference" backend of ``keep_mask``), exact but slow, and the "torch" backend, the same
stream drawn faster (``keep_masks``: every tensor of a step in one batched pass, with numpy's native
uint64 arithmetic on the CPU). The Triton and CUDA kernels draw the bits in-kernel
(``triton_rng.philox_keep4``, ``keep_bits4`` in csrc/child_tuning_kernel.cuh), and the "triton" and
"cuda" backends of ``keep_mask`` expose those draws.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..registry import Probe, registry

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
KEEP_BITS = 24
KEEP_BITS_SHIFT = 32 - KEEP_BITS  # a draw's top 24 bits: x >> 8


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
    # the counter's constant words filled on the device (torch.tensor(x, device="cuda") would synchronise)
    words = philox4x32(q & MASK32, q >> 32, torch.full((), step, dtype=torch.int64, device=device),
                       torch.full((), param_index, dtype=torch.int64, device=device), seed & MASK32, seed >> 32)
    x = torch.stack(words, dim=1).reshape(-1)  # element 4 q + j is word j of group q
    return x[offset & 3:(offset & 3) + numel]


def keep_mask_torch(seed: int, step: int, param_index: int, shape, reserve_p: float, device=None,
                    offset: int = 0) -> torch.Tensor:
    shape = torch.Size(shape)
    x = random_bits(seed, step, param_index, shape.numel(), device, offset)
    return ((x >> KEEP_BITS_SHIFT) < keep_threshold(reserve_p)).view(shape)


# Groups of four elements per numpy pass: the generator's six work arrays (48 B per group) stay in cache.
_NUMPY_CHUNK = 1 << 15


def _philox_keep_numpy(x0, lo1, x2, lo3, k0: int, k1: int, threshold: int, out: np.ndarray) -> None:
    """Philox4x32-10 on uint64 arrays holding the four uint32 counter words (overwritten), then
    ``out[:, j] = (word j >> 8) < threshold``. A product of two uint32 is exact in uint64, its high and
    low words are the definition's multiply-high and -low; a product's low word is used only after the
    next round, so the two products of each round are kept (``lo1``, ``lo3``), masked when read."""
    u64 = np.uint64
    mask = u64(MASK32)
    prod0, prod1 = np.empty_like(x0), np.empty_like(x0)
    for _ in range(10):
        np.multiply(x0, u64(PHILOX_M0), out=prod0)
        np.multiply(x2, u64(PHILOX_M1), out=prod1)
        np.right_shift(prod1, u64(32), out=x0)  # x0 = hi(c2 M1) ^ c1 ^ k0
        x0 ^= lo1
        x0 ^= u64(k0)
        x0 &= mask
        np.right_shift(prod0, u64(32), out=x2)  # x2 = hi(c0 M0) ^ c3 ^ k1
        x2 ^= lo3
        x2 ^= u64(k1)
        x2 &= mask
        prod1, lo1 = lo1, prod1  # c1 = lo(c2 M1), c3 = lo(c0 M0): masked above and below
        prod0, lo3 = lo3, prod0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    lo1 &= mask
    lo3 &= mask
    for j, word in enumerate((x0, lo1, x2, lo3)):
        word >>= u64(KEEP_BITS_SHIFT)
        np.less(word, threshold, out=out[:, j])


def _draw_numpy(rows, counts, first, steps, indices, total: int, seed: int, threshold: int, device) -> torch.Tensor:
    """Keep bits (total * 4, bool, CPU) of ``total`` groups of four elements: tensor j's ``counts[j]`` groups,
    from group number ``first[j]`` on, are rows ``rows[j]`` on, drawn at ``steps[j]`` for parameter
    ``indices[j]``. The counters are written chunk by chunk, in cache."""
    out = np.empty((total, 4), dtype=bool)
    bufs = [np.empty(min(total, _NUMPY_CHUNK), np.uint64) for _ in range(4)]
    j = 0
    for s in range(0, total, _NUMPY_CHUNK):
        e = min(s + _NUMPY_CHUNK, total)
        x0, lo1, x2, lo3 = (b[: e - s] for b in bufs)
        while rows[j] + counts[j] <= s:
            j += 1
        for t in range(j, len(rows)):  # the tensors whose rows meet [s, e)
            a, b = max(int(rows[t]), s), min(int(rows[t] + counts[t]), e)
            if a >= e:
                break
            if a < b:
                q = int(first[t]) + a - int(rows[t])
                x0[a - s:b - s] = np.arange(q, q + b - a, dtype=np.uint64)
                x2[a - s:b - s] = steps[t]
                lo3[a - s:b - s] = indices[t]
        np.right_shift(x0, np.uint64(32), out=lo1)
        x0 &= np.uint64(MASK32)
        _philox_keep_numpy(x0, lo1, x2, lo3, seed & MASK32, seed >> 32, threshold, out[s:e])
    return torch.from_numpy(out).view(-1)


def _draw_torch(rows, counts, first, steps, indices, total: int, seed: int, threshold: int, device) -> torch.Tensor:
    """The same bits with :func:`philox4x32` on ``device`` (where numpy cannot reach). The counters are
    spread over the groups on the device from one small copy of four per-tensor values (pinned and
    asynchronous on CUDA: a pageable copy would synchronise the stream, and the spread counters, 24 bytes
    per group, would be a copy of their own every step)."""
    small = torch.from_numpy(np.stack([first - rows, steps, indices, counts]))
    if device.type == "cuda":
        small = small.pin_memory()
    small = small.to(device, non_blocking=True)
    per_group = lambda x: torch.repeat_interleave(x, small[3], output_size=total)  # noqa: E731 (no size sync)
    q = torch.arange(total, dtype=torch.int64, device=device) + per_group(small[0])
    words = philox4x32(q & MASK32, q >> 32, per_group(small[1]), per_group(small[2]), seed & MASK32, seed >> 32)
    return ((torch.stack(words, dim=1) >> KEEP_BITS_SHIFT) < threshold).view(-1)


@torch.compiler.disable  # numpy and host-side counters: torch.compile(opt.step) runs the draw eagerly
def _keep_masks_torch(seed: int, steps: Sequence[int], param_indices: Sequence[int], shapes, reserve_p: float,
                      device: torch.device, offsets: Sequence[int]) -> list[torch.Tensor]:
    """The "torch" backend: the draws of all tensors made in one pass (numpy on the CPU, :func:`philox4x32`
    over the concatenated counters elsewhere). The masks are views of one buffer."""
    numels = np.array([sh.numel() for sh in shapes], dtype=np.int64)
    offs = np.array(offsets, dtype=np.int64)
    first = offs >> 2
    counts = np.where(numels > 0, ((offs + numels - 1) >> 2) - first + 1, 0)
    rows = np.cumsum(counts) - counts  # row of each tensor's first group
    steps, indices = (np.asarray(x, dtype=np.int64).reshape(-1) & MASK32 for x in (steps, param_indices))
    draw = _draw_numpy if device.type == "cpu" else _draw_torch
    flat = draw(rows, counts, first, steps, indices, int(counts.sum()), seed & ((1 << 64) - 1),
                keep_threshold(reserve_p), device)
    return [flat[4 * int(r) + (o & 3):4 * int(r) + (o & 3) + sh.numel()].view(sh)
            for r, o, sh in zip(rows, offsets, shapes)]


REGISTRY = registry("child_tuning_keep_mask")
REGISTRY.register("reference")(keep_mask_torch)


@REGISTRY.register("torch")
def _keep_mask_torch(seed: int, step: int, param_index: int, shape, reserve_p: float, device, offset: int = 0):
    return _keep_masks_torch(seed, [step], [param_index], [torch.Size(shape)], reserve_p, device, [offset])[0]


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


def keep_masks(seed: int, steps: Sequence[int], param_indices: Sequence[int], shapes, reserve_p: float,
               device=None, offsets: Sequence[int] | None = None, *, backend: str = "auto") -> list[torch.Tensor]:
    """``keep_mask(seed, steps[j], param_indices[j], shapes[j], reserve_p, device, offsets[j])`` for every j;
    the "torch" backend draws them all in one pass (a step's masks at the cost of one large tensor's)."""
    device = torch.device("cpu" if device is None else device)
    shapes = [torch.Size(sh) for sh in shapes]
    offsets = [int(o) for o in offsets] if offsets else [0] * len(shapes)
    name, fn = REGISTRY.select(backend, Probe(device, torch.bool))
    if name == "torch":
        return _keep_masks_torch(seed, steps, param_indices, shapes, reserve_p, device, offsets)
    return [fn(seed, t, i, sh, reserve_p, device, o) for t, i, sh, o in zip(steps, param_indices, shapes, offsets)]
