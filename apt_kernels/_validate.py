"""Argument checks shared by the public entry points. Every message names the argument and its shape."""

from __future__ import annotations

import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def tensor(name: str, t, *, ndim: int | Iterable[int] | None = None, dtypes=FLOAT_DTYPES,
           like: torch.Tensor | None = None, like_name: str = "") -> torch.Tensor:
    """Check that ``t`` is a tensor of an allowed rank and dtype, on ``like``'s device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; "
                         "move them to one device")
    return t


def same_dtype(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> None:
    pairs = [(n, t) for n, t in zip(names, tensors) if t is not None]
    dts = {t.dtype for _, t in pairs}
    if len(dts) > 1:
        listing = ", ".join(f"{n}: {str(t.dtype).replace('torch.', '')}" for n, t in pairs)
        raise TypeError(f"dtypes must match ({listing})")


def number(name: str, x, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """Check a real number lies in [lo, hi] (ends open where asked)."""
    if type(x) is not float and type(x) is not int and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")  # (float/int first: no ABC check)
    x = float(x)
    bad = x != x  # NaN
    if lo is not None:
        bad |= x <= lo if lo_open else x < lo
    if hi is not None:
        bad |= x >= hi if hi_open else x > hi
    if bad:
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        interval = ("(" if lo_open or lo is None else "[") + f"{left}, {right}" + (")" if hi_open or hi is None else "]")
        raise ValueError(f"{name} must lie in {interval}, got {x}")
    return x


def broadcastable(name: str, t: torch.Tensor, target: tuple[int, ...], target_desc: str) -> None:
    """Check ``t`` broadcasts to ``target`` with size-1 dims only (no rank above target's)."""
    if t.dim() > len(target):
        raise ValueError(f"{name} of shape {shape(t)} has more dims than {target_desc} {tuple(target)}")
    for have, want in zip(reversed(t.shape), reversed(target)):
        if have != want and have != 1:
            raise ValueError(f"{name} of shape {shape(t)} does not broadcast to {target_desc} {tuple(target)}")


def choice(name: str, x, options: Iterable) -> None:
    options = tuple(options)
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
