"""CPU smoke test of the benchmark harness: tiny cases of every op, results written and well formed."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, ops_apt_train, ops_attention, ops_child_tuning, ops_pst, run  # noqa: E402

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
    assert out.rstrip().splitlines()[-1].startswith("ratio = ")  # the summary table is printed last


def test_time_budget_skips_with_reason():
    case = ops_pst.make_case(16, 16, device=CPU, wdtype=torch.float32)
    rows = harness.run_case(case, CPU, FAST, deadline=0.0, log=lambda s: None)
    assert rows and all(r["status"] == "skipped" and "budget" in r["reason"] for r in rows)
