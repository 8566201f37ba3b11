"""The sampled bracket of PST's global selection: the host side, shared by the Triton and CUDA backends.

Before the radix passes, on matrices of at least ``BRACKET_MIN`` entries (docs/pst.md, sections 1.2 and 1.3):

1. the scores of 1/16 of the entries are sampled: a run of ``SAMPLE_RUN`` consecutive entries (row-major,
   wrapping to the matrix's start) at a hashed position in each of ``ceil(n k / SAMPLE_EVERY)`` equal strata
   of the flat index (:func:`sampled_entries`);
2. the sample's keys at the ranks of :func:`sample_ranks` (the threshold's expected rank, plus and minus
   ``SIGMAS`` binomial standard deviations) give the bracket ``[lo, hi]``, to 22 bits;
3. one pass over W decides every entry outside the bracket, counts those below it and lists those inside it
   (``(n + k) * LIST_PER_LINE`` entries at most, :func:`list_cap`);
4. the exact selection runs on the list. When the bracket misses (a sample unlike the matrix, or a list too
   full) the radix passes run after it: the results are the same either way.

The kernels (csrc/pst.cu's ``bracket_passes``, triton_pst's ``_bracket_passes``) implement the same sample:
these constants are theirs.
"""

from __future__ import annotations

import math
import os

import torch

SAMPLE_RUN = 32      # consecutive entries a sample run scores
SAMPLE_EVERY = 512   # entries of W per sample run: the sample is 1/16 of the scores
SIGMAS = 4.0         # the bracket's half width in binomial standard deviations of the sample's rank
LIST_PER_LINE = 16   # the list holds (n + k) * LIST_PER_LINE entries
MIN_ENTRIES = 1024   # below this the sample's keys would not fit in W''s buffer (and it would not pay)

# The global selection of a matrix of at least this many entries starts with the sampled bracket; below it the
# radix passes alone (fewer launches). A first choice until a GPU measures it (the benchmarks time both);
# APT_KERNELS_PST_BRACKET_MIN overrides it, -1 turns the bracket off. Each backend module copies it at import
# (cuda_pst.BRACKET_MIN, triton_pst.BRACKET_MIN), so that one can be changed without the other.
BRACKET_MIN = int(os.environ.get("APT_KERNELS_PST_BRACKET_MIN", str(1 << 21)))


def applies(numel: int, n_pruned: int, bracket_min: int, max_numel: int) -> bool:
    """Whether the bracket runs first: something pruned, at least ``bracket_min`` (>= 0) and MIN_ENTRIES
    entries, and flat indices below ``max_numel`` (the backend's)."""
    return n_pruned > 0 and 0 <= bracket_min <= numel and MIN_ENTRIES <= numel <= max_numel


def sample_runs(numel: int) -> int:
    return -(-numel // SAMPLE_EVERY)


def list_cap(n: int, k: int) -> int:
    return (n + k) * LIST_PER_LINE


def sample_ranks(numel: int, n_pruned: int) -> tuple[int, int, bool, bool]:
    """(r_lo, r_hi, lo_open, hi_open): the 1-based ranks in the sample of the bracket's ends, each clamped into
    the sample (1 .. S), and whether an end lies past the sample's (that side of the bracket is then open)."""
    S = sample_runs(numel) * SAMPLE_RUN
    q = n_pruned / numel
    mid = q * S
    margin = SIGMAS * math.sqrt(S * q * (1.0 - q)) + 1.0
    r_lo, r_hi = math.floor(mid - margin), math.ceil(mid + margin)
    lo_open, hi_open = r_lo < 1, r_hi > S
    return (1 if lo_open else r_lo), (S if hi_open else r_hi), lo_open, hi_open


_M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: the hash of a sample run's position (csrc/pst.cu: mix64)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sampled_entries(n: int, k: int) -> torch.Tensor:
    """(n, k) bool: the entries the sample scores (tests make samples unlike their matrices with it)."""
    numel = n * k
    runs = sample_runs(numel)
    hit = torch.zeros(numel, dtype=torch.bool)
    for s in range(runs):
        f0, f1 = s * numel // runs, (s + 1) * numel // runs
        f = f0 + mix64(s) % (f1 - f0)
        hit[(f + torch.arange(SAMPLE_RUN)) % numel] = True
    return hit.view(n, k)
