"""Fisher-information masks for Child-Tuning mode "D", and saving / loading masks."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _validate as V
from .. import bits as _bits

MASKS_FORMAT = "apt_kernels.child_tuning.masks/1"


def layer_stack_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters inside the model's stack of transformer layers.

    The stack is the ``nn.ModuleList`` holding the most parameters, the first in module order between
    equal ones (``encoder.layer`` in BERT, ``transformer.h`` in GPT-2, ``model.layers`` in Llama); with
    no ModuleList, every parameter.
    """
    best, best_size = None, -1
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    source = best if best is not None else model
    return {id(p) for p in source.parameters()}


def default_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """model(**batch).loss for a dict batch, model(*batch).loss for a tuple/list, model(batch) else."""
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("the model's output has no scalar loss; pass loss_fn=lambda model, batch: <scalar loss>")
    return loss


# elements per step of the chunked selection (bounds its temporaries: a few bytes per element each)
SELECT_CHUNK = 1 << 26


def radix_kth(values: list[torch.Tensor], k: int, chunk: int | None = None) -> float:
    """The k-th smallest (1-based) of the float32 ``values`` taken together, exactly, in torch ops on
    their device: a radix select over the order-preserving integer keys of the floats (8 bits a pass,
    4 passes, int64 counts: no size limit), ``chunk`` elements at a time (temporaries stay small,
    nothing is concatenated). NaN counts as the largest value."""
    from ..pst.reference import float_of_key, ordered_key

    chunk = chunk or SELECT_CHUNK
    numel = sum(t.numel() for t in values)
    if not 1 <= k <= numel:
        raise ValueError(f"k = {k} is outside 1 .. {numel}")
    device = values[0].device
    prefix, need = 0, k  # unsigned key bits chosen so far; rank still needed inside the current bucket
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for t in values:
            for part in t.detach().reshape(-1).split(chunk):
                key = ordered_key(part.float()).to(torch.int64) + 2 ** 31  # unsigned order
                if shift < 24:
                    key = key[(key >> (shift + 8)) == (prefix >> (shift + 8))]
                hist += torch.bincount((key >> shift) & 255, minlength=256)
        cum = hist.cumsum(0)
        bucket = int(torch.searchsorted(cum, torch.tensor([need], device=device)).item())
        need -= int(cum[bucket - 1]) if bucket else 0
        prefix |= bucket << shift
    return float_of_key(prefix)


def _kth_values(values: list[torch.Tensor], ks: list[int]) -> list[float]:
    """The ks-th smallest values (1-based) of the float32 ``values`` taken together, selected on their
    device: on a GPU with Triton, the radix-select passes of the PST kernels (one float32 copy; below
    2^31 values), else :func:`radix_kth` in torch ops (no copy, any size; ``torch.kthvalue`` runs one
    block per slice on a GPU); on CPU numpy's introselect (``np.partition``) of their concatenation."""
    from .. import _env

    device = values[0].device
    numel = sum(t.numel() for t in values)
    if device.type == "cpu":
        flat = torch.cat([t.reshape(-1) for t in values]).numpy()
        picked = np.partition(flat, [k - 1 for k in ks])
        return [float(picked[k - 1]) for k in ks]
    if numel < 2 ** 31 and _env.triton_reason(device) is None:
        from ..pst.triton_pst import kth_smallest

        return kth_smallest(values, ks)
    return [radix_kth(values, k) for k in ks]


def quantile_threshold(values, q: float) -> float:
    """The q-quantile of the non-negative ``values`` (a tensor or a list of tensors taken together) with
    linear interpolation (numpy.percentile's default), found by selection on the values' device
    (nothing copied to the host), in float64."""
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    n = sum(t.numel() for t in values)
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    ks = [lo + 1] if hi == lo else [lo + 1, hi + 1]
    got = _kth_values(values, ks)
    v_lo, v_hi = got[0], got[-1]
    return v_lo + (v_hi - v_lo) * (pos - lo)


def fisher_mask(model: torch.nn.Module, batches: Iterable, reserve_p: float, *,
                loss_fn: Callable | None = None, max_grad_norm: float | None = 1.0,
                select: Callable[[str, torch.nn.Parameter], bool] | None = None,
                progress: bool = True) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Child-Tuning-D masks: keep the reserve_p fraction of selected weights with the largest Fisher.

    One pass over ``batches`` in train mode. For every batch the loss's gradient is taken; each
    selected parameter's gradient is clipped to ``max_grad_norm`` on its own (as the paper's code
    does; None disables clipping), squared and accumulated, and the sum is divided by the number of
    batches. Over all selected parameters together, an element is kept iff its Fisher value is >= the
    (1 - reserve_p) quantile (linear interpolation, as ``numpy.percentile``). The quantile is found
    by selection on the device: nothing is copied to the host.

    Args:
        model: the model; its train/eval mode is restored afterwards, its grads cleared.
        batches: an iterable of batches (a DataLoader); dict batches are passed as ``model(**batch)``.
        reserve_p: fraction kept, in (0, 1].
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        select: ``select(name, param) -> bool`` picks the parameters that get a mask; default: those
            inside the transformer layer stack (see :func:`layer_stack_parameters`). Parameters without
            a mask get full updates from :class:`ChildTuningAdamW`.
        progress: show a progress bar.

    Returns:
        {parameter: bool mask of its shape} for the selected trainable parameters.

    Raises:
        ValueError: if a selected parameter's Fisher information is not finite (a NaN or inf gradient).
    """
    reserve_p = V.number("reserve_p", reserve_p, lo=0.0, hi=1.0, lo_open=True)
    if max_grad_norm is not None:
        max_grad_norm = V.number("max_grad_norm", max_grad_norm, lo=0.0, lo_open=True)
    loss_fn = loss_fn or default_loss
    if select is None:
        stack = layer_stack_parameters(model)
        select = lambda name, p: id(p) in stack  # noqa: E731
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and select(name, p)]
    chosen = [p for _, p in named]
    if not chosen:
        raise ValueError("no trainable parameter was selected for a Fisher mask")

    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    modes = {m: m.training for m in model.modules()}  # every submodule's, restored as it was
    model.train()
    model.zero_grad(set_to_none=True)
    n_batches = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, desc="Fisher information", total=total, disable=not progress):
            loss = loss_fn(model, batch)
            loss.backward()
            have = [(p.grad, f) for p, f in zip(chosen, fisher) if p.grad is not None]
            if max_grad_norm is not None:  # per parameter, on its own (as the paper's code)
                for p in chosen:
                    if p.grad is not None:
                        torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
            if have:  # F += g * g for every parameter at once
                grads = [g.float() for g, _ in have]
                torch._foreach_addcmul_([f for _, f in have], grads, grads)
            model.zero_grad(set_to_none=True)
            n_batches += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    if n_batches == 0:
        raise ValueError("batches was empty: the Fisher information needs at least one batch")
    torch._foreach_div_(fisher, float(n_batches))
    finite = torch.stack([torch.isfinite(f).all() for f in fisher]).tolist()  # one sync
    if not all(finite):  # a NaN quantile would keep nothing, silently
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        raise ValueError(f"the Fisher information of {', '.join(bad)} is not finite (NaN or inf gradients in "
                         "some batch, or squares past float32's range): no mask can be chosen from it; check the loss on these batches")

    threshold = quantile_threshold(fisher, 1.0 - reserve_p)
    return {p: f.double() >= threshold for p, f in zip(chosen, fisher)}


def save_masks(masks: dict[torch.Tensor, torch.Tensor], model: torch.nn.Module, path: str | os.PathLike, *,
               packed: bool = True) -> None:
    """Save D-mode masks to a safetensors file, by parameter name.

    Args:
        masks: {parameter of ``model``: bool mask of its shape}, e.g. from :func:`fisher_mask` or
            ``ChildTuningAdamW.masks()``.
        model: the model the parameters belong to (it gives their names).
        path: the file to write.
        packed: store 1 bit per element (int32 words, :mod:`apt_kernels.bits`, 32x smaller) rather than one
            bool byte per element. :func:`load_masks` reads both.
    """
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors, shapes = {}, {}
    for p, mask in masks.items():
        name = names.get(id(p))
        if name is None:
            raise ValueError(f"masks holds a tensor of shape {V.shape(p)} that is not a parameter of the model")
        V.tensor(f"the mask of {name}", mask, dtypes=(torch.bool,))
        if mask.shape != p.shape:
            raise ValueError(f"the mask of {name} has shape {V.shape(mask)}, the parameter {V.shape(p)}")
        mask = mask.detach().cpu().contiguous()
        tensors[name] = _bits.pack_bits(mask) if packed else mask
        shapes[name] = list(mask.shape)
    metadata = {"format": MASKS_FORMAT, "packed": "1" if packed else "0", "shapes": json.dumps(shapes)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_masks(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True
               ) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Read masks written by :func:`save_masks`: {parameter of ``model``: bool mask}, on the parameters' devices.

    With ``strict`` (the default) every name in the file must be a parameter of ``model`` of the saved
    shape; otherwise unknown names are skipped. A shape mismatch is always an error.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    out = {}
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASKS_FORMAT:
            raise ValueError(f"{path} is not a masks file written by apt_kernels.child_tuning.save_masks")
        packed, shapes = meta.get("packed") == "1", json.loads(meta["shapes"])
        for name in f.keys():
            p = params.get(name)
            if p is None:
                if strict:
                    raise ValueError(f"{path} holds a mask for {name!r}, which is not a parameter of the model "
                                     "(load_masks(..., strict=False) skips it)")
                continue
            if list(p.shape) != shapes[name]:
                raise ValueError(f"the mask of {name} in {path} has shape {tuple(shapes[name])}, the parameter "
                                 f"{V.shape(p)}")
            t = f.get_tensor(name)
            mask = _bits.unpack_bits(t, p.shape) if packed else t
            out[p] = mask.to(p.device)
    return out
