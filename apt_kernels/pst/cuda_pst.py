"""The "cuda" backend of PST: the selection and mask passes of the C++ extension (csrc/pst.cu).

An implementation independent of the Triton one: same scores (the evaluation order of
:func:`apt_kernels.pst.reference.fused_order_scores`: float32 FMAs and additions rounded to nearest
through inline PTX), scores evaluated in tiles (V and B of a thread's columns in registers, a row's U
and A read once from shared memory), a three-pass radix select with 11/11/10-bit digits and
shared-memory histograms, and a warp-ballot mask pass. The factors are passed as float32 (they are
small); W0 stays in its dtype.
"""

from __future__ import annotations

from .. import _env


def forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm=None):
    nm_n, nm_m = (0, 0) if nm is None else nm
    out, words = _env.cuda_extension().pst_forward(w0, u, v, a, b, r, c, float(beta), float(alpha1),
                                                   float(alpha2), int(n_pruned), int(nm_n), int(nm_m))
    return out, words


def backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    """The fused Triton backward when Triton runs here (it reads the same bitmask), else the torch STE."""
    if _env.triton_reason(w0.device) is None:
        from . import triton_pst

        return triton_pst.backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs)
    from .reference import ste_backward
    from .. import bits

    keep = bits.unpack_bits(words, w0.shape)
    return ste_backward(grad, keep, w0, u, v, a, b, beta, alpha1, alpha2, needs)
