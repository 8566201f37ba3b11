"""Host time of one ``ChildTuningAdamW.step()``: ``python -m benchmarks.child_tuning_host [--tensors 201]``.

What a step costs the CPU before its kernels run: the optimizer's loop, the launch plan and its tables
(built, or reused from the cache: docs/child_tuning.md), with the kernel launch itself stubbed out, so
it runs on any machine and isolates the Python work. On a GPU that work is in the measured time of a
step whenever it exceeds the GPU time queued ahead of it. Printed: best of ``--repeats`` runs of
``--steps`` steps, per step, for modes F and D with and without the table cache, and
``torch.optim.AdamW(fused=True)`` on the same CPU tensors (its CPU kernels included: tiny tensors).
BERT-base with a classification head has 201 parameter tensors (the bare model, the benchmark's, 199).
"""

from __future__ import annotations

import argparse
import time

import torch

import apt_kernels as ak
from apt_kernels.child_tuning import fused
from apt_kernels.child_tuning import optimizer as _opt


def per_step_ms(step, steps: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def measure(tensors: int = 201, steps: int = 50, repeats: int = 7) -> dict[str, float]:
    params = [torch.nn.Parameter(torch.zeros(8)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.zeros(8)
    stub = fused.Kernel(chunk=8192, group_chunks=True, split_vector=True, launch=lambda t, h, s: None)
    entry = _opt.REGISTRY._entries["triton"]
    saved = entry.fn, entry.checks
    out = {}
    try:
        for cached in (True, False):
            def fn(*args, cache=None, _cached=cached, **kwargs):
                fused.run(stub, *args, cache=cache if _cached else None, **kwargs)

            entry.fn, entry.checks = fn, ()
            for mode in ("F", "D"):
                masks = {p: torch.ones(8, dtype=torch.bool) for p in params} if mode == "D" else None
                opt = ak.ChildTuningAdamW(params, lr=1e-3, mode=mode, reserve_p=0.3, masks=masks, backend="triton")
                out[f"{mode}, tables {'cached' if cached else 'rebuilt'}"] = per_step_ms(opt.step, steps, repeats)
    finally:
        entry.fn, entry.checks = saved
    out["torch.optim.AdamW(fused=True)"] = per_step_ms(torch.optim.AdamW(params, lr=1e-3, fused=True).step, steps,
                                                       repeats)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=201)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    for name, ms in measure(args.tensors, args.steps, args.repeats).items():
        print(f"{name:<32} {ms:7.3f} ms per step (host, {args.tensors} tensors)")


if __name__ == "__main__":
    main()
