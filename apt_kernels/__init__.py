"""apt-kernels: fused kernels for parameter-efficient fine-tuning.

Public ops (math in docs/math.md):

- :func:`gated_prefix_attention` — Adaptive Prefix Tuning's attention over a gated prefix.
- :func:`pst_masked_weight`, :func:`pst_mask`, :func:`pst_scores` — PST's low-rank importance scores
  and exact top-k pruning with a straight-through backward.
- :class:`ChildTuningAdamW`, :func:`fisher_mask` — Child-Tuning's masked-gradient AdamW.

Every op takes ``backend="auto" | "reference" | "torch" | "triton" | "cuda"``;
``python -m apt_kernels`` says which run here and why.
"""

__version__ = "0.1.0"

from . import bits
from .attention import gated_prefix_attention
from .child_tuning import ChildTuningAdamW, fisher_mask
from .pst import pst_mask, pst_masked_weight, pst_scores
from .pst import PSTLinear, SparsityScheduler
from .registry import BackendUnavailable, explain

__all__ = [
    "bits",
    "BackendUnavailable",
    "ChildTuningAdamW",
    "explain",
    "fisher_mask",
    "gated_prefix_attention",
    "pst_mask",
    "pst_masked_weight",
    "pst_scores",
    "PSTLinear",
    "SparsityScheduler",
]
