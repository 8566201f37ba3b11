"""The "torch" backend of PST: the same math as the reference with a sort-free selection.

``kthvalue`` finds the k-th smallest ordered key (a selection, not a sort); everything strictly
below it is pruned, and among the keys equal to it the first ones in flat order, until k are pruned.
In N:M mode each entry's rank inside its group of M is counted by pairwise comparison (no sort).
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


def nm_keep_mask(s: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Keep the N largest of every M consecutive scores of a row; equal scores: smaller index pruned first."""
    keep_n, m = nm
    rows, k = s.shape
    key = ordered_key(s.reshape(rows, k // m, m))
    idx = torch.arange(m, device=s.device)
    kj, ki = key[..., None, :], key[..., :, None]  # [..., i, j]: does entry j come before entry i?
    before = (kj < ki) | ((kj == ki) & (idx[None, :] < idx[:, None]))
    rank = before.sum(-1)
    return (rank >= m - keep_n).view(rows, k)


def torch_forward(w0, u, v, a, b, r, c, beta, alpha1, alpha2, k, nm=None):
    dt = compute_dtype(w0, u, v, a, b, r, c)
    w = dense_weight(w0, u, v, beta, dt)
    s = scores_from_weight(w, a, b, r, c, alpha1, alpha2)
    keep = select_keep_mask(s, k) if nm is None else nm_keep_mask(s, nm)
    return (w * keep).to(w0.dtype), keep
