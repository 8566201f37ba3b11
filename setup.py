"""Build of apt-kernels. The CUDA C++ extension (apt_kernels._C) is built only when it can be.

It is built when torch is importable in the build environment with CUDA support and a CUDA toolkit
(nvcc) is found, or when APT_KERNELS_BUILD_CUDA=1 forces it (then a missing piece is an error).
APT_KERNELS_BUILD_CUDA=0 skips it. Without it the package is pure Python + Triton, and the "cuda"
backend reports itself unavailable at run time. pip builds in an isolated environment without torch
by default: to build the extension, install with `pip install --no-build-isolation -e .`.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def say(msg):
    print(f"apt-kernels setup: {msg}", file=sys.stderr)


def cuda_extension():
    force = os.environ.get("APT_KERNELS_BUILD_CUDA", "").strip()
    if force == "0":
        say("APT_KERNELS_BUILD_CUDA=0: skipping the CUDA extension")
        return [], {}
    why = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = None
        why = "torch is not importable in the build environment (use --no-build-isolation)"
    if torch is not None:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None and shutil.which("nvcc") is None:
            why = "no CUDA toolkit (nvcc) found"
    if why:
        if force == "1":
            raise RuntimeError(f"APT_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        say(f"skipping the CUDA extension: {why}; the 'cuda' backend will be unavailable")
        return [], {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # No --use_fast_math: the kernels are memory-bound, and it would flush denormals to zero.
    nvcc_flags = ["-O3", "-lineinfo"]
    if not arch:
        # sm_90 machine code plus compute_90 PTX, which the driver compiles for newer GPUs at load time
        nvcc_flags += ["-gencode=arch=compute_90,code=[sm_90,compute_90]"]
    # csrc/bindings.cpp includes every csrc/*_bind.cpp (one translation unit for the torch headers)
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        unity = f.read()
    missing = [os.path.basename(b) for b in glob.glob(os.path.join(ROOT, "csrc", "*_bind.cpp"))
               if f'#include "{os.path.basename(b)}"' not in unity]
    if missing:
        raise RuntimeError(f"csrc/bindings.cpp must #include {missing}")
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*.cu"))
    say(f"building the CUDA extension apt_kernels._C from {len(sources)} sources")
    ext = CUDAExtension(
        "apt_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
