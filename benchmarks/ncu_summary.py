"""Nsight Compute's raw CSV, one line a kernel: ``python -m benchmarks.ncu_summary RAW.csv [--cases CASES.json]``.

Reads ``ncu --import REPORT --csv --page raw`` (a header of metric names, a row of units, then one row per
profiled kernel) and prints, per kernel: time, launch shape, registers, theoretical and achieved occupancy,
SM and memory throughput (% of peak), DRAM bandwidth, issue-slot use, warp cycles per issued instruction
and the stall reasons that make up most of those cycles. With ``--cases`` (written by
``benchmarks.ncu_cases``) the kernels are grouped by case: each case's kernels follow a marker kernel.
Metrics a version of ncu names otherwise are left blank, not guessed. ``--json`` writes the parsed rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys

from .names import short_kernel_name

# key -> the raw-page columns that carry it, the first found wins (ncu versions differ in a few names)
METRICS = {
    "us": ("gpu__time_duration.sum",),
    "grid": ("launch__grid_size",),
    "block": ("launch__block_size",),
    "regs": ("launch__registers_per_thread",),
    "occ_theory": ("sm__maximum_warps_per_active_cycle_pct",),
    "occ": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",),
    "mem_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",),
    "dram_gbs": ("dram__bytes.sum.per_second", "dram__bytes_read.sum.per_second"),
    "issue_pct": ("smsp__issue_active.avg.pct_of_peak_sustained_active",),
    "cycles_per_issue": ("smsp__average_warps_active_per_issue_active.ratio",
                         "smsp__average_warp_latency_per_inst_issued.ratio"),
}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TIME_UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
RATE_UNITS = {"byte/second": 1e-9, "Kbyte/second": 1e-6, "Mbyte/second": 1e-3, "Gbyte/second": 1.0,
              "Tbyte/second": 1e3}
TOP_STALLS = 3


def _number(text: str) -> float | None:
    text = (text or "").strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def _scale(key: str, unit: str) -> float:
    if key == "us":
        return TIME_UNITS.get(unit, 1.0)
    if key == "dram_gbs":
        return RATE_UNITS.get(unit, 1.0)
    return 1.0


def parse(lines) -> list[dict]:
    """The kernels of a raw-page CSV, in profiling order: name, the METRICS found, and ``stalls`` (reason ->
    warp cycles per issued instruction spent in it, largest first)."""
    rows = list(csv.reader(lines))
    header = next((r for r in rows if "Kernel Name" in r), None)
    if header is None:
        raise ValueError("no 'Kernel Name' column: not the raw page of an ncu CSV export")
    at = {name: i for i, name in enumerate(header)}
    units: dict[str, str] = {}
    kernels = []
    for r in rows[rows.index(header) + 1:]:
        if len(r) < len(header):
            continue
        if _number(r[at.get("ID", 0)]) is None:  # the units row (and any other row without a kernel ID)
            if not units:
                units = {name: r[i] for name, i in at.items()}
            continue
        k = {"name": r[at["Kernel Name"]]}
        for key, columns in METRICS.items():
            column = next((c for c in columns if c in at), None)
            v = None if column is None else _number(r[at[column]])
            k[key] = None if v is None else v * _scale(key, units.get(column, ""))
        stalls = {}
        for column, i in at.items():
            m = STALL.match(column)
            v = _number(r[i]) if m else None
            if m and v is not None and m.group(1) != "selected":  # "selected": the issuing cycle itself
                stalls[m.group(1)] = v
        k["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1]))
        kernels.append(k)
    return kernels


def group(kernels: list[dict], cases: list[str], marker: str = "spin_kernel") -> list[dict]:
    """Label each kernel with its case: the n-th marker kernel starts the n-th case; markers are dropped.
    Kernels before the first marker, or after more markers than cases, get the case ''."""
    out, n = [], -1
    for k in kernels:
        if marker in k["name"]:
            n += 1
            continue
        out.append({**k, "case": cases[n] if 0 <= n < len(cases) else ""})
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(kernels: list[dict]) -> str:
    head = (f"{'case':34s} {'kernel':44s} {'us':>8s} {'grid':>7s} {'block':>5s} {'regs':>4s} {'occ%':>9s} "
            f"{'sm%':>5s} {'mem%':>5s} {'GB/s':>6s} {'issue%':>6s} {'cyc/is':>6s}  stalls (cycles per issue)")
    lines = [head, "-" * len(head)]
    for k in kernels:
        occ = f"{_fmt(k.get('occ'), '.0f')}/{_fmt(k.get('occ_theory'), '.0f')}"
        stalls = ", ".join(f"{r} {v:.1f}" for r, v in list(k["stalls"].items())[:TOP_STALLS])
        lines.append(f"{k.get('case', ''):34.34s} {short_kernel_name(k['name'], 44):44s} {_fmt(k.get('us'), '8.1f')} "
                     f"{_fmt(k.get('grid'), '7.0f')} {_fmt(k.get('block'), '5.0f')} {_fmt(k.get('regs'), '4.0f')} "
                     f"{occ:>9s} {_fmt(k.get('sm_pct'), '5.1f')} {_fmt(k.get('mem_pct'), '5.1f')} "
                     f"{_fmt(k.get('dram_gbs'), '6.0f')} {_fmt(k.get('issue_pct'), '6.1f')} "
                     f"{_fmt(k.get('cycles_per_issue'), '6.1f')}  {stalls}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --import REPORT --csv --page raw > RAW.csv")
    parser.add_argument("--cases", help="the JSON benchmarks.ncu_cases --order wrote")
    parser.add_argument("--json", help="write the parsed kernels here")
    args = parser.parse_args(argv)
    with open(args.csv, newline="") as f:
        kernels = parse(f)
    if args.cases:
        with open(args.cases) as f:
            order = json.load(f)
        marker = order.get("marker", "spin_kernel")
        if any(marker in k["name"] for k in kernels):
            kernels = group(kernels, order["cases"], marker)
        else:
            print(f"no marker kernel ({marker}) in the report: kernels not grouped by case", file=sys.stderr)
    if not kernels:
        print("no kernels in the report", file=sys.stderr)
        raise SystemExit(1)
    print(table(kernels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(kernels, f, indent=1)


if __name__ == "__main__":
    main()
