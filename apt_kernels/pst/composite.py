"""The "torch" backend of PST: the same math as the reference with a sort-free selection.

``kthvalue`` finds the k-th smallest ordered key (a selection, not a sort); everything strictly
below it is pruned, and among the keys equal to it the first ones in flat order, until k are pruned.
"""

from __future__ import annotations

import torch

from .reference import compute_dtype, dense_weight, ordered_key, scores_from_weight


def select_keep_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    flat = ordered_key(s.reshape(-1))
    if k == 0:
        return torch.ones(s.shape, dtype=torch.bool, device=s.device)
    tau = flat.kthvalue(k).values
    below = flat < tau
    tie = flat == tau
    need = k - below.sum()
    prune = below | (tie & (torch.cumsum(tie, 0) <= need))
    return (~prune).view(s.shape)


def torch_forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, k):
    dt = compute_dtype(w0, u, v, a, b, r, c)
    w = dense_weight(w0, u, v, beta, dt)
    keep = select_keep_mask(scores_from_weight(w, a, b, r, c, alpha1, alpha2), k)
    return (w * keep).to(w0.dtype), keep
