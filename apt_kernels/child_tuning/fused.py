"""What the fused backends ("triton", "cuda") launch: one kernel over a table of tensors.

The update of a param group is split into **launches**, one per (device, parameter dtype, mask mode);
each launch is a single kernel over every tensor in it (the "multi-tensor" table: per tensor its
pointers, numel, element offset, parameter index, step and the two per-step scalars). Per element the
kernel loads param (fp32/bf16/fp16), grad, exp_avg and exp_avg_sq, masks the gradient, and writes the
param (rounded once) and the float32 moments: one read and one write of each, nothing else.

Mask modes (a compile-time constant of the kernels):

- ``MODE_NONE``: no mask (F with reserve_p = 1, or a D-mode tensor without a mask);
- ``MODE_F``: the keep bit is drawn in-kernel from the Philox stream of ``rng.py`` at the element's
  global index (offset + local index); no mask tensor exists;
- ``MODE_D``: the keep bit is read from the tensor's packed int32 words (``apt_kernels.bits``).

This module computes the launches and every scalar once, in float64 rounded to float32 exactly as the
torch backend's scalars are, so the Triton and CUDA kernels differ from it only in float rounding of
the element arithmetic. Tensors that are not contiguous are updated through contiguous copies (the
element index is the row-major position, as the stream defines it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .rng import keep_threshold
from .update import Masking

MODE_NONE, MODE_F, MODE_D = 0, 1, 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The scalars shared by every tensor of a launch.

    ``decay`` is applied when ``has_decay``: semantics "official": ``p = p + decay * p`` after the step,
    with ``decay = -lr * weight_decay``; semantics "torch": ``p = p * decay`` before it, with
    ``decay = 1 - lr * weight_decay``.
    """

    official: bool
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float
    has_decay: bool
    inv_reserve_p: float
    seed_lo: int
    seed_hi: int
    threshold: int


@dataclasses.dataclass
class Launch:
    """One kernel launch: tensors of one device, one param dtype and one mask mode (all contiguous)."""

    device: torch.device
    dtype: torch.dtype
    mode: int
    params: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avgs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    bits: list[torch.Tensor] = dataclasses.field(default_factory=list)  # MODE_D only, else empty
    offsets: list[int] = dataclasses.field(default_factory=list)
    indices: list[int] = dataclasses.field(default_factory=list)
    steps: list[int] = dataclasses.field(default_factory=list)
    step_sizes: list[float] = dataclasses.field(default_factory=list)  # lr * sqrt(bc2) / bc1 or lr / bc1
    bc2_sqrts: list[float] = dataclasses.field(default_factory=list)  # sqrt(1 - beta2^t) (torch semantics)

    def __len__(self) -> int:
        return len(self.params)

    def subset(self, idx: list[int]) -> "Launch":
        """The launch of tensors ``idx`` only."""
        pick = lambda xs: [xs[j] for j in idx] if xs else []  # noqa: E731
        return Launch(self.device, self.dtype, self.mode, **{f.name: pick(getattr(self, f.name))
                                                               for f in dataclasses.fields(self)
                                                               if f.name not in ("device", "dtype", "mode")})


def hyper(*, lr, beta1, beta2, eps, weight_decay, semantics, masking: Masking) -> Hyper:
    official = semantics == "official"
    seed = masking.seed & ((1 << 64) - 1)
    return Hyper(
        official=official, beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        eps=eps, decay=-lr * weight_decay if official else 1 - lr * weight_decay,
        has_decay=weight_decay > 0 if official else weight_decay != 0,
        inv_reserve_p=1.0 / masking.reserve_p if masking.mode == "F" else 1.0,
        seed_lo=seed & 0xFFFFFFFF, seed_hi=seed >> 32,
        threshold=keep_threshold(masking.reserve_p) if masking.mode == "F" else 0)


def _step_scalars(step: int, *, lr, beta1, beta2, official: bool) -> tuple[float, float]:
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    if official:
        return lr * math.sqrt(bc2) / bc1, 1.0
    return lr / bc1, math.sqrt(bc2)


def _check(j, p, g, m, v, masking):
    """Raise a clear error for tensor j's arguments (a cheap test first: this runs for every tensor at
    every step)."""
    shape, dtype, device = p.shape, p.dtype, p.device
    if (dtype in DTYPES and g.dtype == dtype and m.dtype == torch.float32 and v.dtype == torch.float32
            and g.shape == shape and m.shape == shape and v.shape == shape
            and g.device == device and m.device == device and v.device == device):
        bits_ok = True
        if masking.mode == "D" and masking.bits[j] is not None:
            b = masking.bits[j]
            bits_ok = b.dtype == torch.int32 and b.device == device and b.numel() == (p.numel() + 31) // 32
        if bits_ok:
            return
    if dtype not in DTYPES:
        raise TypeError(f"the fused Child-Tuning kernels take float32/bfloat16/float16 parameters, "
                        f"got {dtype} (parameter {j}, shape {tuple(shape)}); use backend='torch'")
    if g.dtype != dtype:
        raise TypeError(f"gradient dtype {g.dtype} differs from its parameter's {dtype} (shape {tuple(shape)})")
    for name, t, dt in (("gradient", g, dtype), ("exp_avg", m, torch.float32), ("exp_avg_sq", v, torch.float32)):
        if t.shape != shape or t.device != device or t.dtype != dt:
            raise ValueError(f"{name} of parameter {j} must be {dt} of shape {tuple(shape)} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    b = masking.bits[j]
    raise ValueError(f"the packed mask of parameter {j} must be {(p.numel() + 31) // 32} int32 words on "
                     f"{device}, got {b.numel()} {b.dtype} on {b.device}")


def run(launch_fn: Callable[[Launch, Hyper], None], params, grads, exp_avgs, exp_avg_sqs, steps,
        masking: Masking, *, lr, beta1, beta2, eps, weight_decay, semantics) -> None:
    """Plan the launches of one param group's update, call ``launch_fn`` on each, write back copies."""
    h = hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, semantics=semantics,
              masking=masking)
    launches: dict[tuple, Launch] = {}
    write_back = []  # (original, contiguous copy) pairs to copy back after the launches
    scalars: dict[int, tuple[float, float]] = {}  # step -> (step size, sqrt(bc2)): steps are mostly equal
    f_mode = masking.mode == "F"
    for j, (p, g, m, v, t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        _check(j, p, g, m, v, masking)
        if p.numel() == 0:
            continue
        mode = (MODE_F if f_mode else MODE_D) if masking.active(j) else MODE_NONE
        key = (p.device, p.dtype, mode)
        launch = launches.get(key)
        if launch is None:
            launch = launches[key] = Launch(p.device, p.dtype, mode)
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            p = p.detach()
            copies = [x.contiguous() for x in (p, m, v)]
            write_back += [(x, c) for x, c in zip((p, m, v), copies) if c is not x]
            p, m, v = copies
            g = g.contiguous()
        launch.params.append(p)
        launch.grads.append(g)
        launch.exp_avgs.append(m)
        launch.exp_avg_sqs.append(v)
        if mode == MODE_D:
            launch.bits.append(masking.bits[j])
        launch.offsets.append(masking.offset(j))
        launch.indices.append(int(masking.indices[j]) if f_mode else 0)
        t = int(t)
        launch.steps.append(t)
        sc = scalars.get(t)
        if sc is None:
            sc = scalars[t] = _step_scalars(t, lr=lr, beta1=beta1, beta2=beta2, official=h.official)
        launch.step_sizes.append(sc[0])
        launch.bc2_sqrts.append(sc[1])
    for launch in launches.values():
        launch_fn(launch, h)
    for original, copy in write_back:
        original.copy_(copy)
