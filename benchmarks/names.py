"""Kernel names for reports (no torch import: ``benchmarks.ncu_summary`` reads ncu's CSV anywhere)."""

from __future__ import annotations


def short_kernel_name(name: str, width: int = 60) -> str:
    """A kernel's name without its parameter list, return type and namespaces (C++), at most ``width`` chars."""
    base = name.strip()
    if base.endswith(")"):  # drop the parameter list: back to the "(" matching the final ")"
        depth = 0
        for i in range(len(base) - 1, -1, -1):
            depth += (base[i] == ")") - (base[i] == "(")
            if depth == 0:
                base = base[:i].strip()
                break
    if base.startswith("void "):
        base = base[5:]
    depth, cut = 0, 0  # after the last "::" outside brackets
    for i, ch in enumerate(base):
        depth += (ch in "<(") - (ch in ">)")
        if depth == 0 and base.startswith("::", i):
            cut = i + 2
    base = base[cut:] or name
    return base if len(base) <= width else base[: width - 3] + "..."
