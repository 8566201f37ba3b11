"""ChildTuningAdamW: AdamW that updates only a child network. Math: docs/math.md, section 4.

The optimizer keeps the state (fp32 moments, the per-parameter step, D-mode masks as packed bits) and
hands each param group's work to a backend of the op ``child_tuning_adamw`` (``update.py`` defines the
interface): "reference" and "torch" (``update.py``), "triton" (``triton_update.py``) and "cuda" (the C++
extension, ``csrc/child_tuning*.cu``); the last two go through ``fused.py``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from .. import _env
from .. import _validate as V
from .. import bits as _bits
from ..registry import BACKENDS, Probe, registry
from . import fused
from .update import Masking, foreach_update, reference_update

OP = "child_tuning_adamw"
REGISTRY = registry(OP)


def _param_dtypes(probe: Probe) -> str | None:
    if probe.dtype not in fused.DTYPES:  # the moments are float32: float64 would be rounded every step
        return ("ChildTuningAdamW takes float32, bfloat16 and float16 parameters (float32 moments), not "
                f"{str(probe.dtype).replace('torch.', '')}")
    return None


REGISTRY.register("reference", _param_dtypes)(reference_update)
REGISTRY.register("torch", _param_dtypes)(foreach_update)


# The fused launchers are left out of torch.compile's graphs (a graph break around one launch that is
# already the whole update): ``torch.compile(opt.step)`` traces the rest and runs the kernel eagerly.
@REGISTRY.register("triton", _param_dtypes)
@torch.compiler.disable
def triton_update(*args, **kwargs):
    """The fused Triton kernel (``triton_update.py``): F bits drawn in-kernel, D bits read packed."""
    from . import triton_update as _t

    fused.run(_t.kernel(), *args, **kwargs)


CUDA_CHUNK = 32768  # csrc/child_tuning.cuh's kChunk (the binding checks it)


def _cuda_launch(t: fused.Tables, h: fused.Hyper, s: fused.Steps) -> None:
    _env.cuda_extension().child_tuning_adamw(
        t.rows, t.chunks, CUDA_CHUNK, t.dtype_code, t.mode, h.official, h.has_decay,
        h.beta1, h.one_minus_beta1, h.beta2, h.one_minus_beta2, h.eps, h.decay, h.inv_reserve_p,
        h.seed_lo, h.seed_hi, h.threshold, s.step, s.step_size, s.bc2_sqrt)


_CUDA_KERNEL = fused.Kernel(chunk=CUDA_CHUNK, group_chunks=False, split_vector=False, launch=_cuda_launch)


@REGISTRY.register("cuda", _param_dtypes)
@torch.compiler.disable
def cuda_update(*args, **kwargs):
    """The CUDA C++ multi-tensor kernel (``csrc/child_tuning.cu``), one launch per dtype group and mode."""
    fused.run(_CUDA_KERNEL, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Sharded parameters (FSDP2's DTensor): the kernels see the local shard and its global element offset
# ---------------------------------------------------------------------------------------------------

_DTENSOR: list = []  # [the DTensor class or None], resolved on first use


def _dtensor_class():
    """torch's DTensor class, or None without torch.distributed (resolved once)."""
    if not _DTENSOR:
        cls = None
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor as cls
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def _is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's local shard (same storage: updating it updates the DTensor), else the tensor."""
    return t.to_local() if t is not None and _is_dtensor(t) else t


def _shard_region(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset per dim) of a DTensor's local shard."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)


def _element_offset(p: torch.Tensor) -> int:
    """The global row-major index of the first element of ``p``'s local shard (0 for a plain tensor).

    Local index + offset is the global index only when the shard is one contiguous slab of rows of the
    full tensor: sharded along dim 0 (as FSDP2 does) or replicated.
    """
    if not _is_dtensor(p):
        return 0
    if not all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in p.placements):
        raise NotImplementedError(
            f"ChildTuningAdamW mode F needs parameters sharded along dim 0 (as FSDP2 shards them) or replicated, "
            f"got placements {p.placements} for a parameter of shape {tuple(p.shape)}")
    _, offset = _shard_region(p)
    strides = [math.prod(p.shape[d + 1:]) for d in range(len(p.shape))]
    return sum(o * s for o, s in zip(offset, strides))


def _local_mask(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The part of a full-shape mask that ``p``'s local shard holds."""
    if not _is_dtensor(p):
        return mask
    shape, offset = _shard_region(p)
    for d, (n, o) in enumerate(zip(shape, offset)):
        mask = mask.narrow(d, o, n)
    return mask


def _check_hyper(group: dict, where: str) -> None:
    V.number(f"lr{where}", group["lr"], lo=0.0, hi=math.inf, hi_open=True)
    V.number(f"eps{where}", group["eps"], lo=0.0, hi=math.inf, hi_open=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
    V.number(f"betas[0]{where}", betas[0], lo=0.0, hi=1.0, hi_open=True)
    V.number(f"betas[1]{where}", betas[1], lo=0.0, hi=1.0, hi_open=True)
    V.number(f"weight_decay{where}", group["weight_decay"], lo=0.0)
    V.number(f"reserve_p{where}", group["reserve_p"], lo=0.0, hi=1.0, lo_open=True)
    V.choice(f"mode{where}", group["mode"], ("F", "D"))
    V.choice(f"semantics{where}", group["semantics"], ("official", "torch"))
    _check_seed(group["seed"], f"seed{where}")
    for p in group.get("params", ()):  # (complex parameters would lose their imaginary part too)
        why = _param_dtypes(Probe(p.device, p.dtype))
        if why:
            raise TypeError(f"{why}: a parameter of shape {V.shape(p)}{where}")


def _check_seed(seed, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {seed!r}")


class ChildTuningAdamW(torch.optim.Optimizer):
    """AdamW whose gradient is masked to a "child network" before the moment updates.

    Mode "F" (task-free) keeps each gradient element with probability ``reserve_p``, drawn afresh at
    every step from a counter-based generator keyed on (seed, step, parameter index, element index),
    and rescales kept elements by 1 / reserve_p. Mode "D" (task-driven) multiplies the gradient by a
    fixed bool mask per parameter (``masks``, e.g. from :func:`apt_kernels.fisher_mask`), with no
    rescale; a parameter without a mask is updated fully.

    ``semantics="official"`` is the Child-Tuning paper's optimizer (the old transformers AdamW: eps
    added before bias correction, weight decay applied after the step to every element);
    ``semantics="torch"`` is exactly ``torch.optim.AdamW``'s update, so reserve_p=1 reproduces it.

    Param groups may set their own lr, betas, eps, weight_decay, reserve_p, mode and semantics. The
    seed and each parameter's step are in ``state_dict()``, so a resumed run draws the same masks.
    Moments are float32 whatever the parameter dtype. Parameters whose ``.grad`` is None are
    skipped (their step does not advance). ``.grad`` is never modified.

    D-mode masks are kept packed, 1 bit per element (``state[p]["mask_bits"]``, int32 words of
    :mod:`apt_kernels.bits`); :meth:`masks` unpacks them. No F-mode mask is stored: the "triton" and
    "cuda" backends draw the bits inside the update kernel, "torch" and "reference" draw them per step.
    The masks do not depend on the backend, the device or the data-parallel rank; parameters sharded by
    FSDP2 (DTensors sharded along dim 0) draw the bits of their global element indices, so a sharded run
    equals the unsharded one (docs/child_tuning.md).

    Example:
        >>> import torch, apt_kernels
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = apt_kernels.ChildTuningAdamW(model.parameters(), lr=1e-3, reserve_p=0.3, mode="F")
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *, reserve_p=1.0,
                 mode="F", masks=None, seed=0, semantics="official", backend="auto"):
        _check_seed(seed)
        V.choice("backend", backend, ("auto",) + BACKENDS)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, reserve_p=reserve_p, mode=mode, semantics=semantics,
                        seed=int(seed))
        _check_hyper(defaults, "")
        super().__init__(params, defaults)
        self.backend = backend
        self._plans: dict[tuple, dict] = {}  # (group, device, dtype) -> the fused backends' cached tables
        if backend != "auto":  # say now, not at the first step, if it cannot run
            for device, dtype in {(_local(p).device, p.dtype) for g in self.param_groups for p in g["params"]}:
                REGISTRY.select(backend, Probe(device, dtype))
        self._set_masks(masks)
        if any(type(p).__name__ == "FlatParameter" for g in self.param_groups for p in g["params"]):
            warnings.warn("ChildTuningAdamW got FSDP1 flat parameters: F-mode masks are drawn per flat shard, "
                          "so they differ from an unsharded run's (and D-mode masks must be given per flat "
                          "shard). Use FSDP2 (fully_shard), whose sharded parameters draw the unsharded masks.",
                          stacklevel=2)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _check_hyper(self.param_groups[-1], f" (param group {len(self.param_groups) - 1})")
        except Exception:  # a rejected group is not kept (its parameters would be stepped with it)
            self.param_groups.pop()
            raise

    def _set_masks(self, masks) -> None:
        self._plans.clear()
        uses_d = any(g["mode"] == "D" for g in self.param_groups)
        if masks is None:
            if uses_d:
                raise ValueError('mode "D" needs masks: a dict {parameter: bool tensor of its shape}, '
                                 "e.g. from apt_kernels.fisher_mask(model, batches, reserve_p)")
            return
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict {{parameter: bool tensor}}, got {type(masks).__name__}")
        mode_of = {id(q): g["mode"] for g in self.param_groups for q in g["params"]}
        for p, mask in masks.items():
            if id(p) not in mode_of:
                raise ValueError(f"masks holds a tensor of shape {V.shape(p) if isinstance(p, torch.Tensor) else repr(p)} "
                                 "that is not a parameter of this optimizer")
            if mode_of[id(p)] != "D":  # an F-mode group draws its masks: a given one would be ignored
                raise ValueError(f'masks holds the mask of a parameter of shape {V.shape(p)} whose param group is '
                                 f'in mode {mode_of[id(p)]!r}: masks are read in mode "D" only (pass mode="D")')
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"the mask of parameter {V.shape(p)} must be a bool tensor, got "
                                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if mask.shape != p.shape:
                raise ValueError(f"the mask of parameter {V.shape(p)} has shape {V.shape(mask)}")
            # Kept packed, 1 bit per element (of the local shard for a sharded parameter).
            self.state[p]["mask_bits"] = _bits.pack_bits(_local_mask(p, _local(mask)).to(_local(p).device))

    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The D-mode masks, {parameter: bool tensor} (of the local shard for a sharded parameter),
        unpacked from the packed bits the optimizer keeps."""
        return {p: _bits.unpack_bits(s["mask_bits"], _local(p).shape) for p, s in self.state.items()
                if "mask_bits" in s}

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer would cast floating state to each parameter's dtype, rounding the
        # float32 moments of a bf16 parameter. Load the tensors ourselves: dtype kept, device moved.
        saved = state_dict["state"]
        tensors = {pid: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for pid, s in saved.items()}
        rest = {pid: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for pid, s in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})
        self._plans.clear()
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in tensors.get(pid, {}).items():
                value = value.to(device=_local(p).device if key == "mask_bits" else p.device, copy=True)
                if key == "mask" and value.dtype == torch.bool:  # a state_dict of version 0.1 (bool masks)
                    key, value = "mask_bits", _bits.pack_bits(_local_mask(p, value))
                self.state[p][key] = value

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        dtensor = _dtensor_class()  # once per step, not per parameter
        for group_index, group in enumerate(self.param_groups):
            f_masked = group["mode"] == "F" and group["reserve_p"] < 1.0
            work: dict[tuple, tuple[list, ...]] = {}  # (device, dtype) -> the backend's lists
            for i, p in enumerate(group["params"], index):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("ChildTuningAdamW does not support sparse gradients "
                                       f"(parameter {i}, shape {V.shape(p)})")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                t = state["step"] = state["step"] + 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                offset = 0
                if dtensor is not None and isinstance(p, dtensor):
                    offset = _element_offset(p) if f_masked else 0
                    p, grad, m, v = _local(p), _local(grad), _local(m), _local(v)
                lists = work.get((p.device, p.dtype))
                if lists is None:
                    lists = work[(p.device, p.dtype)] = tuple([] for _ in range(8))
                ps, gs, ms, vs, ts, indices, offsets, bits = lists
                ps.append(p)
                gs.append(grad)
                ms.append(m)
                vs.append(v)
                ts.append(t)
                indices.append(i)
                offsets.append(offset)
                bits.append(state.get("mask_bits"))
            index += len(group["params"])
            beta1, beta2 = group["betas"]
            for (device, dtype), (ps, gs, ms, vs, ts, indices, offsets, bits) in work.items():
                _, fn = REGISTRY.select(self.backend, Probe(device, dtype))
                if group["mode"] == "F":
                    masking = Masking("F", group["reserve_p"], group["seed"], indices, offsets)
                else:
                    masking = Masking("D", bits=bits)
                cache = self._plans.setdefault((group_index, device, dtype), {})
                fn(ps, gs, ms, vs, ts, masking, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], semantics=group["semantics"], cache=cache)
        return loss
