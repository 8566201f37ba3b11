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


def float_of_key(ukey: int) -> float:
    """The float32 value whose :func:`ordered_key` is ``ukey - 2**31`` (the unsigned form the radix
    selects work with): the inverse map, for the value a selection ends on."""
    key = ukey - 2 ** 31
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


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


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` for float32 tensors, rounded once to float32, exactly as ``fma.rn.f32`` (what
    ``tl.fma`` and ``__fmaf_rn`` compute). PyTorch has no fused multiply-add it guarantees, so this
    works in float64: the product of two float32 values is exact there; TwoSum gives the exact error
    of the float64 sum; rounding that sum *to odd* (the neighbour with an odd last bit whenever it is
    inexact) and then to float32 equals rounding ``a * b + c`` once (Boldo & Melquiond, "Emulation of
    FMA and correctly rounded sums: proved algorithms using rounding to odd", 2008: 53 >= 24 + 2 bits).
    """
    a, b, c = (t.to(torch.float64) for t in torch.broadcast_tensors(a, b, c))
    p = a * b  # exact: 24 + 24 significant bits
    s = p + c
    z = s - p
    e = (p - (s - z)) + (c - z)  # p + c == s + e exactly (TwoSum; no overflow at float32 magnitudes)
    odd = (s.view(torch.int64) & 1) == 1
    fix = (e != 0) & ~odd & torch.isfinite(s)
    s = torch.where(fix, torch.nextafter(s, torch.where(e > 0, math.inf, -math.inf)), s)
    return s.to(torch.float32)


def fused_order_scores(w0, u, v, a, b, r, c, beta, alpha1, alpha2):
    """(W, S) in float32, evaluated in the fused kernels' order (Triton and CUDA C++ backends).

    Every step is one float32 fused multiply-add rounded once to nearest (:func:`fma32`), or one
    float32 addition:

        uv = 0;  for j in 0..rw-1:  uv = fma(U[i, j], V[j, c], uv)          (sequential in j)
        ab = 0;  for j in 0..rs-1:  ab = fma(A[i, j], B[j, c], ab)
        W  = fma(beta, uv, W0)
        S  = fma(alpha2, R[i] + C[c], fma(alpha1, ab, |W|))

    The reference computes ``U @ V`` and ``A @ B`` with a matrix product whose summation order is the
    library's, so its scores can differ from these in the last bits; where the products are exact
    (e.g. ``V = B = 0`` at initialisation, R = C = 0) both give the same bits, hence the same mask.
    """
    f = torch.float32
    w = w0.to(f)
    uv = torch.zeros(w.shape, dtype=f, device=w.device)
    for j in range(u.shape[1]):
        uv = fma32(u[:, j:j + 1].to(f), v[j:j + 1, :].to(f), uv)
    ab = torch.zeros(w.shape, dtype=f, device=w.device)
    for j in range(a.shape[1]):
        ab = fma32(a[:, j:j + 1].to(f), b[j:j + 1, :].to(f), ab)
    scalar = lambda x: torch.tensor(float(x), dtype=f, device=w.device)  # noqa: E731
    w = fma32(scalar(beta), uv, w)
    s = fma32(scalar(alpha1), ab, w.abs())
    s = fma32(scalar(alpha2), r.to(f)[:, None] + c.to(f)[None, :], s)
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
