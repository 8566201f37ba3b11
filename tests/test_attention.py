"""gated_prefix_attention: reference and torch backends against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

import apt_kernels as ak
from apt_kernels.testing import assert_parity
from attention_cases import cast, make_inputs

BACKENDS = ["reference", "torch"]


def naive_rows(q, k, v, pk, pv, gate, keep, causal, scale):
    """An independent, loop-per-row float64 evaluation of the spec (small sizes only)."""
    B, Hq, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    P = 0 if pk is None else pk.shape[-2]
    out = torch.zeros(B, Hq, N, D, dtype=torch.float64)
    lse = torch.full((B, Hq, N), -math.inf, dtype=torch.float64)
    G = None if gate is None else gate.double().expand(B, Hq, N, P)
    # a float keep is an additive mask (broadcastable to (B, Hq, N, M)) on the token columns only
    bias = keep.double().expand(B, Hq, N, M) if keep is not None and keep.is_floating_point() else None
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(N):
                scores, values = [], []
                for j in range(P):
                    pkj = pk[g, j] if pk.dim() == 3 else pk[b, g, j]
                    pvj = pv[g, j] if pv.dim() == 3 else pv[b, g, j]
                    Gj = 1.0 if G is None else G[b, h, i, j]
                    scores.append(scale * Gj * (q[b, h, i].double() @ pkj.double()))
                    values.append(Gj * pvj.double())
                for t in range(M):
                    if bias is None and keep is not None and not keep[b, t]:
                        continue
                    if causal and t > i + (M - N):
                        continue
                    extra = 0.0 if bias is None else bias[b, h, i, t]
                    scores.append(scale * (q[b, h, i].double() @ k[b, g, t].double()) + extra)
                    values.append(v[b, g, t].double())
                if scores:
                    s = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in scores])
                    a = torch.softmax(s, 0)
                    out[b, h, i] = sum(a[c] * values[c] for c in range(len(values)))
                    lse[b, h, i] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["none", "example", "token", "head", "full", "head_scalar", "token_scalar"])
@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_naive_loop(backend, gate, shared_prefix, causal):
    (q, k, v, pk, pv, g), keep = make_inputs(gate=gate, shared_prefix=shared_prefix)
    out, lse = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, causal=causal, backend=backend,
                                         return_lse=True)
    want, want_lse = naive_rows(q, k, v, pk, pv, g, keep, causal, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    if backend == "torch":  # without return_lse the torch backend may take its SDPA path
        out2 = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, causal=causal, backend=backend)
        torch.testing.assert_close(out2, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["none", "example", "token"])
@pytest.mark.parametrize("causal", [False, True])
def test_float_mask_with_prefix_matches_naive_loop(backend, gate, causal):
    # An additive float mask (a DeBERTa-style bias: rows whose largest value is not 0) with a prefix: it is
    # added to the token columns only, so no per-row shift of it may be taken (the prefix columns get 0).
    (q, k, v, pk, pv, g), bias = make_inputs(gate=gate, mask="float")
    bias = bias * 3 + 2  # every row's largest token bias well away from 0
    want, _ = naive_rows(q, k, v, pk, pv, g, bias, causal, q.shape[-1] ** -0.5)
    got = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=bias, causal=causal, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["none", "example", "head"])
def test_equals_explicit_concatenation(backend, gate):
    # A gate constant along N can be folded into the prefix keys and values: then the op must equal
    # SDPA over the concatenation [gated prefix; tokens] with the prefix columns always visible.
    (q, k, v, pk, pv, g), keep = make_inputs(gate=gate, N=6, M=9, P=4)
    B, Hq, N, D = q.shape
    rep = Hq // k.shape[1]
    gk = torch.ones(1, 1, 4, 1, dtype=q.dtype) if g is None else g[:, :, 0, :, None]
    pk_h = (pk.repeat_interleave(rep, 0)[None] * gk).expand(B, Hq, 4, D)
    pv_h = (pv.repeat_interleave(rep, 0)[None] * gk).expand(B, Hq, 4, D)
    k_cat = torch.cat([pk_h, k.repeat_interleave(rep, 1)], 2)
    v_cat = torch.cat([pv_h, v.repeat_interleave(rep, 1)], 2)
    m_cat = torch.cat([torch.ones(B, 4, dtype=torch.bool), keep], 1)[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k_cat, v_cat, attn_mask=m_cat)
    got = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nm", [(5, 7), (7, 7), (1, 4)])
def test_no_prefix_equals_sdpa(backend, mask, causal, dtype, nm):
    N, M = nm
    (q, k, v, _, _, _), am = make_inputs(N=N, M=M, P=None, mask=mask, dtype=dtype)
    rep = q.shape[1] // k.shape[1]
    sd_mask = am
    if am is not None and am.dtype == torch.bool:
        sd_mask = am[:, None, None, :]
    if causal:
        c = torch.ones(N, M, dtype=torch.bool).tril(M - N)
        sd_mask = c if sd_mask is None else (sd_mask & c if sd_mask.dtype == torch.bool
                                             else sd_mask.masked_fill(~c, float("-inf")))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=sd_mask)
    got = ak.gated_prefix_attention(q, k, v, attn_mask=am, causal=causal, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # P == 0 prefix tensors and a P == 0 gate are the same as no prefix
    z = q.new_zeros(k.shape[1], 0, q.shape[-1])
    got0 = ak.gated_prefix_attention(q, k, v, z, z, q.new_ones(1, 1, 1, 0), attn_mask=am, causal=causal,
                                     backend=backend)
    torch.testing.assert_close(got0, got, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate,shared", [("token", True), ("example", False), ("head", True), ("full", False)])
def test_gradcheck_float64(backend, gate, shared):
    tensors, keep = make_inputs(B=2, Hq=2, Hkv=1, N=3, M=4, D=3, P=2, gate=gate, shared_prefix=shared,
                                requires_grad=True)

    def f(*ts):
        return ak.gated_prefix_attention(*ts, attn_mask=keep, causal=True, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["example", "token"])
def test_torch_backend_within_budget(dtype, gate):
    """The torch backend against the float64 truth, with the reference's own error in dtype as budget."""
    tensors, keep = make_inputs(B=3, Hq=4, Hkv=2, N=33, M=40, D=16, P=5, gate=gate, requires_grad=True)
    grad_out = torch.randn(3, 4, 33, 16, dtype=torch.float64)

    def run(ts, backend):
        out = ak.gated_prefix_attention(*ts, attn_mask=keep, causal=True, backend=backend)
        grads = torch.autograd.grad(out, [t for t in ts if t is not None], grad_out.to(out.dtype))
        return [out.detach()] + list(grads)

    truth = run(tensors, "reference")
    lowp = run(cast(tensors, dtype), "reference")
    fast = run(cast(tensors, dtype), "torch")
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate"]
    for name, f, lp, t in zip(names, fast, lowp, truth):
        assert_parity(f, lp, t, name=name, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_not_nan(backend):
    (q, k, v, _, _, _), _ = make_inputs(P=None, mask="none", requires_grad=True)
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, 2] = True
    out = ak.gated_prefix_attention(q, k, v, attn_mask=keep, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    _, lse = ak.gated_prefix_attention(q, k, v, attn_mask=keep, backend=backend, return_lse=True)
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    # float masks at the dtype minimum hide keys just like False
    fm = torch.zeros(2, 1, 1, 7, dtype=q.dtype).masked_fill(~keep[:, None, None, :], torch.finfo(q.dtype).min)
    out_f = ak.gated_prefix_attention(q, k, v, attn_mask=fm, backend=backend)
    torch.testing.assert_close(out_f, out.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prefix", [3, None])
def test_nan_propagates_to_its_rows_only(backend, dtype, prefix):
    # (PyTorch's CPU SDPA kernels, which the torch backend calls, return 0 for a float32 query row with a NaN)
    (q, k, v, pk, pv, g), keep = make_inputs(gate="example", mask="none", dtype=dtype, P=prefix)
    q = q.clone()
    q[1, 2, 3, 0] = float("nan")
    out = ak.gated_prefix_attention(q, k, v, pk, pv, g, backend=backend)
    assert torch.isnan(out[1, 2, 3]).all()
    nan_rows = torch.isnan(out).any(-1)
    assert int(nan_rows.sum()) == 1
    v = v.clone()
    v[0, 0, 1, 2] = float("nan")  # a value NaN reaches every row of its kv head that sees it
    out = ak.gated_prefix_attention(q, k, v, pk, pv, g, backend=backend)
    assert torch.isnan(out[0, :2]).any(-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [dict(B=0), dict(N=0), dict(M=0), dict(N=1), dict(M=0, P=None)])
def test_empty_and_degenerate(backend, dims):
    kw = dict(gate="example", mask="none")
    kw.update(dims)
    (q, k, v, pk, pv, g), _ = make_inputs(**kw, requires_grad=True)
    out, lse = ak.gated_prefix_attention(q, k, v, pk, pv, g, backend=backend, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    if dims.get("M") == 0 and dims.get("P", 3) is None:
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    elif out.numel():
        want, _ = naive_rows(q, k, v, pk, pv, g, None, False, q.shape[-1] ** -0.5)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    for t in (q, k, v, pk, pv, g):
        if t is not None:
            assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    (q, k, v, pk, pv, g), keep = make_inputs(gate="token")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    gt = g.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    a = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, backend=backend)
    b = ak.gated_prefix_attention(qt, kt, v, pk, pv, gt, attn_mask=keep, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["example", "token"])
def test_dropout(backend, gate):
    (q, k, v, pk, pv, g), _ = make_inputs(B=4, Hq=4, N=64, M=64, D=8, P=8, gate=gate, mask="none",
                                          dtype=torch.float32)
    ones = torch.ones_like(v)
    ones_p = torch.ones_like(pv)
    plain = ak.gated_prefix_attention(q, k, v, pk, pv, g, backend=backend)
    assert torch.equal(ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.0, backend=backend), plain)
    torch.manual_seed(1)
    a = ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.3, backend=backend)
    torch.manual_seed(1)
    b = ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    # The explicit-matmul paths drop the same probabilities as the reference under the same seed.
    if gate == "token":
        torch.manual_seed(1)
        want = ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.3, backend="reference")
        torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-6)
    # With unit token values and a unit gate, each output entry is sum(kept weights) / (1 - p):
    # its mean over many rows is 1.
    unit = None if gate == "example" else torch.ones_like(g)
    out = ak.gated_prefix_attention(q, k, ones, pk, ones_p, unit, dropout_p=0.3, backend=backend)
    mean = out[..., 0].mean().item()
    assert abs(mean - 1.0) < 0.05, mean


def test_scale_and_grad_reduction_over_broadcast_dims():
    (q, k, v, pk, pv, g), keep = make_inputs(gate="example", requires_grad=True)
    out = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, scale=0.37, backend="reference")
    out.sum().backward()
    assert pk.grad.shape == pk.shape and g.grad.shape == g.shape
    want, _ = naive_rows(q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), g.detach(), keep, False, 0.37)
    torch.testing.assert_close(out.detach(), want, rtol=1e-10, atol=1e-10)


def test_torch_backend_half_precision_with_a_huge_finite_float_mask():
    """A float32 mask of -1e9 with fp16 scores: an ordinary (not empty) row. The torch backend keeps it
    finite (no NaN, no zero row) and, with the rows shifted by their largest value, gives softmax's exact
    value: the attention of the same row without the offset."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, dtype=torch.float16) for n in (3, 4, 4))
    mask = torch.zeros(1, 1, 3, 4)
    mask[0, 0, 0] = -1e9
    mask[0, 0, 1, :2] = -1e9
    got = ak.gated_prefix_attention(q, k, v, attn_mask=mask, backend="torch")
    assert torch.isfinite(got).all() and got[0, 0, 0].abs().sum() > 0
    plain = ak.gated_prefix_attention(q, k, v, backend="reference")
    torch.testing.assert_close(got[0, 0, 0], plain[0, 0, 0], rtol=2e-3, atol=2e-3)  # -1e9 on every key
    masked = ak.gated_prefix_attention(q, k, v, attn_mask=mask > -1, backend="reference")
    torch.testing.assert_close(got[0, 0, 1], masked[0, 0, 1], rtol=2e-3, atol=2e-3)  # -1e9 on two keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_the_autocast_dtype(backend):
    """Under torch.autocast q, k, v and the prefix are cast to the autocast dtype (mixed float32 and bf16 inputs,
    as rotary embeddings leave them, are accepted), as F.scaled_dot_product_attention does."""
    (q, k, v, pk, pv, g), keep = make_inputs(gate="example", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ak.gated_prefix_attention(q, k, v.bfloat16(), pk, pv, g, attn_mask=keep, backend=backend)
    want = ak.gated_prefix_attention(*(t.bfloat16() for t in (q, k, v, pk, pv)), g, attn_mask=keep, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_torch_backend_without_prefix_compiles_fullgraph():
    """No prefix, a padding mask that empties a row: the torch backend's empty-row guard has no data-dependent
    branch (it synced with the GPU and broke fullgraph tracing)."""
    (q, k, v, _, _, _), keep = make_inputs(P=None, dtype=torch.float32)
    keep[0] = False  # batch 0 sees no key at all
    fn = torch.compile(lambda *a: ak.gated_prefix_attention(*a, attn_mask=keep, backend="torch"), fullgraph=True,
                       backend="eager")
    out = fn(q, k, v)
    torch.testing.assert_close(out, ak.gated_prefix_attention(q, k, v, attn_mask=keep, backend="reference"))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_meta_tensors_give_shapes():
    """Shape inference on the meta device (no autocast there to ask about)."""
    q = torch.empty(2, 4, 5, 8, device="meta")
    k = torch.empty(2, 2, 7, 8, device="meta")
    pk = torch.empty(2, 3, 8, device="meta")
    assert ak.gated_prefix_attention(q, k, k, pk, pk, backend="torch").shape == (2, 4, 5, 8)
