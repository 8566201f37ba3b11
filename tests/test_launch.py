"""apt_kernels._launch: a launch from the cache reaches Triton's launcher with exactly the arguments of the
usual path (tests/launch_probe.py records both with a stub driver: compiled Triton, nothing runs), and a
change of specialisation (here a misaligned pointer) goes the usual way again."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apt_kernels import _launch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture(scope="module")
def probe():
    if not _launch._version_ok():
        pytest.skip("the launch cache is off for this triton version")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("APT_KERNELS_FAST_LAUNCH", None)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "launch_probe.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def _rounds(calls):
    out = {}
    for case, rnd, path, kernel, grid, args in calls:
        out.setdefault(case, {}).setdefault(rnd, []).append((path, kernel, grid, args))
    return out


def _arg_names(kernel):
    from apt_kernels.attention import fused
    from apt_kernels.child_tuning import triton_update
    from apt_kernels.pst import triton_pst

    for module in (fused, triton_pst, triton_update):
        if hasattr(module, kernel):
            return getattr(module, kernel).arg_names
    raise KeyError(kernel)


# what may change between rounds of a case: the per-call dropout seeds, the pruned count the sparsity schedule
# moves, the optimizer's step and its step size
MAY_DIFFER = {"dropout": {"seed_lo", "seed_hi"}, "pst": {"k_target", "n_pruned"},
              "pst bracket": {"k_target", "n_pruned", "k_a", "k_b", "r_lo", "r_hi"}, "child-tuning": {"step0", "step_size0"}}


def test_cached_launch_passes_the_usual_arguments(probe):
    rounds = _rounds(probe["calls"])
    assert set(rounds) == {"encoder", "decoder", "plain", "float mask, per-example prefix", "dropout", "misaligned",
                           "pst", "pst bracket", "kth_smallest", "child-tuning"}
    for case, by_round in rounds.items():
        if len(by_round) == 1:
            continue  # (one round: nothing cached to compare)
        first = by_round[0]
        for rnd in sorted(by_round)[1:]:
            if case == "misaligned" and rnd == 2:
                continue  # below
            later = by_round[rnd]
            assert [c[1] for c in first] == [c[1] for c in later], case
            for (_, kernel, grid0, args0), (path, _, grid1, args1) in zip(first, later):
                assert path == "cached", (case, rnd, kernel)
                assert grid1 == grid0, (case, kernel)
                assert [a[0] for a in args1] == [a[0] for a in args0], (case, kernel)  # types, dtypes
                names = _arg_names(kernel)
                assert len(args1) == len(names), (case, kernel)  # every parameter, constexprs included
                differ = {names[i] for i, (a, b) in enumerate(zip(args0, args1)) if a != b}
                assert differ <= MAY_DIFFER.get(case, set()), (case, kernel, differ)
    # the attention kernels are specialised anew for each case's features (delta and sums may be shared)
    for case in ("encoder", "decoder", "plain", "float mask, per-example prefix", "dropout"):
        usual = {c[1] for c in rounds[case][0] if c[0] == "usual"}
        assert usual >= {"_fwd_kernel", "_bwd_q_kernel", "_bwd_kv_kernel"}, case
    # the rounds of these did move their scalars (and still launched from the cache, above)
    for case, kernel in (("pst", "_hist_kernel"), ("child-tuning", "_child_tuning_adamw_kernel"),
                         ("dropout", "_fwd_kernel")):
        names = _arg_names(kernel)
        moved = [{n: a for n, a in zip(names, args) if n in MAY_DIFFER[case]}
                 for _, k, _, args in (rounds[case][0][0], rounds[case][max(rounds[case])][0]) if k == kernel]
        assert len(moved) == 2 and moved[0] != moved[1], case


# PST's score passes evaluate the score in the documented order only (docs/pst.md): no contraction
NO_FUSION = {"_hist_kernel", "_tie_rows_kernel", "_cut_kernel", "_mask_kernel", "_sample_kernel", "_fixup_kernel"}


def test_every_launch_chooses_fp_fusion(probe):
    """Every kernel states enable_fp_fusion (Triton 3.9 warns that 3.10 turns its default off; the bits and
    the FMA count must not change with the version): True but for PST's score passes."""
    fusion = probe["fusion"]
    assert {"_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel", "_sums_kernel", "_hist_kernel",
            "_mask_kernel", "_bwd_kernel", "_threshold_kernel", "_child_tuning_adamw_kernel"} <= set(fusion)
    for kernel, asked in fusion.items():
        assert set(asked) == {kernel not in NO_FUSION}, (kernel, asked)


def test_misaligned_pointer_is_a_new_specialisation(probe):
    rounds = _rounds(probe["calls"])["misaligned"]
    aligned, misaligned = rounds[1], rounds[2]
    for (path0, kernel, grid0, args0), (path2, _, grid2, args2) in zip(aligned, misaligned):
        q0, q2 = args0[0], args2[0]
        if kernel in ("_fwd_kernel", "_bwd_q_kernel", "_bwd_kv_kernel"):  # q is their first argument
            assert (q0[3], q2[3]) == (0, 4), kernel
            assert path2 == "usual", kernel
            assert grid2 == grid0, kernel
            for a, b in zip(args0, args2):  # equal but for q (and the dummy pointers that stand for absent tensors)
                assert a == b or (a[:3] == b[:3] == q0[:3] and b[3] == 4), (kernel, a, b)
        else:
            assert path2 == "cached", kernel


def test_disabled_and_unsupported_versions_use_the_usual_path(monkeypatch):
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    monkeypatch.setattr(_launch, "ENABLED", False)
    _launch.launch(Kernel(), (3,), (1, 2), {"BLOCK": 4})
    assert calls == [((3,), (1, 2), {"BLOCK": 4})]
    for version, ok in (("3.5.1", False), ("3.6.0", True), ("3.9.0", True), ("4.0.0", False)):
        monkeypatch.setattr("triton.__version__", version, raising=False)
        assert _launch._version_ok() is ok, version


def test_specialisation_rules_assumed_by_the_key():
    """The key takes floats by type only and do_not_specialize integers by width only: Triton's own
    specialisation (the installed version's) must not tell apart values the key does not."""
    if not _launch._version_ok():
        pytest.skip("the launch cache is off for this triton version")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def spec(x, specialize=True):
        return native_specialize_impl(BaseBackend, x, False, specialize, True)

    floats = [0.0, -0.0, 1.0, 16.0, 0.5, -3.25, 1e-30, 3e38, float("inf"), float("-inf"), float("nan")]
    assert len({spec(f) for f in floats}) == 1
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 16, 2 ** 63 - 1, -2 ** 63, 2 ** 63,
            2 ** 64 - 16, 0x41505400, 123456789]
    by_width = {}
    for x in ints:
        by_width.setdefault(_launch._width(x), set()).add(spec(x, specialize=False))
    assert all(len(s) == 1 for s in by_width.values()) and len(by_width) == 3, by_width
    # and the specialised integers do differ by value (the key keeps their values)
    assert spec(1) != spec(2) != spec(16)


def test_attention_backward_runs_the_prefix_launch_beside_the_token_launch(monkeypatch):
    """The backward's stream choreography, with CUDA streams and launches replaced by recorders (CPU): the
    prefix launch goes to the side stream after it waited for the query side (which writes delta), the token
    launch stays on the caller's stream, and the caller's stream waits for the side stream before the sums
    launch reads the prefix partials. With PREFIX_STREAM off, or no prefix, everything stays on one stream."""
    import torch

    from apt_kernels.attention import fused

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    current = [Stream("main")]

    class use:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(fused.launches, "compiled", lambda device: True)
    monkeypatch.setattr(fused, "PREFIX_SPLITS", 2)
    monkeypatch.setattr(fused, "_SIDE", {0: Stream("side")})
    monkeypatch.setattr(fused.torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(fused.torch.cuda, "stream", use)
    monkeypatch.setattr(fused, "_launch", lambda kernel, *a, **k: events.append(
        f"{kernel.__name__}{'[prefix]' if a[3].get('IS_PREFIX') else ''} on {current[-1].name}"))
    monkeypatch.setattr(fused, "run", lambda kernel, *a: events.append(f"{kernel.__name__} on {current[-1].name}"))
    monkeypatch.setattr(fused, "_side_stream", lambda device: fused._SIDE[0])

    B, H, N, P, D = 2, 2, 8, 3, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    pk, pv = (torch.randn(1, H, P, D) for _ in range(2))
    out, stat = torch.randn(B, H, N, D), torch.randn(B, H, N, 2)

    def backward(pk, pv):
        events.clear()
        fused.attention_backward(torch.randn_like(out), None, q, k, v, pk, pv, None, None, out, stat, False, 0.25,
                                 0.0, 0)
        return list(events)

    assert backward(pk, pv) == ["_bwd_q_kernel on main", "side waits main", "_bwd_kv_kernel[prefix] on side",
                                "_bwd_kv_kernel on main", "main waits side", "_sums_kernel on main"]
    assert backward(None, None) == ["_bwd_q_kernel on main", "_bwd_kv_kernel on main"]
    monkeypatch.setattr(fused, "PREFIX_STREAM", False)
    assert backward(pk, pv) == ["_bwd_q_kernel on main", "_bwd_kv_kernel[prefix] on main", "_bwd_kv_kernel on main",
                                "_sums_kernel on main"]
