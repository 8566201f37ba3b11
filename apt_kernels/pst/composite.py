"""The "torch" backend of PST: the same math as the reference with a sort-free selection.

The k-th smallest ordered key is found by a selection, not a sort: numpy's introselect
(``np.partition``) on the CPU, where ``kthvalue`` is 5-20x slower (23 ms against about 1 ms for 2.4M keys
on the 2-core CI VM), ``kthvalue`` elsewhere. Everything strictly below it is pruned, and among the keys
equal to it the first ones in flat order, until k are pruned.
In N:M mode each entry's rank inside its group of M is counted by pairwise comparison (no sort).
"""

from __future__ import annotations

import numpy as np
import torch

from .reference import compute_dtype, dense_weight, ordered_key, scores_from_weight


# Device types whose tensors numpy and host-side counts read without a device sync: there the selection
# runs on the host (tests empty this to check the device path on the CPU).
HOST_DEVICES = ("cpu",)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a 1-D integer tensor, as a 0-d tensor on its device."""
    if flat.device.type in HOST_DEVICES:
        return torch.as_tensor(np.partition(flat.numpy(), k - 1)[k - 1])
    return flat.kthvalue(k).values


def select_keep_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    flat = ordered_key(s.reshape(-1))
    if k == 0:
        return torch.ones(s.shape, dtype=torch.bool, device=s.device)
    tau = kth_smallest(flat, k)
    prune = flat < tau
    if flat.device.type in HOST_DEVICES:  # the few ties to prune, found by index
        need = k - int(prune.sum())
        if need:
            prune[(flat == tau).nonzero().view(-1)[:need]] = True
    else:  # without a sync: a running count of the ties
        tie = flat == tau
        prune |= tie & (torch.cumsum(tie, 0) <= k - prune.sum())
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
