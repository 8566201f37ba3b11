"""Every ```python block of README.md and docs/*.md runs as written (on CPU, no downloads).

Blocks fenced as ```python signature show an API's signature: every parameter they name must be one
of the function's (inspect.signature), in the same order. Every other python block is executed in a fresh namespace, in an
empty working directory, so an example that stops working fails here instead of in a reader's hands.
"""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield pytest.param(m.group(1).strip(), m.group(2), id=f"{path.relative_to(ROOT)}:{line}")


BLOCKS = list(_blocks())


def test_the_docs_have_runnable_examples():
    runnable = [b for b in BLOCKS if b.values[0] == "python"]
    assert len(runnable) >= 5, [b.id for b in BLOCKS]


@pytest.mark.parametrize("info,source", BLOCKS)
def test_doc_block(info, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if info == "python signature":
        _check_signatures(source)
        return
    assert info == "python", f"unknown fence info {info!r}"
    exec(compile(source, "<doc block>", "exec"), {"__name__": "__doc_example__"})


def _arguments(source: str, start: int) -> list[str]:
    """The top-level comma-separated pieces between the parenthesis at ``start`` and its match."""
    depth, piece, pieces = 0, "", []
    for ch in source[start:]:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:
            break
        if ch == "," and depth == 1:
            pieces.append(piece)
            piece = ""
        elif depth > 1 or ch != "(":
            piece += ch
    return [p.strip() for p in pieces + [piece] if p.strip()]


def _check_signatures(source: str) -> None:
    import apt_kernels

    calls = list(re.finditer(r"apt_kernels\.(\w+)\(", source))
    assert calls, source
    for call in calls:
        fn = getattr(apt_kernels, call.group(1))
        params = list(inspect.signature(fn).parameters)
        pieces = _arguments(source, call.end() - 1)
        if pieces == ["...same..."]:  # "the same arguments as the line above"
            continue
        named = [p.split("=")[0].strip() for p in pieces if p != "*"]
        assert named and all(n.isidentifier() for n in named), (call.group(0), pieces)
        assert named == [p for p in params if p in named], (call.group(1), named, params)
        assert set(named) <= set(params), (call.group(1), sorted(set(named) - set(params)))
