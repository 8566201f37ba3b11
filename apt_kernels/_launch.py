"""Cached launches of compiled Triton kernels: the host time of a launch, not of its binding.

``kernel[grid](*args, **kwargs)`` binds and specialises every argument on every call, and an autotuned
kernel first builds its autotuning key from all of them. With a stub driver (Triton 3.6, torch 2.11, the
2-core CI-class CPU of this project) that costs about 17 us per launch of the attention kernels (55-65
arguments) and about 50 us through the autotuner, against a few microseconds of GPU time per kernel at
BERT-sized sequences (N = 128). :func:`launch` makes the first call of each specialisation the usual way,
keeps the ``CompiledKernel`` Triton returns (and the autotuner's pick), and afterwards launches it directly
with ``CompiledKernel[grid](*arguments)`` (about 7 us, same stub): the call Triton's own launch path ends
in, with the same arguments (every parameter in signature order, constexprs included).

The cache key holds everything Triton's specialisation and the autotuner's choice depend on: the kernel,
the current device, the keyword arguments (constexprs, launch options), each argument's type, each tensor's
dtype and 16-byte alignment, and each integer's value (only its width class for a ``do_not_specialize``
parameter, such as a dropout seed or a step count). Floats enter by type only (Triton never specialises on a
float's value) unless the autotuner keys on them. Parameters after the positional arguments must all be
constexprs (their values are frozen into the entry); a kernel called otherwise launches the usual way.

``APT_KERNELS_FAST_LAUNCH=0`` (read at import) turns the cache off. It serves compiled kernels on a GPU
only, and only with the Triton versions whose launch path was read against it (``_SUPPORTED``);
``tests/test_launch.py`` checks with a stub driver that a cached launch hands Triton's launcher the same
arguments as the usual path, and that the specialisation rules assumed here are Triton's.
"""

from __future__ import annotations

import os

import torch

from ._env import triton_interpret

# JITFunction.run ends in kernel.run(grid..., stream, function, packed_metadata, launch_metadata, enter hook,
# exit hook, *bound_args.values()), as CompiledKernel.__getitem__'s runner does: read in Triton 3.6 (the GPU
# image's) and 3.9. Earlier versions passed other argument lists (constexprs left out).
_SUPPORTED = ((3, 6), (4, 0))
_MAX_ENTRIES = 4096  # distinct specialisations kept (shapes and strides enter the key as integers)

_cache: dict = {}
_layouts: dict = {}  # id(kernel or autotuner) -> (parameter names, constexpr flags, loose and value positions, it)
_slots: dict = {}  # (id(kernel), argument types) -> (tensor positions, float positions keyed by type only)
stats = {"cached": 0, "usual": 0}  # launches by either path (tests read it)

# Compile option of every kernel that does not choose otherwise: a * b + c contracted into one FMA, Triton's
# default up to 3.9 (3.9 warns that 3.10 turns it off). Passed explicitly so that the bits and the speed do
# not change with the Triton version, and no warning is printed. (PST's score passes pass False.)
FP_FUSION = {"enable_fp_fusion": True}


def _version_ok() -> bool:
    try:
        import triton

        version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - an unknown version launches the usual way
        return False
    return _SUPPORTED[0] <= version < _SUPPORTED[1]


ENABLED = os.environ.get("APT_KERNELS_FAST_LAUNCH", "1") != "0" and _version_ok()
_INTERPRET = triton_interpret()  # read once, as triton.jit does when the kernels are defined


def compiled(device: torch.device) -> bool:
    """Whether Triton kernels on ``device`` are compiled (a CUDA device, no interpreter)."""
    return device.type == "cuda" and not _INTERPRET


def _layout(fn):
    layout = _layouts.get(id(fn))  # by id: a JITFunction's __hash__ is Python code (the entry keeps fn alive)
    if layout is None:
        jit = fn
        while not hasattr(jit, "params"):  # the JITFunction under an autotuner (or heuristics)
            jit = jit.fn
        names = tuple(jit.arg_names)
        constexpr = tuple(p.is_constexpr for p in jit.params)
        loose = tuple(p.num for p in jit.params if p.do_not_specialize)
        valued = frozenset(names.index(k) for k in getattr(fn, "keys", ()) if k in names)  # the autotuner's
        layout = _layouts[id(fn)] = (names, constexpr, tuple(i for i in loose if i not in valued), valued, fn)
    return layout


def _width(x: int) -> int:
    """Triton's integer argument classes: int32, int64, uint64."""
    return 0 if -(1 << 31) <= x < (1 << 31) else 1 if -(1 << 63) <= x < (1 << 63) else 2


def _args_key(fn, args, loose, valued):
    types = tuple(map(type, args))
    slots = _slots.get((id(fn), types))
    if slots is None:
        slots = _slots[id(fn), types] = (tuple(i for i, t in enumerate(types) if issubclass(t, torch.Tensor)),
                                     tuple(i for i, t in enumerate(types) if t is float and i not in valued))
    tensors, floats = slots
    vals = list(args)
    for i in tensors:
        a = args[i]
        vals[i] = (a.dtype, not a.data_ptr() & 15)
    for i in floats:
        vals[i] = None
    for i in loose:
        if i < len(args) and types[i] is int:
            vals[i] = _width(args[i])
    return types, tuple(vals)


def launch(fn, grid, args: tuple, kwargs: dict):
    """``fn[grid](*args, **kwargs)`` on the current CUDA device, from the cache after the first call of each
    specialisation. ``fn``: a ``triton.jit`` function or an autotuner over one; ``grid``: a tuple, or a
    callable taking the keyword arguments and the autotuner's pick (a dict of constexprs) to a tuple."""
    if not ENABLED:
        return fn[grid](*args, **kwargs)
    names, constexpr, loose, valued, _ = _layout(fn)
    key = (id(fn), torch.cuda.current_device(), tuple(kwargs.items()), _args_key(fn, args, loose, valued))
    entry = _cache.get(key)
    if entry is not None:
        compiled, tail, meta = entry
        grid = grid(meta) if callable(grid) else grid
        compiled[(*grid, 1, 1)[:3]](*args, *tail)  # (the runner wants all three dims)
        stats["cached"] += 1
        return compiled
    compiled = fn[grid](*args, **kwargs)
    stats["usual"] += 1
    from triton.compiler import CompiledKernel

    if not isinstance(compiled, CompiledKernel) or not all(constexpr[len(args):]):
        return compiled
    config = getattr(fn, "best_config", None)
    meta = {**kwargs, **(config.all_kwargs() if config is not None else {})}
    if not all(name in meta for name in names[len(args):]):
        return compiled
    if len(_cache) >= _MAX_ENTRIES:
        _cache.clear()
    _cache[key] = (compiled, tuple(meta[name] for name in names[len(args):]), meta)
    return compiled


def run(fn, grid, args: tuple, kwargs: dict, device: torch.device):
    """``fn[grid](*args, **kwargs)`` for tensors on ``device``: through :func:`launch` where the kernel is compiled
    (:func:`compiled`), the usual way otherwise (Triton's interpreter)."""
    if compiled(device):
        return launch(fn, grid, args, kwargs)
    return fn[grid](*args, **kwargs)


def clear() -> None:
    """Forget every cached launch (the next call of each specialisation goes the usual way again)."""
    _cache.clear()
