"""Run the benchmarks: ``python -m benchmarks.run [--ops attention,pst,child_tuning] [--quick] [--out NAME]
[--device cuda|cpu]``.

Writes benchmarks/results/NAME.json, NAME.csv, NAME-<op>.png and NAME-summary.txt (see
benchmarks/harness.py for what is measured). On CUDA it also measures, once, the device-to-device
copy bandwidth and the dense bf16 matmul rate, the floors that GB/s and TFLOP/s are compared with.
The last thing printed is the summary table: per case and mode, our best backend, the best peer and
their ratio, then the issues' targets (benchmarks/targets.py) as PASS / FAIL / n/a. ``--budget-s`` bounds
the run (contenders and modes not started in time are recorded as skipped; our fused backends run
first, then the peers, then our PyTorch fallbacks); ``--skip`` leaves contenders out by name;
``--table RESULTS.json`` prints the table and targets of an earlier run (and, unless ``--no-plots``,
draws its plots into ``--out-dir``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from . import harness, targets

OPS = ("attention", "pst", "child_tuning", "apt_train")
# Shares of the time budget (the rest rolls over to the ops after).
BUDGET_WEIGHTS = {"attention": 0.45, "pst": 0.15, "child_tuning": 0.2, "apt_train": 0.2}


def measure_copy(device: torch.device, timing: harness.Timing) -> dict:
    """Device-to-device copy of 1 GiB: bytes read + written, median ms, GB/s."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = harness.measure(lambda: dst.copy_(src), device, timing)
    return dict(copy_bytes=2 * n, copy_ms=ms, copy_gb_s=2 * n / (ms * 1e-3) / 1e9)


def measure_floors(device: torch.device, timing: harness.Timing) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and dense bf16 matmul rate (8192^3)."""
    if device.type != "cuda":
        return {}
    floors = measure_copy(device, timing)
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = harness.measure(lambda: a @ b, device, timing)
    floors["matmul_shape"] = [m, m, m]
    floors["matmul_ms"] = ms
    floors["matmul_bf16_tflops"] = 2 * m ** 3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return floors


def autotune_choices() -> dict:
    """The configurations Triton's autotuner picked in this run, per kernel and autotuning key."""
    from apt_kernels.attention import fused

    return fused.autotune_choices()


def format_autotune(choices: dict) -> str:
    if not choices:
        return ""
    lines = ["autotuned configurations (kernel: key -> choice):"]
    for kernel, picks in choices.items():
        lines += [f"  {kernel}: {key} -> {cfg}" for key, cfg in picks.items()]
    return "\n".join(lines)


def report(rows: list[dict], autotune: dict, results) -> str:
    """What a run prints last (and its -summary.txt holds), also for ``--table``: the kernel breakdown,
    the autotuner's picks, the summary table and the targets, blank lines between."""
    return "\n\n".join(x for x in (harness.format_kernel_table(rows), format_autotune(autotune),
                                   harness.format_summary(rows), targets.format_targets(results)) if x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (tiny ones on CPU)")
    ap.add_argument("--out", default=None, help="results name (default: a UTC timestamp)")
    ap.add_argument("--out-dir", default=str(harness.RESULTS_DIR), help="results folder (default benchmarks/results)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA do_bench warm-up per contender")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="CUDA do_bench repetition time per contender")
    ap.add_argument("--cpu-target-s", type=float, default=None, help="CPU: time spent repeating each contender")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new contenders after this many seconds (they are recorded as skipped)")
    ap.add_argument("--skip", default="", help="comma-separated contender names to leave out (e.g. reference)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also record the heaviest kernels of our fused backends per case and mode, and the device "
                         "time by kernel class (torch.profiler; the peers' too for whole training steps)")
    ap.add_argument("--table", metavar="RESULTS.json", help="only print the summary table of a results file")
    args = ap.parse_args(argv)
    if args.table:
        doc = json.loads(Path(args.table).read_text())
        print(f"{doc.get('name')}: {doc.get('device')} ({doc.get('date')})")
        device_type = doc.get("device_type") or ("cuda" if doc.get("floors") else "cpu")
        print(report(doc["rows"], doc.get("autotune") or {}, targets.evaluate(doc["rows"], device_type=device_type)))
        if not args.no_plots:  # the GPU script leaves plots out (files that come back are few): draw them here
            harness.write_plots(doc["rows"], args.out_dir, doc["name"], doc.get("device", ""))
        return 0

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown op(s) {bad}; choose from {OPS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    name = args.out or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    timing = harness.Timing(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    if args.cpu_target_s is not None:
        timing.cpu_target_s = args.cpu_target_s
    elif args.quick:
        timing.cpu_target_s = 0.1

    t0 = time.monotonic()
    end = None if args.budget_s is None else t0 + args.budget_s
    meta = harness.metadata(device, quick=args.quick, ops=ops, n_input_sets=harness.N_INPUT_SETS,
                            timing=dict(vars(timing)), budget_s=args.budget_s,
                            timer="triton.testing.do_bench (median)" if device.type == "cuda" else "time.perf_counter (median)")
    print(f"benchmarks: {name} on {meta['device']}; ops {', '.join(ops)}{' (quick)' if args.quick else ''}", flush=True)
    floors = measure_floors(device, timing)
    if floors:
        print(f"floors: copy {floors['copy_gb_s']:.0f} GB/s, bf16 matmul {floors['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    meta["floors"] = floors or None

    out_dir = Path(args.out_dir)
    skip = tuple(x.strip() for x in args.skip.split(",") if x.strip())
    rows: list[dict] = []

    def save(new_rows, plots=False):
        allrows = rows + new_rows
        harness.add_floor_fractions(allrows, floors)
        harness.write_results(allrows, out_dir, name, dict(meta, elapsed_s=round(time.monotonic() - t0, 1),
                                                           autotune=autotune_choices()), plots=plots)

    for i, op in enumerate(ops):
        mod = importlib.import_module(f"benchmarks.ops_{op}")
        cases = mod.cases(device, args.quick)
        deadline = None
        if end is not None:
            left = max(0.0, end - time.monotonic())
            weights = [BUDGET_WEIGHTS[o] for o in ops[i:]]
            deadline = time.monotonic() + left * BUDGET_WEIGHTS[op] / sum(weights)
        t_op = time.monotonic()
        rows += harness.run_cases(cases, device, timing, deadline=deadline,
                                  log=lambda s: print(s, flush=True), on_case=save, skip=skip, profile=args.profile)
        print(f"[{op}] done in {time.monotonic() - t_op:.1f} s", flush=True)

    results = targets.evaluate(rows, device_type=device.type)
    meta["targets"] = results
    save([], plots=not args.no_plots)
    table = report(rows, autotune_choices(), results)
    (out_dir / f"{name}-summary.txt").write_text(table + "\n")
    elapsed = time.monotonic() - t0
    print(f"\nwrote {out_dir / name}.json/.csv/-*.png in {elapsed:.1f} s\n", flush=True)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
