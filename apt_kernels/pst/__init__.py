"""PST: low-rank importance scoring, exact top-k selection and masked weights. Math: docs/math.md, section 3.

Backends (docs/pst.md): "reference" (stable sort), "torch" (kthvalue), "triton" (fused scores, radix
select, masked weight + bitmask, fused backward) and "cuda" (the C++ extension's selection, mask and
backward passes). Every backend keeps the mask for the backward as a packed bitmask (:mod:`apt_kernels.bits`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .. import _validate as V
from .. import bits
from ..registry import Probe, registry
from .composite import torch_forward
from .reference import compute_dtype, dense_weight, n_pruned, reference_forward, scores_from_weight, ste_backward

OP = "pst_masked_weight"
REGISTRY = registry(OP)

_NAMES = ("w0", "u", "v", "a", "b", "r", "c")


@dataclasses.dataclass(frozen=True)
class PSTImpl:
    """One backend of the op: ``forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm)
    -> (W', packed keep bits)`` and ``backward(G, bits, w0, u, v, a, b, beta, alpha1, alpha2, needs)
    -> [dW0, dU, dV, dA, dB, dR, dC]`` (None where not needed)."""

    name: str
    forward: Callable
    backward: Callable


def _dense_forward(fn, pack_backend):
    def forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, k, nm=None):
        w_prime, keep = fn(w0, u, v, a, b, r, c, beta, alpha1, alpha2, k, nm)
        return w_prime, bits.pack_bits(keep, backend=pack_backend)

    return forward


def _dense_backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    keep = bits.unpack_bits(words, w0.shape)
    return ste_backward(grad, keep, w0, u, v, a, b, beta, alpha1, alpha2, needs)


def _triton_forward(*args):
    from . import triton_pst

    return triton_pst.forward(*args)


def _triton_backward(*args):
    from . import triton_pst

    return triton_pst.backward(*args)


def _cuda_forward(*args):
    from . import cuda_pst

    return cuda_pst.forward(*args)


def _cuda_backward(*args):
    from . import cuda_pst

    return cuda_pst.backward(*args)


def _float32_only(probe: Probe) -> str | None:
    if "float64" in probe.features or probe.dtype == torch.float64:
        return "the fused PST kernels compute in float32; float64 inputs run on the reference/torch backends"
    return None


def _triton_limits(probe: Probe) -> str | None:
    if "numel>=2^31" in probe.features:
        return "the triton PST kernels count with int32: w0 has 2**31 entries or more"
    if "nm:M>32" in probe.features or "nm:M-not-pow2" in probe.features:
        return "the triton N:M path needs a group size M that is a power of two, at most 32"
    return None


def _cuda_groups(probe: Probe) -> str | None:
    if "nm:M>32" in probe.features:
        return "the cuda N:M path needs a group size M of at most 32"
    return None


_IMPLS: dict[str, PSTImpl] = {}  # by name, for the custom ops below


def _register(impl: PSTImpl, *checks) -> None:
    _IMPLS[impl.name] = REGISTRY.register(impl.name, *checks)(impl)


_register(PSTImpl("reference", _dense_forward(reference_forward, "torch"), _dense_backward))
_register(PSTImpl("torch", _dense_forward(torch_forward, "auto"), _dense_backward))
_register(PSTImpl("triton", _triton_forward, _triton_backward), _float32_only, _triton_limits)
_register(PSTImpl("cuda", _cuda_forward, _cuda_backward), _float32_only, _cuda_groups)
REGISTRY.prefer("cuda", ("cuda", "triton", "torch"),
                "the CUDA C++ kernels first: by the counted sm_90 SASS (docs/pst.md section 6) its score tiles "
                "issue about half the instructions per entry of the Triton passes (factors in registers, "
                "shared-memory histograms, three radix passes instead of four) and its backward about 0.6x "
                "(column sums in registers, row sums by warp shuffles); until measured on a GPU")


def _check_nm(nm, k):
    if not (isinstance(nm, (tuple, list)) and len(nm) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in nm)):
        raise TypeError(f"nm must be a pair of ints (N, M), e.g. (2, 4); got {nm!r}")
    keep_n, m = int(nm[0]), int(nm[1])
    if m < 1 or not 0 <= keep_n <= m:
        raise ValueError(f"nm=(N, M) needs M >= 1 and 0 <= N <= M, got {tuple(nm)}")
    if k % m:
        raise ValueError(f"nm={tuple(nm)} needs w0's second dimension (k = {k}) to be a multiple of M = {m}")
    return keep_n, m


def _check(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, nm=None):
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
    if nm is None:
        if sparsity is None:
            raise TypeError("PST needs sparsity= (the fraction of weights pruned) or nm=(N, M)")
        sparsity = V.number("sparsity", sparsity, lo=0.0, hi=1.0, hi_open=True)
    else:
        if sparsity is not None:
            raise ValueError("give either sparsity= or nm=(N, M), not both (N:M fixes the sparsity to 1 - N/M)")
        nm = _check_nm(nm, k)
        sparsity = 1.0 - nm[0] / nm[1]
    return (sparsity, V.number("beta", beta), V.number("alpha1", alpha1), V.number("alpha2", alpha2), nm)


# Under torch.compile every backend runs as these two custom ops: opaque nodes with fake implementations, so
# that the compiler neither traces the kernel launchers nor turns the pruned count into a constant of the
# graph. The count travels as a 0-dim CPU tensor (a graph input: a layer whose sparsity the scheduler moves
# every step is compiled once). Eager calls skip the ops' dispatch.

@torch.library.custom_op("apt_kernels::pst_forward", mutates_args=())
def _forward_op(backend: str, w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                r: torch.Tensor, c: torch.Tensor, beta: float, alpha1: float, alpha2: float, n_pruned: torch.Tensor,
                nm_n: int, nm_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    w_prime, words = _IMPLS[backend].forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, int(n_pruned),
                                             (nm_n, nm_m) if nm_m else None)
    return w_prime, words


@_forward_op.register_fake
def _(backend, w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm_n, nm_m):
    return w0.new_empty(w0.shape), w0.new_empty(((w0.numel() + 31) // 32,), dtype=torch.int32)


def _grad_dtypes(w0, u, v, a, b):
    """The backward op's output dtypes: dW0 in w0's, the factors' gradients in the compute dtype."""
    return (w0.dtype,) + (compute_dtype(w0, u, v, a, b),) * 6


@torch.library.custom_op("apt_kernels::pst_backward", mutates_args=())
def _backward_op(backend: str, grad: torch.Tensor, words: torch.Tensor, w0: torch.Tensor, u: torch.Tensor,
                 v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha1: float, alpha2: float,
                 needs: list[bool]) -> list[torch.Tensor]:
    grads = _IMPLS[backend].backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs)
    # Custom ops return tensors, none a view of another or of an input: a gradient not asked for travels as
    # an empty tensor, the factors' gradients (views of one buffer in the triton backend) are copied.
    return [w0.new_empty((0,)) if g is None else g.to(dt, copy=i > 0)
            for i, (g, dt) in enumerate(zip(grads, _grad_dtypes(w0, u, v, a, b)))]


@_backward_op.register_fake
def _(backend, grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    n, k = w0.shape
    rw, rs = u.shape[1], a.shape[1]
    shapes = ((n, k), (n, rw), (rw, k), (n, rs), (rs, k), (n,), (k,))
    return [w0.new_empty(shape, dtype=dt) if need else w0.new_empty((0,))
            for shape, dt, need in zip(shapes, _grad_dtypes(w0, u, v, a, b), needs)]


def _no_autocast(w0: torch.Tensor):
    """The scores' matrix products in float32 (math.md 3) even inside torch.autocast: the torch and reference
    backends would otherwise run U @ V and A @ B in bf16/fp16, and the mask would depend on the backend."""
    return torch.autocast(w0.device.type, enabled=False)


class _PSTMaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, beta, alpha1, alpha2, k, nm, w0, u, v, a, b, r, c):
        if torch.compiler.is_compiling():
            count = k if isinstance(k, torch.Tensor) else torch.tensor(k, dtype=torch.int64)
            nm_n, nm_m = nm or (0, 0)
            w_prime, words = torch.ops.apt_kernels.pst_forward(impl.name, w0, u, v, a, b, r, c, beta, alpha1, alpha2,
                                                               count, nm_n, nm_m)
        else:
            with _no_autocast(w0):
                w_prime, words = impl.forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, int(k), nm)
        ctx.save_for_backward(words, w0, u, v, a, b, r, c)
        ctx.impl = impl
        ctx.consts = (beta, alpha1, alpha2)
        ctx.mark_non_differentiable(words)
        return w_prime, words

    @staticmethod
    def backward(ctx, grad, _grad_words):
        words, w0, u, v, a, b, r, c = ctx.saved_tensors
        needs = ctx.needs_input_grad[6:]
        # The backward sees w0..b only: if just r or c is float64, upcast w0 so that it computes in the
        # forward's dtype too (gradients are cast back to each input's dtype below).
        w0_b = w0.double() if compute_dtype(w0, u, v, a, b, r, c) != compute_dtype(w0, u, v, a, b) else w0
        if torch.compiler.is_compiling():
            grads = torch.ops.apt_kernels.pst_backward(ctx.impl.name, grad, words, w0_b, u, v, a, b, *ctx.consts,
                                                       list(needs))
            grads = [g if need else None for g, need in zip(grads, needs)]
        else:
            with _no_autocast(w0):
                grads = ctx.impl.backward(grad, words, w0_b, u, v, a, b, *ctx.consts, needs)
        return (None,) * 6 + tuple(None if g is None else g.to(t.dtype)
                                   for g, t in zip(grads, (w0, u, v, a, b, r, c)))


def _probe(w0, u, v, a, b, r, c, nm) -> Probe:
    feats = ["numel>=2^31"] if w0.numel() >= 2 ** 31 else []
    if compute_dtype(w0, u, v, a, b, r, c) == torch.float64:
        feats.append("float64")
    if nm is not None:
        feats.append("nm")
        m = nm[1]
        if m > 32:
            feats.append("nm:M>32")
        if m & (m - 1):
            feats.append("nm:M-not-pow2")
    return Probe.of(w0, *feats)


def _run(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, backend, nm=None, count=None):
    """(W', packed keep bits, backend name). ``count``: instead of ``sparsity``, the number of weights to
    prune as a 0-dim int64 CPU tensor (PSTLinear's, under torch.compile: a graph input, not a constant)."""
    if count is not None:
        sparsity = 0.0  # validated by whoever keeps the count
    sparsity, beta, alpha1, alpha2, nm = _check(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, nm)
    name, impl = REGISTRY.select(backend, _probe(w0, u, v, a, b, r, c, nm))
    k = count if count is not None else n_pruned(w0.numel(), sparsity) if nm is None else 0
    w_prime, words = _PSTMaskedWeight.apply(impl, beta, alpha1, alpha2, k, nm, w0, u, v, a, b, r, c)
    return w_prime, words, name


def pst_masked_weight(w0, u, v, a, b, r, c, *, sparsity=None, beta=1.0, alpha1=1.0, alpha2=1.0, nm=None,
                      backend="auto"):
    """The pruned weight W' = M * (W0 + beta U V), with the straight-through backward.

    Scores S = |W| + alpha1 A B + alpha2 (R[:, None] + C[None, :]) pick the mask M: exactly
    floor(n k sparsity) weights with the smallest scores are zeroed (ties: the smaller row-major
    index goes first). The backward passes gradients to U, V, A, B, R, C (and to W0 if it
    requires grad) as if the mask were the identity in S: dS = G * W, dW = (M + |W|) * G.
    The mask is kept for the backward as a packed bitmask (1 bit per weight).

    Args:
        w0: frozen weight (n, k), any float dtype. u (n, rw), v (rw, k): low-rank weight update.
        a (n, rs), b (rs, k), r (n,), c (k,): score parameters. They may be float32 while w0 is bf16;
            scores are computed in float32 (float64 if any input is float64).
        sparsity: fraction of weights pruned, in [0, 1).
        beta, alpha1, alpha2: scalar weights of the update and score terms.
        nm: instead of ``sparsity``, an (N, M) pair such as (2, 4): in every group of M consecutive
            entries of a row keep the N with the largest scores (k must be a multiple of M).
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
    return _run(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, backend, nm)[0]


def pst_mask(w0, u, v, a, b, r, c, *, sparsity=None, beta=1.0, alpha1=1.0, alpha2=1.0, nm=None, backend="auto"):
    """The bool keep-mask M (n, k) of :func:`pst_masked_weight` (True = kept)."""
    with torch.no_grad():
        words = _run(w0, u, v, a, b, r, c, sparsity, beta, alpha1, alpha2, backend, nm)[1]
    return bits.unpack_bits(words, w0.shape)


def pst_scores(w0, u, v, a, b, r, c, *, beta=1.0, alpha1=1.0, alpha2=1.0):
    """The dense importance scores S (n, k) in float32 (float64 if any input is), differentiable.

    For inspection and tests: the fused kernels never build this matrix.
    """
    _, beta, alpha1, alpha2, _ = _check(w0, u, v, a, b, r, c, 0.0, beta, alpha1, alpha2)
    w = dense_weight(w0, u, v, beta, compute_dtype(w0, u, v, a, b, r, c))
    return scores_from_weight(w, a, b, r, c, alpha1, alpha2)


from .layer import PSTLinear  # noqa: E402  (uses _run)
from .schedule import SparsityScheduler  # noqa: E402

__all__ = ["PSTLinear", "SparsityScheduler", "pst_mask", "pst_masked_weight", "pst_scores"]
