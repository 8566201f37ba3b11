"""Registers, spills and shared memory of the attention kernels' block configurations, compiled offline for
sm_90: ``python -m benchmarks.kernel_resources [--dtypes bf16,fp32] [--sets enc,dec] [--out FILE]``.

No GPU needed: Triton compiles each kernel for an sm_90 target with its own ptxas, and its bundled
``cuobjdump -res-usage`` reads each cubin's registers per thread and stack frame (register spills). A
configuration at 255 registers with a stack frame of kilobytes moves its tiles through local memory at
every loop step; the autotuner would time it and lose, but the fixed choice (``APT_KERNELS_AUTOTUNE=0``)
or a table with nothing better cannot. This is static evidence for picking the tables, not a timing: the
GPU decides among the configurations that compile cleanly.

For each dtype (its dot precision: float32 takes IEEE dots), each feature set of the benchmark shapes and
each kernel (forward, dq side, key side on tokens and on the prefix), every configuration of that dtype's
table: registers, stack bytes, shared memory (``*`` marks the fixed choice, ``OVER`` shared memory past
Hopper's 227 KB, which the autotuner skips), and the matrix instructions in the PTX: Hopper's warpgroup MMA
(``wgmma``) or the Ampere-style ``mma.sync`` it falls back to when a dot's rows are fewer than 64 per
warpgroup. Prints the table and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

# Every kernel of a process compiles for the interpreter or for a GPU: clear the switch before Triton or
# apt_kernels is imported (this module imports neither at top level).
FLOAT_ARGS = {"scale", "mask_min", "inv_keep"}
INT_ARGS = {"Hq", "Hkv", "N", "M", "P", "L", "REP", "keep_thr", "seed_lo", "seed_hi"}
SHARED_LIMIT = 227 * 1024  # Hopper's largest opt-in shared memory per block

# the feature sets of the benchmark shapes: (head dim, prefix tile width, constexprs)
FEATURES = {
    "enc": (64, 16, dict(MASK_KIND=1, MASK_N1=True, CAUSAL=False, HAS_GATE=True, GATE_N1=False, DROPOUT=False)),
    "enc_dropout": (64, 16, dict(MASK_KIND=1, MASK_N1=True, CAUSAL=False, HAS_GATE=True, GATE_N1=False,
                                 DROPOUT=True)),
    "enc_plain": (64, 16, dict(MASK_KIND=1, MASK_N1=True, CAUSAL=False, HAS_GATE=False, GATE_N1=False,
                               DROPOUT=False)),
    "dec": (128, 64, dict(MASK_KIND=0, MASK_N1=False, CAUSAL=True, HAS_GATE=True, GATE_N1=False, DROPOUT=False)),
    "dec_plain": (128, 64, dict(MASK_KIND=0, MASK_N1=False, CAUSAL=True, HAS_GATE=False, GATE_N1=False,
                                DROPOUT=False)),
}
DESCRIBE = {"enc": "BERT encoder, D=64, padding mask, token gate",
            "enc_dropout": "the same with attention dropout (BERT's 0.1 in training)",
            "enc_plain": "BERT encoder, no prefix (P=0)",
            "dec": "Llama decoder, D=128, causal, token gate",
            "dec_plain": "Llama decoder, no prefix (P=0)"}
DTYPES = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # Triton dtype -> the launchers' dot precision


def build(fn, dt: str, consts: dict, opts: dict):
    """Compile the attention kernel ``fn`` for sm_90 with ``consts`` as constexprs (those it has) and every
    other argument typed as the launchers pass it (``dt`` for the tensors), ``opts`` as launch options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from apt_kernels._launch import FP_FUSION

    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in FLOAT_ARGS:
            sig[a] = "fp32"
        elif a in INT_ARGS or a.startswith("s"):
            sig[a] = "i32"
        elif a in ("G", "Lse", "Stat", "Delta", "DG", "DLse"):
            sig[a] = "*fp32"
        elif a == "Mk":
            sig[a] = "*u8" if consts.get("MASK_KIND") == 1 else "*fp32"
        else:
            sig[a] = "*" + dt
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(opts, **FP_FUSION))  # as the launchers ask


def usage(kernel) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of a compiled kernel, read by the cuobjdump that Triton ships."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        text = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-300:]!r}")
    return int(found.group(1)), int(found.group(2))


def rows(dtypes, sets):
    """One dict per (dtype, feature set, kernel, configuration)."""
    from apt_kernels.attention import fused as f

    for dt in dtypes:
        prec = DTYPES[dt]
        fwd_table, bwd_table, kv_table, _ = f._tables(prec)
        for name in sets:
            D, pw, consts = FEATURES[name]
            common = dict(D=D, BLOCK_D=f._block_d(D), PREC=prec, **consts)
            kernels = [("fwd", f._fwd_kernel, fwd_table, dict(PW=pw)),
                       ("bwd_q", f._bwd_q_kernel, bwd_table, dict(PW=pw, HAS_DLSE=False)),
                       ("bwd_kv tokens", f._bwd_kv_kernel, kv_table,
                        dict(IS_PREFIX=False, HAS_GATE=False, GATE_H1=True, SPLIT=False))]
            if consts["HAS_GATE"]:
                kernels.append(("bwd_kv prefix", f._bwd_kv_kernel, f._prefix_table(pw, prec),
                                dict(IS_PREFIX=True, GATE_H1=True, SPLIT=True)))
            for kname, kern, table, extra in kernels:
                for i, entry in enumerate(table[f._dclass(D)]):
                    k = build(kern, dt, dict(common, **f._meta(entry), **extra),
                              dict(num_warps=entry[2], num_stages=entry[3]))
                    regs, stack = usage(k)
                    yield dict(dtype=dt, features=name, kernel=kname, config=entry, fixed=i == 0,
                               regs=regs, stack=stack, shared=k.metadata.shared, mma=mma_counts(k))


def mma_counts(kernel) -> tuple[int, int] | None:
    """(warpgroup MMAs, mma.sync) in a compiled kernel's PTX: Hopper's wgmma needs 64 rows per warpgroup, so a
    dot whose rows are a 32-wide tile falls back to the Ampere instruction."""
    ptx = getattr(kernel, "asm", {}).get("ptx")
    if ptx is None:
        return None
    return len(re.findall(r"wgmma\.mma_async", ptx)), len(re.findall(r"\bmma\.sync", ptx))


def format_row(r: dict) -> str:
    m, n, w, st = r["config"][:4]
    orient = (" key-major" if r["config"][4] else " query-major") if len(r["config"]) > 4 else ""
    over = "  OVER" if r["shared"] > SHARED_LIMIT else ""
    mma = f"  wgmma {r['mma'][0]:>3} mma.sync {r['mma'][1]:>3}" if r.get("mma") else ""
    return (f"{r['dtype']:>5} {r['features']:<12} {r['kernel']:<14} {'*' if r['fixed'] else ' '}"
            f"{m:>4}x{n:<4} w{w} s{st}{orient:<12} regs {r['regs']:>3}  stack {r['stack']:>6} B  "
            f"shared {r['shared'] // 1024:>4} KB{mma}{over}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--sets", default=",".join(FEATURES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    if "triton" in sys.modules:
        raise SystemExit("run as its own process: Triton is already imported")
    import triton
    import torch

    from benchmarks.harness import metadata

    dtypes, sets = args.dtypes.split(","), args.sets.split(",")
    meta = metadata("cpu")
    lines = [f"# attention kernels compiled for sm_90 by Triton {triton.__version__} (torch {torch.__version__}), "
             f"{meta.get('date', '')}", "# feature sets: " + "; ".join(f"{s}: {DESCRIBE[s]}" for s in sets),
             "# '*': the fixed choice (the table's first entry); stack: the spill frame per thread; key-major / "
             "query-major: the key-side backward's score tiles as (keys, queries) or (queries, keys); wgmma / mma.sync: "
             "Hopper's warpgroup MMAs and the Ampere-style ones in the PTX (FMA loops for float32's IEEE dots)"]
    for line in lines:
        print(line, flush=True)
    for r in rows(dtypes, sets):
        lines.append(format_row(r))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
