"""The kernels whose diagnosis is pending, run once each for Nsight Compute: ``bash scripts/gpu_ncu.sh``.

The timings say what is slow; hardware counters say why (issue-bound, latency-bound, which stall). Each
case below is one forward + backward of one of our ops at a benchmark shape, with the inputs of the
benchmark runner (``benchmarks/ops_*.py``). Every case first runs twice outside the profiled region
(Triton compiles and autotunes, launch caches fill), then once inside it (``cudaProfilerStart`` /
``cudaProfilerStop``: ``ncu --profile-from-start off`` profiles only that), each case after a marker
kernel, ``torch.cuda._sleep``'s ``spin_kernel``, so ``benchmarks.ncu_summary`` can tell whose kernels
are whose. ``--order FILE`` writes the case names in that order.

What each case asks:
  * pst-*: are the CUDA C++ histogram and mask passes (about 240 GB/s at 4096 x 11008) bound by latency
    (long-scoreboard stalls, few warps) or by the shared-memory histogram's atomics (MIO / LSU stalls);
    what the Triton passes and the backward wait on; why 768 x 768 passes took 11-26 us each (CUDA C++, 48
    blocks then: now 384) and about 13 us each, 52 us for the four (Triton);
  * attn-*: what dropout's Philox draws and their trip through shared memory (the SASS's extra STS / LDS /
    BAR) cost the forward and backward kernels at BERT's shape, against the same case without dropout;
    the decoder shape for the key-side backward.
"""

from __future__ import annotations

import argparse
import json

import torch

import apt_kernels

MARKER = "spin_kernel"  # torch.cuda._sleep's kernel (ATen's Sleep.cu); no torch.profiler here: CUPTI is ncu's
MARKER_CYCLES = 1000  # the marker kernel's spin: a few microseconds


def _pst(n: int, k: int, backend: str):
    def build(device):
        from . import ops_pst

        inp = ops_pst._inputs(n, k, ops_pst.RANK, device, torch.bfloat16)(0)
        args = tuple(inp[x] for x in ("w0", "u", "v", "a", "b", "r", "c"))
        grad = torch.randn(n, k, device=device, dtype=torch.bfloat16)

        def run():
            out = apt_kernels.pst_masked_weight(*args, sparsity=ops_pst.SPARSITY, backend=backend)
            out.backward(grad)

        return run

    return build


def _attention(kind: str, dropout_p: float):
    def build(device):
        from . import ops_attention

        if kind == "bert":
            spec = dict(B=32, Hq=12, Hkv=12, N=512, P=16, D=64, causal=False, mask="padding", gate="per-example")
        else:
            spec = dict(B=2, Hq=32, Hkv=8, N=4096, P=64, D=128, causal=True, mask="none", gate="per-token")
        case = ops_attention.make_case("ncu", device=device, dtype=torch.bfloat16, flex=False, **spec)
        inp = case.make_inputs(0)
        leaves = [inp[x] for x in ("q", "k", "v", "prefix_k", "prefix_v", "gate")]
        grad = torch.randn_like(inp["q"])

        def run():
            out = apt_kernels.gated_prefix_attention(*leaves, attn_mask=inp["keep"], causal=spec["causal"],
                                                     dropout_p=dropout_p, backend="triton")
            out.backward(grad)
            for t in leaves:
                t.grad = None

        return run

    return build


CASES = {
    "pst-4096x11008-cuda": _pst(4096, 11008, "cuda"),
    "pst-4096x11008-triton": _pst(4096, 11008, "triton"),
    "pst-768x768-cuda": _pst(768, 768, "cuda"),
    "pst-768x768-triton": _pst(768, 768, "triton"),
    "attn-bert-h12-n512-p16": _attention("bert", 0.0),
    "attn-bert-h12-n512-p16-dropout0.1": _attention("bert", 0.1),
    "attn-llama-n4096-p64": _attention("llama", 0.0),
}


def run(names: list[str], device: torch.device, warmup: int = 2, profile=None) -> list[str]:
    """Build and warm every case, then run each once after a marker kernel inside ``profile`` (a context
    manager factory; default: the CUDA profiler's start/stop). Returns the names of the cases that ran, in
    order (a case that cannot be built here, e.g. the CUDA backend without the extension, is left out with
    a message)."""
    runs = []
    for name in names:
        try:
            fn = CASES[name](device)
            for _ in range(warmup):
                fn()
        except Exception as e:  # noqa: BLE001 - one case's failure must not cost the others' profile
            print(f"ncu_cases: {name} left out: {type(e).__name__}: {e}", flush=True)
            continue
        runs.append((name, fn))
    torch.cuda.synchronize(device)
    with (profile or _cuda_profiler)():
        for _, fn in runs:
            torch.cuda._sleep(MARKER_CYCLES)
            fn()
        torch.cuda.synchronize(device)
    return [name for name, _ in runs]


class _cuda_profiler:
    def __enter__(self):
        torch.cuda.cudart().cudaProfilerStart()

    def __exit__(self, *exc):
        torch.cuda.cudart().cudaProfilerStop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: all): " + ", ".join(CASES))
    parser.add_argument("--order", help="write the names of the cases that ran, in order, to this JSON file")
    args = parser.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
    if not torch.cuda.is_available():
        raise SystemExit("ncu_cases needs a CUDA device")
    ran = run(names, torch.device("cuda"))
    if args.order:
        with open(args.order, "w") as f:
            json.dump({"cases": ran, "marker": MARKER}, f)
    print(f"ncu_cases: profiled {len(ran)} of {len(names)} cases: {', '.join(ran)}")


if __name__ == "__main__":
    main()
