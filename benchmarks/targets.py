"""The issues' performance targets, evaluated on a run's rows and printed as PASS / FAIL / n/a.

Each target names the contenders it compares (ours: the best of the listed fused backends; peers:
the best of the listed peers), so a fallback backend or a variant such as plain prefix tuning never
stands in for the kernel the target is about. ``n/a`` says why a target could not be judged (a
contender not measured: skipped, out of time, failed), never silently passes.
"""

from __future__ import annotations

import dataclasses
import re

KINDS = {
    "time_ratio": "our time / the best peer's <= {t}",
    "speedup": "the best peer's time / ours >= {t}",
    "matmul_frac": "our TFLOP/s / the measured bf16 matmul rate >= {t}",
    "copy_frac": "the floor's bytes at the measured copy bandwidth / our time >= {t}",
    "memory": "our peak memory / the peer's <= {t}",
    "memory_less": "our peak memory < the best peer's",
}


@dataclasses.dataclass(frozen=True)
class Target:
    issue: int
    text: str  # the issue's words
    op: str
    cases: str  # regular expression on the case name
    mode: str
    ours: tuple[str, ...]
    kind: str
    threshold: float = 1.0
    peers: tuple[str, ...] = ()


ATTN_PEERS = ("hf_eager_concat", "sdpa_concat", "flex_attention")
PEFT_PEERS = ("peft_prefix_eager", "peft_prefix_sdpa", "hf_cache_prefix_sdpa")
PST_OURS = ("cuda", "triton")
CT_OURS = ("cuda", "triton")

TARGETS = (
    Target(3, "fwd+bwd at most 0.9x the best peer (encoder shapes)", "attention", r"^bert-.*-p\d+$", "fwd+bwd",
           ("triton",), "time_ratio", 0.9, ATTN_PEERS),
    Target(3, "fwd+bwd at most 1.0x the best peer (decoder shapes)", "attention", r"^llama-.*-p\d+$", "fwd+bwd",
           ("triton",), "time_ratio", 1.0, ATTN_PEERS),
    Target(3, "forward at N=4096, D=128 at least half the dense bf16 matmul rate", "attention", r"^llama-n4096-p\d+$",
           "fwd", ("triton",), "matmul_frac", 0.5),
    Target(3, "peak memory no higher than SDPA with the prefix concatenated", "attention", r"-p\d+$", "fwd+bwd",
           ("triton",), "memory", 1.0, ("sdpa_concat",)),
    Target(4, "training step at least 1.5x faster than PEFT prefix tuning (encoder)", "apt_train", r"^bert-", "step",
           ("apt",), "speedup", 1.5, PEFT_PEERS),
    Target(4, "less peak memory than PEFT prefix tuning", "apt_train", r".", "step", ("apt",), "memory_less", 1.0,
           PEFT_PEERS),
    Target(5, "fwd+bwd at least 20x faster than the paper's path (dense S + argsort)", "pst", r".", "fwd+bwd",
           PST_OURS, "speedup", 20.0, ("paper_dense_argsort",)),
    Target(5, "fwd+bwd at least 3x faster than the best torch composite", "pst", r".", "fwd+bwd", PST_OURS,
           "speedup", 3.0, ("torch_kthvalue", "torch_topk")),
    Target(5, "fwd+bwd within 2x of three passes over W's bytes at the copy bandwidth", "pst", r".", "fwd+bwd",
           PST_OURS, "copy_frac", 0.5),
    Target(6, "step at most 1.0x torch.optim.AdamW(fused=True)", "child_tuning", r".", "fwd", CT_OURS, "time_ratio",
           1.0, ("torch_adamw_fused",)),
    Target(6, "step at least 8x faster than the paper's optimizer", "child_tuning", r".", "fwd", CT_OURS, "speedup",
           8.0, ("paper_optimizer",)),
    Target(6, "effective bandwidth at least 85% of the copy bandwidth", "child_tuning", r".", "fwd", CT_OURS,
           "copy_frac", 0.85),
)


def _best(rows: list[dict], names: tuple[str, ...], key: str) -> tuple[dict | None, str]:
    """The row with the smallest ``key`` among the measured contenders ``names`` (and why none)."""
    here = [r for r in rows if r["contender"] in names]
    ok = [r for r in here if r["status"] == "ok" and r.get(key) is not None]
    if ok:
        return min(ok, key=lambda r: r[key]), ""
    if not here:
        return None, "not in this run"
    return None, "; ".join(f"{r['contender']} {r['status']}" + (f" ({r['reason'][:60]})" if r.get("reason") else "")
                           for r in here)


def evaluate(rows: list[dict], targets=TARGETS, *, device_type: str = "cuda") -> list[dict]:
    """One result per (target, case present in the rows). The targets are the issues' H200 targets:
    rows measured on another device type are listed, not judged."""
    out = []
    for t in targets:
        pattern = re.compile(t.cases)
        cases = list(dict.fromkeys(r["case"] for r in rows if r["op"] == t.op and r["mode"] == t.mode
                                   and pattern.search(r["case"])))
        for case in cases:
            group = [r for r in rows if r["op"] == t.op and r["case"] == case and r["mode"] == t.mode]
            res = dict(issue=t.issue, target=t.text, op=t.op, case=case, mode=t.mode, kind=t.kind,
                       threshold=t.threshold, ours=None, peer=None, value=None, status="n/a", why="")
            time_key = "median_ms"
            key = "peak_mem_mb" if t.kind in ("memory", "memory_less") else time_key
            ours, why = _best(group, t.ours, key)
            peer, why_peer = _best(group, t.peers, key) if t.peers else (None, "")
            res["ours"] = ours and ours["contender"]
            res["peer"] = peer and peer["contender"]
            if ours is None or (t.peers and peer is None):
                res["why"] = f"ours: {why}" if ours is None else f"peers: {why_peer}"
                out.append(res)
                continue
            if device_type != "cuda":
                res["why"] = f"set for CUDA (H200); measured on {device_type}"
                out.append(res)
                continue
            if t.peers:  # a verdict against fewer peers than the target names says so
                missing = [n for n in t.peers if not any(r["contender"] == n and r["status"] == "ok" for r in group)]
                if missing:
                    res["why"] = "partial: without " + ", ".join(missing)
            if t.kind == "time_ratio":
                value = ours[time_key] / peer[time_key]
                ok = value <= t.threshold
                walls = [r.get("wall_ms") for r in (ours, peer)]
                if all(walls):  # short calls: the same ratio with host time included, for the reader
                    res["why"] = "; ".join(filter(None, [res["why"], f"wall-clock ratio {walls[0] / walls[1]:.3g}"]))
            elif t.kind == "speedup":
                value = peer[time_key] / ours[time_key]
                ok = value >= t.threshold
            elif t.kind in ("memory", "memory_less"):
                value = ours["peak_mem_mb"] / max(peer["peak_mem_mb"], 1e-9)
                ok = value < 1.0 if t.kind == "memory_less" else value <= t.threshold
            else:
                key = "frac_of_matmul_peak" if t.kind == "matmul_frac" else "frac_of_copy_bw"
                value = ours.get(key)
                if value is None:
                    res["why"] = "no floor measured (CPU run?)"
                    out.append(res)
                    continue
                ok = value >= t.threshold
            res.update(value=value, status="PASS" if ok else "FAIL")
            out.append(res)
    return out


def format_targets(results: list[dict]) -> str:
    if not results:
        return "targets: none of the ops with targets ran"
    lines = ["targets (issue: what it asks; the case; value; verdict):"]
    for r in results:
        who = r["ours"] or "-"
        if r["peer"]:
            who += f" vs {r['peer']}"
        val = "-" if r["value"] is None else f"{r['value']:.3g}"
        line = f"  #{r['issue']} {r['target']} | {r['case']} {r['mode']} | {who} | {val} | {r['status']}"
        if r["why"]:
            line += f" ({r['why']})"
        lines.append(line)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "n/a")}
    lines.append(f"  {counts['PASS']} pass, {counts['FAIL']} fail, {counts['n/a']} not judged")
    return "\n".join(lines)
