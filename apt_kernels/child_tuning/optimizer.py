"""ChildTuningAdamW: AdamW that updates only a child network. Math: docs/math.md, section 4."""

from __future__ import annotations

import numbers

import torch

from .. import _validate as V
from ..registry import BACKENDS, Probe, registry
from . import rng
from .update import foreach_update, reference_update

OP = "child_tuning_adamw"
REGISTRY = registry(OP)
REGISTRY.register("reference")(reference_update)
REGISTRY.register("torch")(foreach_update)


def _check_hyper(group: dict, where: str) -> None:
    V.number(f"lr{where}", group["lr"], lo=0.0)
    V.number(f"eps{where}", group["eps"], lo=0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
    V.number(f"betas[0]{where}", betas[0], lo=0.0, hi=1.0, hi_open=True)
    V.number(f"betas[1]{where}", betas[1], lo=0.0, hi=1.0, hi_open=True)
    V.number(f"weight_decay{where}", group["weight_decay"], lo=0.0)
    V.number(f"reserve_p{where}", group["reserve_p"], lo=0.0, hi=1.0, lo_open=True)
    V.choice(f"mode{where}", group["mode"], ("F", "D"))
    V.choice(f"semantics{where}", group["semantics"], ("official", "torch"))


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

    Example:
        >>> import torch, apt_kernels
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = apt_kernels.ChildTuningAdamW(model.parameters(), lr=1e-3, reserve_p=0.3, mode="F")
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *, reserve_p=1.0,
                 mode="F", masks=None, seed=0, semantics="official", backend="auto"):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        V.choice("backend", backend, ("auto",) + BACKENDS)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, reserve_p=reserve_p, mode=mode, semantics=semantics,
                        seed=int(seed))
        _check_hyper(defaults, "")
        super().__init__(params, defaults)
        self.backend = backend
        for group in self.param_groups:
            if backend != "auto" and group["params"]:  # say now, not at the first step, if it cannot run
                REGISTRY.select(backend, Probe.of(group["params"][0]))
        self._set_masks(masks)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_hyper(self.param_groups[-1], f" (param group {len(self.param_groups) - 1})")

    def _set_masks(self, masks) -> None:
        uses_d = any(g["mode"] == "D" for g in self.param_groups)
        if masks is None:
            if uses_d:
                raise ValueError('mode "D" needs masks: a dict {parameter: bool tensor of its shape}, '
                                 "e.g. from apt_kernels.fisher_mask(model, batches, reserve_p)")
            return
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict {{parameter: bool tensor}}, got {type(masks).__name__}")
        own = {p for g in self.param_groups for p in g["params"]}
        for p, mask in masks.items():
            if not any(p is q for q in own):
                raise ValueError(f"masks holds a tensor of shape {V.shape(p) if isinstance(p, torch.Tensor) else p!r} "
                                 "that is not a parameter of this optimizer")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"the mask of parameter {V.shape(p)} must be a bool tensor, got "
                                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
            if mask.shape != p.shape:
                raise ValueError(f"the mask of parameter {V.shape(p)} has shape {V.shape(mask)}")
            self.state[p]["mask"] = mask.to(p.device)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer would cast floating state to each parameter's dtype, rounding the
        # float32 moments of a bf16 parameter. Load the tensors ourselves: dtype kept, device moved.
        saved = state_dict["state"]
        tensors = {pid: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for pid, s in saved.items()}
        rest = {pid: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for pid, s in saved.items()}
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in tensors.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            work = ([], [], [], [], [], [])
            for p in group["params"]:
                i, index = index, index + 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ChildTuningAdamW does not support sparse gradients "
                                       f"(parameter {i}, shape {V.shape(p)})")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                if group["mode"] == "D":
                    keep = state.get("mask")
                elif group["reserve_p"] < 1.0:
                    keep = rng.keep_mask(group["seed"], state["step"], i, p.shape, group["reserve_p"], p.device)
                else:
                    keep = None
                for lst, x in zip(work, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], keep)):
                    lst.append(x)
            if not work[0]:
                continue
            _, fn = REGISTRY.select(self.backend, Probe.of(work[0][0]))
            beta1, beta2 = group["betas"]
            fn(*work, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], semantics=group["semantics"],
               rescale=group["reserve_p"] if group["mode"] == "F" else None)
        return loss
