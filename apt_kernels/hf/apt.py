"""Adaptive Prefix Tuning (and plain prefix / prompt tuning) on Hugging Face models.

The prefix lives inside attention. ``apply_apt`` registers one attention function and the
matching mask function under the name ``"apt"`` (transformers' ``AttentionInterface`` and
``AttentionMaskInterface``) and selects it with ``model.set_attn_implementation("apt")``. The
function finds the layer's prefix and gate on the attention module it is called for and runs
:func:`apt_kernels.gated_prefix_attention`. Gates are computed from the hidden states entering each
layer by a forward pre-hook on the layer. DeBERTa-v2's attention does not call the interface: its
attention modules' forward is replaced (relative-position terms of prefix columns are zero, as in
P-Tuning v2). Math: docs/math.md, section 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import REGISTRY as ATTENTION_REGISTRY
from ..attention import gated_prefix_attention
from ._heads import task_head

ATTN_NAME = "apt"


@dataclasses.dataclass(frozen=True)
class Family:
    layers: str  # the layer stack, relative to model.base_model
    attention: str  # the attention module inside a layer
    causal: bool
    # The first module a layer's forward calls with the layer's input hidden states (and, for encoders, its
    # attention mask as the second argument): the gate is computed in its forward pre-hook, so inside the
    # layer's forward, where activation checkpointing recomputes it along with the attention.
    gate_source: str
    patch: bool = False  # attention does not call the AttentionInterface: replace its forward


FAMILIES = {
    "bert": Family("encoder.layer", "attention.self", causal=False, gate_source="attention"),
    "roberta": Family("encoder.layer", "attention.self", causal=False, gate_source="attention"),
    "xlm-roberta": Family("encoder.layer", "attention.self", causal=False, gate_source="attention"),
    "deberta-v2": Family("encoder.layer", "attention.self", causal=False, gate_source="attention", patch=True),
    "gpt2": Family("h", "attn", causal=True, gate_source="ln_1"),
    "llama": Family("layers", "self_attn", causal=True, gate_source="input_layernorm"),
    "qwen2": Family("layers", "self_attn", causal=True, gate_source="input_layernorm"),
    "mistral": Family("layers", "self_attn", causal=True, gate_source="input_layernorm"),
}


@dataclasses.dataclass
class APTConfig:
    prefix_len: int = 16
    token_gate: bool = True
    layer_gate: bool = True
    pool: str = "mean"
    reparam_hidden: int | None = None
    train_head: bool = True
    backend: str = "auto"
    family: str = ""
    prompt_tuning: bool = False


def _family(model: nn.Module, caller: str = "apply_apt") -> tuple[str, Family]:
    if _is_peft(model):  # (its get_base_model() would do, but freezing the backbone would freeze PEFT's weights)
        raise ValueError(f"{caller} takes the Hugging Face model itself, not a PEFT wrapper "
                         f"({type(model).__name__}): apply APT first, then wrap it, then re-enable the adapter "
                         "with wrapped.get_base_model().apt_adapter.requires_grad_(True) (docs/apt_hf.md)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{caller} supports the model families {sorted(FAMILIES)}; got "
                         f"{type(model).__name__} with model_type {model_type!r}")
    return model_type, FAMILIES[model_type]


def _is_peft(model: nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model")


def _unwrap(model: nn.Module, peft: bool = False) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (its parameters and modules are that module's); with
    ``peft``, also the model under a PEFT wrapper (for functions that only read or undo what APT added)."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if peft and _is_peft(model) else model


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _dims(config) -> tuple[int, int, int, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "attention_head_size", None) or hidden // heads
    return hidden, heads, kv_heads, head_dim


class APTAdapter(nn.Module):
    """The APT parameters of a model: per-layer prefix keys/values, token-gate weights, layer gates."""

    def __init__(self, cfg: APTConfig, n_layers: int, hidden: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        P = cfg.prefix_len
        shape = (n_layers, kv_heads, P, head_dim)
        if cfg.reparam_hidden:
            self.prefix_embedding = nn.Embedding(P, hidden)
            self.prefix_mlp = nn.Sequential(nn.Linear(hidden, cfg.reparam_hidden), nn.Tanh(),
                                            nn.Linear(cfg.reparam_hidden, 2 * n_layers * kv_heads * head_dim))
        else:
            self.prefix_k = nn.Parameter(torch.randn(shape) * 0.02)
            self.prefix_v = nn.Parameter(torch.randn(shape) * 0.02)
        if cfg.token_gate:
            self.gate_weight = nn.Parameter(torch.randn(n_layers, hidden, P) * 0.02)
            self.gate_bias = nn.Parameter(torch.zeros(n_layers, P))
        if cfg.layer_gate:
            self.layer_scale = nn.Parameter(torch.ones(n_layers))
        # Nothing of a forward is kept here: the layers compute what they read during their own forward (and
        # again in a checkpointed recomputation), so forwards may overlap before a backward.

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v), each (L, Hkv, P, D)."""
        if self.cfg.reparam_hidden:
            P = self.cfg.prefix_len
            flat = self.prefix_mlp(self.prefix_embedding.weight)  # (P, 2 L Hkv D)
            kv = flat.view(P, 2, self.n_layers, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
            return kv[0], kv[1]
        return self.prefix_k, self.prefix_v

    def _shared(self, key: tuple, make, layer: int | None = None):
        """``make()``, made once per forward of the model and shared by its layers (``layer``: the value is a
        tuple of per-layer values, and this layer's is returned); None outside a forward (between the
        backbone's :func:`_open_forward` and :func:`_close_forward` hooks), and under torch.compile, which
        needs no sharing to launch few kernels.

        Why: a (L, ...) parameter indexed by each layer costs, per layer, a select and its backward (a zeroed
        full-size gradient, a copy into it, an add into the accumulated gradient), plus a cast and its
        backward under autocast; unbound once per forward it costs one cast and one unbind, whose backward
        is one stack. A short sequence's step pays each of those launches' host time in full (the small Llama
        step of the H200 run was host-bound: ``python -m benchmarks.step_host`` counts them). Nothing outlives
        the forward: its autograd graph holds what the layers used."""
        cache = self.__dict__.get("_forward_cache")
        if cache is None or torch.compiler.is_compiling():
            return None
        key = key + (torch.is_grad_enabled(),)
        got = cache.get(key)
        if got is None:
            got = cache[key] = make()
        return got if layer is None else got[layer]

    def layer_prefix(self, layer: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) of one layer, each (Hkv, P, D), in ``dtype`` (default: the parameters').
        With the reparametrisation, the MLP runs once per forward of the model (:meth:`_shared`); a layer
        called alone evaluates the MLP's last linear layer for its own outputs only (its hidden layer,
        P x reparam_hidden, recomputed: cheap)."""

        def every_layer():
            pk, pv = (t if dtype is None else t.to(dtype) for t in self.prefixes())
            return tuple(zip(pk.unbind(0), pv.unbind(0)))

        shared = self._shared(("prefix", dtype), every_layer, layer)
        if shared is not None:
            return shared
        if not self.cfg.reparam_hidden:
            pk, pv = self.prefix_k[layer], self.prefix_v[layer]
        else:
            P, L, width = self.cfg.prefix_len, self.n_layers, self.kv_heads * self.head_dim
            hidden = self.prefix_mlp[1](self.prefix_mlp[0](self.prefix_embedding.weight))  # (P, reparam_hidden)
            last = self.prefix_mlp[2]

            def rows(kv):  # this layer's rows of the keys (kv = 0) or values (1): a slice, no copy
                start = (kv * L + layer) * width
                return F.linear(hidden, last.weight[start:start + width], last.bias[start:start + width])

            pk, pv = (rows(kv).view(P, self.kv_heads, self.head_dim).transpose(0, 1) for kv in (0, 1))
        return (pk, pv) if dtype is None else (pk.to(dtype), pv.to(dtype))

    def _gate_params(self, layer: int, dtype: torch.dtype | None):
        """(W_i in ``dtype``, b_i, lambda_i) of one layer; those of a gate that is off are None."""

        def every_layer():
            L, cfg = self.n_layers, self.cfg
            w = (self.gate_weight if dtype is None else self.gate_weight.to(dtype)).unbind(0) if cfg.token_gate \
                else (None,) * L
            b = self.gate_bias.unbind(0) if cfg.token_gate else (None,) * L
            lam = self.layer_scale.unbind(0) if cfg.layer_gate else (None,) * L
            return tuple(zip(w, b, lam))

        shared = self._shared(("gate", dtype), every_layer, layer)
        if shared is not None:
            return shared
        w = b = lam = None
        if self.cfg.token_gate:
            w, b = self.gate_weight[layer], self.gate_bias[layer]
            w = w if dtype is None else w.to(dtype)
        if self.cfg.layer_gate:
            lam = self.layer_scale[layer]
        return w, b, lam

    def gate(self, layer: int, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """lambda_i * sigmoid(pool(h) W_i + b_i): (B, 1, 1, P) pooled, (B, 1, N, P) per token; None if off.
        keep: (B, N) bool, the real tokens of h (mean pooling; None: every token).

        The mean is taken of the logits, pool(h) W = pool(h W) (both linear): h meets W_i once, in h's own
        dtype, and only the (B, N, P) logits are pooled, in float32. So no copy of the (B, N, d) hidden states is
        made, neither in float32 nor weighted by the mask (in a bf16 model that copy and its backward cost more
        than the gate's matmul). A half-precision h takes W_i rounded to its dtype with float32 accumulation,
        what autocast does with a float32 weight; float32 and float64 models compute in W_i's dtype. The
        pooling weights (or the first tokens' positions) of a mask are computed once per forward and shared by
        the layers (:meth:`_shared`)."""
        cfg = self.cfg
        g = None
        half = h.dtype in (torch.float16, torch.bfloat16)
        w, b, lam = self._gate_params(layer, h.dtype if half else None)
        if cfg.token_gate:
            n = h.shape[1]
            masked = keep is not None and keep.shape[-1] >= n
            if cfg.pool == "first":  # the first real token (left padding puts pads first)
                if not masked:
                    h = h[:, :1]
                else:
                    rows, first = self._pooling(keep, n, h.device)
                    h = h[rows, first][:, None]
            z = _logits(h, w)  # (B, N | 1, P) float32 (W's dtype)
            if cfg.pool == "mean":  # over real tokens
                # (a weighted sum, not a matmul: autocast would run that in half precision)
                z = (z * self._pooling(keep, n, h.device)).sum(1, keepdim=True) if masked else z.mean(1, keepdim=True)
            g = torch.sigmoid(z + b)[:, None]  # (B, 1, N|1, P)
        if cfg.layer_gate:
            g = lam.reshape(1, 1, 1, 1).expand(1, 1, 1, cfg.prefix_len) if g is None else g * lam
        return g

    def _shared_for(self, obj, key: tuple, make):
        """``make()``, a function of ``obj`` (a mask), shared per forward as :meth:`_shared` does; ``obj`` is held
        with it, so that its id stays its own until the forward ends."""
        got = self._shared(key + (id(obj),), lambda: (obj, make()))
        return make() if got is None else got[1]

    def _pooling(self, keep: torch.Tensor, n: int, device: torch.device):
        """What pooling reads of the real tokens ``keep`` (B, >= n) of an n-token h: for "mean", the (B, n, 1)
        float32 weights 1 / (real tokens) on real tokens, 0 on pads (a row of pads: all 0); for "first", the
        (batch rows, first real position) indices (0 for a row of pads)."""

        def make():
            k = keep[:, -n:]
            if self.cfg.pool == "first":
                return torch.arange(k.shape[0], device=device), k.to(torch.int8).argmax(1)
            w = k.to(torch.float32)
            return (w / w.sum(1, keepdim=True).clamp_min(1.0))[..., None]

        return self._shared_for(keep, ("pool", n), make)


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight in weight's dtype: for a half-precision h, a matmul in h's dtype (float32 accumulation) whose
    small (..., P) result is cast up, instead of a copy of h in weight's dtype. The logits are pooled in that
    dtype, under autocast too."""
    x = h if h.dtype in (torch.float16, torch.bfloat16) else h.to(weight.dtype)
    return (x @ weight.to(x.dtype)).to(weight.dtype)  # (autocast may also have run a float32 matmul in half precision)


def _apt_state(module: nn.Module):
    return module.__dict__.get("_apt_state")


def apt_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "apt" AttentionInterface function: gated-prefix attention, (B, N, H, D) out, no weights."""
    if kwargs.get("output_attentions"):
        _warn_no_weights()
    state = _apt_state(module)
    causal = bool(getattr(module, "is_causal", False)) and attention_mask is None
    rows = getattr(attention_mask, "apt_causal_rows", None)
    if rows is not None:  # causal & padding (see apt_mask): causal attention with the padding row
        attention_mask, causal = rows, True
    if state is None:  # a module of the model that carries no prefix (e.g. cross-attention)
        out = gated_prefix_attention(query, key, value, attn_mask=attention_mask, causal=causal, scale=scaling,
                                     dropout_p=dropout)
        return out.transpose(1, 2).contiguous(), None
    adapter, layer = state["adapter"], state["layer"]
    pk, pv = adapter.layer_prefix(layer, query.dtype)
    gate = state.pop("gate", None)  # used once: nothing of a forward stays on the module (deepcopy, memory)
    out = gated_prefix_attention(query, key, value, pk, pv, gate,
                                 attn_mask=attention_mask, causal=causal, scale=scaling, dropout_p=dropout,
                                 backend=adapter.cfg.backend)
    return out.transpose(1, 2).contiguous(), None


def _warn_no_weights() -> None:
    warnings.warn("output_attentions=True: the APT attention (a fused kernel) returns no attention weights",
                  stacklevel=3)


def apt_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function=None, attention_mask=None, **kwargs):
    """The "apt" AttentionMaskInterface function: transformers' ``sdpa_mask`` (boolean keep-masks, True =
    attend; None when causality or nothing needs one), the form the kernels read directly. Its values
    are always ``sdpa_mask``'s; two padding cases get a layout the kernels read faster:

    * an encoder's padding-only mask (the plain bidirectional mask function and a 2-D padding mask) is
      the same row for every query: it is built for one query and expanded to ``(B, 1, q_length,
      kv_length)`` with query stride 0, so the kernels read one mask row per key tile (``MASK_N1``)
      instead of a materialised ``B x N x M`` tensor;
    * a decoder's causal-and-padding mask (the plain causal mask function, with the query block ending
      at the last key, as in training and in a cache-free or dynamic-cache prefill) is ``sdpa_mask``'s
      materialised tensor carrying ``apt_causal_rows``, its padding row expanded the same way.
      :func:`apt_attention_forward` then runs causal attention with that row, which skips the key
      tiles above the diagonal instead of reading them all through the full mask.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    def build(q_len, fn, **kw):
        return sdpa_mask(batch_size, q_len, kv_length, q_offset, kv_offset, mask_function=fn,
                         attention_mask=attention_mask, **{**kwargs, **kw})

    if mask_function is None:
        mask_function = causal_mask_function
    plain_padding = (attention_mask is not None and attention_mask.dim() == 2 and q_offset >= 0 and q_length > 1
                     and not kwargs.get("use_vmap") and kwargs.get("local_size") is None)
    if plain_padding and mask_function is bidirectional_mask_function:
        mask = build(1, mask_function)
        return None if mask is None else mask.expand(batch_size, mask.shape[1], q_length, kv_length)
    mask = build(q_length, mask_function)
    if (mask is not None and plain_padding and mask_function is causal_mask_function
            and q_offset - kv_offset == kv_length - q_length):  # HF's causal alignment is the kernels' bottom-right one
        rows = build(1, bidirectional_mask_function, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        mask.apt_causal_rows = rows.expand(batch_size, rows.shape[1], q_length, kv_length)
    return mask


def _register_interfaces() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, apt_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, apt_mask)


def _deberta_forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                     relative_pos=None, rel_embeddings=None):
    """DeBERTa-v2 DisentangledSelfAttention.forward with the gated prefix (zero relative terms on it)."""
    if output_attentions:
        _warn_no_weights()
    if query_states is None:
        query_states = hidden_states
    H = self.num_attention_heads
    q = self.transpose_for_scores(self.query_proj(query_states), H)
    k = self.transpose_for_scores(self.key_proj(hidden_states), H)
    v = self.transpose_for_scores(self.value_proj(hidden_states), H)
    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    bias = None
    if self.relative_attention:
        rel_embeddings = self.pos_dropout(rel_embeddings)
        bias = self.disentangled_attention_bias(q, k, relative_pos, rel_embeddings, scale_factor)
    B = hidden_states.shape[0]
    N, M, D = q.shape[-2], k.shape[-2], q.shape[-1]
    q4, k4, v4 = (t.view(B, H, t.shape[-2], D) for t in (q, k, v))
    mask = torch.zeros((), dtype=torch.float32, device=q.device) if bias is None else bias.view(B, H, N, M).float()
    mask = mask.masked_fill(~attention_mask.bool(), float("-inf"))
    state = _apt_state(self)
    pk = pv = gate = None
    backend = "auto"
    if state is not None:
        adapter, layer = state["adapter"], state["layer"]
        pk, pv = adapter.layer_prefix(layer, q.dtype)
        gate, backend = state.pop("gate", None), adapter.cfg.backend
    out = gated_prefix_attention(q4, k4, v4, pk, pv, gate, attn_mask=mask, scale=1.0 / math.sqrt(D * scale_factor),
                                 dropout_p=getattr(self.dropout, "p", getattr(self.dropout, "drop_prob", 0.0)) if self.training else 0.0, backend=backend)
    out = out.permute(0, 2, 1, 3).reshape(B, N, H * D)
    return (out, None)


def _keep_from_mask(mask) -> torch.Tensor | None:
    """(B, N) real tokens of an encoder layer from the attention mask it is called with (the "apt" mask
    interface's (B, 1, N, M) bool mask, DeBERTa's (B, 1, N, N) 0/1 one, a user's additive float one; None:
    no padding): the diagonal, a token's visibility to itself."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    n, m = mask.shape[-2:]
    diag = mask[:, 0].diagonal(offset=m - n, dim1=-2, dim2=-1)
    if diag.is_floating_point():  # an additive mask (a user's 4-D float mask): hidden at or below finfo.min
        return diag > torch.finfo(diag.dtype).min
    return diag.bool()


def _compute_gate(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of a layer's gate source (Family.gate_source): the layer's gate from the hidden states
    entering it, left on the layer's attention module for the attention call that follows. The hook runs
    inside the layer's forward, so a checkpointed recomputation computes the gate again from its own input
    (forwards may overlap before a backward; reentrant checkpointing sees the gate's whole graph). A
    module-level function that finds everything from ``module``: a deep copy of the model gates with its
    own parameters."""
    attn = module.__dict__["_apt_gate_of"]
    state = attn.__dict__["_apt_state"]
    h = args[0] if args else kwargs["hidden_states"]
    adapter = state["adapter"]
    config = getattr(attn, "config", None) if state.get("interface") else None
    if config is not None and config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"APT is applied, but this model's attention implementation is now "
                           f"{config._attn_implementation!r}: the prefix would be ignored. Switch back with "
                           f"model.set_attn_implementation({ATTN_NAME!r}), or call remove_apt(model) first")
    keep = None
    if adapter.cfg.token_gate and adapter.cfg.pool in ("mean", "first"):
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:  # the same mask object for every layer of a forward: its diagonal read once
            keep = adapter._shared_for(mask, ("keep",), lambda: _keep_from_mask(mask))
    state["gate"] = adapter.gate(state["layer"], h, keep)


def _open_forward(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the backbone: a forward of the model begins, its layers share what
    :meth:`APTAdapter._shared` makes until :func:`_close_forward`. (A nested forward of the same backbone shares
    the outer one's.)"""
    adapter = module.__dict__["_apt_adapter_of"]
    depth = adapter.__dict__.get("_forward_depth", 0)
    if depth == 0:
        adapter.__dict__["_forward_cache"] = {}
    adapter.__dict__["_forward_depth"] = depth + 1


def _close_forward(module: nn.Module, args, kwargs, output) -> None:
    """Forward hook of the backbone (also called when the forward raises): the shared values are dropped."""
    adapter = module.__dict__["_apt_adapter_of"]
    depth = adapter.__dict__.get("_forward_depth", 1) - 1
    adapter.__dict__["_forward_depth"] = depth
    if depth <= 0:
        adapter.__dict__.pop("_forward_cache", None)
        adapter.__dict__.pop("_forward_depth", None)


def _check_not_applied(model) -> None:
    adapter = getattr(model, "apt_adapter", None)
    if adapter is not None:
        what = "prompt tuning" if isinstance(adapter, SoftPrompt) else "APT (or prefix tuning)"
        raise ValueError(f"this model already has {what} applied; call remove_apt(model) first")


def _check_prefix_len(prefix_len) -> int:
    """``prefix_len`` as a plain int (a numpy integer too, as ``reparam_hidden``: the config is saved as JSON)."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, numbers.Integral) or prefix_len < 1:
        raise ValueError(f"prefix_len must be a positive int, got {prefix_len!r}")
    return int(prefix_len)


def _freeze_backbone(model: nn.Module, train_head: bool) -> dict[str, bool]:
    """Freeze every parameter but the task head (if ``train_head``); return the flags to restore later."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if train_head:
        for p in task_head(model) or ():  # (a base model has none)
            p.requires_grad_(True)
    return saved


def apply_apt(model: nn.Module, prefix_len: int = 16, *, token_gate: bool = True, layer_gate: bool = True,
              pool: str | None = None, reparam_hidden: int | None = None, train_head: bool = True,
              backend: str = "auto") -> nn.Module:
    """Adaptive Prefix Tuning on a Hugging Face model, in place; returns the model.

    Every attention layer gets trainable prefix keys/values (P = ``prefix_len`` per kv head), scaled
    by a token-level gate ``sigmoid(pool(h) W + b)`` computed from the hidden states entering the
    layer and a layer-level scalar gate (initialised to 1). The backbone is frozen; the APT
    parameters (and the task head, if ``train_head``) train.

    Args:
        model: a BERT, RoBERTa, XLM-RoBERTa, DeBERTa-v2, GPT-2, Llama, Qwen2 or Mistral model (any head).
        prefix_len: P, prefix tokens per layer.
        token_gate, layer_gate: turn the two gates on or off (both off: plain prefix tuning).
        pool: how the token gate pools the hidden states: "mean" over real tokens (default for
            encoders), "first" token, or "token" (one gate row per position: the default and the only
            causal-safe choice for decoders).
        reparam_hidden: hidden size of a P-Tuning v2 reparameterisation MLP producing the prefix
            (None: the prefix is a plain parameter).
        train_head: keep the task head trainable: the parameters outside the base model (classifier, score),
            minus weights tied to it and a language model's output embeddings (its vocabulary projection).
        backend: gated_prefix_attention backend ("auto", "triton", "torch", "reference").

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from apt_kernels.hf import apply_apt
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
        >>> model = apply_apt(model, prefix_len=4)
        >>> sorted({n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("apt")})
        ['gate_bias', 'gate_weight', 'layer_scale', 'prefix_k', 'prefix_v']
    """
    wrapper, model = model, _unwrap(model)
    model_type, fam = _family(model)
    _check_not_applied(model)
    prefix_len = _check_prefix_len(prefix_len)
    if reparam_hidden is not None:
        if isinstance(reparam_hidden, bool) or not isinstance(reparam_hidden, numbers.Integral) or reparam_hidden < 1:
            raise ValueError(f"reparam_hidden must be None (no reparameterisation) or an int >= 1, "
                             f"got {reparam_hidden!r}")
        reparam_hidden = int(reparam_hidden)
    ATTENTION_REGISTRY.check_backend(backend)
    # an encoder family configured as a decoder (BertLMHeadModel & co.: config.is_decoder) is causal too
    causal = fam.causal or bool(getattr(model.config, "is_decoder", False))
    pool = pool or ("token" if causal else "mean")
    if pool not in ("mean", "first", "token"):
        raise ValueError(f"pool must be 'mean', 'first' or 'token', got {pool!r}")
    if causal and pool != "token" and token_gate:
        raise ValueError(f"pool={pool!r} lets a token's gate see later tokens in a causal decoder ({model_type}"
                         f"{', is_decoder=True' if not fam.causal else ''}); use pool='token'")
    cfg = APTConfig(prefix_len, token_gate, layer_gate, pool, reparam_hidden, train_head, backend, model_type)
    layers = _get(model.base_model, fam.layers)
    hidden, _, kv_heads, head_dim = _dims(model.config)
    adapter = APTAdapter(cfg, len(layers), hidden, kv_heads, head_dim)
    ref = next(model.parameters())
    adapter.to(device=ref.device)

    saved_grad = _freeze_backbone(model, train_head)
    model.apt_adapter = adapter  # registered: in parameters(), state_dict() and .to()

    patched, hooked = [], []
    backbone = model.base_model
    backbone.__dict__["_apt_adapter_of"] = adapter
    backbone.register_forward_pre_hook(_open_forward, with_kwargs=True)
    backbone.register_forward_hook(_close_forward, with_kwargs=True, always_call=True)
    hooked.append(backbone)
    for i, layer in enumerate(layers):
        attn = _get(layer, fam.attention)
        attn.__dict__["_apt_state"] = {"adapter": adapter, "layer": i, "interface": not fam.patch}
        source = _get(layer, fam.gate_source)
        source.__dict__["_apt_gate_of"] = attn  # module references: a deep copy of the model maps them
        source.register_forward_pre_hook(_compute_gate, with_kwargs=True)
        hooked.append(source)
        if fam.patch:
            attn.forward = types.MethodType(_deberta_forward, attn)
            patched.append(attn)

    previous = model.config._attn_implementation
    configs = []  # (config, implementation) of attention modules whose config the model's switch missed
    if not fam.patch:
        _register_interfaces()
        model.set_attn_implementation(ATTN_NAME)
        for layer in layers:  # e.g. an EncoderDecoderModel's encoder: it replaced encoder.config, not the layers'
            config = getattr(_get(layer, fam.attention), "config", None)
            if config is not None and config._attn_implementation != ATTN_NAME:
                if all(c is not config for c, _ in configs):
                    configs.append((config, config._attn_implementation))
                config._attn_implementation = ATTN_NAME
    model.__dict__["_apt_undo"] = {"hooked": hooked, "patched": patched, "attn": previous, "configs": configs,
                                   "requires_grad": saved_grad, "layers": layers, "family": fam}
    return wrapper


def apply_prefix_tuning(model: nn.Module, prefix_len: int = 16, *, reparam_hidden: int | None = None,
                        train_head: bool = True, backend: str = "auto") -> nn.Module:
    """Plain prefix tuning (P-Tuning v2): APT with both gates off."""
    return apply_apt(model, prefix_len, token_gate=False, layer_gate=False, reparam_hidden=reparam_hidden,
                     train_head=train_head, backend=backend)


def remove_apt(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_apt` (or the prefix / prompt variants): hooks, attention, flags, parameters."""
    wrapper, model = model, _unwrap(model, peft=True)
    undo = model.__dict__.pop("_apt_undo", None)
    if undo is None:
        raise ValueError("this model has no APT applied")
    for module in undo["hooked"]:  # by function, not by handle: handles would point into the original of a copy
        for key, fn in list(module._forward_pre_hooks.items()):
            if fn in (_compute_gate, _insert_prompt, _open_forward):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        for key, fn in list(module._forward_hooks.items()):
            if fn is _close_forward:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        module.__dict__.pop("_apt_gate_of", None)
        module.__dict__.pop("_apt_adapter_of", None)
        module.__dict__.pop("_apt_prompt_of", None)
    for attn in undo["patched"]:
        del attn.forward
    for layer in undo["layers"]:
        _get(layer, undo["family"].attention).__dict__.pop("_apt_state", None)
    if model.__dict__.get("_apt_prompt") is not None:
        model.__dict__.pop("_apt_prompt")
    del model.apt_adapter
    if undo["attn"] != model.config._attn_implementation:
        model.set_attn_implementation(undo["attn"])
    for config, implementation in undo.get("configs", ()):
        config._attn_implementation = implementation
    for n, p in model.named_parameters():
        p.requires_grad_(undo["requires_grad"].get(n, p.requires_grad))
    return wrapper


class SoftPrompt(nn.Module):
    """P trainable input embeddings prepended to every sequence (prompt tuning, Lester et al.)."""

    def __init__(self, prefix_len: int, hidden: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(prefix_len, hidden) * 0.02)


def apply_prompt_tuning(model: nn.Module, prefix_len: int = 16, *, train_head: bool = True) -> nn.Module:
    """Input-layer soft prompt tuning: P trainable embeddings prepended to the input embeddings.

    The model is called as usual (input_ids, attention_mask, labels); the prompt is inserted through
    a pre-hook on the base model, and the attention mask is extended to cover it. For token-level
    outputs (language modelling, token classification) the logits gain P leading positions, and those heads'
    ``labels`` (the inputs' length) gain P leading -100s (no loss on the prompt), as PEFT's prompt tuning
    does. Heads that read positions of the input (question answering; a decoder's sequence classification,
    which pools the last non-pad token found from ``input_ids``) are refused. ``generate()``, a KV cache and explicit ``position_ids`` are refused: the prompt would be inserted
    again at every decoding step (use :func:`apply_prefix_tuning` or :func:`apply_apt`, whose prefixes stay
    out of the cache).
    """
    wrapper, model = model, _unwrap(model)
    model_type, fam = _family(model, "apply_prompt_tuning")
    _check_not_applied(model)
    prefix_len = _check_prefix_len(prefix_len)
    head = type(model).__name__
    if head.endswith("ForQuestionAnswering") or (fam.causal and head.endswith("ForSequenceClassification")):
        # their heads index positions of the input (answer spans; a decoder's last non-pad token from input_ids),
        # which the prompt shifts by P: refused rather than silently reading the wrong positions
        raise ValueError(f"apply_prompt_tuning does not support {head}: its head reads positions of the input, "
                         "which the prompt would shift; use apply_prefix_tuning or apply_apt")
    token_level = head.endswith(("ForCausalLM", "LMHeadModel", "ForTokenClassification", "ForMaskedLM"))
    hidden = model.config.hidden_size
    prompt = SoftPrompt(prefix_len, hidden).to(next(model.parameters()).device)
    saved_grad = _freeze_backbone(model, train_head)
    model.apt_adapter = prompt
    base = model.base_model
    base.__dict__["_apt_prompt_of"] = {"prompt": prompt, "embed": model.get_input_embeddings()}
    base.register_forward_pre_hook(_insert_prompt, with_kwargs=True)
    hooked = [base]
    if model is not base and token_level:  # a token-level head: its labels need the prompt's -100s
        model.__dict__["_apt_prompt_of"] = {"prompt": prompt, "labels_only": True}
        model.register_forward_pre_hook(_insert_prompt, with_kwargs=True)
        hooked.append(model)
    model.__dict__["_apt_undo"] = {"hooked": hooked, "patched": [], "attn": model.config._attn_implementation,
                                   "requires_grad": saved_grad, "layers": [], "family": fam}
    model.__dict__["_apt_prompt"] = prompt
    return wrapper


def _position_limit(config) -> int | None:
    """How many positions a model's learned absolute position embeddings hold (RoBERTa's start after the
    padding index); None for rotary (Llama, Qwen2, Mistral) or relative-only (DeBERTa-v2) positions."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("llama", "qwen2", "mistral") or (model_type == "deberta-v2" and
                                                       not getattr(config, "position_biased_input", True)):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if model_type in ("roberta", "xlm-roberta"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def _insert_prompt(module: nn.Module, args, kwargs):
    """Forward pre-hook of apply_prompt_tuning: on the base model, the prompt's embeddings before the inputs'
    (and ones / zeros before the attention mask / token types); on a task-head model, -100 before token-level
    labels. Everything is found from ``module`` (a deep copy of the model uses its own prompt)."""
    of = module.__dict__["_apt_prompt_of"]
    P = of["prompt"].embedding.shape[0]
    kwargs = dict(kwargs)
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if of.get("labels_only"):
        labels = kwargs.get("labels")
        inputs = ids if ids is not None else kwargs.get("inputs_embeds")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and inputs is not None and \
                labels.shape[1] == inputs.shape[1]:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], P), -100), labels], 1)
        return args, kwargs
    for name in ("past_key_values", "position_ids"):  # generate() passes both (a cache from the first step)
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"apply_prompt_tuning: {name} is not supported (generate() and KV caches "
                                      "would insert the prompt at every step); use apply_prefix_tuning or "
                                      "apply_apt, whose prefixes stay out of the cache")
    if ids is not None and "input_ids" not in kwargs:
        args = args[1:]
    kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = of["embed"](ids)
    B = embeds.shape[0]
    limit = _position_limit(getattr(module, "config", None))
    if limit is not None and embeds.shape[1] + P > limit:
        raise ValueError(f"apply_prompt_tuning: {embeds.shape[1]} tokens and the {P}-token prompt make "
                         f"{embeds.shape[1] + P} positions, more than the model's {limit} position embeddings")
    p = of["prompt"].embedding.to(embeds.dtype)[None].expand(B, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([p, embeds], 1)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], 1)
    if "token_type_ids" in kwargs and kwargs["token_type_ids"] is not None:
        tt = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, P), tt], 1)
    return args, kwargs


# ---------------------------------------------------------------------------------------------
# adapters on disk

CONFIG_NAME = "apt_config.json"
WEIGHTS_NAME = "apt_adapter.safetensors"


def _head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    head = {id(p) for p in task_head(model) or ()}
    return {n: p.detach() for n, p in model.named_parameters() if id(p) in head and not n.startswith("apt_adapter.")}


def _apt_applied(model: nn.Module) -> dict:
    """The undo record of apply_apt / apply_prefix_tuning, or an error saying what the model has instead."""
    undo = _unwrap(model, peft=True).__dict__.get("_apt_undo")
    if undo is None:
        raise ValueError("this model has no APT applied")
    if not isinstance(getattr(model, "apt_adapter", None), APTAdapter):
        raise ValueError("this model has prompt tuning (apply_prompt_tuning), not APT or prefix tuning: save it "
                         "with model.apt_adapter.state_dict()")
    return undo


def save_apt(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the APT parameters (and the trained head) as safetensors, plus a config JSON."""
    from safetensors.torch import save_file

    model = _unwrap(model, peft=True)
    _apt_applied(model)
    adapter: APTAdapter = model.apt_adapter
    os.makedirs(path, exist_ok=True)
    tensors = {f"apt.{n}": p.detach().contiguous() for n, p in adapter.named_parameters()}
    if adapter.cfg.train_head:
        tensors.update({f"head.{n}": t.contiguous() for n, t in _head_state(model).items()})
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(dataclasses.asdict(adapter.cfg), f, indent=2)


def load_apt(base_model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Apply APT to ``base_model`` with the saved config and load the saved parameters (exactly).

    ``backend`` overrides the saved one (an adapter trained with ``backend="triton"`` on a GPU, used on a
    CPU). A saved tensor whose shape does not fit the model is named in the error, and the model is left
    as it was (the APT applied for the load is removed again).
    """
    from safetensors.torch import load_file

    wrapper, base_model = base_model, _unwrap(base_model)
    with open(os.path.join(path, CONFIG_NAME)) as f:
        cfg = APTConfig(**json.load(f))
    if not cfg.reparam_hidden:  # adapters saved before reparam_hidden=0 was refused: 0 meant none
        cfg.reparam_hidden = None
    model_type, _ = _family(base_model, "load_apt")
    if cfg.family and cfg.family != model_type:
        raise ValueError(f"the adapter at {path} was trained on {cfg.family}, not {model_type}")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    model = apply_apt(base_model, cfg.prefix_len, token_gate=cfg.token_gate, layer_gate=cfg.layer_gate,
                      pool=cfg.pool, reparam_hidden=cfg.reparam_hidden, train_head=cfg.train_head,
                      backend=cfg.backend if backend is None else backend)
    try:
        adapter_params = dict(model.apt_adapter.named_parameters())
        params = dict(model.named_parameters())
        pairs = []  # (the model's parameter, the saved tensor), all checked before any is copied
        for n, t in tensors.items():
            kind, name = n.split(".", 1)
            target = adapter_params.get(name) if kind == "apt" else params.get(name) if kind == "head" else None
            pairs.append((target, t))
            if target is None:
                raise ValueError(f"the adapter at {path} holds {n!r}, which this model has no parameter for")
            if target.shape != t.shape:
                raise ValueError(f"the adapter at {path} holds {n!r} of shape {tuple(t.shape)}; this model's is "
                                 f"{tuple(target.shape)} (another model size or number of labels?)")
        missing = sorted(set(adapter_params) - {n[len("apt."):] for n in tensors if n.startswith("apt.")})
        if missing:
            raise ValueError(f"the adapter at {path} lacks {missing}")
        with torch.no_grad():
            for target, t in pairs:
                target.copy_(t)
    except Exception:
        remove_apt(model)
        raise
    return wrapper


# ---------------------------------------------------------------------------------------------
# probing


@torch.no_grad()
def gate_report(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mean gate values of one batch, as the paper probes them.

    Returns ``{"layer": (L,), "layer_prefix": (L, P)}``: the gate (lambda_i * alpha) averaged over
    examples, real (non-padded) positions and, for "layer", the prefix tokens too.
    """
    model = _unwrap(model, peft=True)  # (run eagerly: the probe's hooks are not for a compiled graph)
    undo = _apt_applied(model)
    adapter: APTAdapter = model.apt_adapter
    keep = batch.get("attention_mask")
    keep = keep.bool() if isinstance(keep, torch.Tensor) and keep.dim() == 2 else None
    rows: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(undo["layers"]):
        def grab(module, args, kwargs, i=i):  # runs after the gate source's hook has left the layer's gate
            g = module.__dict__["_apt_state"].get("gate")
            h = args[0] if args else kwargs["hidden_states"]
            if g is None:
                g = torch.ones(h.shape[0], 1, 1, adapter.cfg.prefix_len, device=h.device)
            g = g.float().expand(h.shape[0], 1, g.shape[2], -1)[:, 0]  # (B, N|1, P)
            if g.shape[1] > 1 and keep is not None:
                w = keep[:, -g.shape[1]:].float()[..., None].to(g.device)
                rows[i] = (g * w).sum((0, 1)) / w.sum((0, 1)).clamp_min(1.0)
            else:
                rows[i] = g.mean((0, 1))
        hooks.append(_get(layer, undo["family"].attention).register_forward_pre_hook(grab, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(**batch)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    per_prefix = torch.stack([rows[i] for i in range(len(rows))]).cpu()
    return {"layer": per_prefix.mean(1), "layer_prefix": per_prefix}
