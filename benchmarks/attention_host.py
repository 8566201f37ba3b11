"""Host time of the triton attention backend: ``python -m benchmarks.attention_host [--repeats 5]``.

What one ``gated_prefix_attention`` forward and forward + backward cost the CPU around their kernels, on
any machine: Triton's launch path runs for real up to its launcher, which a stub GPU
(``benchmarks/triton_stub.py``) replaces, so argument binding, the autotuner's bookkeeping and the launch
cache (``apt_kernels/_launch.py``) are all counted and no kernel runs. On a GPU this work is the op's time
whenever it exceeds the GPU work queued ahead of it: at BERT's N = 128 it does by far. Printed, per call
(median of ``--calls`` calls, best of ``--repeats`` runs): with the launch cache, without it, and with
every launch removed (the op's own Python and torch work); the encoder shape of the benchmarks but B = 2
(host work does not depend on the sizes; CPU tensors stand in for CUDA ones). Must run without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _median_us(fn, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        for _ in range(20):
            fn()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best = min(best, statistics.median(times) * 1e6)
    return best


def measure(calls: int = 500, repeats: int = 5, B: int = 2, H: int = 12, N: int = 128, P: int = 16,
            D: int = 64) -> dict[str, float]:
    from . import triton_stub

    triton_stub.install()
    import torch

    import apt_kernels
    from apt_kernels import _launch
    from apt_kernels.attention import fused

    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(H, P, D, requires_grad=True) for _ in range(2))
    gate = torch.rand(B, 1, 1, P, requires_grad=True)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[:, N - 5:] = False
    grad = torch.randn(B, H, N, D)
    leaves = (q, k, v, pk, pv, gate)

    def forward():
        with torch.no_grad():
            apt_kernels.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=keep, backend="triton")

    def step():
        out = apt_kernels.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=keep, backend="triton")
        out.backward(grad)
        for t in leaves:
            t.grad = None

    out = {}
    run, enabled_before = fused.run, _launch.ENABLED
    try:
        for label, enabled in (("launch cache", True), ("no launch cache", False)):
            _launch.ENABLED = enabled
            out[f"forward, {label}"] = _median_us(forward, calls, repeats)
            out[f"forward + backward, {label}"] = _median_us(step, calls, repeats)
        fused.run = lambda *args: None
        out["forward, no launches"] = _median_us(forward, calls, repeats)
        out["forward + backward, no launches"] = _median_us(step, calls, repeats)
    finally:
        fused.run, _launch.ENABLED = run, enabled_before
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import torch
    import triton

    print(f"host time per call, us (torch {torch.__version__}, triton {triton.__version__}; "
          f"B=2, H=12, N=128, P=16, D=64, bool padding mask, per-example gate; autotuned)")
    for name, us in measure(args.calls, args.repeats).items():
        print(f"  {name:36s} {us:8.1f}")


if __name__ == "__main__":
    main()
