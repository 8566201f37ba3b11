"""PST's fused backward alone, per implementation: ``python -m benchmarks.pst_backward [--out-dir DIR]``.

The straight-through gradients dU, dV, dA, dB, dR, dC from G = dL/dW' and the forward's bitmask (no dW0),
bf16 W0, float32 factors of rank 8, sparsity 0.9, at the PST benchmark's shapes, for:

* ``cuda``: csrc/pst.cu's backward as built (2 columns per thread at rank 8, two blocks per SM);
* ``cuda-wide``: its tuning variant (4 columns per thread, one block per SM; ``WIDE_BACKWARD``);
* ``triton``: the Triton backward.

All three in one run, on the same inputs; time: ``triton.testing.do_bench`` median (CUDA events); the
floor column is one read of G plus one of W0 at the copy bandwidth measured in the same run. Which
variant ``backend="cuda"`` should use is this script's question (docs/pst.md, section 6). Needs CUDA
and the extension; prints a table and writes ``<out-dir>/pst-backward-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import torch

from apt_kernels import _env
from apt_kernels.pst import cuda_pst, triton_pst

from .harness import RESULTS_DIR, Timing, fill, measure, metadata
from .ops_pst import BETA, ALPHA1, ALPHA2, RANK, SPARSITY
from .run import measure_copy

SHAPES = ((768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008))


def run(timing: Timing) -> dict:
    ext = _env.cuda_extension()
    if ext is None:
        raise SystemExit(f"the CUDA extension is not built: {_env.cuda_reason(torch.device('cuda'))}")
    bw = measure_copy(torch.device("cuda"), timing)["copy_gb_s"]
    rows = []
    for n, k in SHAPES:
        s = 1000 * n + k
        w0 = fill((n, k), seed=s, device="cuda", dtype=torch.bfloat16, scale=0.02)
        u, a = (fill((n, RANK), seed=s + i, device="cuda", scale=0.02) for i in (1, 2))
        v, b = (fill((RANK, k), seed=s + i, device="cuda", scale=0.02) for i in (3, 4))
        r, c = fill((n,), seed=s + 5, device="cuda", scale=0.01), fill((k,), seed=s + 6, device="cuda", scale=0.01)
        g = fill((n, k), seed=s + 7, device="cuda", dtype=torch.bfloat16)
        words = cuda_pst.forward(w0, u, v, a, b, r, c, BETA, ALPHA1, ALPHA2, int(n * k * SPARSITY))[1]
        calls = {
            "cuda": lambda: ext.pst_backward(g, words, w0, u, v, a, b, BETA, ALPHA1, ALPHA2, False, False),
            "cuda-wide": lambda: ext.pst_backward(g, words, w0, u, v, a, b, BETA, ALPHA1, ALPHA2, False, True),
            "triton": lambda: triton_pst.backward(g, words, w0, u, v, a, b, BETA, ALPHA1, ALPHA2,
                                                  (False,) + (True,) * 6),
        }
        floor_ms = 2 * n * k * 2 / bw / 1e6  # G and W0, bf16, read once
        row = dict(shape=f"{n}x{k}", floor_ms=floor_ms)
        for name, fn in calls.items():
            row[name + "_ms"] = measure(fn, torch.device("cuda"), timing)
        rows.append(row)
        print(f"{row['shape']:>10}  " + "  ".join(f"{name} {row[name + '_ms']:.4f} ms" for name in calls)
              + f"  (floor {floor_ms:.4f} ms; cuda-wide / cuda {row['cuda-wide_ms'] / row['cuda_ms']:.2f},"
                f" triton / cuda {row['triton_ms'] / row['cuda_ms']:.2f})", flush=True)
    return dict(meta=metadata("cuda", copy_gb_s=bw, rank=RANK, sparsity=SPARSITY, w_dtype="bfloat16"), rows=rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--rep-ms", type=float, default=100.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    result = run(Timing(rep_ms=args.rep_ms))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out_dir) / f"pst-backward-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
