"""The "cuda" backend of PST: the selection, mask and backward passes of the C++ extension (csrc/pst.cu).

An implementation independent of the Triton one: same scores (the evaluation order of
:func:`apt_kernels.pst.reference.fused_order_scores`: float32 FMAs and additions rounded to nearest
through inline PTX), scores evaluated in tiles (V and B of a thread's columns in registers, a row's U
and A read once from shared memory), a three-pass radix select with 11/11/10-bit digits and
shared-memory histograms, and a warp-ballot mask pass. The fused straight-through backward keeps each
thread's column sums (dV, dB, dC) in registers and reduces the row sums (dU, dA, dR) with warp shuffles.
The factors are passed as float32 (they are small); W0 stays in its dtype.
"""

from __future__ import annotations

import os

from .. import _env
from . import bracket


# The sampled bracket's threshold (apt_kernels.pst.bracket: csrc/pst.cu's bracket_passes run first on matrices of at
# least this many entries; -1: never). This backend's own copy: tests and benchmarks set it apart from Triton's.
BRACKET_MIN = bracket.BRACKET_MIN


def forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm=None):
    nm_n, nm_m = (0, 0) if nm is None else nm
    out, words = _env.cuda_extension().pst_forward(w0, u, v, a, b, r, c, float(beta), float(alpha1),
                                                   float(alpha2), int(n_pruned), int(nm_n), int(nm_m),
                                                   int(BRACKET_MIN))
    return out, words


MAX_BACKWARD_RANK = 32  # csrc/pst.cuh: APT_PST_BACKWARD_MAX_RANK
# The backward's tuning variant (csrc/pst.cu: bwd_cols): twice the columns per thread up to rank 16, fewer
# instructions per entry at half the resident warps. Off until a GPU measurement says otherwise
# (python -m benchmarks.pst_backward times both); APT_KERNELS_PST_WIDE_BACKWARD=1 turns it on.
WIDE_BACKWARD = os.environ.get("APT_KERNELS_PST_WIDE_BACKWARD", "0") == "1"


def backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs):
    """The extension's fused backward for ranks up to MAX_BACKWARD_RANK; above that the fused Triton
    backward when Triton runs here (it reads the same bitmask), else the torch STE."""
    if max(u.shape[1], a.shape[1]) <= MAX_BACKWARD_RANK:
        grads = _env.cuda_extension().pst_backward(grad, words, w0, u, v, a, b, float(beta), float(alpha1),
                                                   float(alpha2), bool(needs[0]), WIDE_BACKWARD)
        return [g if need else None for g, need in zip(grads, needs)]
    if _env.triton_reason(w0.device) is None:
        from . import triton_pst

        return triton_pst.backward(grad, words, w0, u, v, a, b, beta, alpha1, alpha2, needs)
    from .reference import ste_backward
    from .. import bits

    keep = bits.unpack_bits(words, w0.shape)
    return ste_backward(grad, keep, w0, u, v, a, b, beta, alpha1, alpha2, needs)
