"""PST: low-rank importance scoring, exact top-k selection and masked weights. Math: docs/math.md, section 3."""

from __future__ import annotations

import torch

from .. import _validate as V
from ..registry import Probe, registry
from .composite import torch_forward
from .reference import compute_dtype, dense_weight, n_pruned, reference_forward, scores_from_weight, ste_backward

OP = "pst_masked_weight"
REGISTRY = registry(OP)
REGISTRY.register("reference")(reference_forward)
REGISTRY.register("torch")(torch_forward)

_NAMES = ("w0", "u", "v", "a", "b", "r", "c")


def _check(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2):
    V.tensor("w0", w0, ndim=2)
    n, k = w0.shape
    for name, t, nd in zip(_NAMES[1:], (u, v, a, b, r, c), (2, 2, 2, 2, 1, 1)):
        V.tensor(name, t, ndim=nd, like=w0, like_name="w0")
    rw, rs = u.shape[1], a.shape[1]
    want = {"u": (n, rw), "v": (rw, k), "a": (n, rs), "b": (rs, k), "r": (n,), "c": (k,)}
    for name, t in zip(_NAMES[1:], (u, v, a, b, r, c)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]} for w0 {V.shape(w0)} "
                             f"(u {V.shape(u)}, a {V.shape(a)}), got {V.shape(t)}")
    sparsity = V.number("sparsity", sparsity, lo=0.0, hi=1.0, hi_open=True)
    return (sparsity, V.number("beta", beta), V.number("alpha1", alpha1), V.number("alpha2", alpha2))


class _PSTMaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, beta, alpha1, alpha2, k, w0, u, v, a, b, r, c):
        w_prime, keep = fn(w0, u, v, a, b, r, c, beta, alpha1, alpha2, k)
        ctx.save_for_backward(keep, w0, u, v, a, b, r, c)
        ctx.consts = (beta, alpha1, alpha2)
        ctx.mark_non_differentiable(keep)
        return w_prime, keep

    @staticmethod
    def backward(ctx, grad, _grad_keep):
        keep, w0, u, v, a, b, r, c = ctx.saved_tensors
        grads = ste_backward(grad, keep, w0, u, v, a, b, *ctx.consts, ctx.needs_input_grad[5:])
        return (None,) * 5 + tuple(None if g is None else g.to(t.dtype)
                                   for g, t in zip(grads, (w0, u, v, a, b, r, c)))


def _run(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, backend):
    sparsity, beta, alpha1, alpha2 = _check(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2)
    _, fn = REGISTRY.select(backend, Probe.of(w0))
    k = n_pruned(w0.numel(), sparsity)
    return _PSTMaskedWeight.apply(fn, beta, alpha1, alpha2, k, w0, u, v, a, b, r, c)


def pst_masked_weight(w0, u, v, a, b, r, c, *, sparsity, beta=1.0, alpha1=1.0, alpha2=1.0, backend="auto"):
    """The pruned weight W' = M * (W0 + beta U V), with the straight-through backward.

    Scores S = |W| + alpha1 A B + alpha2 (R[:, None] + C[None, :]) pick the mask M: exactly
    floor(n k sparsity) weights with the smallest scores are zeroed (ties: the smaller row-major
    index goes first). The backward passes gradients to U, V, A, B, R, C (and to W0 if it
    requires grad) as if the mask were the identity in S: dS = G * W, dW = (M + |W|) * G.

    Args:
        w0: frozen weight (n, k), any float dtype. u (n, rw), v (rw, k): low-rank weight update.
        a (n, rs), b (rs, k), r (n,), c (k,): score parameters. They may be float32 while w0 is bf16;
            scores are computed in float32 (float64 if any input is float64).
        sparsity: fraction of weights pruned, in [0, 1).
        beta, alpha1, alpha2: scalar weights of the update and score terms.
        backend: "auto", "reference", "torch", "triton" or "cuda".

    Returns:
        W' (n, k) in w0's dtype. NaN scores count as the largest (kept), so a NaN anywhere shows in W'.

    Example:
        >>> import torch, apt_kernels
        >>> n, k, r = 6, 5, 2
        >>> w0 = torch.randn(n, k); u = torch.randn(n, r); v = torch.zeros(r, k)
        >>> a = torch.randn(n, r); b = torch.zeros(r, k); rr = torch.zeros(n); c = torch.zeros(k)
        >>> w = apt_kernels.pst_masked_weight(w0, u, v, a, b, rr, c, sparsity=0.5)
        >>> int((w == 0).sum())
        15
    """
    return _run(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, backend)[0]


def pst_mask(w0, u, v, a, b, r, c, *, sparsity, beta=1.0, alpha1=1.0, alpha2=1.0, backend="auto"):
    """The bool keep-mask M (n, k) of :func:`pst_masked_weight` (True = kept)."""
    with torch.no_grad():
        return _run(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, backend)[1]


def pst_scores(w0, u, v, a, b, r, c, *, beta=1.0, alpha1=1.0, alpha2=1.0):
    """The dense importance scores S (n, k) in float32 (float64 if any input is), differentiable.

    For inspection and tests: the fused kernels never build this matrix.
    """
    _, beta, alpha1, alpha2 = _check(w0, u, v, a, b, r, c, 0.0, beta, alpha1, alpha2)
    w = dense_weight(w0, u, v, beta, compute_dtype(w0, u, v, a, b, r, c))
    return scores_from_weight(w, a, b, r, c, alpha1, alpha2)
