"""PST reference: importance scores, exact top-k mask and the straight-through backward, in plain PyTorch.

Scores are computed in float32 (float64 when any input is float64), whatever the weight's dtype.
"""

from __future__ import annotations

import math

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def n_pruned(numel: int, sparsity: float) -> int:
    """floor(numel * sparsity), the number of weights set to zero (evaluated in float64, as written)."""
    return int(math.floor(numel * sparsity))


def dense_weight(w0, u, v, beta, dtype):
    """W = W0 + beta * U @ V in ``dtype``."""
    return w0.to(dtype) + beta * (u.to(dtype) @ v.to(dtype))


def scores_from_weight(w, a, b, r, c, alpha1, alpha2):
    """S = |W| + alpha1 * A @ B + alpha2 * (R[:, None] + C[None, :])."""
    dt = w.dtype
    return w.abs() + alpha1 * (a.to(dt) @ b.to(dt)) + alpha2 * (r.to(dt)[:, None] + c.to(dt)[None, :])


def ordered_key(s: torch.Tensor) -> torch.Tensor:
    """Map float scores to integers with the same order, so ties are exact and selection sort-free.

    -0.0 and +0.0 map to one key (they compare equal), every NaN to one key above +inf (NaN scores
    count as the largest: they are kept, and W' shows the NaN). Radix-select kernels use the same map.
    """
    s = torch.where(torch.isnan(s), torch.full_like(s, float("nan")).abs(), s) + 0.0  # canonical +NaN, -0 -> +0
    if s.dtype == torch.float64:
        bits, top = s.view(torch.int64), (1 << 63) - 1
        sign = bits >> 63
    else:
        bits, top = s.to(torch.float32).view(torch.int32), (1 << 31) - 1
        sign = bits >> 31
    return bits ^ (sign & top)


def reference_keep_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k smallest scores; among equal scores the smaller flat (row-major) index goes first."""
    flat = s.reshape(-1)
    order = torch.sort(ordered_key(flat), stable=True).indices
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=s.device)
    keep[order[:k]] = False
    return keep.view(s.shape)


def reference_nm_keep_mask(s: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """N:M: in every group of M consecutive entries of a row, keep the N largest scores.

    Among equal scores the smaller index is pruned first (a stable sort of each group).
    """
    keep_n, m = nm
    rows, k = s.shape
    keys = ordered_key(s.reshape(rows, k // m, m))
    order = torch.sort(keys, dim=-1, stable=True).indices
    keep = torch.ones_like(keys, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - keep_n], False)
    return keep.view(rows, k)


def reference_forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, k, nm=None):
    """(W', keep mask) per the spec, with a stable sort for the selection (per group of M with ``nm``)."""
    dt = compute_dtype(w0, u, v, a, b, r, c)
    w = dense_weight(w0, u, v, beta, dt)
    s = scores_from_weight(w, a, b, r, c, alpha1, alpha2)
    keep = reference_keep_mask(s, k) if nm is None else reference_nm_keep_mask(s, nm)
    return (w * keep).to(w0.dtype), keep


def fused_order_scores(w0, u, v, a, b, r, c, beta, alpha1, alpha2):
    """(W, S) in float32, evaluated in the fused kernels' order (Triton and CUDA C++ backends).

    Every operation is one IEEE float32 operation rounded to nearest (no fused multiply-add):

        uv = 0;  for j in 0..rw-1:  uv = uv + U[i, j] * V[j, c]          (sequential in j)
        ab = 0;  for j in 0..rs-1:  ab = ab + A[i, j] * B[j, c]
        W  = W0 + beta * uv
        S  = (|W| + alpha1 * ab) + alpha2 * (R[i] + C[c])

    The reference computes ``U @ V`` and ``A @ B`` with a matrix product whose summation order is the
    library's, so its scores can differ from these in the last bits; where the products are exact
    (e.g. ``V = B = 0`` at initialisation, R = C = 0) both give the same bits, hence the same mask.
    """
    f = torch.float32
    w = w0.to(f)
    uv = torch.zeros(w.shape, dtype=f, device=w.device)
    for j in range(u.shape[1]):
        uv = uv + u[:, j:j + 1].to(f) * v[j:j + 1, :].to(f)
    ab = torch.zeros(w.shape, dtype=f, device=w.device)
    for j in range(a.shape[1]):
        ab = ab + a[:, j:j + 1].to(f) * b[j:j + 1, :].to(f)
    w = w + beta * uv
    s = w.abs() + alpha1 * ab
    s = s + alpha2 * (r.to(f)[:, None] + c.to(f)[None, :])
    return w, s


def ste_backward(grad, keep, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    """Straight-through gradients (dW0, dU, dV, dA, dB, dR, dC) from G = dL/dW'; None where not needed.

        dS = G * W;  dA = a1 dS B^T;  dB = a1 A^T dS;  dR = a2 dS.sum(1);  dC = a2 dS.sum(0)
        dW = M * G + sign(W) * dS = (M + |W|) * G;  dU = beta dW V^T;  dV = beta U^T dW
    """
    dt = compute_dtype(w0, u, v, a, b)
    w = dense_weight(w0, u, v, beta, dt)
    g = grad.to(dt)
    ds = g * w
    dw = (keep + w.abs()) * g
    out = [dw if needs[0] else None,
           beta * (dw @ v.to(dt).T) if needs[1] else None,
           beta * (u.to(dt).T @ dw) if needs[2] else None,
           alpha1 * (ds @ b.to(dt).T) if needs[3] else None,
           alpha1 * (a.to(dt).T @ ds) if needs[4] else None,
           alpha2 * ds.sum(1) if needs[5] else None,
           alpha2 * ds.sum(0) if needs[6] else None]
    return out
