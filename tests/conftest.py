"""Test configuration. Lanes (pytest markers): triton, nvcc, gpu; see pyproject.toml.

Without a CUDA device, Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, before any test module imports it.
"""

import os
import shutil
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness tests use the fixed block configurations: autotuning every shape and feature combination
# would spend minutes compiling. tests/test_attention_triton.py checks the autotuned path once.
os.environ.setdefault("APT_KERNELS_AUTOTUNE", "0")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_nvcc = pytest.mark.skip(reason="nvcc not found")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "nvcc" in item.keywords and shutil.which("nvcc") is None:
            item.add_marker(skip_nvcc)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh inputs, yet a failure can be replayed.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
