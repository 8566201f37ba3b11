"""Packed bitmasks: 1 bit per element, LSB first (bit j of int32 word w is element 32 * w + j).

PST keeps its pruning mask this way for the backward and Child-Tuning mode "D" reads its masks
this way: 32x less memory than a bool tensor. Backends: "torch"/"reference" (any device) and
"cuda" (the C++ extension's warp-ballot kernel).
"""

from __future__ import annotations

import torch

from . import _env
from . import _validate as V
from .registry import Probe, registry

OP = "pack_bits"
REGISTRY = registry(OP)


# The small tables below are made on the device (arange), never copied from Python data: torch.tensor(...,
# device="cuda") from host memory synchronises the stream.


def _byte_shifts(device) -> torch.Tensor:
    """(0, 8, 16, 24): byte i of an int32 word holds its bits 8 i .. 8 i + 7."""
    return torch.arange(0, 32, 8, dtype=torch.int64, device=device)


def _byte_bits(device) -> torch.Tensor:
    """(256, 8) bool: row b is byte b's bits, LSB first."""
    return (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1 == 1


@REGISTRY.register("reference")
@REGISTRY.register("torch")
def _pack_torch(mask: torch.Tensor) -> torch.Tensor:
    """Bits to bytes (a weighted sum of 8), bytes to words (a shifted sum of 4): a few passes over the
    bytes, never an int64 per element."""
    flat = mask.reshape(-1)
    n = flat.numel()
    padded = torch.zeros(((n + 31) // 32) * 32, dtype=torch.int32, device=mask.device)
    padded[:n] = flat
    weights = 1 << torch.arange(8, dtype=torch.int32, device=mask.device)  # bit j of a byte weighs 2 ** j
    byte = (padded.view(-1, 8) * weights).sum(1, dtype=torch.int64).view(-1, 4)
    words = (byte << _byte_shifts(mask.device)).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed 32-bit


@REGISTRY.register("cuda")
def _pack_cuda(mask: torch.Tensor) -> torch.Tensor:
    return _env.cuda_extension().pack_bits(mask)


def pack_bits(mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Pack a bool tensor into ceil(numel / 32) int32 words."""
    V.tensor("mask", mask, dtypes=(torch.bool,))
    _, fn = REGISTRY.select(backend, Probe.of(mask))
    return fn(mask)


def unpack_bits(words: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed into ``words``."""
    V.tensor("words", words, ndim=1, dtypes=(torch.int32,))
    shape = torch.Size(shape)
    if words.numel() * 32 < shape.numel():
        raise ValueError(f"{words.numel()} words hold fewer than the {shape.numel()} bits of shape {tuple(shape)}")
    byte = (words.to(torch.int64)[:, None] >> _byte_shifts(words.device)) & 0xFF
    # each byte's 8 bits from a 256-row table: one gather writes the bools (no int64 per element)
    return _byte_bits(words.device).index_select(0, byte.view(-1)).view(-1)[: shape.numel()].view(shape)
