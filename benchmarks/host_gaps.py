"""Where a short op's time goes on a GPU: host time and GPU time per call, apart, and any synchronisation.

``python -m benchmarks.host_gaps [--calls 20] [--out-dir DIR]`` (CUDA only; about a minute).

The first H200 run (2026-11-22) measured our attention backward at 0.86 ms of wall clock per call at
bert-h12-n512-p64 while its kernels summed to 433 us, and PST's CUDA backward at 0.2 ms for a 15 us kernel:
the GPU idled half the time, and the profile did not say why. This script separates the two times with a
held stream: ``torch.cuda._sleep`` keeps the GPU busy for far longer than the host needs to queue ``--calls``
calls, so

* the host time per call is the wall clock of queueing them (Python, torch, launches, the autograd engine
  and its device thread: everything but waiting on the GPU);
* the GPU time per call is the CUDA-event time of the queued calls, which then run back to back with no
  host gaps;
* if the sleep had already ended when the host finished queueing, something in a call waited for the GPU
  (a synchronisation: ``synced`` is then true and the host time includes GPU time);
* ``sync_warnings`` counts what ``torch.cuda.set_sync_debug_mode("warn")`` reports during one call
  (torch's own synchronising ops; Triton's and the extension's launches are not watched by it).

A call is host-bound when its host time exceeds its GPU time: then the wall clock of a loop of calls is
the host time. Rows: our attention (triton) and SDPA on the concatenated prefix at two encoder shapes and a
decoder one; our attention's backward launcher called directly (``bwd-direct``: no autograd engine); our
attention with the backward's prefix launch on the caller's stream (``triton-one-stream``; by default it runs
on a side stream, beside the token launch); PST's CUDA and Triton backends (also each selection apart:
``*_bracket``, ``*_radix``) and the paper's path at three shapes; an empty autograd Function (``noop``): what
one ``torch.autograd.grad`` through a custom Function costs the host on CUDA, the device thread's hand-off
included; and whole training steps (``apt_train``: APT, prefix tuning and PEFT's prefix tuning with SDPA, at
both of ``ops_apt_train``'s models), where the H200 run timed our small-Llama step at 40 ms, its eight
heaviest kernel classes at 7.6 ms. A step's ``sync_warnings`` name the synchronising ops inside it (Hugging
Face's mask helpers ask ``.all()`` of a padding mask, for one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from . import harness, ops_apt_train, ops_attention, ops_pst

ATTENTION_CASES = ("bert-h12-n512-p64", "bert-h12-n128-p16", "llama-n2048-p64")
ATTENTION_CONTENDERS = ("triton", "sdpa_concat")
PST_CASES = ("768x768", "768x3072", "4096x4096")
# the two selections of each fused backend apart: the sampled bracket launches 18 kernels (Triton) where the radix
# passes launch 7, so a matrix whose passes are short may be host-bound on one and not the other
PST_CONTENDERS = ("cuda", "triton", "paper_dense_argsort", "cuda_bracket", "cuda_radix", "triton_bracket",
                  "triton_radix")
STEP_CONTENDERS = ("apt", "prefix", "peft_prefix_sdpa")
STEP_CALLS = 5  # training steps queued per measurement (tens of ms each)
MODES = ("fwd", "bwd", "fwd+bwd")
SLEEP_CYCLES = 400_000_000  # about 0.2 s at the H200's 1.98 GHz: far beyond the host time of a batch of calls
STEP_SLEEP_CYCLES = 4_000_000_000  # about 2 s: beyond STEP_CALLS steps' host time


def split(call, calls: int, cycles: int = SLEEP_CYCLES) -> dict:
    """Host and GPU time per call (us) of ``calls`` calls queued behind a held stream, and whether the host
    waited for the GPU while queueing them."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - t0
    synced = start.query()  # the held stream already reached `start`: the host waited for the sleep
    end.record()
    torch.cuda.synchronize()
    return dict(host_us=host / calls * 1e6, gpu_us=start.elapsed_time(end) / calls * 1e3, synced=bool(synced))


def sync_warnings(call) -> tuple[int, str]:
    """(how many synchronising torch ops one call runs, the first warning's text)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return len(msgs), (msgs[0][:200] if msgs else "")


def measure(call, calls: int, repeats: int = 3, cycles: int = SLEEP_CYCLES) -> dict:
    for _ in range(3):
        call()
    runs = [split(call, calls, cycles) for _ in range(repeats)]
    n_sync, first = sync_warnings(call)
    return dict(host_us=statistics.median(r["host_us"] for r in runs),
                gpu_us=statistics.median(r["gpu_us"] for r in runs),
                synced=any(r["synced"] for r in runs), sync_warnings=n_sync, first_sync=first)


def _case_rows(case, names, calls, log, device, cycles: int = SLEEP_CYCLES) -> list[dict]:
    rows = []
    for c in case.contenders:
        if c.name not in names:
            continue
        inputs = [case.make_inputs(0)]
        why = c.check(inputs[0]) if c.check else None
        if why:
            log(f"  {case.name} {c.name}: skipped ({why})")
            continue
        fns = [c.build(inputs[0])]
        rows += _mode_rows(case, c.name, c.modes or case.modes, fns, inputs, calls, log, device, cycles)
        if case.op == "attention" and c.name == "triton":
            row = dict(op=case.op, case=case.name, contender=c.name, mode="bwd-direct",
                       **measure(_attention_bwd_direct(inputs[0]), calls))
            rows.append(row)
            log(_fmt(row))
            rows += _one_stream_rows(case, fns, inputs, calls, log, device)
        del fns, inputs
        torch.cuda.empty_cache()
    return rows


def _one_stream_rows(case, fns, inputs, calls, log, device) -> list[dict]:
    """Our attention's backward with its prefix launch on the caller's stream (``fused.PREFIX_STREAM`` off):
    set against the default rows, what running the prefix launch beside the token launch gains."""
    from apt_kernels.attention import fused

    before = fused.PREFIX_STREAM
    fused.PREFIX_STREAM = False
    try:
        return _mode_rows(case, "triton-one-stream", ("bwd", "fwd+bwd"), fns, inputs, calls, log, device)
    finally:
        fused.PREFIX_STREAM = before


def _mode_rows(case, contender, modes, fns, inputs, calls, log, device, cycles: int = SLEEP_CYCLES) -> list[dict]:
    """One measured row per mode of the built callables ``fns`` (as the benchmark harness calls them)."""
    rows = []
    for mode in modes:
        call = harness._mode_calls(case, mode, fns, inputs, device)[0]
        row = dict(op=case.op, case=case.name, contender=contender, mode=mode, **measure(call, calls, cycles=cycles))
        rows.append(row)
        log(_fmt(row))
    return rows


def _attention_bwd_direct(inp):
    """Our attention's backward launcher on the forward's saved outputs, without the autograd engine."""
    from apt_kernels.attention import fused, normalise_inputs

    detached = (None if inp[n] is None else inp[n].detach() for n in ("q", "k", "v", "prefix_k", "prefix_v", "gate"))
    q, k, v, pk, pv, gate, mask, causal, scale, _ = normalise_inputs(*detached, inp["keep"], inp["causal"], None, 0.0)
    out, _, stat = fused.attention_forward(q, k, v, pk, pv, gate, mask, causal, scale, 0.0, 0)
    grad = torch.randn_like(out)
    return lambda: fused.attention_backward(grad, None, q, k, v, pk, pv, gate, mask, out, stat, causal, scale, 0.0, 0)


def _noop_rows(calls, log, device) -> list[dict]:
    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    x = torch.randn(16, device=device, requires_grad=True)
    g = torch.randn(16, device=device)
    out = Noop.apply(x)
    rows = []
    for mode, call in (("bwd", lambda: torch.autograd.grad(out, x, g, retain_graph=True)),
                       ("fwd+bwd", lambda: torch.autograd.grad(Noop.apply(x), x, g))):
        row = dict(op="autograd", case="noop-function", contender="torch", mode=mode, **measure(call, calls))
        rows.append(row)
        log(_fmt(row))
    return rows


def _fmt(r: dict) -> str:
    bound = "host" if r["host_us"] > r["gpu_us"] else "gpu"
    sync = " SYNCED" if r["synced"] else ""
    warn = f"  sync warnings {r['sync_warnings']}: {r['first_sync']}" if r["sync_warnings"] else ""
    return (f"  {r['op']:9s} {r['case']:19s} {r['contender']:20s} {r['mode']:10s} host {r['host_us']:8.1f} us  "
            f"gpu {r['gpu_us']:8.1f} us  {bound}-bound{sync}{warn}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.host_gaps needs a CUDA device")
    device = torch.device("cuda")
    print(f"host and GPU time per call, us ({torch.cuda.get_device_name()}, torch {torch.__version__}); "
          f"{args.calls} calls queued behind a held stream, median of 3")
    rows = _noop_rows(args.calls, print, device)
    for case in ops_attention.cases(device, quick=False):
        if case.name in ATTENTION_CASES:
            rows += _case_rows(case, ATTENTION_CONTENDERS, args.calls, print, device)
    for case in ops_pst.cases(device, quick=False):
        if case.name in PST_CASES:
            rows += _case_rows(case, PST_CONTENDERS, args.calls, print, device)
    for case in ops_apt_train.cases(device, quick=False):
        rows += _case_rows(case, STEP_CONTENDERS, STEP_CALLS, print, device, STEP_SLEEP_CYCLES)
    if args.out_dir:
        path = Path(args.out_dir) / f"host-gaps-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        calls=args.calls, rows=rows), indent=1))
        print(f"written: {path}")


if __name__ == "__main__":
    main()
