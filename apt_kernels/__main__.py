"""``python -m apt_kernels``: what this machine has and which backend of every op runs here, and why."""

from __future__ import annotations

import sys

import torch

from . import _env
from .registry import REGISTRIES, Probe


def report() -> str:
    import apt_kernels  # noqa: F401  (registers every op)

    lines = ["apt-kernels environment", ""]
    for name, ver in _env.versions().items():
        lines.append(f"  {name:13s} {ver or 'not installed'}")
    lines.append(f"  {'device':13s} {_env.device_description()}")
    lines.append(f"  {'triton mode':13s} " + ("interpreter (TRITON_INTERPRET=1)" if _env.triton_interpret() else "compiled"))
    ext_err = _env.cuda_reason(torch.device("cuda"))
    lines.append(f"  {'CUDA ext.':13s} " + ("loaded" if ext_err is None else ext_err))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in sorted(REGISTRIES):
        lines.append("")
        for dev in devices:
            dtype = torch.bool if op in ("pack_bits", "child_tuning_keep_mask") else (
                torch.bfloat16 if dev == "cuda" else torch.float32)
            lines.append(REGISTRIES[op].explain(Probe(torch.device(dev), dtype)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
