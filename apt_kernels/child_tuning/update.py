"""The masked AdamW update: the backend interface, and the reference and "torch" (foreach) backends.

A backend takes one param group's work and updates params and states in place::

    fn(params, grads, exp_avgs, exp_avg_sqs, steps, masking, *, lr, beta1, beta2, eps, weight_decay, semantics,
       cache=None)

``params, grads, exp_avgs, exp_avg_sqs, steps`` are lists in step (``steps`` already incremented) and
``masking`` (a :class:`Masking`) says how the gradients are masked. It never holds an F-mode mask: it
holds what defines one, ``(seed, reserve_p, parameter indices, element offsets)``, and D-mode masks as
packed bits (:mod:`apt_kernels.bits`). The reference and torch backends materialise bool masks from it
(:meth:`Masking.keep`); the fused backends (``fused.py``) draw F bits in-kernel and read D bits packed.
``cache`` is a dict the caller keeps per group of tensors across calls: the fused backends keep their
launch tables in it; the others have nothing to keep.
States are float32; bf16/fp16 parameters are updated in float32 and rounded back once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from .. import bits as _bits
from . import rng


@dataclasses.dataclass(frozen=True)
class Masking:
    """How one param group's gradients are masked (docs/math.md, 4.1).

    Attributes:
        mode: "F" (a fresh Bernoulli(reserve_p) mask per step, kept gradients divided by reserve_p) or
            "D" (a fixed mask per tensor, no rescale).
        reserve_p: F: the keep probability; reserve_p = 1 means no masking.
        seed: F: the optimizer's seed.
        indices: F: each tensor's parameter index.
        offsets: F: the global element index of each tensor's first element (0 unless the tensor is a
            shard of a larger parameter); empty means all 0.
        bits: D: each tensor's mask as packed int32 words (``apt_kernels.bits.pack_bits``), or None for
            a tensor without a mask (updated fully).
    """

    mode: str
    reserve_p: float = 1.0
    seed: int = 0
    indices: Sequence[int] = ()
    offsets: Sequence[int] = ()
    bits: Sequence[torch.Tensor | None] = ()

    @classmethod
    def none(cls, n: int) -> "Masking":
        """No masking for any of n tensors (plain AdamW)."""
        return cls("D", bits=[None] * n)

    @property
    def rescale(self) -> float | None:
        """The factor of kept gradients: 1 / reserve_p in mode F, None (no rescale) in mode D. Clamped to
        float32's largest value, as every backend takes it: a reserve_p below 2^-24 keeps nothing anyway, and an
        infinite factor would make the dropped elements 0 * inf = NaN."""
        return min(1.0 / self.reserve_p, torch.finfo(torch.float32).max) if self.mode == "F" else None

    def offset(self, j: int) -> int:
        return int(self.offsets[j]) if self.offsets else 0

    def active(self, j: int) -> bool:
        """Whether tensor j is masked at all."""
        return self.reserve_p < 1.0 if self.mode == "F" else self.bits[j] is not None

    def keeps(self, js: Sequence[int], likes: Sequence[torch.Tensor], steps: Sequence[int]) -> list[torch.Tensor | None]:
        """``keep(j, like, step)`` of several tensors on one device, F masks drawn in one batched call."""
        if self.mode != "F" or self.reserve_p >= 1.0 or not js:
            return [self.keep(j, like, t) for j, like, t in zip(js, likes, steps)]
        return rng.keep_masks(self.seed, steps, [self.indices[j] for j in js], [like.shape for like in likes],
                              self.reserve_p, likes[0].device, [self.offset(j) for j in js])

    def keep(self, j: int, like: torch.Tensor, step: int, *, backend: str = "auto") -> torch.Tensor | None:
        """Tensor j's bool keep mask at ``step`` (the shape and device of ``like``), None if unmasked."""
        if not self.active(j):
            return None
        if self.mode == "F":
            return rng.keep_mask(self.seed, step, self.indices[j], like.shape, self.reserve_p, like.device,
                                 self.offset(j), backend=backend)
        return _bits.unpack_bits(self.bits[j], like.shape)


def masked_grad(grad: torch.Tensor, keep: torch.Tensor | None, rescale: float | None) -> torch.Tensor:
    """keep * grad (* 1 / reserve_p in mode F) in float32; the caller's .grad is never modified."""
    g = grad.float()
    if keep is None:
        return g
    if rescale is None:  # mode D: plain mask (the bool converted first: a bool operand slows the product)
        return keep.float().mul_(g)
    # mode F: g * (Bernoulli sample / reserve_p), as the paper's code, with the float32 factor the kernels take
    # (a division by a subnormal reserve_p is a product by inf on CUDA: the dropped elements would be NaN)
    return keep.float().mul_(rescale).mul_(g)


def reference_update(params, grads, exp_avgs, exp_avg_sqs, steps, masking: Masking, *, lr, beta1, beta2, eps,
                     weight_decay, semantics, cache=None):
    """One parameter at a time, the formulas of the spec written out."""
    for j, (p, grad, m, v, t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        g = masked_grad(grad, masking.keep(j, p, t, backend="reference"), masking.rescale)
        w = p.detach().float()
        if semantics == "official":
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            w.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
            if weight_decay > 0:
                w.add_(w, alpha=-lr * weight_decay)
        else:  # torch.optim.AdamW
            if weight_decay != 0:
                w.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        p.detach().copy_(w)


def foreach_update(params, grads, exp_avgs, exp_avg_sqs, steps, masking: Masking, *, lr, beta1, beta2, eps,
                   weight_decay, semantics, cache=None):
    """The same update with torch._foreach_* ops: a few launches per dtype group instead of per tensor."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        ps = [params[i].detach() for i in idx]
        ws = ps if dtype == torch.float32 else [p.float() for p in ps]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        ts = [steps[i] for i in idx]
        keeps = masking.keeps(idx, [params[i] for i in idx], [steps[i] for i in idx])
        gs = [masked_grad(grads[i], keep, masking.rescale) for i, keep in zip(idx, keeps)]
        if semantics == "official":
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, gs, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, ms, denom, [-lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) for t in ts])
            if weight_decay > 0:
                torch._foreach_add_(ws, ws, alpha=-lr * weight_decay)
        else:
            if weight_decay != 0:
                torch._foreach_mul_(ws, 1 - lr * weight_decay)
            torch._foreach_lerp_(ms, gs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, ms, denom, [-lr / (1 - beta1 ** t) for t in ts])
        if ws is not ps:
            torch._foreach_copy_(ps, ws)
