"""Benchmark cases for gated-prefix attention (Adaptive Prefix Tuning).

Shapes (CUDA, bf16):
  * BERT encoder: B=32, H in {12, 16}, N=M in {128, 512}, P in {16, 64}, D=64; a bool (B, M) padding
    keep-mask with random lengths; a per-example gate (B, 1, 1, P).
  * Llama-3-8B-like decoder: B=2, Hq=32, Hkv=8, N=M in {2048, 4096}, P=64, D=128; causal; a per-token
    gate (B, 1, N, P).
  * Plain attention (P=0) at the same shapes.
On CPU: tiny float32 shapes (an encoder, a GQA causal decoder and a plain one).

Peers:
  * hf_eager_concat: what PEFT prefix tuning runs on Hugging Face's eager attention: the prefix expanded
    per batch and concatenated in front of K/V (ungated: PEFT has no gate), repeat_kv for GQA, matmul,
    additive mask, softmax in float32, matmul.
  * sdpa_concat: the gated prefix materialised (gate folded into prefix keys and values), concatenated
    to K/V, and ``F.scaled_dot_product_attention`` with a bool mask.
  * flex_attention: ``torch.nn.attention.flex_attention`` under ``torch.compile``: prefix concatenated,
    the gate a ``score_mod`` multiplying prefix scores, prefix values pre-scaled by the gate; padding
    and causality a ``BlockMask``. CUDA only.
Masks and block masks are built outside the timed region (a model builds them once per batch).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import apt_kernels
from apt_kernels.registry import Probe

from .harness import OUR_BACKENDS, Case, Contender, Skip, fill, our_backend

OP = "attention"
REGISTRY_OP = "gated_prefix_attention"


@functools.lru_cache(maxsize=None)
def _shape_flops(B, Hq, N, M, P, D, causal):
    tok = M / 2 if causal else M
    fwd = 4.0 * B * Hq * N * (tok + P) * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


# ------------------------------------------------------------------------------------------ inputs


def _inputs(spec: dict, device, dtype):
    B, Hq, Hkv, N, M, P, D = (spec[k] for k in ("B", "Hq", "Hkv", "N", "M", "P", "D"))

    def make(seed: int) -> dict:
        s = 1000 * (seed + 1)
        inp = dict(q=fill((B, Hq, N, D), seed=s + 1, device=device, dtype=dtype, requires_grad=True),
                   k=fill((B, Hkv, M, D), seed=s + 2, device=device, dtype=dtype, requires_grad=True),
                   v=fill((B, Hkv, M, D), seed=s + 3, device=device, dtype=dtype, requires_grad=True),
                   prefix_k=None, prefix_v=None, gate=None, keep=None)
        if P:
            inp["prefix_k"] = fill((Hkv, P, D), seed=s + 4, device=device, dtype=dtype, requires_grad=True)
            inp["prefix_v"] = fill((Hkv, P, D), seed=s + 5, device=device, dtype=dtype, requires_grad=True)
            gshape = (B, 1, N, P) if spec["gate"] == "per-token" else (B, 1, 1, P)
            # APT's gate is a sigmoid-like value in (0, 1): keep it away from 0.
            inp["gate"] = fill(gshape, seed=s + 6, device=device, dtype=dtype, kind="rand", scale=0.9,
                               offset=0.1, requires_grad=True)
        if spec["mask"] == "padding":
            g = torch.Generator().manual_seed(s + 7)
            lengths = torch.randint(M // 2, M + 1, (B,), generator=g)
            inp["keep"] = (torch.arange(M)[None, :] < lengths[:, None]).to(device)
        return inp

    return make


def _grad_names(spec) -> tuple[str, ...]:
    return ("q", "k", "v", "prefix_k", "prefix_v", "gate") if spec["P"] else ("q", "k", "v")


# ------------------------------------------------------------------------------------------ peers


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's repeat_kv: (B, Hkv, L, D) -> (B, heads, L, D), materialised."""
    B, Hkv, L, D = x.shape
    if Hkv == heads:
        return x
    return x[:, :, None].expand(B, Hkv, heads // Hkv, L, D).reshape(B, heads, L, D)


def _keep_matrix(inp, spec) -> torch.Tensor | None:
    """Bool (B|1, 1, N|1, P+M) keep mask over the concatenated [prefix, tokens] keys, or None."""
    N, M, P = spec["N"], spec["M"], spec["P"]
    q = inp["q"]
    keep = None
    if inp["keep"] is not None:
        keep = inp["keep"][:, None, None, :]  # (B, 1, 1, M)
    if spec["causal"]:
        i = torch.arange(N, device=q.device)[:, None]
        t = torch.arange(M, device=q.device)[None, :]
        c = (t <= i + (M - N))[None, None]  # bottom-right aligned, as the op defines it
        keep = c if keep is None else keep & c
    if keep is None:
        return None
    if P:
        keep = torch.cat([torch.ones(keep.shape[:-1] + (P,), dtype=torch.bool, device=q.device).expand(*keep.shape[:-1], P),
                          keep.expand(*keep.shape[:-1], M)], dim=-1)
    return keep


def build_hf_eager(spec):
    def build(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        B, Hq, _, D = q.shape
        keep = _keep_matrix(inp, spec)
        add = None
        if keep is not None:  # HF's additive mask: 0 where visible, finfo.min where hidden
            add = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, torch.finfo(q.dtype).min)
        pk, pv = inp["prefix_k"], inp["prefix_v"]
        scale = D ** -0.5

        def run():
            kk, vv = k, v
            if pk is not None:  # PEFT: past_key_values = the prefix expanded over the batch
                kk = torch.cat([pk[None].expand(B, -1, -1, -1), kk], dim=2)
                vv = torch.cat([pv[None].expand(B, -1, -1, -1), vv], dim=2)
            kk, vv = _repeat_kv(kk, Hq), _repeat_kv(vv, Hq)
            w = torch.matmul(q, kk.transpose(2, 3)) * scale
            if add is not None:
                w = w + add
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(w, vv)

        return run

    return build


def _gate_over_keys(gate: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1|N, P) -> (B, 1, P, 1), the gate a key/value can carry.

    A per-token gate varies along the query axis and cannot be folded into keys and values; the peers
    use its mean over N instead: an approximation (same cost, not the same numbers).
    """
    g = gate.mean(dim=2, keepdim=True) if gate.shape[2] != 1 else gate
    return g[:, :, 0, :, None]


def build_sdpa(spec):
    def build(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        B, Hq, _, D = q.shape
        keep = _keep_matrix(inp, spec)
        pk, pv, gate = inp["prefix_k"], inp["prefix_v"], inp["gate"]
        # Causal with no padding: SDPA's own causal masks, never a materialised one, so that its fastest
        # (flash) backend runs: is_causal without a prefix (N == M: top-left == bottom-right), else the
        # bottom-right causal bias over [prefix, tokens] (the prefix columns come first: always visible).
        causal_only = keep is not None and spec["causal"] and inp["keep"] is None
        use_is_causal = causal_only and pk is None and spec["N"] == spec["M"]
        bias = None
        if causal_only and not use_is_causal:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(spec["N"], spec["P"] + spec["M"])
        if causal_only:
            keep = None
        gqa = [True]  # SDPA's own GQA (no repeated K/V) where this torch takes it with the mask form used

        def run():
            kk, vv = k, v
            if pk is not None:
                g = _gate_over_keys(gate)  # (B, 1, P, 1)
                kk = torch.cat([(g * pk[None]).to(q.dtype), kk], dim=2)
                vv = torch.cat([(g * pv[None]).to(q.dtype), vv], dim=2)
            if causal_only and kk.shape[1] != Hq and gqa[0]:
                try:
                    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, is_causal=use_is_causal,
                                                          enable_gqa=True)
                except RuntimeError:
                    gqa[0] = False
            kk, vv = _repeat_kv(kk, Hq), _repeat_kv(vv, Hq)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=keep if bias is None else bias,
                                                  is_causal=use_is_causal)

        return run

    return build


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except Exception as e:  # noqa: BLE001
            raise Skip(f"torch.nn.attention.flex_attention is not available: {type(e).__name__}: {e}")
        import torch._dynamo.config as dc

        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dc, knob):  # one compile per shape; do not fall back to eager after 8 of them
                setattr(dc, knob, max(getattr(dc, knob), 256))
        _FLEX = (torch.compile(flex_attention, dynamic=False), create_block_mask)
    return _FLEX


def check_flex(spec):
    def check(inp):
        if inp["q"].device.type != "cuda":
            return "flex_attention is benchmarked on CUDA only"
        if not spec.get("flex", True):
            return "flex_attention runs on the representative shapes only (a compile per shape does not fit the time budget)"
        return None

    return check


def build_flex(spec):
    N, M, P, causal = spec["N"], spec["M"], spec["P"], spec["causal"]
    padded, per_token, off = spec["mask"] == "padding", spec["gate"] == "per-token", M - N
    # One mask_mod / score_mod per case reading the current input set's tensors from `cur`: the compiled
    # flex_attention then sees the same functions for every input set (new closures could recompile).
    cur: dict = {}

    def mask_mod(b, h, q_idx, kv_idx):
        t = kv_idx - P
        ok = t >= 0
        if padded:
            ok = ok & cur["keep"][b, torch.clamp(t, 0, M - 1)]  # clamped: padded tiles may probe past M
        if causal:
            ok = ok & (t <= q_idx + off)
        return ((kv_idx < P) | ok) if P else ok

    def score_mod(score, b, h, q_idx, kv_idx):
        j = torch.clamp(kv_idx, 0, P - 1)
        gate = cur["gate"]
        g = gate[b, 0, torch.clamp(q_idx, 0, N - 1), j] if per_token else gate[b, 0, 0, j]
        return torch.where(kv_idx < P, score * g, score)

    def build(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        flex, create_block_mask = _flex()
        B, Hq, _, D = q.shape
        Hkv = k.shape[1]
        pk, pv, gate, keep = inp["prefix_k"], inp["prefix_v"], inp["gate"], inp["keep"]
        block_mask = None
        if padded or causal:
            cur["keep"] = keep
            block_mask = create_block_mask(mask_mod, B if padded else None, None, N, P + M, device=q.device)

        def run():
            cur["keep"], cur["gate"] = keep, gate
            kk, vv = k, v
            if pk is not None:
                g = _gate_over_keys(gate)  # values carry the gate (mean over N for a per-token gate)
                kk = torch.cat([pk[None].expand(B, -1, -1, -1), kk], dim=2)
                vv = torch.cat([(g * pv[None]).to(q.dtype), vv], dim=2)
            return flex(q, kk, vv, score_mod=score_mod if P else None, block_mask=block_mask,
                        enable_gqa=Hq != Hkv)

        return run

    return build


# ------------------------------------------------------------------------------------------ ours


def build_ours(backend):
    def build(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        pk, pv, gate, keep, causal = inp["prefix_k"], inp["prefix_v"], inp["gate"], inp["keep"], inp["causal"]

        def run():
            return apt_kernels.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=keep, causal=causal,
                                                      backend=backend)

        return run

    return build


def _probe(inp) -> Probe:
    return Probe.of(inp["q"], "prefix" if inp["prefix_k"] is not None else "",
                    "gate" if inp["gate"] is not None else "")


def verified(build, tol: float = 2e-2):
    """``build``, whose first built callable is checked once against our reference on its inputs:
    a peer that computes something else must not be timed as if it did the same work."""
    done = []

    def checked(inp):
        fn = build(inp)
        if not done:
            done.append(True)
            with torch.no_grad():
                got = fn()
                got = (got[0] if isinstance(got, tuple) else got).float()
                want = apt_kernels.gated_prefix_attention(
                    inp["q"], inp["k"], inp["v"], inp["prefix_k"], inp["prefix_v"], inp["gate"],
                    attn_mask=inp["keep"], causal=inp["causal"], backend="reference").float()
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if not err <= tol:
                raise RuntimeError(f"its output differs from the reference: relative error {err:.2e} > {tol}")
        return fn

    return checked


# ------------------------------------------------------------------------------------------ cases


def make_case(name: str, *, B, Hq, Hkv, N, P, D, causal, mask, gate, device, dtype, flex=True) -> Case:
    M = N
    spec = dict(B=B, Hq=Hq, Hkv=Hkv, N=N, M=M, P=P, D=D, causal=causal, mask=mask,
                gate=gate if P else "none", dtype=str(dtype).replace("torch.", ""), flex=flex)
    make = _inputs(spec, device, dtype)

    def make_inputs(seed):
        inp = make(seed)
        inp["causal"] = causal
        return inp

    contenders = [our_backend(REGISTRY_OP, b, build_ours(b), _probe) for b in OUR_BACKENDS]
    # SDPA and FlexAttention compute our op exactly unless the gate is per token (they take its mean over
    # the queries); the eager peer is PEFT's, ungated by design. The exact ones are checked once.
    exact = (lambda b: verified(b)) if spec["gate"] != "per-token" else (lambda b: b)
    contenders += [Contender("hf_eager_concat" if P else "hf_eager", build_hf_eager(spec)),
                   Contender("sdpa_concat" if P else "sdpa", exact(build_sdpa(spec))),
                   Contender("flex_attention", exact(build_flex(spec)), check=check_flex(spec))]
    params = dict(spec)
    return Case(op=OP, name=name, params=params, make_inputs=make_inputs, contenders=contenders,
                modes=("fwd", "bwd", "fwd+bwd"), grad_names=_grad_names(spec),
                flops=_shape_flops(B, Hq, N, M, P, D, causal))


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    if device.type != "cuda":
        dt = torch.float32
        small = [dict(B=2, H=4, N=64, P=8, D=32)] if quick else [dict(B=2, H=4, N=64, P=8, D=32),
                                                                 dict(B=4, H=8, N=256, P=16, D=64)]
        out = []
        for s in small:
            for P in (s["P"], 0):
                tag = f"p{P}" if P else "plain"
                out.append(make_case(f"enc-b{s['B']}-h{s['H']}-n{s['N']}-{tag}", B=s["B"], Hq=s["H"], Hkv=s["H"],
                                     N=s["N"], P=P, D=s["D"], causal=False, mask="padding", gate="per-example",
                                     device=device, dtype=dt))
            out.append(make_case(f"dec-gqa-b{s['B']}-hq{s['H']}-hkv{s['H'] // 2}-n{s['N']}-p{s['P']}", B=s["B"], Hq=s["H"],
                                 Hkv=s["H"] // 2, N=s["N"], P=s["P"], D=s["D"], causal=True, mask="none",
                                 gate="per-token", device=device, dtype=dt))
        return out

    dt = torch.bfloat16
    # flex_attention compiles per shape (tens of seconds each, forward and backward): it runs on one
    # encoder and one decoder shape with a prefix only (for plain attention SDPA is the natural peer).
    flex_shapes = {("bert", 12, 512, 64), ("llama", 32, 4096, 64)}
    bert = [(H, N, P) for H in (12, 16) for N in (128, 512) for P in (16, 64)]
    bert_plain = [(H, N) for H in (12, 16) for N in (128, 512)]
    llama_n = (2048, 4096)
    if quick:
        bert, bert_plain, llama_n = [(12, 512, 64)], [(12, 512)], (4096,)
    out = []
    for H, N, P in bert:
        out.append(make_case(f"bert-h{H}-n{N}-p{P}", B=32, Hq=H, Hkv=H, N=N, P=P, D=64, causal=False, mask="padding",
                             gate="per-example", device=device, dtype=dt, flex=("bert", H, N, P) in flex_shapes))
    for H, N in bert_plain:
        out.append(make_case(f"bert-h{H}-n{N}-plain", B=32, Hq=H, Hkv=H, N=N, P=0, D=64, causal=False,
                             mask="padding", gate="none", device=device, dtype=dt, flex=("bert", H, N, 0) in flex_shapes))
    for N in llama_n:
        for P in (64, 0):
            tag = f"p{P}" if P else "plain"
            out.append(make_case(f"llama-n{N}-{tag}", B=2, Hq=32, Hkv=8, N=N, P=P, D=128, causal=True, mask="none",
                                 gate="per-token", device=device, dtype=dt, flex=("llama", 32, N, P) in flex_shapes))
    # The representative shapes first (those with flex_attention, then their plain twins): under a time
    # budget they are the ones that run for sure.
    first = {"bert-h12-n512-p64": 0, "llama-n4096-p64": 1, "bert-h12-n512-plain": 2, "llama-n4096-plain": 3}
    return sorted(out, key=lambda c: first.get(c.name, len(first)))
