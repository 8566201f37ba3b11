"""The "torch" backend: the fastest composite of stock PyTorch ops (the CPU default).

When the gate does not vary along the query axis (None, (B,1,1,P), (1,Hq,1,P), ...), the gate folds
into the prefix: the prefix keys and values are scaled by the gate, concatenated in front of the
token keys/values, and one call to ``F.scaled_dot_product_attention`` does the rest (SDPA's fused
CPU/GPU kernels, GQA through ``enable_gqa`` when the gate is shared by heads). A per-token gate
(varying along N) cannot fold into keys: it takes an explicit-matmul path, the reference's math
with the query heads of a key/value head stacked along N (no copy of K and V per query head) and
a fused softmax (a prefix column is always visible, so no row is empty). SDPA does not return the
logsumexp: ``return_lse=True`` takes the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import additive_mask, reference_attention, score_dtype


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _shift_rows(mask: torch.Tensor) -> torch.Tensor:
    """A float mask minus each row's largest unmasked value (softmax is unchanged by a per-row constant when
    every column is a token column, P == 0): large finite values (a float32 mask of -1e9 with half-precision
    scores) keep their differences in q's dtype, and a row of equal ones stays uniform."""
    lowest = torch.finfo(mask.dtype).min
    masked = mask <= lowest
    top = mask.masked_fill(masked, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return (mask - top).masked_fill(masked, float("-inf"))


def _per_token_gate_attention(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p):
    """The reference's math (scores and softmax in float32, float64 for float64) for a gate varying along N."""
    B, Hq, N, D = q.shape
    Hkv, M, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    rep = Hq // Hkv
    sd = score_dtype(q.dtype)
    qg = q.reshape(B, Hkv, rep * N, D)  # query head h = kv head h // rep: its rows follow its group's
    s_tok = (qg @ k.transpose(-1, -2)).view(B, Hq, N, M).to(sd) * scale
    mask = additive_mask(attn_mask, causal, N, M, sd, q.device)
    if mask is not None:
        s_tok = s_tok + mask
    g = gate.to(sd)
    s_pre = (qg @ prefix_k.transpose(-1, -2)).view(B, Hq, N, P).to(sd) * scale * g
    a = torch.softmax(torch.cat([s_pre, s_tok], dim=-1), dim=-1)
    if dropout_p > 0:
        a = F.dropout(a, dropout_p)
    a_pre = (a[..., :P] * g).to(v.dtype).reshape(B, Hkv, rep * N, P)
    a_tok = a[..., P:].to(v.dtype).reshape(B, Hkv, rep * N, M)
    return (a_pre @ prefix_v + a_tok @ v).view(B, Hq, N, D).to(q.dtype)


def torch_attention(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, return_lse):
    per_token_gate = gate is not None and gate.shape[2] != 1
    if return_lse or q.numel() == 0 or k.shape[2] + (0 if prefix_k is None else prefix_k.shape[2]) == 0:
        return reference_attention(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, return_lse)
    if per_token_gate:
        return _per_token_gate_attention(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p)

    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    # A gate that differs per query head makes the gated prefix differ per query head.
    heads = Hq if gate is not None and gate.shape[1] != 1 else Hkv
    if prefix_k is None and attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = _shift_rows(attn_mask)
    mask = additive_mask(attn_mask, causal, N, M, q.dtype, q.device)
    if prefix_k is not None:
        P = prefix_k.shape[2]
        pk, pv = _expand_heads(prefix_k, heads), _expand_heads(prefix_v, heads)
        if gate is not None:
            g = gate[:, :, 0, :, None].to(q.dtype)  # (1|B, 1|Hq, P, 1)
            pk, pv = pk * g, pv * g
        pk, pv = pk.expand(B, heads, P, D), pv.expand(B, heads, P, D)
        k = torch.cat([pk, _expand_heads(k, heads)], dim=2)
        v = torch.cat([pv, _expand_heads(v, heads)], dim=2)
        if mask is not None:  # prefix columns are always visible
            mask = torch.cat([mask.new_zeros(mask.shape[:-1] + (P,)).expand(*mask.shape[:-1], P), mask], dim=-1)
    else:
        k, v = _expand_heads(k, heads), _expand_heads(v, heads)

    dead = None
    if mask is not None and prefix_k is None:
        # Rows with no visible key: SDPA would return NaN. Open one column so it computes finite
        # numbers (and finite gradients), then return 0 there as the spec says. (Always, without asking
        # whether there are any: that would sync with a GPU and break torch.compile(fullgraph=True).)
        dead = (mask == float("-inf")).all(-1, keepdim=True)
        first = torch.arange(mask.shape[-1], device=mask.device) == 0
        mask = mask.masked_fill(dead & first, 0.0)

    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=heads != Hq)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    # PyTorch's CPU SDPA kernels return 0 for a query row holding a NaN: it must propagate (docs/math.md)
    return out.masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))
