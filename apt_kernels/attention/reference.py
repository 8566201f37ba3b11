"""The reference gated-prefix attention: the spec written as plain PyTorch.

Arguments arrive normalised by :func:`apt_kernels.gated_prefix_attention`:
q (B,Hq,N,D); k, v (B,Hkv,M,D); prefix_k/prefix_v None or 4-D (1 or B, Hkv, P, D) with P >= 1;
gate None or 4-D broadcastable to (B,Hq,N,P); attn_mask None or 4-D broadcastable to (B,Hq,N,M),
either bool (True = attend) or additive float.

Matrix products run in the input dtype; scores, softmax and lse in float32 (float64 for float64
inputs), as Hugging Face's eager attention does; lse comes back in that score dtype. In float64 it is the ground truth the kernels are
checked against; in a half dtype its error is "PyTorch's own error" that sets their error budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def additive_mask(attn_mask: torch.Tensor | None, causal: bool, n: int, m: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """The token-column mask as an additive 4-D tensor in ``dtype`` (-inf = hidden), or None.

    A float mask entry at or below its dtype's most negative finite value counts as masked (-inf),
    so Hugging Face's ``finfo.min`` masks hide keys exactly. Other entries are added as they are; one
    beyond ``dtype``'s range (-1e9 of a float32 mask for half-precision scores) saturates to its largest
    finite value instead of becoming an infinity (which would hide the key: a row of -1e9 is uniform
    attention, not an empty row).
    """
    out = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            out = torch.zeros((), dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf"))
        else:
            lowest = torch.finfo(attn_mask.dtype).min
            out = attn_mask
            if torch.finfo(dtype).max < torch.finfo(attn_mask.dtype).max:
                out = out.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
            out = out.to(dtype).masked_fill(attn_mask <= lowest, float("-inf"))
    if causal:
        i = torch.arange(n, device=device)[:, None]
        t = torch.arange(m, device=device)[None, :]
        hidden = torch.zeros((n, m), dtype=dtype, device=device).masked_fill(t > i + (m - n), float("-inf"))
        out = hidden if out is None else out + hidden
    return out


def masked_softmax(s: torch.Tensor):
    """softmax and logsumexp over the last dim; a row of all -inf gives probabilities 0 and lse -inf.

    Written so that such rows produce no NaN in the backward either.
    """
    if s.shape[-1] == 0:  # no key columns at all (M == 0, P == 0)
        m = s.new_full(s.shape[:-1] + (1,), float("-inf"))
    else:
        m = s.amax(-1, keepdim=True).detach()
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), m + torch.log(safe))
    return e / safe, lse.squeeze(-1)


def reference_attention(q, k, v, prefix_k, prefix_v, gate, attn_mask, causal, scale, dropout_p, return_lse):
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    sd = score_dtype(q.dtype)

    k_h = k.repeat_interleave(rep, dim=1)  # (B, Hq, M, D): query head h reads kv head h // rep
    v_h = v.repeat_interleave(rep, dim=1)
    s_tok = (q @ k_h.transpose(-1, -2)).to(sd) * scale
    mask = additive_mask(attn_mask, causal, N, M, sd, q.device)
    if mask is not None:
        s_tok = s_tok + mask

    if prefix_k is None:
        a, lse = masked_softmax(s_tok)
        if dropout_p > 0:
            a = F.dropout(a, dropout_p)
        out = a.to(v.dtype) @ v_h
    else:
        P = prefix_k.shape[2]
        g = torch.ones((), dtype=sd, device=q.device) if gate is None else gate.to(sd)
        pk_h = prefix_k.repeat_interleave(rep, dim=1)  # (1 or B, Hq, P, D)
        pv_h = prefix_v.repeat_interleave(rep, dim=1)
        s_pre = (q @ pk_h.transpose(-1, -2)).to(sd) * scale * g
        a, lse = masked_softmax(torch.cat([s_pre, s_tok], dim=-1))
        if dropout_p > 0:
            a = F.dropout(a, dropout_p)
        a_pre, a_tok = a[..., :P], a[..., P:]
        out = (a_pre * g).to(v.dtype) @ pv_h + a_tok.to(v.dtype) @ v_h
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
