"""What the fused backends ("triton", "cuda") launch: one kernel over a table of tensors.

The update of a param group is split into **launches**, one per (device, parameter dtype, mask mode);
each launch is a single kernel over every tensor in it. Per element the kernel loads param
(fp32/bf16/fp16), grad, exp_avg and exp_avg_sq, masks the gradient, and writes the param (rounded
once) and the float32 moments: one read and one write of each, nothing else.

Mask modes (a compile-time constant of the kernels):

- ``MODE_NONE``: no mask (F with reserve_p = 1, or a D-mode tensor without a mask);
- ``MODE_F``: the keep bit is drawn in-kernel from the Philox stream of ``rng.py`` at the element's
  global index (offset + local index); no mask tensor exists;
- ``MODE_D``: the keep bit is read from the tensor's packed int32 words (``apt_kernels.bits``).

Both kernels read the same two tables, built here (``Tables``):

- the **tensor table**, one row of ``ROW_WORDS`` int64 words per tensor, the layout of
  ``csrc/child_tuning.cuh``'s ``TensorRow``: the addresses of param, grad, exp_avg, exp_avg_sq and the
  packed mask (0 if none), numel, element offset, then two 32-bit halves per word: parameter index and
  step, the step size and sqrt(1 - beta2^step) as float32 bits;
- the **chunk table**, int32 (tensor row, chunk) pairs: program / thread block ``i`` updates chunk
  ``i``.

Every scalar is computed once here, in float64 rounded to float32 exactly as the torch backend's
scalars are, so the kernels differ from it only in float rounding of the element arithmetic. Tensors
that are not contiguous are updated through contiguous copies (the element index is the row-major
position, as the stream defines it).

**Plan cache.** Building the tables is Python work per tensor; the optimizer passes a ``cache`` dict per
(param group, device, dtype) and, when every tensor of the call has the same step (the usual case), the
tables are kept on the device and reused while the tensors are the same: same addresses, sizes,
dtypes and mask structure, all contiguous. The step and its two scalars then go to the kernel as
arguments (``Steps``), overriding the rows' values; a step of tensors with different steps rebuilds the
tables with each row's own values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .rng import keep_threshold
from .update import Masking

MODE_NONE, MODE_F, MODE_D = 0, 1, 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the order of csrc/child_tuning.cuh's DType codes
ROW_WORDS = 9  # int64 words of a tensor row (sizeof(TensorRow) == 72)
ALIGN = 16  # bytes: a tensor whose four base addresses are multiples of this can be accessed as vectors


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


@dataclasses.dataclass(frozen=True)
class Steps:
    """The step of every tensor of a call and its scalars, when they all share one; ``step == 0``: each
    row's own (``PER_ROW``)."""

    step: int
    step_size: float
    bc2_sqrt: float


PER_ROW = Steps(0, 0.0, 0.0)


@dataclasses.dataclass
class Launch:
    """The tensors of one launch: one device, one param dtype and one mask mode (all contiguous)."""

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


@dataclasses.dataclass
class Tables:
    """One kernel launch's tables, on its device. ``vector``: every tensor's four base addresses are
    multiples of ALIGN and its element offset a multiple of 4 (the Triton kernel then vectorises)."""

    device: torch.device
    dtype: torch.dtype
    mode: int
    vector: bool
    rows: torch.Tensor  # int64 [tensors, ROW_WORDS]
    chunks: torch.Tensor  # int32 [chunks, 2]: tensor row, chunk index within the tensor

    @property
    def dtype_code(self) -> int:
        return DTYPES.index(self.dtype)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What a fused backend tells the planner: its chunk size, whether chunks of a tensor whose element
    offset is not a multiple of 4 start ``offset % 4`` elements early (so that they hold whole groups of
    the random stream: Triton), whether vectorisable tensors get a launch of their own (Triton; the CUDA
    kernel decides per chunk), and how to launch one ``Tables``."""

    chunk: int
    group_chunks: bool
    split_vector: bool
    launch: Callable[[Tables, Hyper, Steps], None]


def hyper(*, lr, beta1, beta2, eps, weight_decay, semantics, masking: Masking) -> Hyper:
    official = semantics == "official"
    seed = masking.seed & ((1 << 64) - 1)
    return Hyper(
        official=official, beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        eps=eps, decay=-lr * weight_decay if official else 1 - lr * weight_decay,
        has_decay=weight_decay > 0 if official else weight_decay != 0,
        # masking.rescale is clamped float32-finite: a Triton argument beyond float32's range would be typed
        # float64 (a reserve_p that small keeps nothing anyway: keep_threshold(p) = floor(p * 2^24) is 0 below 2^-24)
        inv_reserve_p=masking.rescale if masking.mode == "F" else 1.0,
        seed_lo=seed & 0xFFFFFFFF, seed_hi=seed >> 32,
        threshold=keep_threshold(masking.reserve_p) if masking.mode == "F" else 0)


def _step_scalars(step: int, *, lr, beta1, beta2, official: bool) -> tuple[float, float]:
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    if official:
        return lr * math.sqrt(bc2) / bc1, 1.0
    return lr / bc1, math.sqrt(bc2)


def _check(j, p, g, m, v, masking):
    """Raise a clear error for tensor j's arguments (a cheap test first: this runs for every tensor at
    every step that builds tables)."""
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


def plan(params, grads, exp_avgs, exp_avg_sqs, steps, masking: Masking, *, lr, beta1, beta2,
         official: bool) -> tuple[list[Launch], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The launches of one call, and the (original, contiguous copy) pairs to copy back after them."""
    launches: dict[tuple, Launch] = {}
    write_back = []
    scalars: dict[int, tuple[float, float]] = {}  # step -> (step size, sqrt(bc2)): steps are mostly equal
    f_mode = masking.mode == "F"
    for j, (p, g, m, v, t) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        _check(j, p, g, m, v, masking)
        if p.numel() == 0:
            continue
        t = int(t)
        index = int(masking.indices[j]) if f_mode else 0
        offset = masking.offset(j)
        if not (0 < t < 2 ** 32 and 0 <= index < 2 ** 32 and offset >= 0):
            raise ValueError(f"the fused kernels take steps in [1, 2^32), parameter indices in [0, 2^32) and "
                             f"element offsets >= 0; parameter {j} has step {t}, index {index}, offset {offset}")
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
        launch.offsets.append(offset)
        launch.indices.append(index)
        launch.steps.append(t)
        sc = scalars.get(t)
        if sc is None:
            sc = scalars[t] = _step_scalars(t, lr=lr, beta1=beta1, beta2=beta2, official=official)
        launch.step_sizes.append(sc[0])
        launch.bc2_sqrts.append(sc[1])
    return list(launches.values()), write_back


def _u32_pairs(lo: list, hi: list, floats: bool) -> torch.Tensor:
    """int64 words whose low and high 32-bit halves hold lo[i] and hi[i]: integers in [0, 2^32), or the
    float32 bits of floats (rounded to nearest)."""
    if floats:
        halves = torch.tensor([lo, hi], dtype=torch.float32)
    else:
        halves = torch.tensor([lo, hi], dtype=torch.int64)
        halves = torch.where(halves >= 2 ** 31, halves - 2 ** 32, halves).to(torch.int32)
    return halves.t().reshape(-1).view(torch.int64)


def rows(launch: Launch, addresses: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """The tensor table of ``launch`` on the host: int64 [tensors, ROW_WORDS] (csrc/child_tuning.cuh)."""
    bits = [b.data_ptr() for b in launch.bits] if launch.mode == MODE_D else [0] * len(addresses)
    table = torch.empty(len(addresses), ROW_WORDS, dtype=torch.int64)
    table[:, :7] = torch.tensor([(*a, b, p.numel(), o) for a, b, p, o in
                                 zip(addresses, bits, launch.params, launch.offsets)], dtype=torch.int64)
    table[:, 7] = _u32_pairs(launch.indices, launch.steps, floats=False)
    table[:, 8] = _u32_pairs(launch.step_sizes, launch.bc2_sqrts, floats=True)
    return table


def chunks(numels: list[int], leads: list[int], chunk: int) -> torch.Tensor:
    """The chunk table: (tensor row, chunk index) for every ``chunk``-element chunk of every tensor, in
    order; tensor i's chunks cover its numel plus ``leads[i]`` elements before it."""
    counts = torch.tensor([(n + lead + chunk - 1) // chunk for n, lead in zip(numels, leads)], dtype=torch.int64)
    tensor_of = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    return torch.stack([tensor_of, torch.arange(tensor_of.numel()) - first[tensor_of]], 1).to(torch.int32)


def _to_device(device: torch.device, *tables: torch.Tensor) -> list[torch.Tensor]:
    """The tables on ``device`` as views of one buffer (every table's size is a multiple of 8 bytes: every
    view stays aligned). On a GPU one pinned buffer and one asynchronous copy: from pinned memory the host
    does not wait for the GPU's queued work."""
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tables])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    out, at = [], 0
    for t in tables:
        size = t.numel() * t.element_size()
        out.append(flat[at:at + size].view(t.dtype).view(t.shape))
        at += size
    return out


def tables(kernel: Kernel, launch: Launch) -> list[Tables]:
    """The tables of ``launch`` on its device: one ``Tables``, or two when the kernel gives vectorisable
    tensors a launch of their own and only some are."""
    addresses = [(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
                 for p, g, m, v in zip(launch.params, launch.grads, launch.exp_avgs, launch.exp_avg_sqs)]
    # all four addresses multiples of ALIGN (a power of two) iff their bitwise or is
    vector = [not (p | g | m | v) % ALIGN and o % 4 == 0 for (p, g, m, v), o in zip(addresses, launch.offsets)]
    if kernel.split_vector and any(vector) and not all(vector):
        parts = []
        for flag in (True, False):
            idx = [j for j, a in enumerate(vector) if a == flag]
            parts.append((launch.subset(idx), [addresses[j] for j in idx], flag))
    else:
        parts = [(launch, addresses, all(vector))]
    out = []
    for part, addr, flag in parts:
        leads = [o % 4 for o in part.offsets] if kernel.group_chunks else [0] * len(part)
        r, c = _to_device(part.device, rows(part, addr), chunks([p.numel() for p in part.params], leads,
                                                                 kernel.chunk))
        out.append(Tables(part.device, part.dtype, part.mode, flag, r, c))
    return out


def _cache_key(params, grads, exp_avgs, exp_avg_sqs, masking: Masking) -> tuple | None:
    """What the tables of a call depend on besides the steps, or None if a tensor is not contiguous (its
    copies are new every call). ``.grad`` has its parameter's shape, dtype and device (torch checks on
    assignment) but may be a new tensor every step; the moments and masks are the optimizer's, which
    drops its caches when it replaces them."""
    if not (all(p.is_contiguous() for p in params) and all(g.is_contiguous() for g in grads)):
        return None
    return (masking.mode, masking.reserve_p < 1.0, tuple(masking.indices), tuple(masking.offsets),
            tuple(b.data_ptr() if b is not None else 0 for b in masking.bits),
            tuple(p.dtype for p in params), tuple(p.numel() for p in params),
            tuple(p.data_ptr() for p in params), tuple(g.data_ptr() for g in grads),
            tuple(m.data_ptr() for m in exp_avgs), tuple(v.data_ptr() for v in exp_avg_sqs))


def run(kernel: Kernel, params, grads, exp_avgs, exp_avg_sqs, steps, masking: Masking, *, lr, beta1, beta2, eps,
        weight_decay, semantics, cache: dict | None = None) -> None:
    """One param group's update on ``kernel``: plan, build (or reuse from ``cache``) the tables, launch,
    write back copies. ``cache``: a dict the caller keeps for the same group of tensors (the optimizer:
    one per param group, device and dtype), or None."""
    h = hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, semantics=semantics,
              masking=masking)
    first = int(steps[0]) if len(steps) else 0
    shared = PER_ROW
    if 0 < first < 2 ** 32 and steps.count(steps[0]) == len(steps):
        shared = Steps(first, *_step_scalars(first, lr=lr, beta1=beta1, beta2=beta2, official=h.official))
    key = _cache_key(params, grads, exp_avgs, exp_avg_sqs, masking) if cache is not None and shared.step else None
    if key is not None and cache.get("key") == key:
        for t in cache["tables"]:
            kernel.launch(t, h, shared)
        return
    launches, write_back = plan(params, grads, exp_avgs, exp_avg_sqs, steps, masking, lr=lr, beta1=beta1,
                                beta2=beta2, official=h.official)
    built = [t for launch in launches for t in tables(kernel, launch)]
    for t in built:
        kernel.launch(t, h, shared)
    for original, copy in write_back:
        original.copy_(copy)
    if cache is not None:
        cache.clear()
        if key is not None and not write_back:
            cache.update(key=key, tables=built)
