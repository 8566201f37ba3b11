"""Build helpers for the nvcc lane: where the CUDA headers are, and the host build of csrc/'s kernels.

The host build (``build_host_kernels``) compiles csrc/*.cu as plain C++ with tests/cuda_host_sim.h, which
runs every launch on CPU threads with CUDA's block and warp semantics, so that a machine without a GPU
executes the very kernels the extension builds (see that header for what it covers).
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
TESTS = ROOT / "tests"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def cuda_include_dirs() -> list[pathlib.Path]:
    """The CUDA toolkit's include folders (cuda_runtime.h), found from nvcc."""
    nvcc = pathlib.Path(shutil.which("nvcc")).resolve()
    found = [p for p in (nvcc.parents[1] / "include", pathlib.Path("/usr/local/cuda/include"))
             if (p / "cuda_runtime.h").exists()]
    if not found:  # nvcc may be a wrapper script: ask it where the toolkit is
        out = subprocess.run([str(nvcc), "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
        tops = [line.split("=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line]
        found = [pathlib.Path(t) / "include" for t in tops]
    return found


def host_source(text: str) -> str:
    """A .cu file's text with its launches ``k<<<g, b, s, st>>>(args)`` as ``::sim::Launch(g, b, s, st)(k, args)``."""
    out, n = _LAUNCH.subn(r"::sim::Launch(\2)(\1, ", text)
    if n != text.count("<<<"):
        raise ValueError("a launch was not rewritten")
    return '#include "cuda_host_sim.h"\n' + out


def build_host_kernels(out_dir: pathlib.Path, sources: list[str], harness: str = "") -> ctypes.CDLL:
    """csrc/<sources> (.cu files) compiled for the host into one shared library (their extern "C" API),
    with ``harness`` (C++ source: more host entry points for the tests) as one more translation unit."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    units = [(pathlib.Path(name).stem, host_source((CSRC / name).read_text())) for name in sources]
    if harness:
        units.append(("harness", host_source(harness)))
    objects = []
    for i, (stem, text) in enumerate(units):
        src = out_dir / (stem + "_host.cpp")
        if i == 0:
            text = "#define CUDA_HOST_SIM_RUNTIME\n" + text
        src.write_text(text)
        obj = src.with_suffix(".o")
        # -ffp-contract=off: the host branches' x * y and x + y stay separate roundings, as the PTX's .rn.
        cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-pthread", "-w", f"-I{TESTS}", f"-I{CSRC}",
               *[f"-I{p}" for p in cuda_include_dirs()], "-c", str(src), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"host build of {stem} failed:\n{res.stderr[-4000:]}")
        objects.append(str(obj))
    lib = out_dir / "libcsrc_host.so"
    # -Bsymbolic: the simulated runtime (cudaMemsetAsync, cudaGetLastError, ..) binds to its own definitions,
    # not to a real libcudart that a CUDA build of torch has already loaded with global symbols
    res = subprocess.run([cxx, "-shared", "-pthread", "-Wl,-Bsymbolic", "-o", str(lib), *objects], capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"linking the host kernels failed:\n{res.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))
