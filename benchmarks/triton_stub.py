"""A stub GPU for Triton's launch path: compiled kernels are recorded, never built or run.

``install(record)`` makes Triton (imported here without its interpreter: the process must not have
``TRITON_INTERPRET`` set before this import) believe it has an sm_90 device: every ``kernel[grid](...)``
binds and specialises its arguments, runs the autotuner's bookkeeping (its timing stubbed) and ends in the
launcher, which calls ``record(kernel_name, grid, args)`` instead of launching. CPU tensors stand in for
CUDA ones, and apt_kernels is told Triton can run on them and that its kernels are compiled. Used by
``benchmarks/attention_host.py`` (host time of the launch path) and ``tests/launch_probe.py`` (what a cached
launch hands the launcher).
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("benchmarks.triton_stub needs compiled Triton: unset TRITON_INTERPRET")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import CompiledKernel  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return torch.cuda


class _Compiled(CompiledKernel):
    """A compiled kernel whose launcher records its calls."""

    function = 0
    packed_metadata = None

    def __init__(self, name, record):  # noqa: D107 - none of CompiledKernel's own state is needed
        self.name = name

        def run(g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
            record(name, (g0, g1, g2), args)

        self._recorder = run

    def _init_handles(self):
        pass

    @property
    def run(self):
        return self._recorder

    def launch_metadata(self, grid, stream, *args):
        return None


def install(record=lambda name, grid, args: None, prefix_splits: int = 2) -> None:
    """Stub the device (see the module docstring). ``prefix_splits``: the attention backward's query splits
    of the prefix launch (on a GPU computed from the SM count)."""
    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _Compiled(self.__name__, record)
        self.device_caches[device][0][key] = kernel
        return kernel

    driver.set_active(_Driver())
    JITFunction._do_compile = do_compile
    Autotuner._bench = lambda self, *args, config, **kwargs: [float(config.num_warps)] * 3  # no timing
    torch.cuda.current_device = lambda: 0

    from apt_kernels import _env, _launch
    from apt_kernels.attention import fused

    _env.triton_reason = lambda device: None  # CPU tensors stand in for CUDA ones
    _launch.compiled = lambda device: True  # (every launcher asks it)
    fused.PREFIX_SPLITS = prefix_splits
