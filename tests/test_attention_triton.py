"""The fused Triton gated-prefix attention against the float64 reference.

On CPU the kernels run through Triton's interpreter (small shapes, float32: the interpreter has no
bf16 dot); on a GPU the same tests run compiled, in every dtype and at larger shapes. Every output
and gradient must lie within the error budget of apt_kernels.testing (twice the reference's own
error in that dtype, plus a floor).
"""

import pytest
import torch
import torch.nn.functional as F

import apt_kernels as ak
from apt_kernels.testing import assert_parity
from attention_cases import cast, make_inputs

pytestmark = pytest.mark.triton

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if GPU else [torch.float32]
NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate"]


def check(tensors, mask, dtype, *, causal=False, with_lse=False, scale=None):
    """Forward and every gradient of the triton backend within budget of the float64 truth."""
    tensors = [None if t is None else t.to(DEVICE).requires_grad_(True) for t in tensors]
    mask = None if mask is None else mask.to(DEVICE)
    grad_out = torch.randn(tensors[0].shape, dtype=torch.float64, device=DEVICE)
    grad_lse = torch.randn(tensors[0].shape[:3], dtype=torch.float64, device=DEVICE)

    def run(ts, backend):
        res = ak.gated_prefix_attention(*ts, attn_mask=mask, causal=causal, scale=scale, backend=backend,
                                        return_lse=with_lse)
        out, lse = res if with_lse else (res, None)
        loss = (out.double() * grad_out).sum()
        if with_lse:
            loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0) * grad_lse).sum()
        live = [t for t in ts if t is not None]
        grads = torch.autograd.grad(loss, live, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, live)]
        return [out.detach()] + ([lse.detach()] if with_lse else []) + grads

    truth = run(tensors, "reference")
    lowp = run(cast(tensors, dtype), "reference")
    fast = run(cast(tensors, dtype), "triton")
    names = NAMES[:1] + (["lse"] if with_lse else []) + [n for n, t in zip(NAMES[1:], tensors) if t is not None]
    for name, f, lp, t in zip(names, fast, lowp, truth):
        assert f.dtype == lp.dtype, name
        assert_parity(f, lp, t, name=name, dtype=dtype)


SMALL = dict(B=2, Hq=4, Hkv=2, N=19, M=23, D=24, P=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["none", "example", "token", "head", "full", "head_scalar", "token_scalar"])
@pytest.mark.parametrize("causal", [False, True])
def test_gates_and_causal(dtype, gate, causal):
    tensors, keep = make_inputs(**SMALL, gate=gate, dtype=torch.float64)
    check(tensors, keep, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["none", "bool", "float", "bool4d"])
def test_masks_and_per_example_prefix(dtype, mask):
    tensors, am = make_inputs(**SMALL, gate="token", shared_prefix=False, dtype=torch.float64,
                              mask="float" if mask == "float" else "bool" if mask == "bool" else "none")
    if mask == "bool4d":
        am = torch.rand(2, 4, 19, 23) > 0.4
        am[..., 0] = True
    check(tensors, am, dtype, causal=False, with_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [dict(N=1, M=9), dict(N=17, M=5), dict(N=33, M=33, P=1), dict(P=20, N=3, M=2),
                                  dict(Hq=6, Hkv=1), dict(Hq=3, Hkv=3)])
def test_odd_sizes_and_gqa(dtype, dims):
    shape = dict(SMALL)
    shape.update(dims)
    tensors, keep = make_inputs(**shape, gate="token", dtype=torch.float64)
    check(tensors, keep, dtype, causal=True, scale=0.3)


@pytest.mark.parametrize("D", [16, 48, 80] + ([96, 112, 128, 256] if GPU else []))
def test_head_dims(D):
    tensors, keep = make_inputs(B=1, Hq=2, Hkv=1, N=17, M=18, D=D, P=3, gate="example", dtype=torch.float64)
    check(tensors, keep, DTYPES[-1], causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_no_prefix_equals_sdpa(dtype, mask, causal):
    (q, k, v, _, _, _), am = make_inputs(B=2, Hq=4, Hkv=4, N=21, M=21, D=32, P=None, mask=mask,
                                         dtype=torch.float32, device=DEVICE)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    sd_mask = am[:, None, None, :] if mask == "bool" else (None if am is None else am.to(dtype))
    got = ak.gated_prefix_attention(q, k, v, attn_mask=am, causal=causal, backend="triton")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=sd_mask, is_causal=causal and am is None)
    if causal and am is not None:
        c = torch.ones(21, 21, dtype=torch.bool, device=DEVICE).tril()
        m = sd_mask & c if mask == "bool" else sd_mask.masked_fill(~c, float("-inf"))
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_rows_without_keys_and_empty_inputs():
    (q, k, v, _, _, _), _ = make_inputs(B=2, Hq=2, Hkv=1, N=5, M=7, D=16, P=None, mask="none", dtype=torch.float32,
                                        device=DEVICE, requires_grad=True)
    keep = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    keep[0, 3] = True
    out, lse = ak.gated_prefix_attention(q, k, v, attn_mask=keep, backend="triton", return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    for dims in (dict(B=0), dict(N=0), dict(M=0), dict(M=0, P=None)):
        kw = dict(B=2, Hq=2, Hkv=1, N=5, M=7, D=16, P=3, gate="example", mask="none", dtype=torch.float32,
                  device=DEVICE, requires_grad=True)
        kw.update(dims)
        ts, _ = make_inputs(**kw)
        out = ak.gated_prefix_attention(*ts, backend="triton")
        ref = ak.gated_prefix_attention(*ts, backend="reference")
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        for t in ts:
            if t is not None:
                assert t.grad is not None and t.grad.shape == t.shape


def test_nan_propagates():
    (q, k, v, pk, pv, g), _ = make_inputs(**SMALL, gate="example", mask="none", dtype=torch.float32, device=DEVICE)
    q = q.clone()
    q[1, 2, 3, 0] = float("nan")
    out = ak.gated_prefix_attention(q, k, v, pk, pv, g, backend="triton")
    assert torch.isnan(out[1, 2, 3]).all() and int(torch.isnan(out).any(-1).sum()) == 1


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64])
def test_extreme_finite_mask_values_are_not_hidden(mask_dtype):
    """Finite float-mask values far beyond any real bias (-3e38, -1e300 in a float64 mask, +3e38) are added
    (saturated), not turned into -inf (which hides the key) or NaN: a row whose every key carries -3e38 is
    uniform attention, as in the reference; a key with +3e38 takes the whole row."""
    (q, k, v, _, _, _), _ = make_inputs(B=1, Hq=2, Hkv=1, N=4, M=6, D=16, P=None, mask="none", dtype=torch.float32,
                                        device=DEVICE)
    huge = -1e300 if mask_dtype == torch.float64 else -3e38
    mask = torch.full((1, 1, 4, 6), huge, dtype=mask_dtype, device=DEVICE)
    mask[0, 0, 1] = -2.5e38
    mask[0, 0, 2, 4] = 3e38
    mask[0, 0, 3] = torch.randn(6, dtype=mask_dtype)
    out, lse = ak.gated_prefix_attention(q, k, v, attn_mask=mask, backend="triton", return_lse=True)
    ref = ak.gated_prefix_attention(q, k, v, attn_mask=mask, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, :, :2], v[0].mean(1, keepdim=True).expand(2, 2, 16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, :, 2], v[0, :, 4].expand(2, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [-1e4, -1e9, -3e38])
def test_gradients_of_rows_whose_every_key_has_a_huge_mask_offset(offset):
    """A row whose every key carries the same huge finite offset is uniform attention (the offset swamps q.k in
    float32, in the reference too). Its gradients need the row's log-sum-exp to the last bit: the forward keeps
    it as hi + lo in base 2 (hi alone dropped log2(#keys) at -1e9: gradients off by up to the key count)."""
    (q, k, v, _, _, _), _ = make_inputs(B=1, Hq=2, Hkv=1, N=3, M=5, D=16, P=None, mask="none", dtype=torch.float32,
                                        device=DEVICE)
    mask = torch.zeros(1, 1, 3, 5, device=DEVICE)
    mask[0, 0, 0] = offset
    mask[0, 0, 1, :2] = offset
    res = {}
    for backend in ("triton", "reference"):
        ts = [t.clone().requires_grad_(True) for t in (q, k, v)] + [mask.clone().requires_grad_(True)]
        out = ak.gated_prefix_attention(*ts[:3], attn_mask=ts[3], backend=backend)
        res[backend] = [out] + list(torch.autograd.grad(out.square().sum(), ts))  # dq, dk, dv and the mask's
    # at -1e4 q.k keeps about 10 bits next to the offset, rounded differently in the kernel's base-2 scores and
    # the reference's natural ones (both float32); past that both see uniform rows
    tol = 3e-3 if offset == -1e4 else 1e-5
    for name, a, b in zip(NAMES[:4] + ["dmask"], res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def test_float64_mask_with_its_own_layout():
    """A float64 mask is copied to float32 for the kernels: a sliced (non-dense) one and an expanded one are
    read through the copy's strides, not the original's."""
    (q, k, v, pk, pv, g), _ = make_inputs(**SMALL, gate="example", mask="none", dtype=torch.float32, device=DEVICE)
    B, N, M = SMALL["B"], SMALL["N"], SMALL["M"]
    base = torch.randn(B, 1, N, 2 * M, dtype=torch.float64, device=DEVICE)
    for mask in (base[..., ::2], base[..., :1, :M].expand(B, 1, N, M), base[..., ::2].transpose(0, 2)[:B, :, :1]):
        out = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=mask, backend="triton")
        ref = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=mask, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mask_rows_past_2_31_elements():
    """A (B, 1, N, M) mask whose row offsets pass 2**31 elements (N = M = 46342 materialised; here a 2-GB
    row stride over a lazily allocated buffer, three rows touched): the key-side backward's query rows come
    from a 32-bit loop, so their offsets must be widened (it read another row, or faulted)."""
    S, N, M = 2 ** 30 + 64, 3, 5
    try:
        buf = torch.empty((N - 1) * S + M, dtype=torch.bool, device=DEVICE)  # never touched but three rows
    except RuntimeError:
        pytest.skip("cannot reserve 2 GB of address space here")
    rows = torch.rand(N, M, device=DEVICE) > 0.4
    rows[:, 0] = True
    for i in range(N):
        buf[i * S:i * S + M] = rows[i]
    mask = buf.as_strided((1, 1, N, M), (0, 0, S, 1))
    (q, k, v, pk, pv, g), _ = make_inputs(B=1, Hq=2, Hkv=1, N=N, M=M, D=16, P=2, gate="token", mask="none",
                                          dtype=torch.float32, device=DEVICE, requires_grad=True)
    grads = {}
    for backend, m in (("triton", mask), ("reference", rows[None, None])):
        out = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=m, backend=backend)
        grads[backend] = [out] + list(torch.autograd.grad(out.square().sum(), [q, k, v, pk, pv, g]))
    for name, a, b in zip(NAMES, grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_non_contiguous_inputs_honour_strides():
    (q, k, v, pk, pv, g), keep = make_inputs(**SMALL, gate="token", dtype=torch.float32, device=DEVICE)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    pvt = pv.transpose(0, 1).contiguous().transpose(0, 1)
    a = ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, backend="triton")
    b = ak.gated_prefix_attention(qt, kt, v, pk, pvt, g.transpose(2, 3).contiguous().transpose(2, 3),
                                  attn_mask=keep, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_outputs_and_gradients_in_the_inputs_layout():
    """Hugging Face's layout, (B, N, H, D) projections viewed as (B, H, N, D): out and dq/dk/dv come back in
    it (their transposes are contiguous, as SDPA's: no copies after), with the same values as from
    contiguous inputs, forward and backward."""
    (q, k, v, pk, pv, g), keep = make_inputs(**SMALL, gate="token", dtype=torch.float32, device=DEVICE)
    hf = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v)]
    plain = [t.contiguous().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn(q.shape, device=DEVICE)
    results = []
    for qkv in (hf, plain):
        out = ak.gated_prefix_attention(*qkv, pk, pv, g, attn_mask=keep, backend="triton")
        results.append([out] + list(torch.autograd.grad(out, qkv, grad)))
    for t in results[0]:
        assert t.transpose(1, 2).is_contiguous() and not t.is_contiguous()
    assert all(t.is_contiguous() for t in results[1])
    for name, a, b in zip(NAMES, *results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty and torch.empty_like return float tensors filled with NaN: a kernel output element never
    written shows."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def poisoned(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, poisoned)


def test_every_output_element_is_written(nan_empty):
    from apt_kernels.attention import fused

    (q, k, v, pk, pv, g), keep = make_inputs(**SMALL, gate="token", dtype=torch.float32, device=DEVICE)
    out, lse, stat = fused.attention_forward(q, k, v, pk[None], pv[None], g, keep[:, None, None, :], True, 0.2, 0.0, 0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(stat).all()


@pytest.mark.parametrize("gate,shared,causal", [("example", True, True), ("token", False, False),
                                                ("head", True, False), ("full", False, True)])
def test_prefix_backward_split_over_query_tiles(monkeypatch, nan_empty, gate, shared, causal):
    """The prefix launch of the key-side backward split into runs of query tiles (on a GPU when a prefix
    has too few key tiles to fill it): 3 splits of the 2 query tiles of the interpreter, one of them
    empty. Partial dprefix_k / dprefix_v (and a row-shared gate's gradient) are summed in a fixed order:
    every gradient within budget, every partial written (empty buffers poisoned with NaN), and the same
    bits on a second run."""
    from apt_kernels.attention import fused

    monkeypatch.setattr(fused, "PREFIX_SPLITS", 3)
    tensors, keep = make_inputs(**SMALL, gate=gate, shared_prefix=shared, dtype=torch.float64)
    check(tensors, keep, torch.float32, causal=causal)
    ts = [t.float().to(DEVICE).requires_grad_(True) for t in tensors]

    def grads():
        out = ak.gated_prefix_attention(*ts, attn_mask=keep.to(DEVICE), causal=causal, backend="triton")
        return torch.autograd.grad((out * out).sum(), ts)

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dropout_is_seeded_statistical_and_differentiable():
    (q, k, v, pk, pv, g), _ = make_inputs(B=2, Hq=2, Hkv=1, N=32, M=32, D=16, P=8, gate="example", mask="none",
                                          dtype=torch.float32, device=DEVICE)
    plain = ak.gated_prefix_attention(q, k, v, pk, pv, g, backend="triton")
    assert torch.equal(ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.0, backend="triton"), plain)
    torch.manual_seed(3)
    a = ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.25, backend="triton")
    torch.manual_seed(3)
    b = ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.25, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, plain)
    # unit values and no gate: each output entry is (sum of kept probabilities) / (1 - p), mean 1
    out = ak.gated_prefix_attention(q, k, torch.ones_like(v), pk, torch.ones_like(pv), None, dropout_p=0.25,
                                    backend="triton")
    assert abs(out[..., 0].mean().item() - 1.0) < 0.05
    # with a fixed seed the op is a smooth function: its gradient matches central differences
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv, g)]

    def f(*xs):
        torch.manual_seed(7)
        return (ak.gated_prefix_attention(*xs, dropout_p=0.25, backend="triton") ** 2).sum()

    grads = torch.autograd.grad(f(*ts), ts)
    for i, (t, gr) in enumerate(zip(ts, grads)):
        d = torch.randn_like(t)
        eps = 1e-2
        with torch.no_grad():
            xs_p = [x + eps * d if j == i else x for j, x in enumerate(ts)]
            xs_m = [x - eps * d if j == i else x for j, x in enumerate(ts)]
            fd = (f(*xs_p) - f(*xs_m)) / (2 * eps)
        assert abs(fd.item() - (gr * d).sum().item()) <= 2e-2 * max(1.0, abs(fd.item())), NAMES[i + 1]


@pytest.mark.skipif(GPU, reason="the interpreter's tile sizes are set here; on a GPU the tables decide")
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
@pytest.mark.parametrize("case", [
    dict(gate="token", mask="bool", causal=False, P=5),
    dict(gate="example", mask="float", causal=True, P=20, splits=3),
    dict(gate="full", mask="bool", causal=True, P=5, dropout=0.3),
    dict(gate="example", mask="bool", causal=False, P=20, dropout=0.3, splits=3),
    dict(gate="none", mask="float", causal=False, P=None),
])
def test_key_side_orientations_agree(monkeypatch, tiles, case):
    """The key-side backward computes its score tiles as (queries, keys) or, KEY_MAJOR, as (keys, queries)
    (the autotuner picks per shape on a GPU): every gate form, mask, causality, GQA, the prefix launch split
    over query tiles and dropout through both, with key and query tiles of different sizes (16 x 16 tiles would hide a swapped axis).
    Without dropout each against the float64 reference (the error budget); with dropout the two orientations
    against each other (the keep bits regenerated transposed: a wrong one changes the gradients at O(1))."""
    from apt_kernels.attention import fused

    real = fused._blocks
    case = dict(case)
    dropout, causal = case.pop("dropout", 0.0), case.pop("causal")
    monkeypatch.setattr(fused, "PREFIX_SPLITS", case.pop("splits", None))  # the prefix launch split over query tiles
    mask_kind, gate, P = case.pop("mask"), case.pop("gate"), case.pop("P")
    tensors, am = make_inputs(B=2, Hq=4, Hkv=2, N=19, M=37, D=24, P=P, gate=gate, mask=mask_kind,
                              dtype=torch.float64)
    results = {}
    for key_major in (False, True):
        def blocks(D, device, table=None, key_major=key_major):
            got, launch = real(D, device, table)
            if "KEY_MAJOR" in got:  # the key-side launches (tokens and prefix)
                got = dict(got, BLOCK_M=tiles[0], BLOCK_N=tiles[1], KEY_MAJOR=key_major)
            return got, launch

        monkeypatch.setattr(fused, "_blocks", blocks)
        if not dropout:
            check(tensors, am, torch.float32, causal=causal)
        ts = [None if t is None else t.float().requires_grad_(True) for t in tensors]
        torch.manual_seed(5)
        out = ak.gated_prefix_attention(*ts, attn_mask=None if am is None else am.float() if am.is_floating_point()
                                        else am, causal=causal, dropout_p=dropout, backend="triton")
        live = [t for t in ts if t is not None]
        results[key_major] = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), live)
    names = [n for n, t in zip(NAMES[1:], tensors) if t is not None]
    for name, a, b in zip(names, results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_bits_do_not_depend_on_the_tile_sizes(monkeypatch):
    """The forward and the two backward kernels are tuned separately on a GPU, so their key tiles differ:
    the keep bits are a function of (row, column), not of the tiling. Same seed, other tiles: the same
    output and gradients up to summation order (a different mask would change them at O(1))."""
    from apt_kernels.attention import fused

    (q, k, v, pk, pv, g), _ = make_inputs(B=1, Hq=2, Hkv=1, N=20, M=40, D=16, P=8, gate="example", mask="none",
                                          dtype=torch.float32, device=DEVICE)
    ts = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv, g)]

    def run():
        torch.manual_seed(11)
        out = ak.gated_prefix_attention(*ts, dropout_p=0.5, backend="triton")
        return [out.detach()] + list(torch.autograd.grad((out ** 2).sum(), ts))

    base = run()
    real = fused._blocks
    for bn in (32, 64):
        def blocks(D, device, table=None, bn=bn):
            got, launch = real(D, device, table)
            # forward tiles wider, backward kept at 16
            wide = table is None or table is fused._FWD_TABLE or table is fused._FWD_TABLE_IEEE
            return dict(got, BLOCK_N=bn if wide else got["BLOCK_N"]), launch

        monkeypatch.setattr(fused, "_blocks", blocks)
        for name, a, b in zip(NAMES, run(), base):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"BLOCK_N={bn}: {name}")


@pytest.mark.skipif(GPU, reason="the interpreter's tile sizes are widened here; on a GPU the tables decide")
@pytest.mark.parametrize("bn", [32, 64])
@pytest.mark.parametrize("P,causal", [(5, False), (16, True), (40, False)])
def test_prefix_tiles_narrower_than_key_tiles(monkeypatch, bn, P, causal):
    """The forward and dq kernels walk the prefix in tiles of min(BLOCK_N, next power of two of P, >= 16):
    with key tiles of 32 or 64 a 5- or 16-long prefix gets 16-wide tiles, a 40-long one two or one tiles of
    32 / 64. Against the reference, every output and gradient, with per-token gates, masks and dropout off."""
    from apt_kernels.attention import fused

    real = fused._blocks

    def blocks(D, device, table=None):
        got, launch = real(D, device, table)
        narrow = isinstance(table, dict) and not any(table is t for t in fused._tables("ieee")[:2] + fused._tables("tf32")[:2])
        return dict(got, BLOCK_N=got["BLOCK_N"] if narrow else bn), launch  # the prefix kv launch stays at 16

    monkeypatch.setattr(fused, "_blocks", blocks)
    tensors, keep = make_inputs(**dict(SMALL, P=P, N=21, M=37), gate="token", dtype=torch.float64)
    check(tensors, keep, torch.float32, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_backward_reductions_in_one_launch(dtype, splits):
    """_backward_result's sums of the prefix launch's float32 partials (over the query splits, the batch of a
    shared prefix, the batch and/or heads a gate is shared by) and casts, one _sums_kernel launch, against
    float64 torch sums, for every gate and prefix form. Exact in float32 up to summation order; in bf16/fp16
    the cast of that sum."""
    from types import SimpleNamespace

    from apt_kernels.attention import fused

    B, Hkv, Hq, N, P, D = 3, 2, 4, 5, 6, 8
    g = torch.Generator().manual_seed(splits)
    dq = torch.zeros(1, device=DEVICE)
    for shared in (True, False):
        pk = torch.zeros((1 if shared else B, Hkv, P, D), dtype=dtype, device=DEVICE)
        parts = [torch.randn((splits, B, Hkv, P, D), generator=g).to(DEVICE) for _ in range(2)]
        for gshape, heads in (((B, 1, 1, P), Hkv), ((B, 1, N, P), Hkv), ((1, Hq, 1, P), Hq), ((1, 1, 1, P), Hkv),
                              ((B, Hq, N, P), Hq), ((1, Hq, N, P), Hq)):
            gate = torch.zeros(gshape, dtype=dtype, device=DEVICE)
            gparts = torch.randn((splits, B, heads, gshape[2], P), generator=g).to(DEVICE)
            got = fused._backward_result(dq, dq, dq, parts[0], parts[1], gparts, SimpleNamespace(has_gate=True),
                                         pk, pk, gate)[3:]
            want = [x.double().sum(0).sum(0, keepdim=True) if shared else x.double().sum(0) for x in parts]
            gw = gparts.double().sum(0)
            dims = [d for d in (0, 1) if gshape[d] == 1 and gw.shape[d] != 1]
            gw = gw.sum(dims, keepdim=True) if dims else gw
            want.append(gw.expand(gshape))
            for name, x, w in zip(("dprefix_k", "dprefix_v", "dgate"), got, want):
                assert x.dtype == dtype and x.shape == w.shape, (name, x.shape, w.shape)
                torch.testing.assert_close(x, w.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                           atol=1e-5 if dtype == torch.float32 else 1e-2,
                                           msg=f"{name} shared={shared} gate {gshape}")


@pytest.mark.parametrize("used", ["lse", "out"])
def test_gradient_through_one_output_only(used):
    """Only lse (or only out) feeds the loss: the other output's gradient never exists (None in the eager
    path); every input gradient still matches the reference."""
    tensors, keep = make_inputs(**SMALL, gate="token", dtype=torch.float64)
    grads = {}
    for backend in ("reference", "triton"):
        ts = [t.to(DEVICE).float().requires_grad_(True) for t in tensors]
        out, lse = ak.gated_prefix_attention(*ts, attn_mask=keep.to(DEVICE), backend=backend, return_lse=True)
        loss = lse.masked_fill(torch.isinf(lse), 0).sum() if used == "lse" else out.sum()
        gs = torch.autograd.grad(loss, ts, allow_unused=True)  # lse does not depend on v
        grads[backend] = [torch.zeros_like(t) if g is None else g for g, t in zip(gs, ts)]
    for name, a, b in zip(NAMES[1:], grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_custom_op_opcheck_and_compile():
    from apt_kernels.attention import fused  # noqa: F401  (registers the custom ops)

    (q, k, v, pk, pv, g), keep = make_inputs(B=1, Hq=2, Hkv=1, N=5, M=6, D=16, P=3, gate="token",
                                             dtype=torch.float32, device=DEVICE, requires_grad=True)
    args = (q, k, v, pk[None], pv[None], g, keep[:, None, None, :], True, 0.25, 0.0, 0)
    torch.library.opcheck(torch.ops.apt_kernels.gated_prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))
    out, lse, stat = torch.ops.apt_kernels.gated_prefix_attention_fwd(*args)
    assert out.requires_grad and lse.requires_grad and not stat.requires_grad  # the kernels' own row statistics

    def f(q, k, v, pk, pv, g):
        return ak.gated_prefix_attention(q, k, v, pk, pv, g, attn_mask=keep, causal=True, backend="triton")

    # eager runs the kernels through an autograd.Function, compiled code through the custom op: the two
    # must agree, outputs and gradients
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    ts = (q, k, v, pk, pv, g)
    out = compiled(*ts)
    eager = f(*ts)
    torch.testing.assert_close(out, eager)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), ts)
    want = torch.autograd.grad((eager * w).sum(), ts)
    for name, a, b in zip(NAMES[1:], got, want):
        torch.testing.assert_close(a, b, msg=name)

    # dropout under compilation: the seed is drawn per call (not baked into the graph), from torch's generator
    def dropped(q):
        return ak.gated_prefix_attention(q, k, v, pk, pv, g, dropout_p=0.5, backend="triton")

    compiled = torch.compile(dropped, fullgraph=True, backend="aot_eager" if not GPU else "inductor")
    with torch.no_grad():
        assert not torch.equal(compiled(q), compiled(q))
        torch.manual_seed(11)
        a = compiled(q)
        torch.manual_seed(11)
        assert torch.equal(compiled(q), a)


@pytest.mark.gpu
def test_more_than_65535_heads_times_batch():
    """B Hq = 65600 programs' worth of (batch, head): beyond a 2-D grid's second dimension."""
    tensors, keep = make_inputs(B=4100, Hq=16, Hkv=4, N=3, M=5, D=16, P=2, gate="token", dtype=torch.float64)
    check(tensors, keep, torch.bfloat16, causal=True)


@pytest.mark.gpu
def test_autotuned_path_on_gpu(monkeypatch):
    from apt_kernels.attention import fused

    monkeypatch.setattr(fused, "AUTOTUNE", True)
    tensors, keep = make_inputs(B=2, Hq=8, Hkv=2, N=200, M=200, D=64, P=16, gate="token", dtype=torch.float64)
    check(tensors, keep, torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_cached_launches_give_the_same_bits_on_gpu(monkeypatch, autotune):
    """apt_kernels._launch: launches from the cache (the second call of a shape and later) compute the same
    bits as the usual launch path; tests/test_launch.py checks their arguments on CPU."""
    from apt_kernels import _launch
    from apt_kernels.attention import fused

    monkeypatch.setattr(fused, "AUTOTUNE", autotune == "1")
    assert _launch.ENABLED, "the launch cache is off here (APT_KERNELS_FAST_LAUNCH=0 or an unchecked triton)"
    tensors, keep = make_inputs(B=2, Hq=8, Hkv=2, N=150, M=150, D=64, P=16, gate="token", device="cuda",
                                dtype=torch.bfloat16, requires_grad=True)
    keep = keep.cuda()
    grad = torch.randn(2, 8, 150, 64, device="cuda", dtype=torch.bfloat16)

    def run():
        out = ak.gated_prefix_attention(*tensors, attn_mask=keep, causal=True, backend="triton")
        return [out] + list(torch.autograd.grad(out, [t for t in tensors if t is not None], grad))

    _launch.clear()
    monkeypatch.setattr(_launch, "ENABLED", False)
    usual = run()
    monkeypatch.setattr(_launch, "ENABLED", True)
    before = dict(_launch.stats)
    first = run()
    mid = dict(_launch.stats)
    cached = run()
    launches = mid["usual"] - before["usual"]  # the first: forward, query side, 2 key side, sums
    assert launches >= 5 and mid["cached"] == before["cached"]
    assert _launch.stats["cached"] - mid["cached"] == launches and _launch.stats["usual"] == mid["usual"]
    for a, b, c in zip(usual, first, cached):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["example", "token"])
def test_prefix_launch_on_a_side_stream_gives_the_same_bits_on_gpu(monkeypatch, gate):
    """The backward's prefix launch on the side stream (the default), on the caller's stream, and with the
    caller itself on a non-default stream: the same bits (disjoint outputs, fixed-order sums)."""
    from apt_kernels.attention import fused

    tensors, keep = make_inputs(B=3, Hq=8, Hkv=2, N=130, M=130, D=64, P=20, gate=gate, device="cuda",
                                dtype=torch.bfloat16, requires_grad=True)
    keep = keep.cuda()
    grad = torch.randn(3, 8, 130, 64, device="cuda", dtype=torch.bfloat16)

    def run():
        out = ak.gated_prefix_attention(*tensors, attn_mask=keep, backend="triton")
        return list(torch.autograd.grad(out, [t for t in tensors if t is not None], grad))

    monkeypatch.setattr(fused, "PREFIX_STREAM", True)
    side = run()
    other = torch.cuda.Stream()
    other.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(other):
        on_other = run()
    torch.cuda.current_stream().wait_stream(other)
    monkeypatch.setattr(fused, "PREFIX_STREAM", False)
    one = run()
    assert len(side) == 6
    for a, b, c in zip(side, on_other, one):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # warpgroup MMAs; float32's IEEE tables
@pytest.mark.parametrize("shape", [dict(B=2, Hq=4, Hkv=2, N=150, M=170, D=64, P=16, gate="example", causal=False),
                                   dict(B=2, Hq=8, Hkv=2, N=200, M=200, D=128, P=64, gate="token", causal=True)])
def test_key_major_key_side_tiles_on_gpu(monkeypatch, dtype, shape):
    """Every key-major entry of the key-side table (not the fixed choice, so the other GPU tests, which run
    with autotuning off, do not reach them) made the fixed choice in turn, compiled: every output and
    gradient within budget, for the token and the prefix launch."""
    from apt_kernels.attention import fused

    shape = dict(shape)
    gate, causal = shape.pop("gate"), shape.pop("causal")
    table = fused._tables(fused._precision(dtype))[2]
    cls = fused._dclass(shape["D"])
    entries = [e for e in table[cls] if e[4]]
    assert entries
    tensors, keep = make_inputs(**shape, gate=gate, dtype=torch.float64)
    try:
        for entry in entries:
            monkeypatch.setitem(table, cls, [entry] + [e for e in table[cls] if e != entry])
            fused._prefix_table.cache_clear()
            check(tensors, keep, dtype, causal=causal)
    finally:
        fused._prefix_table.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])  # float32: its own IEEE tables
@pytest.mark.parametrize("shape", [dict(B=4, Hq=12, Hkv=12, N=128, M=128, D=64, P=16),
                                   dict(B=2, Hq=32, Hkv=8, N=300, M=300, D=128, P=64)])
def test_larger_shapes_on_gpu(dtype, shape):
    tensors, keep = make_inputs(**shape, gate="token", dtype=torch.float64)
    check(tensors, keep, dtype, causal=shape["Hq"] != shape["Hkv"])


_AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apt_kernels.attention import fused as f
from benchmarks.kernel_resources import build, usage


count, worst = 0, 0
cuda = type("dev", (), {"type": "cuda"})()
# (dtype, dot precision, head dim, mask kind, causal, dropout, gate): every feature at least once, every
# block configuration (head dims 64 / 128 / 256), the widest tiles for the shared-memory bound.
VARIANTS = [("bf16", "tf32", 64, 1, True, True, True), ("bf16", "tf32", 128, 2, False, False, True),
            ("bf16", "tf32", 256, 1, True, True, True), ("fp16", "tf32", 80, 0, True, False, False),
            ("fp32", "ieee", 128, 1, True, True, True)]
for dt, prec, D, mask_kind, causal, dropout, gate in VARIANTS:
    fwd_table, bwd_table, kv_table, _ = f._tables(prec)  # the fixed choices of the dtype's tables
    fwd, lf = f._blocks(D, cuda, fwd_table)
    bwd, lb = f._blocks(D, cuda, bwd_table)
    kv_entries = [f._blocks(D, cuda, kv_table)]  # and the first key-major entry, where the table has one
    kv_entries += [(dict(BLOCK_D=f._block_d(D), **f._meta(e)), dict(num_warps=e[2], num_stages=e[3]))
                   for e in kv_table[f._dclass(D)] if e[4]][:1]
    # row-broadcast masks and gates (MASK_N1 / GATE_N1) alternate with full ones across the variants
    common = dict(D=D, MASK_KIND=mask_kind, MASK_N1=D % 128 == 0, CAUSAL=causal, DROPOUT=dropout, PREC=prec)
    # prefix tiles narrower than the key tiles (PW = 16) and as wide (PW = 256, capped at BLOCK_N)
    ks = [build(f._fwd_kernel, dt, dict(common, PW=16 if gate else 256, HAS_GATE=gate, GATE_N1=not causal, **fwd), lf),
          build(f._bwd_q_kernel, dt, dict(common, PW=16, HAS_GATE=gate, GATE_N1=causal, HAS_DLSE=not dropout, **bwd),
                lb)]
    for kv, lk in kv_entries:
        for is_prefix in (True, False):
            ks.append(build(f._bwd_kv_kernel, dt, dict(common, IS_PREFIX=is_prefix, HAS_GATE=gate and is_prefix,
                                                       GATE_N1=not causal, GATE_H1=causal, SPLIT=is_prefix, **kv), lk))
    for k in ks:
        worst = max(worst, k.metadata.shared)
        assert k.metadata.shared <= 227 * 1024, (k.name, dt, D, k.metadata.shared)
    count += len(ks)
# the backward's reductions of the prefix/gate partials (float32 in, bf16 out)
sig = {a: "constexpr" if a == "BLOCK" else "*fp32" if a[0] == "S" else "*bf16" if a[0] == "D" else "i32"
       for a in f._sums_kernel.arg_names}
triton.compile(ASTSource(fn=f._sums_kernel, signature=sig, constexprs={"BLOCK": f._SUM_BLOCK}),
               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
count += 1
# Triton turns an int argument whose value is 1 into a constexpr (seed 1, one head per group, P = 1, ...)
ones = dict(seed_lo=1, seed_hi=1, REP=1, P=1, Hq=1, N=1, M=1, keep_thr=1)
fwd, lf = f._blocks(64, cuda)
build(f._fwd_kernel, "bf16", dict(D=64, PW=16, MASK_KIND=1, MASK_N1=True, CAUSAL=True, DROPOUT=True, PREC="tf32",
                                  HAS_GATE=True, GATE_N1=False, **fwd, **ones), lf)
bwd, lb = f._blocks(64, cuda, f._BWD_TABLE)
build(f._bwd_q_kernel, "bf16", dict(D=64, PW=16, MASK_KIND=1, MASK_N1=False, CAUSAL=True, DROPOUT=True,
                                    PREC="tf32", HAS_GATE=True, GATE_N1=True, **bwd, **ones), lb)
kv, lk = f._blocks(64, cuda, f._KV_TABLE)
build(f._bwd_kv_kernel, "bf16", dict(D=64, MASK_KIND=1, MASK_N1=True, CAUSAL=True, DROPOUT=True, PREC="tf32",
                                     HAS_GATE=True, IS_PREFIX=True, GATE_N1=True, GATE_H1=True, SPLIT=False, L=1,
                                     **kv, **ones), lk)
count += 3
# every autotuning configuration of the two heaviest kernels compiles (bf16, every feature on); float32's
# (IEEE dots) at head dims 64 and 128, within Hopper's shared memory (the slow 256 class: its fixed choice above)
dims = {64: 64, 128: 128, 256: 256}
for dt, prec, classes in (("bf16", "tf32", (64, 128, 256)), ("fp32", "ieee", (64, 128))):
    fwd_table, bwd_table, kv_table, _ = f._tables(prec)
    for table, kern, extra in ((fwd_table, f._fwd_kernel, dict(PW=16)),
                               (kv_table, f._bwd_kv_kernel, dict(IS_PREFIX=False, GATE_H1=True, SPLIT=False)),
                               (f._prefix_table(16, prec), f._bwd_kv_kernel,
                                dict(IS_PREFIX=True, GATE_H1=True, SPLIT=True))):
        for cls in classes:
            for entry in table[cls]:
                k = build(kern, dt, dict(D=dims[cls], BLOCK_D=dims[cls], **f._meta(entry), MASK_KIND=1,
                                         MASK_N1=False, CAUSAL=True, DROPOUT=True, PREC=prec, HAS_GATE=True,
                                         GATE_N1=False, **extra), dict(num_warps=entry[2], num_stages=entry[3]))
                assert prec != "ieee" or k.metadata.shared <= 227 * 1024, (k.name, entry, k.metadata.shared)
                count += 1
regs, stack = usage(k)  # the resource report's reading of the last one (an IEEE prefix configuration)
assert 16 <= regs <= 255 and stack >= 0, (regs, stack)
print("compiled", count, "max shared", worst, "last", regs, "registers", stack, "stack bytes")
"""


def test_autotuning_configs_are_pruned_by_head_dim():
    from apt_kernels.attention import fused

    for table, kernel in ((fused._FWD_TABLE, fused._fwd_kernel), (fused._BWD_TABLE, fused._bwd_q_kernel),
                          (fused._KV_TABLE, fused._bwd_kv_kernel), (fused._prefix_table(16), fused._bwd_kv_kernel),
                          (fused._FWD_TABLE_IEEE, fused._fwd_kernel), (fused._BWD_TABLE_IEEE, fused._bwd_q_kernel),
                          (fused._KV_TABLE_IEEE, fused._bwd_kv_kernel),
                          (fused._prefix_table(32, "ieee"), fused._bwd_kv_kernel)):
        tuned = fused._autotuned(kernel, table)
        tuned.nargs = {}
        for D, cls in ((16, 64), (64, 64), (80, 128), (128, 128), (192, 256), (256, 256)):
            kept = tuned.prune_configs({"D": D})
            got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   + ((c.kwargs["KEY_MAJOR"],) if "KEY_MAJOR" in c.kwargs else ()) for c in kept]
            assert got != [] and set(got) == set(table[cls]) and len(got) == len(table[cls])
    # the key-side tables hold both orientations where they have tensor-core dots at head dims 64 and 128
    for table in (fused._KV_TABLE, fused._KV_TABLE_IEEE):
        for cls in (64, 128):
            assert {c[4] for c in table[cls]} == {False, True}


@pytest.mark.parametrize("dtype,prec", [(torch.float32, "ieee"), (torch.float16, "tf32")])
def test_prefix_key_tiles_are_no_wider_than_the_prefix(monkeypatch, dtype, prec):
    """The prefix launch of the key-side backward autotunes over its dtype's key-side table with key tiles
    clipped to the prefix length's next power of two (at least 16), under its own tag; the token launch
    over the key-side table itself, the query side over the backward table. Float32 (IEEE dots) has tables
    and autotuners of its own."""
    from apt_kernels.attention import fused

    fwd_table, bwd_table, kv_table, tag = fused._tables(prec)
    assert (fwd_table is fused._FWD_TABLE_IEEE) == (prec == "ieee") and (bwd_table is fused._BWD_TABLE) == (prec != "ieee")
    assert kv_table is (fused._KV_TABLE_IEEE if prec == "ieee" else fused._KV_TABLE)
    for width in (16, 32, 64):
        clipped = fused._prefix_table(width, prec)
        for cls, cfgs in kv_table.items():
            assert all(n <= width for _, n, _, _, _ in clipped[cls])
            assert {(m, w, st, km) for m, _, w, st, km in clipped[cls]} == {(m, w, st, km) for m, _, w, st, km in cfgs}
            assert {(m, min(n, width), w, st, km) for m, n, w, st, km in cfgs} == set(clipped[cls])
    launches = []
    real = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda kernel, table, *a, tag="", **k: launches.append(
        (kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), table, tag)) or real(kernel, table, *a, tag=tag, **k))
    for P, width in ((5, 16), (20, 32)):
        launches.clear()
        tensors, keep = make_inputs(B=1, Hq=2, Hkv=1, N=9, M=7, D=16, P=P, gate="example", dtype=dtype)
        tensors = [t.to(DEVICE).requires_grad_(True) for t in tensors]
        out = ak.gated_prefix_attention(*tensors, attn_mask=keep.to(DEVICE), backend="triton")
        out.sum().backward()
        assert [(name, table, t) for name, table, t in launches if "bwd_kv" not in name] == [
            ("_fwd_kernel", fwd_table, tag), ("_bwd_q_kernel", bwd_table, tag)]
        kv = [(table, t) for name, table, t in launches if "bwd_kv" in name]
        assert kv == [(fused._prefix_table(width, prec), ",".join(filter(None, (tag, f"prefix<={width}")))),
                      (kv_table, tag)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="an offline sm_90 compile check for the CPU lanes; on a GPU the kernels compile for real")
def test_kernels_compile_for_sm90():
    """Compile every kernel variant for sm_90 with the GPU block sizes (Triton's own toolchain, no GPU
    needed): lowering errors the interpreter cannot see, and shared memory within Hopper's 227 KB."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is imported from there
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=900, cwd=root)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's NVIDIA toolchain (ptxas) is not available")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled 99 " in res.stdout, res.stdout


def test_double_backward_is_refused():
    """A backward that builds a graph (create_graph=True: a gradient penalty) would miss the attention's
    second-order terms: the triton backend raises; the reference one differentiates twice."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True)
    k, v, pk, pv = (torch.randn(shape, device=DEVICE) for shape in ((1, 2, 8, 16), (1, 2, 8, 16), (2, 3, 16), (2, 3, 16)))
    out = ak.gated_prefix_attention(q, k, v, pk, pv, backend="triton")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad(ak.gated_prefix_attention(q, k, v, pk, pv, backend="triton").square().sum(), q)
    out = ak.gated_prefix_attention(q, k, v, pk, pv, backend="reference")
    (dq_ref,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    torch.testing.assert_close(dq, dq_ref.detach(), rtol=1e-4, atol=1e-4)
    (g,) = torch.autograd.grad(dq_ref.square().sum() + 0.0 * q.sum(), q)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 1, 5, 7), (5, 7)])
@pytest.mark.parametrize("causal,lse", [(False, False), (True, True)])
def test_float_mask_gradient(shape, causal, lse):
    """A float attn_mask that requires grad (DeBERTa's relative-position bias, a learned bias) gets the
    reference's gradient, summed to its broadcast shape, with a gated prefix and with the lse's gradient."""
    torch.manual_seed(0)
    B, Hq, Hkv, N, M, P, D = 2, 3, 1, 5, 7, 2, 16
    q = torch.randn(B, Hq, N, D, device=DEVICE, requires_grad=True)
    k, v = torch.randn(B, Hkv, M, D, device=DEVICE), torch.randn(B, Hkv, M, D, device=DEVICE)
    pk, pv = torch.randn(Hkv, P, D, device=DEVICE), torch.randn(Hkv, P, D, device=DEVICE)
    gate = torch.rand(B, 1, N, P, device=DEVICE)
    mask = (torch.randn(shape, device=DEVICE) * 2).requires_grad_()
    grads = {}
    for backend in ("reference", "triton"):
        res = ak.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=mask, causal=causal, return_lse=lse,
                                        backend=backend)
        out, l = res if lse else (res, None)
        loss = (out * torch.linspace(-1, 1, D, device=DEVICE)).sum() + (l.sum() * 0.3 if lse else 0)
        grads[backend] = torch.autograd.grad(loss, [q, mask])
    for name, g, want in zip(("dq", "dmask"), grads["triton"], grads["reference"]):
        assert g.shape == want.shape, name
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # no gradient asked for: nothing is computed for the mask
        ak.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=mask, backend="triton")
    with pytest.raises(RuntimeError, match="no attn_mask gradient with dropout"):
        ak.gated_prefix_attention(q, k, v, attn_mask=mask, dropout_p=0.1, backend="triton")


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16])
def test_rows_whose_every_key_is_at_the_mask_dtype_min_are_empty(mask_dtype):
    """The Hugging Face convention: finfo(mask dtype).min hides a key exactly as -inf does (SPEC 1), so a row
    whose every key carries it (a padding query row) has no visible key: out 0 and lse -inf, as in the
    reference, not uniform attention over the hidden keys (what comparing with < instead of <= gives)."""
    (q, k, v, _, _, _), _ = make_inputs(B=2, Hq=2, Hkv=1, N=4, M=6, D=16, P=None, mask="none", dtype=torch.float32,
                                        device=DEVICE)
    mask = torch.randn(2, 1, 4, 6, device=DEVICE).to(mask_dtype)
    mask[0, 0, 1] = torch.finfo(mask_dtype).min  # row 1 of batch 0: every key hidden
    mask[1, 0, :, 2] = torch.finfo(mask_dtype).min  # key 2 of batch 1 hidden for every row
    out, lse = ak.gated_prefix_attention(q, k, v, attn_mask=mask, backend="triton", return_lse=True)
    ref, ref_lse = ak.gated_prefix_attention(q, k, v, attn_mask=mask, backend="reference", return_lse=True)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1])) and torch.isneginf(lse[0, :, 1]).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def guarded_empty(monkeypatch):
    """torch.empty returns float tensors that are views of the front of a larger buffer whose tail (a guard band
    of 4096 elements) holds a sentinel: a kernel storing past the end of an output shows there."""
    real_empty = torch.empty
    guards = []

    def guarded(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if not t.is_floating_point() or kwargs.get("out") is not None:
            return t
        buf = real_empty(t.numel() + 4096, dtype=t.dtype, device=t.device)
        buf.fill_(float("nan"))
        buf[t.numel():].fill_(12345.0)
        guards.append(buf[t.numel():])
        return buf[:t.numel()].view(t.shape)

    monkeypatch.setattr(torch, "empty", guarded)
    return guards


def test_no_output_is_written_past_its_end(guarded_empty):
    """The kernels store only the rows and head dims that exist: the forward's out, lse and row statistics and the
    backward's dq, dk, dv, prefix partials and delta, with N and M off the tile sizes (a store of the row past
    N lands in the next head's row 0, overwritten later in the interpreter, but past the end for the last head)."""
    from apt_kernels.attention import fused

    (q, k, v, pk, pv, g), keep = make_inputs(B=1, Hq=2, Hkv=1, N=19, M=21, D=24, P=3, gate="token",
                                             dtype=torch.float32, device=DEVICE)
    out, lse, stat = fused.attention_forward(q, k, v, pk[None], pv[None], g, keep[:, None, None, :], True, 0.2, 0.0, 0)
    grads = fused.attention_backward(torch.randn_like(out), torch.randn_like(lse), q, k, v, pk[None], pv[None], g,
                                     keep[:, None, None, :], out, stat, True, 0.2, 0.0, 0)
    assert guarded_empty and all(bool((t == 12345.0).all()) for t in guarded_empty)
    assert all(bool(torch.isfinite(t).all()) for t in (out, lse, stat, *grads))


def test_dropout_keep_bits_are_the_documented_stream():
    """The dropout bits of the forward are the stream of fused.py's docstring: for query row i of (batch b, head h)
    and key column c of part (0 prefix, 1 tokens), the 16-bit uniform is half (c % 8) % 2 (low, high) of word
    (c % 8) // 2 of Philox4x32-10(counter (c // 8, i, b Hq + h, 0x41505400 + part), key (seed lo, seed hi)),
    kept iff below floor((1 - p) 2^16). Read back exactly: q = 0 makes the attention uniform and one-hot values
    put each column's kept probability in an output dim of its own. p is chosen so that some entry's uniform is
    the threshold itself (dropped: a strict comparison)."""
    from apt_kernels.attention import fused
    from apt_kernels.child_tuning.rng import philox4x32

    B, Hq, N, M, P = 2, 2, 5, 24, 8
    L = P + M
    seed = 0x1234_5678_9ABC_DEF0
    q = torch.zeros(B, Hq, N, L, device=DEVICE)
    eye = torch.eye(L, device=DEVICE)
    pk, pv = torch.randn(1, 1, P, L, device=DEVICE), eye[:P].reshape(1, 1, P, L)
    k, v = torch.randn(B, 1, M, L, device=DEVICE), eye[P:].expand(B, 1, M, L).contiguous()

    def uniforms(cols, part):
        bh, i, c = torch.meshgrid(torch.arange(B * Hq), torch.arange(N), torch.arange(cols), indexing="ij")
        words = philox4x32(c // 8, i, bh, 0x41505400 + part, seed & 0xFFFFFFFF, seed >> 32)
        x = torch.stack(words, -1).gather(-1, ((c % 8) // 2)[..., None])[..., 0]
        return ((x >> (16 * (c % 2))) & 0xFFFF).view(B, Hq, N, cols)

    u = torch.cat([uniforms(P, 0), uniforms(M, 1)], -1)
    thr = int(u.view(-1)[7])
    p = 1.0 - (thr + 0.5) / 65536
    assert fused.keep_threshold(p) == thr
    out, _, _ = fused.attention_forward(q, k, v, pk, pv, None, None, False, 1.0, p, seed)
    kept = out * (L * (1.0 - p))
    assert torch.allclose(kept, kept.round(), atol=1e-4)
    assert torch.equal(kept.round().bool().cpu(), u < thr)


@pytest.mark.parametrize("needs_grad", ["none", "no_grad", "gate_only"])
def test_autograd_node_only_where_a_gradient_is_wanted(needs_grad, monkeypatch):
    """With nothing to differentiate (no input requires grad, or grad mode off) the op runs the forward
    kernel without an autograd node (its host time is most of a short sequence's forward); the output is
    the same bits as through the node. An input that requires grad (the gate alone) gets the node."""
    from apt_kernels.attention import fused

    tensors, keep = make_inputs(**SMALL, gate="token", dtype=torch.float32)
    tensors = [t.to(DEVICE) for t in tensors]
    want = ak.gated_prefix_attention(*[t.clone().requires_grad_(True) for t in tensors], attn_mask=keep.to(DEVICE),
                                     backend="triton").detach()
    applied = []
    real = fused._EagerAttention.apply
    monkeypatch.setattr(fused._EagerAttention, "apply", lambda *a: applied.append(1) or real(*a))
    if needs_grad == "gate_only":
        tensors[5].requires_grad_(True)
    with torch.set_grad_enabled(needs_grad != "no_grad"):
        if needs_grad == "no_grad":
            tensors[0].requires_grad_(True)
        out = ak.gated_prefix_attention(*tensors, attn_mask=keep.to(DEVICE), backend="triton")
    assert torch.equal(out.detach(), want)
    assert (out.grad_fn is not None) == (needs_grad == "gate_only") == bool(applied)
