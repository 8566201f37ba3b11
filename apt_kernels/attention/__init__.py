"""Gated-prefix attention (the Adaptive Prefix Tuning op). Math: docs/math.md, section 1."""

from __future__ import annotations

import torch

from .. import _validate as V
from ..registry import Probe, registry
from .composite import torch_attention
from .reference import reference_attention

OP = "gated_prefix_attention"
REGISTRY = registry(OP)
REGISTRY.register("reference")(reference_attention)
REGISTRY.register("torch")(torch_attention)


def _triton_supports(probe):
    if probe.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes float16/bfloat16/float32, not {str(probe.dtype).replace('torch.', '')}"
    if "head_dim>256" in probe.features:
        return "the Triton kernel takes head dims up to 256"
    if "mask_grad" in probe.features and "dropout" in probe.features:
        return "the Triton kernels give no attn_mask gradient with dropout (the mask requires grad)"
    return None


@REGISTRY.register("triton", _triton_supports)
def _triton_attention(*args):
    from .fused import triton_attention  # imports triton: only once the registry said it can run

    return triton_attention(*args)


def _autocast(dtype, *tensors):
    """Floating tensors other than float64 in ``dtype``, as autocast casts an op's inputs (under
    ``torch.autocast`` Hugging Face's rotary embeddings return float32 q and k beside a bf16 v)."""
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            else t for t in tensors]


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``. CUDA and CPU always have autocast; other device types are
    asked first whether they have it at all (meta has not: is_autocast_enabled would raise). Dynamo before
    torch 2.13 cannot trace that question (torch 2.11 fails torch.compile(fullgraph=True) on it), so the
    usual devices skip it."""
    return ((device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type))
            and torch.is_autocast_enabled(device_type))


def _normalise_mask(attn_mask, B, Hq, N, M, q):
    if attn_mask is None:
        return None
    V.tensor("attn_mask", attn_mask, dtypes=None, like=q, like_name="q")
    if attn_mask.dtype == torch.bool:
        if attn_mask.dim() == 2:  # (B, M) keep-mask
            if tuple(attn_mask.shape) != (B, M):
                raise ValueError(f"a 2-D bool attn_mask must be (B, M) = ({B}, {M}), got {V.shape(attn_mask)}")
            return attn_mask.view(B, 1, 1, M)
    elif not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
    V.broadcastable("attn_mask", attn_mask, (B, Hq, N, M), "(B, Hq, N, M) =")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def gated_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, gate=None, *, attn_mask=None,
                           causal=False, scale=None, dropout_p=0.0, return_lse=False, backend="auto"):
    """Attention over a gated prefix followed by the tokens' own keys.

    For query row (b, h, i), kv head g = h // (Hq / Hkv) and gate value G_j = gate[b, h, i, j]::

        s_pre[j] = scale * G_j * <q, prefix_k[g, j]>        (j < P, always visible)
        s_tok[t] = scale * <q, k[g, t]> + mask[t]            (-inf where masked or causally hidden)
        a        = softmax(concat(s_pre, s_tok))
        out      = sum_j a_pre[j] * G_j * prefix_v[g, j] + sum_t a_tok[t] * v[g, t]

    Args:
        q: (B, Hq, N, D). k, v: (B, Hkv, M, D) with Hq % Hkv == 0 (grouped-query attention).
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch, or (B, Hkv, P, D) per example; both or
            neither. None or P == 0 is plain attention (equal to ``F.scaled_dot_product_attention``).
        gate: None (all ones) or a float tensor broadcastable to (B, Hq, N, P): (B,1,1,P) per example,
            (B,1,N,P) per token, (1,Hq,1,P) per head, ... It multiplies the prefix scores *and* values.
        attn_mask: None; a bool keep-mask (B, M) or bool tensor broadcastable to (B, Hq, N, M)
            (True = attend); or an additive float mask broadcastable to (B, Hq, N, M), where entries
            at the dtype's minimum (Hugging Face's convention) or -inf hide the key. Masks token keys only.
        causal: token query i sees token key t iff t <= i + (M - N) (bottom-right aligned); the prefix
            stays visible to every query.
        scale: score scale, default D ** -0.5.
        dropout_p: probability of dropping attention weights (prefix and token columns alike), applied
            whenever > 0, as in ``F.scaled_dot_product_attention``: pass 0.0 at evaluation.
        return_lse: also return the logsumexp of each row's scores, (B, Hq, N), float32 (float64 for
            float64 inputs).
        backend: "auto", "reference", "torch", "triton" or "cuda" (see ``python -m apt_kernels``).

    Returns:
        out (B, Hq, N, D) in q's dtype, or (out, lse). A row that sees no key at all (P == 0 and every
        token masked) gives out = 0 and lse = -inf, never NaN. NaN in any input propagates to the
        rows it touches; it is never hidden. Under ``torch.autocast`` q, k, v and the prefix run in the
        autocast dtype, as in ``F.scaled_dot_product_attention`` (the gate and a float mask keep theirs).

    Example:
        >>> import torch, apt_kernels
        >>> q = torch.randn(2, 4, 8, 16); k = v = torch.randn(2, 2, 8, 16)
        >>> pk = pv = torch.randn(2, 3, 16)                   # shared prefix, P = 3
        >>> gate = torch.rand(2, 1, 1, 3)                      # APT per-example gate
        >>> apt_kernels.gated_prefix_attention(q, k, v, pk, pv, gate, causal=True).shape
        torch.Size([2, 4, 8, 16])
    """
    args = normalise_inputs(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p)
    q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p = args
    features = ("dropout" if dropout_p > 0 else "", "lse" if return_lse else "",
                "prefix" if prefix_k is not None else "", "gate" if gate is not None else "",
                "head_dim>256" if q.shape[-1] > 256 else "",
                "mask_grad" if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled() else "")
    _, fn = REGISTRY.select(backend, Probe.of(q, *features))
    return fn(*args, bool(return_lse))


def normalise_inputs(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p) -> tuple:
    """The checks of :func:`gated_prefix_attention` and its arguments as every backend takes them:
    ``(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p)`` in the autocast dtype, the
    prefix 4-D (None when P == 0), the gate and mask 4-D, the scale a float."""
    V.tensor("q", q, ndim=4)
    if _autocast_on(q.device.type):
        # as F.scaled_dot_product_attention: in the autocast dtype
        q, k, v, prefix_k, prefix_v = _autocast(torch.get_autocast_dtype(q.device.type), q, k, v, prefix_k, prefix_v)
    V.tensor("k", k, ndim=4, like=q, like_name="q")
    V.tensor("v", v, ndim=4, like=q, like_name="q")
    V.same_dtype(("q", "k", "v"), (q, k, v))
    B, Hq, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, M, D), got k {V.shape(k)}, v {V.shape(v)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {V.shape(k)} must be (B, Hkv, M, D) with B = {B} and D = {D} from q {V.shape(q)}")
    Hkv, M = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads Hq = {Hq} (q {V.shape(q)}) must be a multiple of kv heads "
                         f"Hkv = {Hkv} (k {V.shape(k)})")

    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None:
        V.tensor("prefix_k", prefix_k, ndim=(3, 4), like=q, like_name="q")
        V.tensor("prefix_v", prefix_v, ndim=(3, 4), like=q, like_name="q")
        V.same_dtype(("q", "prefix_k", "prefix_v"), (q, prefix_k, prefix_v))
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prefix_k {V.shape(prefix_k)} and prefix_v {V.shape(prefix_v)} must have the same shape")
        pk4 = prefix_k if prefix_k.dim() == 4 else prefix_k[None]
        if pk4.shape[0] not in (1, B) or pk4.shape[1] != Hkv or pk4.shape[3] != D:
            raise ValueError(f"prefix_k {V.shape(prefix_k)} must be (Hkv, P, D) = ({Hkv}, P, {D}) or "
                             f"(B, Hkv, P, D) = ({B}, {Hkv}, P, {D})")
        P = pk4.shape[2]
        if P == 0:
            prefix_k = prefix_v = None
        else:
            prefix_k, prefix_v = pk4, prefix_v if prefix_v.dim() == 4 else prefix_v[None]
    else:
        P = 0
    if gate is not None:
        V.tensor("gate", gate, like=q, like_name="q")
        V.broadcastable("gate", gate, (B, Hq, N, P), "(B, Hq, N, P) =")
        gate = None if not P else gate if gate.dim() == 4 else gate.reshape((1,) * (4 - gate.dim()) + tuple(gate.shape))
    attn_mask = _normalise_mask(attn_mask, B, Hq, N, M, q)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = D ** -0.5 if scale is None else V.number("scale", scale)
    dropout_p = V.number("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    return q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p
