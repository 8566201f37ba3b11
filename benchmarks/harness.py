"""One benchmark runner for every op.

A :class:`Case` is one op at one shape: a recipe for fresh random inputs (``make_inputs(seed)``), the
*contenders* that compute the op from those inputs (our backends and the peers we compare with), the
modes to time ("fwd", "bwd", "fwd+bwd") and optional nominal FLOP / byte counts per mode.

For every contender the harness builds ``N_INPUT_SETS`` input sets from different seeds (same seeds for
every contender, so all of them see the same data), builds the contender's closure on each, and times
a function that rotates through them, so a set's data is not still in cache from the previous call.

* fwd:      the closure, under ``torch.no_grad()``.
* bwd:      the closure runs once per set outside the timed region; ``torch.autograd.grad`` of that
            output with a fixed random output gradient (``retain_graph=True``) is timed.
* fwd+bwd:  closure + ``torch.autograd.grad``.
* step:     the closure as it is, gradients enabled (a whole training step: forward, backward, update).

Timing: on CUDA ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events and a median when
Triton is missing); on CPU the median of ``time.perf_counter`` over repeated calls after a warm-up.
do_bench flushes the L2 cache before each timed call, which leaves the GPU busy while the host prepares
the call: the median is GPU time. Calls under ``WALL_BELOW_MS`` also get ``wall_ms``, the time per call of
back-to-back calls with host time included (what a training loop waits when the host is the bottleneck);
the targets show its ratio next to the verdict.
Peak memory (CUDA only) is ``max_memory_allocated`` during one call minus what was allocated before
it (inputs, optimizer states, saved graphs): the extra memory the op needs.

A contender that cannot run (``BackendUnavailable``, a peer that does not exist on this device, a
failed compile) is recorded with status "skipped" and the reason; an unexpected exception from one of
*our* backends is recorded as "error" (a bug to look at) without stopping the run.

With ``profile=True`` every measured mode of our fused backends (not the PyTorch fallbacks; and of the peers
too where the case sets ``profile_peers``) gets a ``kernels`` list: the time per call of its heaviest kernels
(CUDA; CPU: operators), and ``kernel_totals``: the device time of all of them, their number and their time
by kernel class (set against the median: the time the device idled within the call), from a few calls
under ``torch.profiler`` once every contender of the case has been timed (so the profiler never runs
before a timing of the same case), so that one GPU run says where the time goes; and ``host``: the host's side
of the same calls (wall clock per call, launches, time in CUDA API calls, and the calls that waited for the GPU),
which says whether device time the kernels leave idle went to host work or to a synchronisation.

Every ok row gets ``ratio_to_best_peer`` = its median / the best peer's median in the same
(op, case, mode): below 1 means faster than every peer measured in that run.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from apt_kernels import _env
from apt_kernels.registry import REGISTRIES, BackendUnavailable, Probe

from .names import short_kernel_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
N_INPUT_SETS = 3
MODES = ("fwd", "bwd", "fwd+bwd", "step")
OUR_BACKENDS = ("reference", "torch", "triton", "cuda")

CSV_COLUMNS = ("op", "case", "mode", "contender", "kind", "status", "median_ms", "wall_ms", "tflops", "gb_s",
               "peak_mem_mb", "ratio_to_best_peer", "best_peer", "frac_of_matmul_peak",
               "frac_of_copy_bw", "params", "reason")


class Skip(Exception):
    """Raised by a contender's build when it cannot run here (the message is the reason)."""


# ------------------------------------------------------------------------------------------ model


@dataclasses.dataclass
class Contender:
    """One way to compute a case.

    ``build(inputs)`` returns a zero-argument callable computing the op on ``inputs`` (a tensor
    output for ops with gradients). ``check(inputs)`` may return a reason to skip before building.
    """

    name: str
    build: Callable[[dict], Callable[[], Any]]
    ours: bool = False
    check: Callable[[dict], "str | None"] | None = None
    # a variant of one of our backends (a setting forced one way): timed after the peers, only in ``modes``
    # (None: every mode of the case), never profiled
    variant: bool = False
    modes: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "ours" if self.ours else "peer"


@dataclasses.dataclass
class Case:
    op: str
    name: str
    params: dict
    make_inputs: Callable[[int], dict]
    contenders: list[Contender]
    modes: tuple[str, ...] = ("fwd",)
    grad_names: tuple[str, ...] = ()  # input tensors the backward differentiates with respect to
    flops: dict[str, float] | None = None  # per mode
    bytes: dict[str, float] | None = None  # per mode
    profile_peers: bool = False  # --profile covers the peers too (whole training steps: where each one's time goes)


@dataclasses.dataclass
class Timing:
    warmup_ms: float = 25.0  # CUDA (do_bench)
    rep_ms: float = 100.0  # CUDA (do_bench)
    cpu_warmup: int = 0  # extra calls after the first pass over the input sets (which already warms up)
    cpu_min_runs: int = 5  # ... but a slow contender stops at 3 runs once it took 4x cpu_target_s
    cpu_max_runs: int = 200
    cpu_target_s: float = 0.25  # keep repeating until this much time was spent (and min_runs done)


def our_backend(op_registry: str, backend: str, build: Callable[[dict], Callable[[], Any]],
                probe: Callable[[dict], Probe], name: str | None = None,
                modes: tuple[str, ...] | None = None) -> Contender:
    """A contender for one of our backends; availability comes from the op's registry. With ``name`` (not the
    backend's), a variant of it (see Contender.variant), measured in ``modes``."""

    def check(inputs):
        p = probe(inputs)
        if backend == "triton" and p.device.type == "cpu" and _env.triton_interpret():
            return "Triton's CPU interpreter (TRITON_INTERPRET=1) is a correctness tool, not a performance measurement"
        return REGISTRIES[op_registry].reason(backend, p)

    variant = name is not None and name != backend
    return Contender(name or backend, build, ours=True, check=check, variant=variant, modes=modes)


def fill(shape, *, seed: int, device, dtype=torch.float32, scale: float = 1.0, offset: float = 0.0,
         requires_grad: bool = False, kind: str = "randn") -> torch.Tensor:
    """Seeded random tensor (never all zeros); ``kind`` "randn" or "rand" (uniform [0, 1))."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    f = torch.randn if kind == "randn" else torch.rand
    t = f(shape, generator=g, device=device, dtype=torch.float32)
    if scale != 1.0 or offset != 0.0:
        t = t * scale + offset
    t = t.to(dtype)
    return t.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench(fn, timing: Timing) -> float:
    try:
        import triton.testing
    except Exception:  # noqa: BLE001 - fall back to CUDA events
        return _cuda_events(fn, timing)
    try:
        return float(triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median"))
    except TypeError:  # an older Triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, quantiles=[0.5])[0])


def _cuda_events(fn, timing: Timing) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(timing.warmup_ms / est))):
        fn()
    n = max(3, min(1000, int(timing.rep_ms / est)))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in evs:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in evs)


def _cpu_time(fn, timing: Timing) -> float:
    for _ in range(timing.cpu_warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()

    def more() -> bool:
        n, spent = len(times), time.perf_counter() - start
        if n >= timing.cpu_max_runs:
            return False
        if n < min(3, timing.cpu_min_runs) or spent < timing.cpu_target_s:
            return True
        return n < timing.cpu_min_runs and spent < 4 * timing.cpu_target_s

    while more():
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


WALL_BELOW_MS = 1.0  # calls this short on a GPU also get wall_ms: their host time may be what a user waits for


def wall_time(fn, device: torch.device, budget_ms: float = 40.0) -> float:
    """Median milliseconds per call of back-to-back calls, host time included (no cache flush between
    calls, a synchronisation per batch): where a call's host work (Python, launches) outlasts its GPU work,
    this is the time a training loop spends on it, which do_bench's flushed, event-timed median hides."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n = max(3, min(200, int(budget_ms / 5 / est)))
    batches = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        batches.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(batches)


def measure(fn, device: torch.device, timing: Timing) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        return _do_bench(fn, timing)
    return _cpu_time(fn, timing)


def peak_extra_mb(fn, device: torch.device) -> float | None:
    """Peak memory of one call beyond what was allocated before it (CUDA), else None."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base) / 2**20


TOP_KERNELS = 8  # kernels kept per profiled row

CALL_RANGE = "apt_bench_call"  # the record_function range around each profiled call
# CUDA runtime / driver calls, as the profiler names them (CPU events): kernel launches, and the calls that
# block the host until the GPU has caught up (a pageable copy to the host is a cudaMemcpyAsync followed by a
# cudaStreamSynchronize: counted by the latter).
LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
               "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
             "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH", "cuMemcpyHtoD")


def _harness_event(key: str) -> bool:
    """The profiler's step markers and the range around each call: the harness's, not the call's."""
    return key.startswith("ProfilerStep") or key == CALL_RANGE


def _api_kind(name: str) -> str | None:
    """"launch", "sync" or "api" for a CUDA runtime/driver call's profiler name, None for anything else."""
    if not (name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper())):
        return None
    base = name.split("_v")[0]  # cuMemcpyDtoH_v2
    if base in LAUNCH_APIS:
        return "launch"
    if base in SYNC_APIS:
        return "sync"
    return "api"


def host_totals(calls: list[tuple[float, float]], events: list[tuple[str, float, float]]) -> dict:
    """Where the host's time goes in the profiled calls: ``calls`` are their (start, end) in microseconds,
    ``events`` the profile's (name, start, end) from every thread (the autograd engine's device thread
    included). Per call: ``host_us`` (wall clock from entering the call to leaving it: Python, torch, the
    launches, and any wait on the GPU), ``launches``, ``syncs`` and ``sync_us`` (calls that wait for the GPU),
    ``api_us`` (time in every CUDA runtime/driver call, those included); ``apis``: the heaviest of them."""
    n = max(1, len(calls))
    spans = sorted(calls)
    per: dict[str, list[float]] = {}
    kinds = dict(launch=[0, 0.0], sync=[0, 0.0], api=[0, 0.0])
    for name, t0, t1 in events:
        kind = _api_kind(name)
        if kind is None or not any(a <= t0 and t1 <= b for a, b in spans):
            continue
        kinds[kind][0] += 1
        kinds[kind][1] += t1 - t0
        per.setdefault(name, [0, 0.0])
        per[name][0] += 1
        per[name][1] += t1 - t0
    apis = sorted(per.items(), key=lambda kv: -kv[1][1])[:6]
    return dict(host_us=sum(b - a for a, b in spans) / n, launches=kinds["launch"][0] / n,
                syncs=kinds["sync"][0] / n, sync_us=kinds["sync"][1] / n,
                api_us=sum(v[1] for v in kinds.values()) / n,
                apis=[dict(name=k, calls=c / n, us=us / n) for k, (c, us) in apis])


def profile_call(fn, device: torch.device, calls: int = 3) -> tuple[list[dict], dict]:
    """``(kernels, host)`` of ``fn`` from ``calls`` calls under ``torch.profiler``, per call.

    ``kernels``: every kernel (CUDA: device time of each kernel, copy and fill; CPU: self time of each
    operator), ``[{"name", "calls", "us"}]``, heaviest first; ``calls`` is how often it ran per call of ``fn``.
    ``host``: :func:`host_totals` (the profiler's own cost is in ``host_us``: an upper bound), and ``ops``: the
    operators with the most self CPU time per call."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    # one warm-up step inside the session (a session's first kernel records can be lost), then the
    # recorded one
    with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
        for step in range(2):
            for _ in range(1 if step == 0 else calls):
                with record_function(CALL_RANGE):
                    fn()
            _sync(device)
            prof.step()
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == CALL_RANGE]
    host = host_totals(spans, [(e.name, e.time_range.start, e.time_range.end) for e in events
                               if e.device_type == torch.autograd.DeviceType.CPU])
    avgs = prof.key_averages()
    # the operators heaviest on the host (self CPU time, the autograd engine's thread included)
    cpu_ops = [e for e in avgs if e.device_type == torch.autograd.DeviceType.CPU and _api_kind(e.key) is None
               and not _harness_event(e.key)]
    cpu_ops.sort(key=lambda e: -e.self_cpu_time_total)
    host["ops"] = [dict(name=e.key, calls=e.count / calls, us=e.self_cpu_time_total / calls) for e in cpu_ops[:8]]
    out = []
    for e in avgs:
        if _harness_event(e.key):
            continue
        if cuda:
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
        else:
            us = e.self_cpu_time_total
        if us > 0 and (not cuda or e.device_type != torch.autograd.DeviceType.CPU):
            out.append(dict(name=short_kernel_name(e.key), calls=e.count / calls, us=us / calls))
    if cuda and not out:  # a profiler that files kernels under their operators only
        out = [dict(name=short_kernel_name(e.key), calls=e.count / calls, us=e.self_device_time_total / calls)
               for e in avgs
               if getattr(e, "self_device_time_total", 0) > 0 and not _harness_event(e.key)]
    out.sort(key=lambda k: -k["us"])
    return out, host


# Our kernels by exact name (C++ template arguments dropped): a peer's "flash_fwd_kernel" is not ours.
OUR_KERNELS = {
    "ours:attention": {"_fwd_kernel", "_bwd_q_kernel", "_bwd_kv_kernel", "_sums_kernel"},
    "ours:pst": {"_hist_kernel", "_mask_kernel", "_tie_rows_kernel", "_threshold_kernel", "_cut_kernel", "_bwd_kernel",
                 "hist_kernel", "mask_kernel", "tie_rows_kernel", "bwd_kernel", "nm_kernel"},
    "ours:child_tuning": {"_child_tuning_adamw_kernel", "adamw_kernel", "_keep_mask_kernel", "keep_mask_kernel",
                          "pack_bits_kernel", "unpack_bits_kernel"},
}
# Everything else by a piece of its name (first match wins): what a training step's device time goes to.
KERNEL_CLASSES = (
    ("attention", ("fmha", "flash", "attention", "sdpa", "attn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "matmul", "linear", "mm")),
    ("norm", ("norm",)),
    ("softmax", ("softmax",)),
    ("dropout", ("dropout", "bernoulli")),
    ("reduce", ("reduce", "sum", "mean")),
    ("copy", ("copy", "memcpy", "cat", "clone", "contiguous")),
    ("fill", ("memset", "fill", "zero")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("elementwise", ("elementwise", "vectorized", "add", "mul", "div", "gelu", "tanh", "sigmoid", "silu", "where",
                     "masked")),
)


def kernel_class(name: str) -> str:
    base = name.split("<")[0].strip()
    for cls, names in OUR_KERNELS.items():
        if base in names:
            return cls
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def kernel_totals(kernels: list[dict]) -> dict:
    """{"us": device time per call of every kernel, "launches": kernels per call, "classes": {class: us}}
    (classes heaviest first): set against the call's median, the time the device idled within it."""
    classes: dict[str, float] = {}
    for k in kernels:
        cls = kernel_class(k["name"])
        classes[cls] = classes.get(cls, 0.0) + k["us"]
    return dict(us=sum(k["us"] for k in kernels), launches=sum(k["calls"] for k in kernels),
                classes=dict(sorted(classes.items(), key=lambda kv: -kv[1])))


def format_kernels(kernels: list[dict], top: int = 5) -> str:
    return ", ".join(f"{k['name']} {k['us']:.1f} us" + (f" x{k['calls']:g}" if k["calls"] != 1 else "")
                     for k in kernels[:top])


# ------------------------------------------------------------------------------------------ running


def _rotate(calls: list[Callable[[], Any]]) -> Callable[[], None]:
    it = itertools.cycle(calls)

    def run():
        next(it)()

    return run


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _mode_calls(case: Case, mode: str, fns: list, input_sets: list[dict], device) -> list[Callable[[], Any]]:
    """One zero-argument callable per input set computing ``mode``."""
    if mode == "step":
        return list(fns)
    if mode == "fwd":
        def fwd(f):
            def call():
                with torch.no_grad():
                    return f()
            return call
        return [fwd(f) for f in fns]

    calls = []
    gouts: dict[int, torch.Tensor] = {}  # fwd+bwd: the output gradient of each set, made at its first call
    for s, (f, inputs) in enumerate(zip(fns, input_sets)):
        leaves = [inputs[n] for n in case.grad_names]
        if mode == "bwd":
            with torch.enable_grad():
                out = _first_output(f())
            gout = fill(out.shape, seed=10_000 + s, device=device, dtype=out.dtype)

            def call(out=out, gout=gout, leaves=leaves):
                return torch.autograd.grad(out, leaves, gout, retain_graph=True, allow_unused=True)
        else:  # fwd+bwd
            def call(f=f, leaves=leaves, s=s):
                with torch.enable_grad():
                    out = _first_output(f())
                    gout = gouts.get(s)
                    if gout is None:
                        gout = gouts[s] = fill(out.shape, seed=10_000 + s, device=device, dtype=out.dtype)
                    return torch.autograd.grad(out, leaves, gout, allow_unused=True)
        calls.append(call)
    return calls


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 400:
        msg = msg[:400] + " ..."
    return f"{type(e).__name__}: {msg}" if not isinstance(e, (Skip, BackendUnavailable)) else msg


def _row(case: Case, mode: str, c: Contender, status: str, reason: str = "", ms=None, mem=None, wall=None) -> dict:
    row = dict(op=case.op, case=case.name, mode=mode, contender=c.name, kind=c.kind, status=status,
               median_ms=ms, wall_ms=wall, tflops=None, gb_s=None, peak_mem_mb=mem, ratio_to_best_peer=None,
               best_peer=None, frac_of_matmul_peak=None, frac_of_copy_bw=None, params=dict(case.params),
               reason=reason)
    if ms is not None and ms > 0:
        fl = (case.flops or {}).get(mode)
        by = (case.bytes or {}).get(mode)
        if fl:
            row["tflops"] = fl / (ms * 1e-3) / 1e12
        if by:
            row["gb_s"] = by / (ms * 1e-3) / 1e9
    return row


def _cleanup(device: torch.device, collect: bool = True) -> None:
    # Only on CUDA (memory is measured there). gc.collect costs ~0.2 s with torch, transformers and
    # inductor loaded: once per contender; between modes dropping the references is enough.
    if device.type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


FALLBACKS = ("torch", "reference")  # our plain-PyTorch backends: measured last, so a budget cuts them first


def run_order(contenders: list[Contender]) -> list[Contender]:
    """Our fused backends first, then the peers, then the variants of our backends, then our PyTorch fallbacks:
    when the time budget runs out, what goes unmeasured is what matters least for the targets."""
    def rank(c):
        if not c.ours:
            return 1
        return 3 if c.name in FALLBACKS else 2 if c.variant else 0

    return sorted(contenders, key=rank)


def run_case(case: Case, device: torch.device, timing: Timing, *, deadline: float | None = None,
             n_sets: int = N_INPUT_SETS, log: Callable[[str], None] = print, skip: tuple[str, ...] = (),
             profile: bool = False) -> list[dict]:
    rows: list[dict] = []
    for c in run_order(case.contenders):
        if c.name in skip:
            rows += [_row(case, m, c, "skipped", "left out (--skip)") for m in _modes(case, c)]
            continue
        if deadline is not None and time.monotonic() > deadline:
            rows += [_row(case, m, c, "skipped", "time budget exhausted") for m in _modes(case, c)]
            continue
        rows += _run_contender(case, c, device, timing, n_sets, log, deadline)
        _cleanup(device)
    if profile:  # after every contender of the case was timed: the profiler cannot touch a timing
        for c in case.contenders:
            if (c.ours and c.name not in FALLBACKS and not c.variant) or (case.profile_peers and not c.ours):
                _profile_contender(case, c, [r for r in rows if r["contender"] == c.name and r["status"] == "ok"],
                                   device, log)
                _cleanup(device)
    add_ratios(rows)
    return rows


def _profile_contender(case, c, rows, device, log) -> None:
    """Adds ``kernels`` (the TOP_KERNELS heaviest of :func:`profile_call`), ``kernel_totals`` and ``host`` to
    the measured ``rows`` of contender ``c``."""
    if not rows:
        return
    try:
        inputs = [case.make_inputs(0)]
        fns = [c.build(inputs[0])]
        for row in rows:
            call = _mode_calls(case, row["mode"], fns, inputs, device)[0]
            call()  # warm (compiled and autotuned already, but a fresh closure)
            kernels, row["host"] = profile_call(call, device)
            row["kernels"], row["kernel_totals"] = kernels[:TOP_KERNELS], kernel_totals(kernels)
            log(f"    {c.name:22s} {row['mode']:8s} kernels: {format_kernels(row['kernels'])}")
            log(f"    {'':22s} {'':8s} {format_totals(row)}")
    except Exception as e:  # noqa: BLE001  (a profiler problem must not cost the timings)
        log(f"    {c.name:22s} not profiled: {_reason(e)}")


def _modes(case: Case, c: Contender) -> tuple[str, ...]:
    """The modes contender ``c`` is measured in."""
    return case.modes if c.modes is None else tuple(m for m in case.modes if m in c.modes)


def _run_contender(case, c, device, timing, n_sets, log, deadline=None) -> list[dict]:
    rows = []
    fail_status = "error" if c.ours else "skipped"
    try:
        input_sets = [case.make_inputs(0)]
        why = c.check(input_sets[0]) if c.check else None
        if why:
            raise Skip(why)
        input_sets += [case.make_inputs(s) for s in range(1, n_sets)]
        fns = [c.build(inputs) for inputs in input_sets]
    except (Skip, BackendUnavailable) as e:
        log(f"    {c.name:22s} skipped: {_reason(e)}")
        return [_row(case, m, c, "skipped", _reason(e)) for m in _modes(case, c)]
    except torch.OutOfMemoryError as e:
        log(f"    {c.name:22s} skipped: out of memory")
        return [_row(case, m, c, "skipped", "out of memory: " + _reason(e)) for m in _modes(case, c)]
    except Exception as e:  # noqa: BLE001
        log(f"    {c.name:22s} {fail_status}: {_reason(e)}")
        return [_row(case, m, c, fail_status, _reason(e)) for m in _modes(case, c)]

    for mode in _modes(case, c):
        if deadline is not None and time.monotonic() > deadline:
            rows.append(_row(case, mode, c, "skipped", "time budget exhausted"))
            continue
        calls = run = None
        try:
            calls = _mode_calls(case, mode, fns, input_sets, device)
            for call in calls:  # first pass: compiles, autotunes, creates optimizer state
                call()
            _sync(device)
            run = _rotate(calls)
            mem = peak_extra_mb(run, device)
            ms = measure(run, device, timing)
            if not (math.isfinite(ms) and ms > 0):
                raise RuntimeError(f"timer returned {ms}")
            wall = wall_time(run, device) if device.type == "cuda" and ms < WALL_BELOW_MS else None
            row = _row(case, mode, c, "ok", ms=ms, mem=mem, wall=wall)
            extra = "".join([f"  {row['tflops']:8.2f} TFLOP/s" if row["tflops"] else "",
                             f"  {row['gb_s']:8.1f} GB/s" if row["gb_s"] else "",
                             f"  +{mem:.0f} MiB" if mem is not None else "",
                             f"  wall {wall:.4f} ms" if wall is not None else ""])
            log(f"    {c.name:22s} {mode:8s} {ms:10.4f} ms{extra}")
        except (Skip, BackendUnavailable) as e:
            row = _row(case, mode, c, "skipped", _reason(e))
            log(f"    {c.name:22s} {mode:8s} skipped: {_reason(e)}")
        except torch.OutOfMemoryError as e:  # a size limit of this device, not a bug
            row = _row(case, mode, c, "skipped", "out of memory: " + _reason(e))
            log(f"    {c.name:22s} {mode:8s} skipped: out of memory")
        except Exception as e:  # noqa: BLE001
            row = _row(case, mode, c, fail_status, _reason(e))
            log(f"    {c.name:22s} {mode:8s} {fail_status}: {_reason(e)}")
            if c.ours and os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        rows.append(row)
        calls = run = None  # free this mode's saved graphs before the next mode
        _cleanup(device, collect=False)
    return rows


def add_ratios(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), []).append(r)
    for group in groups.values():
        peers = [r for r in group if r["kind"] == "peer" and r["status"] == "ok"]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["median_ms"])
        for r in group:
            r["best_peer"] = best["contender"]
            if r["status"] == "ok":
                r["ratio_to_best_peer"] = r["median_ms"] / best["median_ms"]


def add_floor_fractions(rows: list[dict], floors: dict | None) -> None:
    if not floors:
        return
    for r in rows:
        if r.get("tflops") and floors.get("matmul_bf16_tflops"):
            r["frac_of_matmul_peak"] = r["tflops"] / floors["matmul_bf16_tflops"]
        if r.get("gb_s") and floors.get("copy_gb_s"):
            r["frac_of_copy_bw"] = r["gb_s"] / floors["copy_gb_s"]


def run_cases(cases: list[Case], device, timing: Timing | None = None, *, deadline: float | None = None,
              n_sets: int = N_INPUT_SETS, log: Callable[[str], None] = print,
              on_case: Callable[[list[dict]], None] | None = None, skip: tuple[str, ...] = (),
              profile: bool = False) -> list[dict]:
    """Run every case; returns the rows (``on_case(rows_so_far)`` after each case, for incremental saves)."""
    device = torch.device(device)
    timing = timing or Timing()
    rows: list[dict] = []
    for i, case in enumerate(cases, 1):
        shape = ", ".join(f"{k}={v}" for k, v in case.params.items())
        log(f"[{case.op} {i}/{len(cases)}] {case.name} ({shape})")
        rows += run_case(case, device, timing, deadline=deadline, n_sets=n_sets, log=log, skip=skip, profile=profile)
        if on_case:
            on_case(rows)
    return rows


# ------------------------------------------------------------------------------------------ output


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return x


def metadata(device, **extra) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        desc = _env.device_description()
    else:
        desc = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads)")
    return dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), device=desc,
                device_type=device.type, versions=_env.versions(), **extra)


def write_results(rows: list[dict], out_dir: str | Path, name: str, meta: dict, *, plots: bool = True) -> dict:
    """Write ``<name>.json``, ``<name>.csv`` and (``plots``) ``<name>-<op>.png``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "csv": out_dir / f"{name}.csv"}
    doc = _jsonable(dict(meta, name=name, rows=rows))
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(paths["json"])
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            r = dict(r, params=json.dumps(r["params"], sort_keys=True))
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    if plots:
        paths.update(write_plots(rows, out_dir, name, meta.get("device", "")))
    return paths


def write_plots(rows: list[dict], out_dir: str | Path, name: str, device: str = "") -> dict:
    """``<name>-<op>.png`` per op with a measured row; returns {"png:<op>": path} ({} without matplotlib:
    the results are already written, a missing plotting library must not fail the run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (draw them later with --table NAME.json)")
        return {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        p = plot_op([r for r in rows if r["op"] == op], out_dir / f"{name}-{op}.png", title=f"{op} — {device}")
        if p:
            paths[f"png:{op}"] = p
    return paths


def plot_op(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Bars of median ms per contender, grouped by case, one panel per mode (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches  # noqa: F401
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in ok))  # only those measured somewhere
    kind = {r["contender"]: r["kind"] for r in ok}
    colors = plt.get_cmap("tab10" if len(contenders) <= 10 else "tab20")
    color = {c: colors(i % colors.N) for i, c in enumerate(contenders)}
    ms = {(r["mode"], r["case"], r["contender"]): r["median_ms"] for r in ok}
    most = max(sum((m, cs, c) in ms for c in contenders) for m in modes for cs in cases)
    width = 0.8 / max(1, most)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 0.35 * len(cases) * most + 2), 3.2 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        for i, cs in enumerate(cases):
            here = [c for c in contenders if (mode, cs, c) in ms]
            for j, c in enumerate(here):
                ax.bar(i + (j - (len(here) - 1) / 2) * width, ms[(mode, cs, c)], width=width, color=color[c],
                       hatch=None if kind[c] == "ours" else "//", edgecolor="black", linewidth=0.3)
        ax.set_yscale("log")
        ax.set_ylabel(f"{mode}: median ms")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles = [matplotlib.patches.Patch(facecolor=color[c], edgecolor="black", hatch=None if kind[c] == "ours" else "//",
                                        label=c) for c in contenders]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"{title}  (hatched = peers; lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def summary(rows: list[dict]) -> list[dict]:
    """Per (op, case, mode): our best backend and the best peer."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), []).append(r)
    for (op, case, mode), g in groups.items():
        ok = [r for r in g if r["status"] == "ok"]
        ours = min((r for r in ok if r["kind"] == "ours"), key=lambda r: r["median_ms"], default=None)
        peer = min((r for r in ok if r["kind"] == "peer"), key=lambda r: r["median_ms"], default=None)
        out.append(dict(op=op, case=case, mode=mode,
                        ours=ours["contender"] if ours else None, ours_ms=ours["median_ms"] if ours else None,
                        peer=peer["contender"] if peer else None, peer_ms=peer["median_ms"] if peer else None,
                        ratio=(ours["median_ms"] / peer["median_ms"]) if ours and peer else None))
    return out


def format_summary(rows: list[dict]) -> str:
    s = summary(rows)
    head = ("op", "case", "mode", "ours", "ours ms", "best peer", "peer ms", "ratio")
    body = [(r["op"], r["case"], r["mode"], r["ours"] or "-",
             f"{r['ours_ms']:.4f}" if r["ours_ms"] is not None else "-",
             r["peer"] or "-", f"{r['peer_ms']:.4f}" if r["peer_ms"] is not None else "-",
             f"{r['ratio']:.3f}" if r["ratio"] is not None else "-") for r in s]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    lines.append("ratio = our best backend's median / the best peer's median (< 1: ours is faster).")
    return "\n".join(lines)


def format_totals(row: dict, top: int = 6) -> str:
    """A profiled row's device time in all, per kernel class, against its median (what is left: idle)."""
    t = row.get("kernel_totals")
    if not t:
        return ""
    busy = f" = {t['us'] / (row['median_ms'] * 1e3):.0%} of the median" if row.get("median_ms") else ""
    classes = ", ".join(f"{c} {us / 1e3:.2f}" for c, us in list(t["classes"].items())[:top])
    line = f"all kernels {t['us'] / 1e3:.2f} ms in {t['launches']:g} launches{busy}; by class (ms): {classes}"
    h = row.get("host")
    if h:
        line += f"; {format_host(h)}"
    return line


def format_host(h: dict) -> str:
    """A profiled call's host side (:func:`host_totals`) in one phrase."""
    text = f"host {h['host_us'] / 1e3:.3f} ms a call under the profiler"
    if h["api_us"]:
        text += f" ({h['launches']:g} launches, {h['api_us'] / 1e3:.3f} ms in CUDA API calls"
        if h["syncs"]:
            text += f", {h['syncs']:g} waiting on the GPU for {h['sync_us'] / 1e3:.3f} ms"
        text += ")"
    return text


def format_kernel_table(rows: list[dict], top: int = 4) -> str:
    """Per measured row with a profile: its heaviest kernels and its device time by class (empty string when
    none)."""
    prof = [r for r in rows if r.get("kernels")]
    if not prof:
        return ""
    lines = ["heaviest kernels per call (torch.profiler, after the timing):"]
    for r in prof:
        lines.append(f"  {r['op']} {r['case']} {r['mode']} {r['contender']}: {format_kernels(r['kernels'], top)}")
        if r.get("kernel_totals"):
            lines.append(f"    {format_totals(r)}")
    return "\n".join(lines)
