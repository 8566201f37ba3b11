"""Parity checks with per-dtype error budgets, shared by every kernel test.

A fast path is compared with a float64 run of the reference (the truth). Its error may be at most
``MULTIPLIER`` times the error that the reference itself makes when run in the fast path's dtype
(PyTorch's own error for that precision) plus a floor, both measured as max |x - truth|:

    max|fast - truth|  <=  MULTIPLIER * max|ref_in_dtype - truth|  +  FLOOR[dtype] * max(1, max|truth|)

The floor covers cases where the reference happens to be exact in that dtype (e.g. all-zero rows).
NaN or infinity where the truth is finite (or the reverse) always fails; equal infinities pass.

:class:`OpCount` counts the aten operations a piece of code dispatches (the tests' and
``benchmarks/step_host.py``'s census of a training step).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MULTIPLIER = 2.0
# Floors, relative to the magnitude of the truth: a few units in the last place of each dtype.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """max |x - truth| over the entries where both are finite (0.0 for empty tensors)."""
    x, truth = x.double(), truth.double()
    both = torch.isfinite(x) & torch.isfinite(truth)
    return float((x - truth)[both].abs().max()) if bool(both.any()) else 0.0


def _nonfinite_mismatch(x: torch.Tensor, truth: torch.Tensor) -> int:
    x, truth = x.double(), truth.double()
    same_inf = torch.isinf(x) & torch.isinf(truth) & (torch.sign(x) == torch.sign(truth))
    finite_both = torch.isfinite(x) & torch.isfinite(truth)
    return int((~(same_inf | finite_both)).sum())


def error_budget(ref_lowp: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                 multiplier: float = MULTIPLIER, floor: float | None = None) -> float:
    floor = FLOOR[dtype] if floor is None else floor
    scale = max(1.0, float(truth.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if truth.numel() else 1.0)
    return multiplier * max_error(ref_lowp, truth) + floor * scale


def assert_parity(actual: torch.Tensor, ref_lowp: torch.Tensor, truth: torch.Tensor, *, name: str = "output",
                  dtype: torch.dtype | None = None, multiplier: float = MULTIPLIER, floor: float | None = None) -> None:
    """Assert ``actual`` is within the error budget of ``truth`` set by ``ref_lowp``'s own error."""
    dtype = dtype or actual.dtype
    if actual.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(truth.shape)}")
    bad = _nonfinite_mismatch(actual, truth)
    if bad:
        raise AssertionError(f"{name}: {bad} entries are NaN/inf where the float64 reference is not (or vice versa)")
    err = max_error(actual, truth)
    budget = error_budget(ref_lowp, truth, dtype, multiplier, floor)
    if err > budget:
        raise AssertionError(f"{name} ({str(dtype).replace('torch.', '')}): max error {err:.3e} > budget {budget:.3e} "
                             f"(= {multiplier} x reference error {max_error(ref_lowp, truth):.3e} + floor)")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a preallocated output with NaN so an element a kernel forgets to write cannot pass."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


class OpCount(TorchDispatchMode):
    """A dispatch mode counting the aten operations run under it: ``ops`` all of them, ``kernels`` those that
    are not views, by name (on a GPU each of those is a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if not func.is_view:
            self.kernels[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
