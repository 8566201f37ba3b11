"""CPU smoke test of the benchmark harness: tiny cases of every op, results written and well formed."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

import apt_kernels  # noqa: E402
from apt_kernels import _launch  # noqa: E402
from benchmarks import harness, names, ops_apt_train, ops_attention, ops_child_tuning, ops_pst, run  # noqa: E402

CPU = torch.device("cpu")
FAST = harness.Timing(cpu_min_runs=3, cpu_max_runs=20, cpu_target_s=0.005)


def _tiny_cases():
    f32 = torch.float32
    return [
        ops_attention.make_case("enc-tiny", B=2, Hq=2, Hkv=2, N=16, P=4, D=8, causal=False, mask="padding",
                                gate="per-example", device=CPU, dtype=f32),
        ops_attention.make_case("dec-gqa-tiny", B=1, Hq=4, Hkv=2, N=16, P=4, D=8, causal=True, mask="none",
                                gate="per-token", device=CPU, dtype=f32),
        ops_attention.make_case("plain-tiny", B=1, Hq=2, Hkv=2, N=16, P=0, D=8, causal=True, mask="none",
                                gate="none", device=CPU, dtype=f32),
        ops_pst.make_case(32, 48, device=CPU, wdtype=f32),
        ops_child_tuning.make_case("tiny", "F", device=CPU, shapes=[(64, 16), (16,), (8, 64)]),
        ops_child_tuning.make_case("tiny", "D", device=CPU, shapes=[(64, 16), (16,), (8, 64)]),
        # a training step of APT on a tiny Llama (its PEFT-free peer runs everywhere)
        *[c for c in ops_apt_train.cases(CPU, quick=True) if c.name.startswith("llama")],
    ]


def _check_rows(rows):
    assert rows
    ok = [r for r in rows if r["status"] == "ok"]
    assert not [r for r in rows if r["status"] == "error"], [r for r in rows if r["status"] == "error"]
    for r in ok:
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert r["peak_mem_mb"] is None  # CPU: not measured
    for r in rows:
        if r["status"] != "ok":
            assert r["status"] == "skipped" and r["reason"], r
    groups = {(r["op"], r["case"], r["mode"]) for r in rows}
    for key in groups:
        g = [r for r in ok if (r["op"], r["case"], r["mode"]) == key]
        ours = [r for r in g if r["kind"] == "ours"]
        peers = [r for r in g if r["kind"] == "peer"]
        assert ours and peers, key  # reference and torch run everywhere; so do the CPU peers
        best = min(p["median_ms"] for p in peers)
        for r in g:
            assert r["ratio_to_best_peer"] is not None and math.isclose(r["ratio_to_best_peer"], r["median_ms"] / best)
    return ok


def test_harness_tiny_cases_every_op(tmp_path):
    cases = _tiny_cases()
    rows = harness.run_cases(cases, CPU, FAST, log=lambda s: None)
    ok = _check_rows(rows)
    assert {r["op"] for r in ok} == {"attention", "pst", "child_tuning", "apt_train"}
    assert {r["contender"] for r in ok if r["op"] == "apt_train"} >= {"apt", "prefix", "hf_cache_prefix_sdpa"}
    assert {r["mode"] for r in ok if r["op"] == "attention"} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["tflops"] > 0 for r in ok if r["op"] == "attention")
    assert all(r["gb_s"] > 0 for r in ok if r["op"] in ("pst", "child_tuning"))
    # CPU has no triton/cuda backend to time, and flex_attention is CUDA-only: skipped, with reasons.
    assert any(r["contender"] == "flex_attention" and r["status"] == "skipped" for r in rows)
    assert any(r["contender"] == "cuda" and r["status"] == "skipped" for r in rows)

    paths = harness.write_results(rows, tmp_path, "smoke", harness.metadata(CPU))
    doc = json.loads(paths["json"].read_text())
    assert doc["device"].startswith("cpu") and doc["versions"]["torch"] and doc["date"]
    assert len(doc["rows"]) == len(rows)
    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    for r in csv_rows:
        if r["status"] == "ok":
            assert float(r["median_ms"]) > 0 and float(r["ratio_to_best_peer"]) > 0
    for op in ("attention", "pst", "child_tuning"):
        png = tmp_path / f"smoke-{op}.png"
        assert png.exists() and png.stat().st_size > 1000
    table = harness.format_summary(rows)
    assert "best peer" in table and "enc-tiny" in table


def test_run_cli_quick_pst(tmp_path, capsys):
    assert run.main(["--ops", "pst", "--quick", "--device", "cpu", "--out", "cli", "--out-dir", str(tmp_path),
                     "--cpu-target-s", "0.005"]) == 0
    for suffix in (".json", ".csv", "-pst.png", "-summary.txt"):
        assert (tmp_path / f"cli{suffix}").exists(), suffix
    doc = json.loads((tmp_path / "cli.json").read_text())
    _check_rows(doc["rows"])
    assert doc["floors"] is None  # measured on CUDA only
    out = capsys.readouterr().out
    lines = out.rstrip().splitlines()
    assert any(x.startswith("ratio = ") for x in lines)  # the summary table, then the targets, last
    assert lines[-1].strip().endswith("not judged") and "#5" in out
    assert [t["status"] for t in doc["targets"]] and all(t["status"] == "n/a" for t in doc["targets"])  # CPU


def _trow(case, contender, ms, *, kind="peer", status="ok", mem=None, copy=None, op="pst", mode="fwd+bwd"):
    return dict(op=op, case=case, mode=mode, contender=contender, kind=kind, status=status, median_ms=ms,
                peak_mem_mb=mem, frac_of_copy_bw=copy, frac_of_matmul_peak=None, reason="" if status == "ok" else "why")


def test_targets_pass_fail_and_not_judged():
    from benchmarks import targets

    rows = [_trow("a", "triton", 1.0, kind="ours", copy=0.6), _trow("a", "cuda", 2.0, kind="ours"),
            _trow("a", "torch", 0.1, kind="ours"),  # a fallback never stands in for the kernels
            _trow("a", "paper_dense_argsort", 25.0), _trow("a", "torch_kthvalue", 2.5), _trow("a", "torch_topk", 9.0),
            _trow("b", "triton", 1.0, kind="ours", copy=0.4), _trow("b", "paper_dense_argsort", 5.0),
            _trow("b", "torch_kthvalue", 1.0, status="skipped"), _trow("b", "torch_topk", None, status="error")]
    results = targets.evaluate(rows)
    paper, comp, floor = "at least 20x", "at least 3x", "within 2x of"
    got = {(r["case"], w): r for r in results for w in (paper, comp, floor) if w in r["target"]}
    assert got[("a", paper)]["status"] == "PASS" and got[("a", paper)]["value"] == 25.0
    assert got[("a", paper)]["ours"] == "triton"
    assert got[("a", comp)]["status"] == "FAIL" and got[("a", comp)]["peer"] == "torch_kthvalue"
    assert got[("a", floor)]["status"] == "PASS" and got[("b", floor)]["status"] == "FAIL"
    assert got[("b", paper)]["status"] == "FAIL"
    assert got[("b", comp)]["status"] == "n/a" and "skipped" in got[("b", comp)]["why"]
    text = targets.format_targets(results)
    assert "PASS" in text and "FAIL" in text and "not judged" in text
    # the same rows measured on a CPU: listed with their contenders, judged never (the targets are the H200's)
    on_cpu = targets.evaluate(rows, device_type="cpu")
    assert [(r["case"], r["target"]) for r in on_cpu] == [(r["case"], r["target"]) for r in results]
    assert all(r["status"] == "n/a" for r in on_cpu)
    assert got[("a", paper)]["ours"] == [r for r in on_cpu if r["case"] == "a" and paper in r["target"]][0]["ours"]
    assert any("measured on cpu" in r["why"] for r in on_cpu)


def test_run_order_puts_variants_after_the_peers_and_fallbacks_last():
    cs = [harness.Contender(n, None, ours=o, variant=n.endswith("_radix")) for n, o in
          (("reference", True), ("cuda_radix", True), ("torch", True), ("triton", True), ("sdpa", False),
           ("cuda", True))]
    assert [c.name for c in harness.run_order(cs)] == ["triton", "cuda", "sdpa", "cuda_radix", "reference", "torch"]


def test_variants_are_timed_in_their_modes_only_and_not_profiled():
    """ops_pst's selection variants (triton_bracket, ...): forward and forward+backward rows, no profile."""
    case = ops_pst.make_case(16, 24, device=CPU, wdtype=torch.float32)
    names = {c.name: c for c in case.contenders}
    assert {"cuda_bracket", "cuda_radix", "triton_bracket", "triton_radix"} <= set(names)
    assert all(names[n].variant and names[n].modes == ("fwd", "fwd+bwd") for n in ("cuda_radix", "triton_bracket"))
    assert not names["cuda"].variant and names["cuda"].modes is None
    fused = names["torch"]  # stands in for a backend on CPU
    case.contenders = [harness.Contender("triton", fused.build, ours=True),
                       harness.Contender("triton_radix", fused.build, ours=True, variant=True, modes=("fwd", "fwd+bwd"))]
    rows = harness.run_case(case, CPU, FAST, log=lambda s: None, profile=True)
    got = {(r["contender"], r["mode"]): r for r in rows}
    assert set(got) == {("triton", m) for m in ("fwd", "bwd", "fwd+bwd")} | {("triton_radix", "fwd"),
                                                                             ("triton_radix", "fwd+bwd")}
    assert all(r["status"] == "ok" for r in rows)
    assert got[("triton", "fwd")].get("kernels") and not got[("triton_radix", "fwd")].get("kernels")


def test_time_budget_skips_with_reason():
    case = ops_pst.make_case(16, 16, device=CPU, wdtype=torch.float32)
    rows = harness.run_case(case, CPU, FAST, deadline=0.0, log=lambda s: None)
    assert rows and all(r["status"] == "skipped" and "budget" in r["reason"] for r in rows)


def test_exact_peers_are_checked_against_the_reference():
    case = ops_attention.make_case("t", B=2, Hq=2, Hkv=2, N=8, P=3, D=16, causal=False, mask="padding",
                                   gate="per-example", device=CPU, dtype=torch.float32, flex=False)
    inp = case.make_inputs(0)
    sdpa = next(c for c in case.contenders if c.name == "sdpa_concat")
    sdpa.build(inp)()  # the real peer passes its check
    wrong = ops_attention.verified(lambda inp: (lambda: inp["q"] * 2))
    with pytest.raises(RuntimeError, match="differs from the reference"):
        wrong(inp)


@pytest.mark.parametrize("Hkv,P", [(1, 3), (2, 3), (1, 0)])
def test_sdpa_peer_causal_decoder_forms_are_exact(Hkv, P):
    """The decoder SDPA peer runs SDPA's own causal masks (bottom-right bias over [prefix, tokens], GQA
    without repeated K/V) and is checked against the reference when it builds."""
    case = ops_attention.make_case("t", B=2, Hq=2, Hkv=Hkv, N=8, P=P, D=16, causal=True, mask="none",
                                   gate="per-example", device=CPU, dtype=torch.float32, flex=False)
    inp = case.make_inputs(0)
    sdpa = next(c for c in case.contenders if c.name == ("sdpa_concat" if P else "sdpa"))
    sdpa.build(inp)()


@pytest.mark.parametrize("n", [700, 1800])  # topk takes the smaller side: the pruned or the kept entries
def test_pst_peer_masks_prune_the_same_n_smallest(n):
    sd = torch.rand(37, 53, generator=torch.Generator().manual_seed(2))
    masks = {name: f(sd, n) for name, f in ops_pst.PEER_MASKS.items()}
    want = (sd > sd.flatten().sort().values[n - 1]).float()
    for name, m in masks.items():
        assert torch.equal(m, want), name


def test_profile_kernels_names_the_heaviest_work():
    # a matmul of ~0.9 GFLOP (milliseconds on a CI core): a scheduler hiccup of a few milliseconds in the
    # cheap ops cannot outweigh it (at 256 x 256 one did on a loaded 2-core machine)
    a = torch.randn(768, 768)

    def fn():
        return (a @ a).relu_().sum()

    ks, host = harness.profile_call(fn, CPU, calls=2)
    assert ks and ks[0]["us"] > 0 and ks == sorted(ks, key=lambda k: -k["us"])
    assert ks[0]["name"] == "mm" and ks[0]["calls"] == 1, ks  # aten::mm, namespace dropped
    assert not [k for k in ks if k["name"].startswith("ProfilerStep") or k["name"] == harness.CALL_RANGE], ks
    # the host side: every call's wall clock, at least its operators' time; no CUDA API calls on a CPU
    assert host["host_us"] >= sum(k["us"] for k in ks) * 0.99 and host["api_us"] == 0 == host["launches"], host
    assert host["ops"][0]["name"] == "aten::mm" and host["ops"][0]["calls"] == 1, host
    assert names.short_kernel_name("void (anonymous namespace)::hist_kernel(AptPstProblem, int, State const*)") \
        == "hist_kernel"
    assert names.short_kernel_name("void apt::ct::adamw_kernel<float, 1, true, false>(apt::Row const*)") \
        == "adamw_kernel<float, 1, true, false>"
    assert names.short_kernel_name("_attn_fwd") == "_attn_fwd"


def test_host_totals_counts_the_api_calls_inside_the_calls():
    calls = [(0.0, 100.0), (200.0, 260.0)]
    events = [("cudaLaunchKernel", 10, 14), ("cuLaunchKernelEx", 20, 26),  # launches, runtime and driver API
              ("cudaStreamSynchronize", 30, 80),  # a wait on the GPU
              ("cuMemcpyDtoH_v2", 210, 230),  # a synchronous copy, versioned name
              ("cudaEventRecord", 240, 241), ("aten::mm", 50, 60),  # another API call; an operator (not counted)
              ("cudaDeviceSynchronize", 150, 190),  # between the calls: the harness's own, not counted
              ("cudaLaunchKernel", 95, 105)]  # straddles a call's end: not inside it
    h = harness.host_totals(calls, events)
    assert h["host_us"] == 80.0 and h["launches"] == 1.0 and h["syncs"] == 1.0 and h["sync_us"] == 35.0
    assert h["api_us"] == (4 + 6 + 50 + 20 + 1) / 2
    assert [a["name"] for a in h["apis"]] == ["cudaStreamSynchronize", "cuMemcpyDtoH_v2", "cuLaunchKernelEx",
                                              "cudaLaunchKernel", "cudaEventRecord"]
    assert harness._api_kind("custom_op") is None and harness._api_kind("cudnnConvolution") is None
    text = harness.format_host(h)
    assert "host 0.080 ms" in text and "1 launches" in text and "1 waiting on the GPU for 0.035 ms" in text
    assert harness.format_host(dict(h, api_us=0.0)) == "host 0.080 ms a call under the profiler"


def test_profile_records_kernels_of_fused_contenders_only(monkeypatch):
    """--profile: our non-fallback backends get a "kernels" list per measured mode; peers and fallbacks not."""
    case = ops_pst.make_case(16, 24, device=CPU, wdtype=torch.float32)
    fused = [c for c in case.contenders if c.name == "torch"][0]  # stands in for a fused backend on CPU
    case.contenders = [harness.Contender("triton", fused.build, ours=True),
                       *[c for c in case.contenders if c.name in ("torch", "torch_kthvalue")]]
    rows = harness.run_case(case, CPU, FAST, log=lambda s: None, profile=True)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["contender"] for r in ok} == {"triton", "torch", "torch_kthvalue"}
    for r in ok:
        assert bool(r.get("kernels")) == (r["contender"] == "triton"), r
    table = harness.format_kernel_table(rows)
    assert table.count("\n") == 2 * sum(r["contender"] == "triton" for r in ok) and " us" in table
    totals = [r for r in ok if r["contender"] == "triton"][0]["kernel_totals"]
    assert totals["us"] >= sum(k["us"] for k in [r for r in ok if r["contender"] == "triton"][0]["kernels"]) > 0
    assert "all kernels" in table and "of the median" in table and "host " in table
    assert [r for r in ok if r["contender"] == "triton"][0]["host"]["host_us"] > 0


def test_profile_peers_covers_the_peers_too():
    case = ops_pst.make_case(16, 24, device=CPU, wdtype=torch.float32)
    case.contenders = [c for c in case.contenders if c.name in ("torch", "torch_kthvalue")]
    case.profile_peers = True
    rows = harness.run_case(case, CPU, FAST, log=lambda s: None, profile=True)
    ok = {r["contender"]: r for r in rows if r["status"] == "ok"}
    assert not ok["torch"].get("kernels")  # our fallback: never profiled
    assert ok["torch_kthvalue"]["kernels"] and ok["torch_kthvalue"]["kernel_totals"]["launches"] > 0


def test_kernel_classes():
    cls = harness.kernel_class
    assert cls("_fwd_kernel") == "ours:attention" and cls("flash_fwd_kernel") == "attention"
    assert cls("adamw_kernel<float, 1, true, false>") == "ours:child_tuning"
    assert cls("fmha_cutlassB_bf16_aligned_64x64_k64_sm80") == "attention"
    assert cls("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert cls("unrolled_elementwise_kernel<at::native::direct_copy_kerne...") == "copy"
    assert cls("vectorized_elementwise_kernel<4, at::native::CUDAFunctor_...") == "elementwise"
    assert cls("vectorized_layer_norm_kernel<c10::BFloat16, float>") == "norm"
    assert cls("reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::...") == "reduce"
    assert cls("mm") == "gemm" and cls("something_else") == "other"
    t = harness.kernel_totals([dict(name="mm", calls=2, us=30.0), dict(name="_fwd_kernel", calls=1, us=50.0),
                               dict(name="addmm", calls=1, us=10.0)])
    assert t == dict(us=90.0, launches=4, classes={"ours:attention": 50.0, "gemm": 40.0})


def test_autotune_choices_are_reported(monkeypatch):
    from types import SimpleNamespace

    from apt_kernels.attention import fused

    assert run.autotune_choices() == {} or all(isinstance(v, dict) for v in run.autotune_choices().values())
    tuner = SimpleNamespace(cache={(64, 128, False): "BLOCK_M: 128, BLOCK_N: 64, num_warps: 4, num_stages: 3"})
    monkeypatch.setitem(fused._TUNED, ("_attn_fwd", ""), tuner)
    monkeypatch.setitem(fused._TUNED, ("_attn_fwd", "prefix<=16"), tuner)
    choices = run.autotune_choices()
    assert choices["_attn_fwd"] == {"(64, 128, False)": "BLOCK_M: 128, BLOCK_N: 64, num_warps: 4, num_stages: 3"}
    assert choices["_attn_fwd[prefix<=16]"] == choices["_attn_fwd"]
    assert "_attn_fwd: (64, 128, False) -> BLOCK_M: 128" in run.format_autotune(choices)


def test_child_tuning_host_time_script():
    from benchmarks import child_tuning_host
    from apt_kernels.child_tuning import optimizer as _opt

    entry = _opt.REGISTRY._entries["triton"]
    before = (entry.fn, entry.checks)
    out = child_tuning_host.measure(tensors=5, steps=2, repeats=1)
    assert set(out) == {"F, tables cached", "D, tables cached", "F, tables rebuilt", "D, tables rebuilt",
                        "torch.optim.AdamW(fused=True)"}
    assert all(0 < ms < 1e3 for ms in out.values())
    assert (entry.fn, entry.checks) == before  # the stub is gone again


@pytest.mark.skipif(not _launch._version_ok(), reason="the stub GPU follows the launch path of Triton 3.6 to 3.x")
def test_attention_host_time_script():
    """benchmarks/attention_host.py runs (its own process: compiled Triton under a stub GPU) and reports the
    six host times."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_ = subprocess.run([sys.executable, "-m", "benchmarks.attention_host", "--calls", "3", "--repeats", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run_.returncode == 0, run_.stderr[-3000:]
    lines = [line.split() for line in run_.stdout.splitlines()[1:]]
    assert len(lines) == 6 and all(0 < float(line[-1]) < 1e5 for line in lines), run_.stdout


@pytest.mark.skipif(not _launch._version_ok(), reason="the stub GPU follows the launch path of Triton 3.6 to 3.x")
def test_step_host_script():
    """benchmarks/step_host.py runs (its own process: compiled Triton under a stub GPU) and counts a training
    step's operations; our two contenders share the adapter across layers (no per-layer select_backward)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_ = subprocess.run([sys.executable, "-m", "benchmarks.step_host", "--steps", "2", "--only", "apt", "prefix",
                           "--ops"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run_.returncode == 0, run_.stderr[-3000:]
    rows = [line.split() for line in run_.stdout.splitlines()[2:] if not line.startswith(" ")]
    assert [r[:2] for r in rows] == [[c, n] for c in ("bert-12L-p16", "llama-8L-p64") for n in ("apt", "prefix")]
    for r in rows:
        assert 0 < int(r[3]) < int(r[2]) and 0 < float(r[4]) < 1e6, run_.stdout
    ops = [line for line in run_.stdout.splitlines() if line.startswith(" ")]
    selects = [re.search(r"select_backward (\d+)", line) for line in ops]
    assert len(ops) == 4 and all(m is None or int(m.group(1)) <= 1 for m in selects), ops  # (BERT's pooler: 1)


def test_pst_backward_variants_script_needs_cuda(monkeypatch):
    """benchmarks/pst_backward.py (GPU only: gpu_check.sh runs it) imports everywhere and says why it stops."""
    from benchmarks import pst_backward

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        pst_backward.main([])
    assert pst_backward.SHAPES[-1] == (4096, 11008)


def test_partial_verdicts_and_wall_clock_ratio():
    """A verdict against fewer peers than the target names says which are missing; short calls also show
    the ratio with host time included."""
    from benchmarks import targets

    t = next(x for x in targets.TARGETS if x.kind == "time_ratio" and x.op == "attention")
    case = "bert-h12-n128-p16"
    rows = [dict(op="attention", case=case, mode=t.mode, contender=t.ours[0], kind="ours", status="ok",
                 median_ms=0.09, wall_ms=0.30),
            dict(op="attention", case=case, mode=t.mode, contender=t.peers[0], kind="peer", status="ok",
                 median_ms=0.10, wall_ms=0.20)]
    (res,) = [r for r in targets.evaluate(rows, [t]) if r["case"] == case]
    assert res["status"] == "PASS" and res["value"] == pytest.approx(0.9)
    assert "partial: without" in res["why"] and "wall-clock ratio 1.5" in res["why"]


def test_kernel_resources_report_walks_each_dtypes_tables(monkeypatch):
    """benchmarks/kernel_resources.py (the offline sm_90 register report; the real compile and cuobjdump
    reading are exercised by test_attention_triton's sm_90 test): every configuration of the dtype's own
    tables for each kernel of a feature set, the first marked as the fixed choice, shared memory past
    Hopper's limit flagged. Compilation is faked here."""
    from types import SimpleNamespace

    from apt_kernels.attention import fused
    from benchmarks import kernel_resources as kr

    built = []

    def fake_build(fn, dt, consts, opts):
        built.append((fn.__name__, dt, consts["PREC"], consts["BLOCK_M"], consts["BLOCK_N"], opts["num_warps"],
                      consts.get("KEY_MAJOR")))
        return SimpleNamespace(metadata=SimpleNamespace(shared=1024 * consts["BLOCK_M"] * consts["BLOCK_N"] // 16),
                               asm=dict(ptx="wgmma.mma_async.sync x\nmma.sync.aligned y\nmma.sync.aligned z"))

    monkeypatch.setattr(kr, "build", fake_build)
    monkeypatch.setattr(kr, "usage", lambda k: (200, 0 if k.metadata.shared < 300 * 1024 else 64))
    got = list(kr.rows(["fp32", "bf16"], ["enc"]))
    for dt, prec, (fwd, bwd, kv, _) in (("fp32", "ieee", fused._tables("ieee")), ("bf16", "tf32", fused._tables("tf32"))):
        mine = [r for r in got if r["dtype"] == dt]
        for kernel, table in (("fwd", fwd[64]), ("bwd_q", bwd[64]), ("bwd_kv tokens", kv[64]),
                              ("bwd_kv prefix", fused._prefix_table(16, prec)[64])):
            rows = [r for r in mine if r["kernel"] == kernel]
            assert [r["config"] for r in rows] == table and [r["fixed"] for r in rows] == [True] + [False] * (len(table) - 1)
        assert {b[2] for b in built if b[1] == dt} == {prec}
        # the key-side launches compile in the orientation of each entry; the others have no such constant
        assert {b[6] for b in built if b[1] == dt and b[0] == "_bwd_kv_kernel"} == {False, True}
        assert {b[6] for b in built if b[1] == dt and b[0] != "_bwd_kv_kernel"} == {None}
    assert all(r["mma"] == (1, 2) for r in got)
    key_major = next(r for r in got if len(r["config"]) > 4 and r["config"][4])
    assert "key-major" in kr.format_row(key_major) and "wgmma   1 mma.sync   2" in kr.format_row(key_major)
    assert not [r for r in kr.rows(["bf16"], ["enc_plain"]) if r["kernel"] == "bwd_kv prefix"]  # no prefix
    big = next(r for r in got if r["shared"] > kr.SHARED_LIMIT)
    assert _row_shown(kr.format_row(big), big) and "OVER" in kr.format_row(big)
    small = next(r for r in got if r["shared"] <= kr.SHARED_LIMIT)
    assert "OVER" not in kr.format_row(small)


def _row_shown(line: str, row: dict) -> bool:
    m, n, w, st = row["config"][:4]
    return f"{m}x{n}" in line and f"w{w} s{st}" in line and f"regs {row['regs']}" in line


class _FakeEvent:
    """A CUDA event on the CPU clock; ``reached`` is what query() says (the held stream's progress)."""

    reached = False

    def __init__(self, **kwargs):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def query(self):
        return _FakeEvent.reached

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_host_gaps_script_on_cpu_stand_ins(monkeypatch):
    """benchmarks/host_gaps.py (GPU only: gpu_check.sh's attention call runs it) runs its whole flow with CPU
    stand-ins for the held stream and the events, and flags a call during which the stream moved on."""
    from benchmarks import host_gaps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        host_gaps.main([])
    for name, fn in (("synchronize", lambda *a: None), ("_sleep", lambda cycles: None), ("Event", _FakeEvent),
                     ("set_sync_debug_mode", lambda mode: None), ("empty_cache", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, fn)
    lines = []
    rows = host_gaps._noop_rows(2, lines.append, CPU)
    case = ops_attention.make_case("enc-tiny", B=2, Hq=2, Hkv=2, N=16, P=4, D=8, causal=False, mask="padding",
                                   gate="per-example", device=CPU, dtype=torch.float32)
    rows += host_gaps._case_rows(case, ("torch", "sdpa_concat"), 2, lines.append, CPU)
    assert [(r["contender"], r["mode"]) for r in rows[2:]] == [(c, m) for c in ("torch", "sdpa_concat")
                                                               for m in host_gaps.MODES]
    assert len(lines) == len(rows) == 8
    assert all(r["host_us"] > 0 and r["gpu_us"] > 0 and not r["synced"] for r in rows)
    # the one-stream rows: the backward's prefix launch on the caller's stream while they are measured, only
    from apt_kernels.attention import fused

    seen = []
    torch_build = [c for c in case.contenders if c.name == "torch"][0].build
    inputs = [case.make_inputs(0)]
    fns = [lambda: seen.append(fused.PREFIX_STREAM) or torch_build(inputs[0])()]
    one = host_gaps._one_stream_rows(case, fns, inputs, 2, lines.append, CPU)
    assert [(r["contender"], r["mode"]) for r in one] == [("triton-one-stream", m) for m in ("bwd", "fwd+bwd")]
    assert seen and not any(seen) and fused.PREFIX_STREAM
    # PST: the named contenders exist, and a variant is measured in its own modes only
    from benchmarks import ops_pst

    pst_case = ops_pst.cases(CPU, quick=True)[0]
    assert set(host_gaps.PST_CONTENDERS) <= {c.name for c in pst_case.contenders}
    import dataclasses

    torch_pst = [c for c in pst_case.contenders if c.name == "torch"][0]
    pst_case.contenders.append(dataclasses.replace(torch_pst, name="torch_variant", variant=True, modes=("fwd",)))
    pst = host_gaps._case_rows(pst_case, ("torch", "torch_variant"), 1, lines.append, CPU)
    assert [(r["contender"], r["mode"]) for r in pst] == [("torch", m) for m in pst_case.modes] + [
        ("torch_variant", "fwd")]
    # training steps: their one mode, behind a longer sleep
    from benchmarks import ops_apt_train

    slept = []
    monkeypatch.setattr(torch.cuda, "_sleep", slept.append)
    step_case = ops_apt_train.cases(CPU, quick=True)[0]
    steps = host_gaps._case_rows(step_case, ("apt", "prefix"), 1, lines.append, CPU, host_gaps.STEP_SLEEP_CYCLES)
    assert [(r["op"], r["contender"], r["mode"]) for r in steps] == [("apt_train", c, "step") for c in ("apt", "prefix")]
    assert slept and set(slept) == {host_gaps.STEP_SLEEP_CYCLES}
    monkeypatch.setattr(_FakeEvent, "reached", True)  # the stream passed `start` while the host was queueing
    assert host_gaps.split(lambda: None, 2)["synced"]
    assert "SYNCED" in host_gaps._fmt(dict(rows[0], synced=True))


@pytest.mark.triton
def test_host_gaps_direct_backward_is_the_ops_backward():
    """host_gaps' ``bwd-direct`` row times the backward launcher on the public entry's normalised inputs:
    its gradients are those of autograd through gated_prefix_attention (through the interpreter here)."""
    from benchmarks import host_gaps

    case = ops_attention.make_case("enc-tiny", B=2, Hq=2, Hkv=2, N=16, P=4, D=8, causal=False, mask="padding",
                                   gate="per-example", device=CPU, dtype=torch.float32)
    inp = case.make_inputs(0)
    torch.manual_seed(7)  # the direct call's output gradient: torch.randn_like
    direct = host_gaps._attention_bwd_direct(inp)()
    leaves = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "gate")]
    out = apt_kernels.gated_prefix_attention(*leaves, attn_mask=inp["keep"], causal=inp["causal"], backend="triton")
    torch.manual_seed(7)
    want = torch.autograd.grad(out, leaves, torch.randn_like(out))
    got = direct[:3] + tuple(g.sum(0) for g in direct[3:5]) + direct[5:6]  # a shared prefix: (1, ...) summed
    for name, g, w in zip(("dq", "dk", "dv", "dpk", "dpv", "dgate"), got, want):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-5, atol=1e-5, msg=name)


def _ncu_raw_csv(path: Path) -> Path:
    """A raw-page CSV as ``ncu --import R --csv --page raw`` writes it: header, units row, one row per kernel
    (numbers with thousands separators), two marker kernels opening two cases."""
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
              "gpu__time_duration.sum", "launch__grid_size", "launch__registers_per_thread",
              "sm__warps_active.avg.pct_of_peak_sustained_active", "dram__bytes.sum.per_second",
              stall.format("long_scoreboard"), stall.format("mio_throttle"), stall.format("selected"),
              stall.format("barrier")]
    units = ["", "", "", "", "", "", "", "usecond", "", "register/thread", "%", "Tbyte/second", "", "", "", ""]
    rows = [
        [0, 1, "python3", "h", "spin_kernel(long)", 1, 7, "3.1", "1", "16", "1.5", "0.01", "0", "0", "1", "0"],
        [1, 1, "python3", "h", "void (anonymous namespace)::hist_kernel<8, true, __nv_bfloat16>(AptPstProblem, int)",
         1, 7, "1,451.25", "264", "128", "23.5", "0.24", "18.2", "3.1", "1", "0.4"],
        [2, 1, "python3", "h", "_mask_kernel", 1, 7, "343.8", "1,024", "96", "40", "0.5", "", "", "", ""],
        [3, 1, "python3", "h", "spin_kernel(long)", 1, 7, "3.0", "1", "16", "1.5", "0.01", "0", "0", "1", "0"],
        [4, 1, "python3", "h", "_fwd_kernel", 1, 7, "230", "3,072", "255", "12", "1.1", "2", "5.5", "1", "7"],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(header)
        w.writerow(units)
        w.writerows(rows)
    return path


def test_ncu_summary_reads_the_raw_page_and_groups_by_case(tmp_path, capsys):
    """benchmarks/ncu_summary.py: units applied (us, TB/s -> GB/s), separators read, stall reasons sorted
    (the issuing 'selected' state left out, blanks skipped), kernels grouped by the markers, markers dropped."""
    from benchmarks import ncu_summary

    raw = _ncu_raw_csv(tmp_path / "raw.csv")
    with open(raw, newline="") as f:
        kernels = ncu_summary.parse(f)
    assert [k["name"][:11] for k in kernels] == ["spin_kernel", "void (anony", "_mask_kerne", "spin_kernel",
                                                 "_fwd_kernel"]
    hist = kernels[1]
    assert hist["us"] == pytest.approx(1451.25) and hist["grid"] == 264 and hist["regs"] == 128
    assert hist["dram_gbs"] == pytest.approx(240.0) and hist["occ"] == pytest.approx(23.5)
    assert list(hist["stalls"]) == ["long_scoreboard", "mio_throttle", "barrier"]
    assert kernels[2]["stalls"] == {} and kernels[2]["grid"] == 1024 and kernels[2]["issue_pct"] is None
    grouped = ncu_summary.group(kernels, ["pst", "attn"])
    assert [(k["case"], k["name"][:5]) for k in grouped] == [("pst", "void "), ("pst", "_mask"), ("attn", "_fwd_")]
    (tmp_path / "cases.json").write_text(json.dumps({"cases": ["pst", "attn"], "marker": "spin_kernel"}))
    ncu_summary.main([str(raw), "--cases", str(tmp_path / "cases.json"), "--json", str(tmp_path / "k.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("pst") and "hist_kernel<8, true, __nv_bfloat16>" in out[2]
    assert "long_scoreboard 18.2, mio_throttle 3.1, barrier 0.4" in out[2]
    assert out[4].startswith("attn") and len(json.loads((tmp_path / "k.json").read_text())) == 3
    with pytest.raises(ValueError, match="Kernel Name"):
        ncu_summary.parse(["a,b", "1,2"])


def test_ncu_cases_script_checks_its_arguments(monkeypatch):
    """benchmarks/ncu_cases.py (GPU only: scripts/gpu_ncu.sh runs it under ncu) refuses unknown cases and
    says why it stops without CUDA."""
    from benchmarks import ncu_cases

    with pytest.raises(SystemExit):
        ncu_cases.main(["--cases", "no-such-case"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        ncu_cases.main(["--cases", "pst-768x768-cuda"])


@pytest.mark.gpu
def test_ncu_cases_run_on_gpu():
    """Every ncu case builds, warms up and runs again in the profiled region (here a null context)."""
    import contextlib

    from apt_kernels import _env
    from benchmarks import ncu_cases

    ran = ncu_cases.run(list(ncu_cases.CASES), torch.device("cuda"), warmup=1, profile=contextlib.nullcontext)
    cuda_cases = {n for n in ncu_cases.CASES if n.endswith("-cuda")}
    expected = [n for n in ncu_cases.CASES if n not in cuda_cases or _env.cuda_reason(torch.device("cuda")) is None]
    assert ran == expected
