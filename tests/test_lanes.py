"""The Triton lane (interpreter on CPU, compiled on GPU) and the CUDA C++ compile lane."""

import pathlib
import shutil
import subprocess

import pytest
import torch

from apt_kernels.child_tuning import keep_mask
from cuda_host import cuda_include_dirs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("seed,step,index,shape,p,offset", [
    (0, 1, 0, (37, 5), 0.3, 0),
    (123456789012345, 7, 3, (1000,), 0.9, 0),
    (2 ** 64 - 1, 2 ** 31 + 5, 70000, (3, 3), 0.5, 0),
    (5, 1, 0, (10,), 0.5, 2 ** 32 - 3),  # element index crosses 2**32
])
def test_triton_keep_mask_equals_definition(seed, step, index, shape, p, offset):
    want = keep_mask(seed, step, index, shape, p, DEVICE, offset, backend="reference")
    got = keep_mask(seed, step, index, shape, p, DEVICE, offset, backend="triton")
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_sources_compile_for_sm90(source, tmp_path):
    cmd = [shutil.which("nvcc"), "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90",
           "-I", str(CSRC), "-c", str(CSRC / source), "-o", str(tmp_path / "out.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def _torch_include_flags(stub_dir: pathlib.Path) -> list[str]:
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    # CPU wheels of torch ship c10/cuda headers but not this generated one; it only sets a macro.
    (stub_dir / "c10/cuda/impl").mkdir(parents=True)
    (stub_dir / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = cuda_include_dirs()
    return ([f"-I{stub_dir}"] + [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
            + [f"-I{p}" for p in cuda_include] + [f"-I{CSRC}"])


@pytest.mark.nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cpp")))
def test_bindings_compile_against_torch_headers(source, tmp_path):
    """The torch-facing files cannot be built without a CUDA torch; check they at least compile."""
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=_C",
           *_torch_include_flags(tmp_path), str(CSRC / source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


def test_kernel_sources_are_free_of_torch_headers():
    sources = list(CSRC.glob("*.cu")) + list(CSRC.glob("*.cuh"))
    assert sources
    for path in sources:
        text = path.read_text()
        assert "torch/" not in text and "ATen" not in text and "c10/" not in text, path
