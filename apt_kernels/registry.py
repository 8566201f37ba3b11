"""One backend registry for every op.

Each op family registers its implementations under the four backend names. A backend is an
implementation plus a *check* that looks at a :class:`Probe` (device, dtype and the op's features
in use) and returns ``None`` when it can run, or a sentence saying why it cannot. ``backend="auto"``
walks a per-device preference order and takes the first backend whose check passes; an explicit
backend that cannot run raises :class:`BackendUnavailable` with its reason. :func:`explain` returns
the whole decision as text, and ``python -m apt_kernels`` prints it for every op.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from . import _env

log = logging.getLogger("apt_kernels")

BACKENDS = ("reference", "torch", "triton", "cuda")
# The order "auto" tries, per device type. "reference" is never chosen automatically.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
_DEFAULT_AUTO = ("torch",)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs here."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a backend check may look at: where the data lives, its dtype, which features are used."""

    device: torch.device
    dtype: torch.dtype
    features: frozenset[str] = frozenset()

    @classmethod
    def of(cls, t: torch.Tensor, *features: str) -> "Probe":
        return cls(t.device, t.dtype, frozenset(f for f in features if f))


Check = Callable[[Probe], "str | None"]


def needs_triton(probe: Probe) -> str | None:
    return _env.triton_reason(probe.device)


def needs_cuda_extension(probe: Probe) -> str | None:
    return _env.cuda_reason(probe.device)


@dataclasses.dataclass
class _Entry:
    fn: Callable[..., Any]
    checks: tuple[Check, ...]

    def reason(self, probe: Probe) -> str | None:
        for check in self.checks:
            why = check(probe)
            if why:
                return why
        return None


class Registry:
    """Backends of one op. ``register`` adds one; ``select`` picks one for a probe."""

    def __init__(self, op: str):
        self.op = op
        self._entries: dict[str, _Entry] = {}
        self._order: dict[str, tuple[str, ...]] = {}  # per-op auto orders that differ from AUTO_ORDER
        self.order_reason: dict[str, str] = {}

    def prefer(self, device_type: str, order: tuple[str, ...], why: str) -> None:
        """This op's ``auto`` order on ``device_type`` (instead of AUTO_ORDER's), with the reason."""
        self._order[device_type] = tuple(order)
        self.order_reason[device_type] = why

    def auto_order(self, device_type: str) -> tuple[str, ...]:
        return self._order.get(device_type) or AUTO_ORDER.get(device_type, _DEFAULT_AUTO)

    def register(self, backend: str, *checks: Check):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")
        default = {"triton": (needs_triton,), "cuda": (needs_cuda_extension,)}.get(backend, ())

        def deco(fn):
            self._entries[backend] = _Entry(fn, default + tuple(checks))
            return fn

        return deco

    def check_backend(self, backend: str) -> str:
        """``backend`` if it names "auto" or a backend registered for this op, else ValueError (for arguments
        stored now and selected at a later call)."""
        names = ("auto", *(b for b in BACKENDS if b in self._entries))
        if backend not in names:
            raise ValueError(f"backend must be one of {names}, got {backend!r}")
        return backend

    def reason(self, backend: str, probe: Probe) -> str | None:
        """None if ``backend`` can run ``probe`` here, else why not."""
        entry = self._entries.get(backend)
        if entry is None:
            return f"{self.op} has no {backend} implementation yet"
        return entry.reason(probe)

    def select(self, backend: str, probe: Probe) -> tuple[str, Callable[..., Any]]:
        if backend == "auto":
            order = self.auto_order(probe.device.type)
            for name in order:
                if self.reason(name, probe) is None:
                    if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
                        log.debug("%s: auto picked %s for %s", self.op, name, probe)
                    return name, self._entries[name].fn
            # Nothing preferred can run (e.g. an unusual device): the reference runs anywhere.
            return "reference", self._entries["reference"].fn
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        why = self.reason(backend, probe)
        if why:
            raise BackendUnavailable(f"{self.op}: backend={backend!r} cannot run here: {why}")
        return backend, self._entries[backend].fn

    def explain(self, probe: Probe) -> str:
        lines = [f"{self.op} on {probe.device.type}/{str(probe.dtype).replace('torch.', '')}"
                 + (f" with {', '.join(sorted(probe.features))}" if probe.features else "") + ":"]
        for name in BACKENDS:
            why = self.reason(name, probe)
            lines.append(f"  {name:9s} {'available' if why is None else 'unavailable: ' + why}")
        why = self.order_reason.get(probe.device.type)
        pick = self.select("auto", probe)[0]
        if self.reason(pick, probe):
            lines.append("  auto ->   none: no backend runs these inputs")
        else:
            lines.append(f"  auto ->   {pick}"
                         + (f" (order {' > '.join(self.auto_order(probe.device.type))}: {why})" if why else ""))
        return "\n".join(lines)


REGISTRIES: dict[str, Registry] = {}


def registry(op: str) -> Registry:
    if op not in REGISTRIES:
        REGISTRIES[op] = Registry(op)
    return REGISTRIES[op]


def explain(op: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            *features: str) -> str:
    """Text saying which backends of ``op`` can run on ``device``/``dtype`` and which ``auto`` picks."""
    if op not in REGISTRIES:
        raise ValueError(f"unknown op {op!r}; ops are {sorted(REGISTRIES)}")
    return REGISTRIES[op].explain(Probe(torch.device(device), dtype, frozenset(features)))
