"""Integer helpers for the kernel launchers' host code.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` wrappers (usable inside kernels),
and from Python each call costs a microsecond or two of argument unwrapping; a launcher calls them several
times per op, on the host-time budget of short sequences. These are the same functions on plain ints.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for ints, y > 0."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as triton.next_power_of_2."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()
