"""What this process can run: Triton (compiled or interpreted), the CUDA extension, versions.

Everything here is cheap and cached; nothing here raises. The backend registry asks these
questions to decide which backends are available and to say why one is not.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import platform

import torch


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None


def triton_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_UNSET = object()
_triton_error = _UNSET


def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the reason it does not (computed once).

    A plain module-level cache rather than functools.lru_cache, so torch.compile traces through it.
    """
    global _triton_error
    if _triton_error is _UNSET:
        if importlib.util.find_spec("triton") is None:
            _triton_error = "triton is not installed (pip install triton)"
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _triton_error = None
            except Exception as e:  # noqa: BLE001
                _triton_error = f"import triton failed: {type(e).__name__}: {e}"
    return _triton_error


@torch.compiler.assume_constant_result  # traced code (backend selection) gets the answer, not the import machinery
def triton_reason(device: torch.device) -> str | None:
    """None when a Triton kernel can run on tensors of ``device``, else why not."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpret():
            return None
        return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels do not run on {device.type} tensors"


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("apt_kernels._C"), None
    except ImportError as e:
        return None, (
            "the CUDA extension apt_kernels._C is not built "
            f"({e}); rebuild on a CUDA machine with `pip install --no-build-isolation -e .`"
        )
    except Exception as e:  # noqa: BLE001 - a broken build must not break import
        return None, f"the CUDA extension apt_kernels._C failed to load: {type(e).__name__}: {e}"


def cuda_extension():
    """The loaded extension module, or None."""
    return _load_extension()[0]


def on_device(device: torch.device):
    """A context in which ``device`` is the current CUDA device (a no-op elsewhere). Triton launches, and
    its autotuner benchmarks, on the current device: the kernels' tensors may live on another GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.compiler.assume_constant_result  # as triton_reason: torch.compile must not trace the extension's import
def cuda_reason(device: torch.device) -> str | None:
    """None when the CUDA C++ extension can run on tensors of ``device``, else why not."""
    if device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors (got {device.type})"
    why = _load_extension()[1]
    if why is None and not torch.cuda.is_available():  # built and loaded, e.g. a CUDA torch on a GPU-less host
        return "the CUDA extension apt_kernels._C is built, but torch sees no CUDA device"
    if why is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # the default build targets compute capability 9.0 (sm_90 code + compute_90 PTX)
        major, minor = torch.cuda.get_device_capability(device)
        if major < 9:
            return (f"the CUDA extension was built for compute capability 9.0 and later; this GPU is "
                    f"{major}.{minor} (rebuild with TORCH_CUDA_ARCH_LIST set to include it)")
    return why


def versions() -> dict[str, str | None]:
    cuda = torch.version.cuda
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "apt_kernels": _version("apt_kernels"),
    }


def device_description() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (f"cuda:0 {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB)")
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); no CUDA device"
