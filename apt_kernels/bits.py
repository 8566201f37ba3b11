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


def _shifts(device):
    return torch.arange(32, dtype=torch.int64, device=device)


@REGISTRY.register("reference")
@REGISTRY.register("torch")
def _pack_torch(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    n = flat.numel()
    padded = torch.zeros(((n + 31) // 32) * 32, dtype=torch.int64, device=mask.device)
    padded[:n] = flat
    words = (padded.view(-1, 32) << _shifts(mask.device)).sum(1)
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
    bits = (words.to(torch.int64)[:, None] >> _shifts(words.device)) & 1
    return bits.reshape(-1)[: shape.numel()].bool().view(shape)
