"""PST on a whole model: convert the linear layers of the transformer blocks, train, export.

``apply_pst`` needs no import of transformers: it works on any ``nn.Module``, and recognises
transformers' GPT-2 style ``Conv1D`` by its class name.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..pst.layer import PSTLinear
from ._heads import task_head

HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head", "head", "pre_classifier")


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def _convertible(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _block_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the transformer blocks: the items of every nn.ModuleList holding linear layers."""
    prefixes = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            for i, item in enumerate(mod):
                if any(_convertible(m) for m in item.modules()):
                    prefixes.append(f"{name}.{i}" if name else str(i))
    return prefixes


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _reads_weight_directly(model: nn.Module, name: str) -> bool:
    """A linear layer whose parent uses its weight without calling it, which a PSTLinear cannot stand in for:
    nn.MultiheadAttention's out_proj (its forward reads ``out_proj.weight``), and the linear layers of
    torch's nn.Transformer*Layer (their inference fast path reads ``linear1.weight`` etc.)."""
    parent, _, _ = name.rpartition(".")
    return isinstance(model.get_submodule(parent) if parent else model, _READS_WEIGHTS)


def _select(model: nn.Module, targets) -> list[str]:
    names = [n for n, m in model.named_modules() if n and _convertible(m)]
    if targets is None:
        blocks = _block_prefixes(model)
        inside = [n for n in names if any(_in(n, b) for b in blocks)]
        chosen = [n for n in inside if not _reads_weight_directly(model, n)]
        if inside and not chosen:
            raise ValueError("apply_pst: the linear layers of these blocks are read directly by their parents "
                             "(torch.nn.MultiheadAttention / nn.Transformer*Layer use .weight without calling the "
                             "layer), so a PSTLinear there would never prune them")
        return chosen
    if callable(targets):
        mods = dict(model.named_modules())
        chosen = [n for n in names if targets(n, mods[n])]
    else:
        pats = [targets] if isinstance(targets, (str, re.Pattern)) else targets
        if not isinstance(pats, (list, tuple, set)) or not all(isinstance(p, (str, re.Pattern)) for p in pats):
            raise TypeError("targets must be None, a regex (str or compiled), a list of them or a callable(name, "
                            f"module); got {targets!r}")
        chosen = [n for n in names if any(re.search(p, n) for p in pats)]
    direct = [n for n in chosen if _reads_weight_directly(model, n)]
    if direct:
        raise ValueError(f"apply_pst cannot convert {direct}: their parents (nn.MultiheadAttention, "
                         "nn.Transformer*Layer) read the weight directly instead of calling the layer, so a "
                         "PSTLinear there would never prune it")
    return chosen


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The task head: that of a transformers model (``_heads.task_head``), else modules named like a head."""
    head = task_head(model)
    if head is not None:
        return head
    out = []
    for name, mod in model.named_modules():
        if name and name.split(".")[-1] in HEAD_NAMES:
            out.extend(mod.parameters())
    return out


def pst_layers(model: nn.Module) -> list[tuple[str, PSTLinear]]:
    """(qualified name, layer) of every PSTLinear of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PSTLinear)]


def apply_pst(model: nn.Module, sparsity: float = 0.9, rank_w: int = 8, rank_s: int = 8, *, targets=None,
              train_head: bool = True, nm: tuple[int, int] | None = None, backend: str = "auto",
              beta: float = 1.0, alpha1: float = 1.0, alpha2: float = 1.0, init_std: float = 0.02,
              train_bias: bool = False, factor_dtype: torch.dtype | None = None) -> nn.Module:
    """Convert linear layers of ``model`` to :class:`~apt_kernels.PSTLinear` in place and freeze the rest.

    Args:
        model: e.g. a transformers ``...ForSequenceClassification``; any ``nn.Module`` works.
        sparsity: the final sparsity of every converted layer (a :class:`~apt_kernels.SparsityScheduler`
            ramps to it; without one the layers prune this much from the first forward).
        rank_w, rank_s: ranks of the weight update U V and of the score term A B.
        targets: which layers. None (default): every ``nn.Linear`` (and transformers ``Conv1D``) inside the
            transformer blocks, i.e. inside the items of an ``nn.ModuleList`` (``encoder.layer.3.attention
            .self.query``, ``model.layers.0.mlp.up_proj``, ...): not embeddings, pooler or task head. A
            regex or list of regexes: every linear layer whose qualified name matches one (``re.search``),
            anywhere in the model. A callable ``(name, module) -> bool``: every linear layer it accepts.
        train_head: leave the task head trainable (parameters outside ``model.base_model`` for
            transformers models, else modules named classifier/score/qa_outputs/lm_head/head;
            parameters tied to the body and a transformers language model's output embeddings stay
            frozen). The paper's script froze it; here it trains.
        nm: (N, M), e.g. (2, 4): N:M sparsity instead of a global top-k in every converted layer; the
            sparsity is then 1 - N/M whatever ``sparsity`` says.
        backend: the PST backend of every layer ("auto", "torch", "triton", "cuda", "reference").
        beta, alpha1, alpha2, init_std, factor_dtype: see :class:`~apt_kernels.PSTLinear`.
        train_bias: leave the biases of the converted layers trainable (default: frozen like W0).

    Every parameter of the model is frozen except the PST factors (``pst_u``, ``pst_v``, ``pst_a``,
    ``pst_b``, ``pst_r``, ``pst_c``), the head when ``train_head`` and the converted biases when
    ``train_bias``. Returns ``model``.
    """
    names = _select(model, targets)
    if not names:
        raise ValueError("apply_pst found no linear layers to convert" +
                         (" inside transformer blocks (no nn.ModuleList holding nn.Linear); pass targets="
                          if targets is None else f" matching targets={targets!r}"))
    opts = dict(sparsity=sparsity, rank_w=rank_w, rank_s=rank_s, beta=beta, alpha1=alpha1, alpha2=alpha2, nm=nm,
                backend=backend, init_std=init_std, factor_dtype=factor_dtype)
    head = _head_parameters(model) if train_head else []
    flags = {p: p.requires_grad for p in model.parameters()}
    replaced = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            mod = model.get_submodule(name)
            layer = PSTLinear.from_conv1d(mod, **opts) if _is_conv1d(mod) else PSTLinear.from_linear(mod, **opts)
            if layer.bias is not None:
                layer.bias.requires_grad_(train_bias)
            _set(model, name, layer)
            replaced.append((name, mod))
    except Exception:  # a bad option (or a layer it does not fit): the model as it was
        for name, mod in replaced:
            _set(model, name, mod)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    converted = {id(p) for _, layer in pst_layers(model) for p in (layer.weight, layer.bias) if p is not None}
    for p in head:
        if id(p) not in converted:
            p.requires_grad_(True)
    return model


@torch.no_grad()
def export_pst(model: nn.Module, *, semi_structured: bool = False, inplace: bool = True) -> nn.Module:
    """Replace every PSTLinear by a plain ``nn.Linear`` holding W' (pruned entries exact +0.0), or by the
    transformers ``Conv1D`` it was made from (GPT-2) holding W' transposed, so the exported model saves and
    loads as its original architecture.

    Each layer is pruned at its current ``sparsity`` (the final one after a full schedule), so the
    realised sparsity of every exported weight equals its target (``floor(out * in * s)`` zeros from
    the mask; weights that happen to be exactly 0 in W add to that). With N:M layers,
    ``semi_structured=True`` stores 2:4 weights as ``torch.sparse.to_sparse_semi_structured`` (CUDA,
    fp16/bf16, and the shape limits of torch's sparse kernels). ``inplace=False`` exports a deep copy.
    Returns the model.
    """
    if not inplace:
        model = copy.deepcopy(model)
    layers = pst_layers(model)
    if not layers:
        raise ValueError("export_pst found no PSTLinear layers in the model")
    for name, layer in layers:
        _set(model, name, layer.to_dense(semi_structured=semi_structured))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


__all__ = ["apply_pst", "export_pst", "pst_layers", "trainable_parameters"]
