"""PST: masks against an independent stable sort, the straight-through backward against autograd."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import apt_kernels as ak
from apt_kernels.pst.reference import ordered_key

BACKENDS = ["reference", "torch"]


def make(n=7, k=9, rw=2, rs=3, *, dtype=torch.float64, ties=False, requires_grad=False):
    w0 = torch.randn(n, k, dtype=dtype)
    if ties:  # as at initialisation: bf16-valued weights, zero low-rank terms -> many equal scores
        w0 = (torch.randint(-4, 5, (n, k)).to(dtype) / 4).to(torch.bfloat16).to(dtype)
    u, a = torch.randn(n, rw, dtype=dtype) * 0.1, torch.randn(n, rs, dtype=dtype) * 0.1
    if ties:
        v, b = torch.zeros(rw, k, dtype=dtype), torch.zeros(rs, k, dtype=dtype)
        r, c = torch.zeros(n, dtype=dtype), torch.zeros(k, dtype=dtype)
    else:
        v, b = torch.randn(rw, k, dtype=dtype) * 0.1, torch.randn(rs, k, dtype=dtype) * 0.1
        r, c = torch.randn(n, dtype=dtype) * 0.1, torch.randn(k, dtype=dtype) * 0.1
    ts = [w0, u, v, a, b, r, c]
    if requires_grad:
        for t in ts[1:]:
            t.requires_grad_(True)
    return ts


def numpy_mask(w0, u, v, a, b, r, c, sparsity, beta=1.0, a1=1.0, a2=1.0):
    """Independent selection: numpy stable argsort of the float64 scores; the first k indices are pruned."""
    W = w0.double().numpy() + beta * (u.double().detach().numpy() @ v.double().detach().numpy())
    S = (np.abs(W) + a1 * (a.double().detach().numpy() @ b.double().detach().numpy())
         + a2 * (r.double().detach().numpy()[:, None] + c.double().detach().numpy()[None, :]))
    kp = math.floor(W.size * sparsity)
    order = np.argsort(S.reshape(-1), kind="stable")
    keep = np.ones(W.size, dtype=bool)
    keep[order[:kp]] = False
    return torch.from_numpy(keep.reshape(W.shape)), W


@pytest.mark.parametrize("backend", BACKENDS + ["torch-device-path"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(7, 9), (1, 13), (13, 1), (1, 1), (33, 65)])
def test_mask_matches_stable_sort(monkeypatch, backend, sparsity, ties, shape):
    """torch-device-path: the torch backend's selection as it runs on a GPU (kthvalue, a running tie
    count) instead of the host one (numpy's introselect, ties found by index)."""
    if backend == "torch-device-path":
        monkeypatch.setattr(ak.pst.composite, "HOST_DEVICES", ())
        backend = "torch"
    ts = make(*shape, ties=ties)
    want, W = numpy_mask(*ts, sparsity)
    got = ak.pst_mask(*ts, sparsity=sparsity, backend=backend)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert int((~got).sum()) == math.floor(got.numel() * sparsity)
    wp = ak.pst_masked_weight(*ts, sparsity=sparsity, backend=backend)
    torch.testing.assert_close(wp, torch.from_numpy(W) * want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_float32_and_bf16_weights_torch_equals_reference(sparsity):
    for dtype in (torch.float32, torch.bfloat16):
        ts = make(31, 47, dtype=torch.float32)
        ts[0] = ts[0].to(dtype)
        ref = ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference")
        fast = ak.pst_masked_weight(*ts, sparsity=sparsity, backend="torch")
        assert ref.dtype == dtype and torch.equal(ref, fast)
        # ties under bf16 weights with zero low-rank terms: exact mask equality
        tt = make(31, 47, dtype=torch.float32, ties=True)
        tt[0] = tt[0].to(dtype)
        assert torch.equal(ak.pst_mask(*tt, sparsity=sparsity, backend="reference"),
                           ak.pst_mask(*tt, sparsity=sparsity, backend="torch"))


def test_ordered_key_is_monotone_and_merges_zeros():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf"), float("nan"),
                      -float("nan")])
    key = ordered_key(x)
    assert torch.all(key[:-3][1:] >= key[:-3][:-1])
    assert key[3] == key[4]  # -0 == +0
    assert key[8] == key[9] and key[8] > key[7]  # every NaN above +inf
    assert ordered_key(x.double())[3] == ordered_key(x.double())[4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_are_kept_and_propagate(backend):
    ts = make(5, 6)
    ts[0][2, 3] = float("nan")
    wp = ak.pst_masked_weight(*ts, sparsity=0.9, backend=backend)
    assert torch.isnan(wp[2, 3]) and int(torch.isnan(wp).sum()) == 1
    assert bool(ak.pst_mask(*ts, sparsity=0.9, backend=backend)[2, 3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w0_grad", [False, True])
def test_straight_through_backward_equals_surrogate_autograd(backend, w0_grad):
    """The STE gradient is autograd's gradient of (M + S - S.detach()) * W: same value, mask as identity in S."""
    ts = make(11, 13, requires_grad=True)
    ts[0].requires_grad_(w0_grad)
    beta, a1, a2, sp = 0.7, 1.3, 0.4, 0.6
    g = torch.randn(11, 13, dtype=torch.float64)
    out = ak.pst_masked_weight(*ts, sparsity=sp, beta=beta, alpha1=a1, alpha2=a2, backend=backend)
    got = torch.autograd.grad(out, [t for t in ts if t.requires_grad], g)

    mask = ak.pst_mask(*ts, sparsity=sp, beta=beta, alpha1=a1, alpha2=a2, backend="reference").double()
    w0, u, v, a, b, r, c = ts
    W = w0 + beta * u @ v
    S = W.abs() + a1 * a @ b + a2 * (r[:, None] + c[None, :])
    sur = (mask + S - S.detach()) * W
    torch.testing.assert_close(sur, out, rtol=1e-14, atol=1e-14)
    want = torch.autograd.grad(sur, [t for t in ts if t.requires_grad], g)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_spec_formulas_in_backward():
    # dW = (M + |W|) * G reaches U and V; dR, dC are row/column sums of dS = G * W.
    ts = make(4, 5, requires_grad=True)
    w0, u, v, a, b, r, c = ts
    g = torch.randn(4, 5, dtype=torch.float64)
    out = ak.pst_masked_weight(*ts, sparsity=0.5, alpha2=2.0)
    out.backward(g)
    M = ak.pst_mask(*ts, sparsity=0.5, alpha2=2.0).double()
    W = (w0 + u @ v).detach()
    dS = g * W
    torch.testing.assert_close(r.grad, 2.0 * dS.sum(1))
    torch.testing.assert_close(c.grad, 2.0 * dS.sum(0))
    torch.testing.assert_close(u.grad, ((M + W.abs()) * g) @ v.detach().T)
    torch.testing.assert_close(b.grad, a.detach().T @ dS)


def test_scores_gradcheck_and_values():
    ts = make(4, 5, requires_grad=True)
    ts[0] = ts[0] + 3.0  # keep W away from 0, where |W| has a kink
    f = lambda *x: ak.pst_scores(ts[0], *x, beta=0.5, alpha1=2.0, alpha2=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(ts[1:]))
    w0, u, v, a, b, r, c = ts
    want = (w0 + 0.5 * u @ v).abs() + 2.0 * a @ b + 0.3 * (r[:, None] + c[None, :])
    torch.testing.assert_close(f(*ts[1:]), want)


def test_mixed_dtypes_compute_in_float32():
    ts = make(6, 8, dtype=torch.float32)
    ts[0] = ts[0].to(torch.bfloat16)
    s = ak.pst_scores(*ts)
    assert s.dtype == torch.float32
    out = ak.pst_masked_weight(*ts, sparsity=0.5)
    W = ts[0].float() + ts[1] @ ts[2]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (W * ak.pst_mask(*ts, sparsity=0.5)).to(torch.bfloat16))


def test_backward_computes_in_the_forwards_dtype_when_only_r_is_float64():
    ts = make(6, 7, dtype=torch.float32, requires_grad=True)
    ts[5] = ts[5].detach().double().requires_grad_(True)  # r alone in float64
    out = ak.pst_masked_weight(*ts, sparsity=0.5)
    assert out.dtype == torch.float32
    g = torch.randn(6, 7, dtype=torch.float64)
    out.backward(g.float())
    full = [t.detach().double().requires_grad_(t.requires_grad) for t in ts]
    ak.pst_masked_weight(*full, sparsity=0.5).backward(g.float().double())
    assert ts[5].grad.dtype == torch.float64
    torch.testing.assert_close(ts[5].grad, full[5].grad, rtol=1e-12, atol=1e-12)


def _round_to_float32_exactly(x):
    """The float32 nearest to the Fraction x (ties to even), by exact comparison with its neighbours."""
    import numpy as np

    if x == 0:
        return np.float32(0.0)
    f = np.float32(float(x))  # within one float32 ulp of x
    if not np.isfinite(f):
        return f
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(cands, key=lambda y: (abs(Fraction(float(y)) - x), int(np.array(y).view(np.int32)) & 1))
    return best


def test_fma32_rounds_once():
    """reference.fma32 == the exactly rounded a * b + c, on random triples and on the hard cases of double
    rounding (c cancelling most of a * b, far exponents, exact float32 midpoints)."""
    import numpy as np

    from apt_kernels.pst.reference import fma32

    rng = np.random.default_rng(0)
    a = rng.standard_normal(3000).astype(np.float32)
    b = rng.standard_normal(3000).astype(np.float32)
    c = rng.standard_normal(3000).astype(np.float32)
    c[:1000] = -(a[:1000].astype(np.float64) * b[:1000]).astype(np.float32)  # cancellation
    c[1000:1500] *= np.float32(2.0 ** -40)  # tiny addend: the product's rounding decides
    c[1500:2000] *= np.float32(2.0 ** 30)  # huge addend
    # a * b exactly half an ulp of c away from a float32 (a float64 sum, rounded again, breaks ties wrongly)
    c[2000:2500] = np.float32(1.0)
    a[2000:2500] = np.float32(2.0 ** -24)
    b[2000:2500] = (1.0 + rng.integers(1, 1000, 500) * 2.0 ** -23).astype(np.float32)
    # the classic double-rounding trap: a * b = 2^-24 - 2^-70, c = 1 + 2^-23 (odd last bit): the exact sum lies
    # just below the midpoint 1 + 2^-23 + 2^-24; float64 rounds it onto the midpoint, float32 then to even
    a[2400:2500] = np.float32(2.0 ** -12 * (1 + 2.0 ** -23))
    b[2400:2500] = np.float32(2.0 ** -12 * (1 - 2.0 ** -23))
    c[2400:2500] = np.float32(1 + 2.0 ** -23) * np.where(np.arange(100) % 2, 1, -1).astype(np.float32)
    b[2400:2500] *= np.where(np.arange(100) % 2, 1, -1).astype(np.float32)
    a[2500:2600] = np.float32(1e-30)  # subnormal results
    b[2500:2600] = np.float32(1e-10)
    c[2500:2600] = np.float32(0.0)
    got = fma32(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)).numpy()
    for i in range(len(a)):
        want = _round_to_float32_exactly(Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i])))
        assert got[i].view(np.int32) == np.float32(want).view(np.int32) or (got[i] == 0 and want == 0), i
    # plain float64 evaluation is wrong on some of these: the test can fail
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert (naive.view(np.int32) != got.view(np.int32)).any()


# --------------------------------------------------------------------------------------------------
# torch.compile: every backend runs as the custom ops apt_kernels::pst_forward / pst_backward. The
# helpers below are shared with the triton lane (tests/test_pst_kernels.py) and the cuda-on-host lane
# (tests/test_csrc_on_host.py).
# --------------------------------------------------------------------------------------------------

def check_compiled_layer(backend, device="cpu", dtype=torch.float32):
    """torch.compile(fullgraph=True) of a PSTLinear: one graph for every sparsity the scheduler sets (the
    pruned count is a graph input), and at each the same mask, output and factor gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = ak.PSTLinear(53, 37, sparsity=0.9, rank_w=3, rank_s=2, backend=backend, device=device, dtype=dtype)
    with torch.no_grad():
        for p in (layer.pst_v, layer.pst_b, layer.pst_r, layer.pst_c):
            p.normal_(0, 0.05)
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(5, 53, device=device, dtype=dtype)
    for sparsity in (0.2, 0.5, 0.9, 0.35, 0.0):
        layer.sparsity = sparsity
        got = compiled(x)
        words = layer._words  # set by the compiled forward
        want = layer(x)
        assert torch.equal(words, layer._words), sparsity
        assert layer.realised_sparsity == math.floor(53 * 37 * sparsity) / (53 * 37)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(got)
        params = layer.factors()
        for name, a, b in zip("uvabrc", torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            # the same kernels; on a GPU the fused backward's float atomics add in a run-dependent order
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name} at sparsity {sparsity}")
    assert counter.frame_count == 1  # a moving sparsity does not recompile


def opcheck_pst_ops(backend, device="cpu", dtype=torch.float32):
    """torch.library.opcheck of both custom ops: schema, fake implementations against the real outputs
    (shapes, dtypes, strides), and AOT dispatch with dynamic shapes."""
    torch.manual_seed(3)
    n, k = 21, 36
    w0 = torch.randn(n, k, device=device).to(dtype)
    factors = [torch.randn(shape, device=device) * 0.1 for shape in ((n, 3), (3, k), (n, 2), (2, k), (n,), (k,))]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    fwd = (backend, w0, *factors, 0.7, 1.3, 0.4, torch.tensor(300), 0, 0)
    torch.library.opcheck(torch.ops.apt_kernels.pst_forward.default, fwd, test_utils=utils)
    torch.library.opcheck(torch.ops.apt_kernels.pst_forward.default, fwd[:-3] + (torch.tensor(0), 2, 4),
                          test_utils=utils)  # N:M
    _, words = torch.ops.apt_kernels.pst_forward(*fwd)
    grad = torch.randn(n, k, device=device).to(dtype)
    for needs in ([False] + [True] * 6, [True, False, True, True, False, True, False]):
        torch.library.opcheck(torch.ops.apt_kernels.pst_backward.default,
                              (backend, grad, words, w0, *factors[:4], 0.7, 1.3, 0.4, needs), test_utils=utils)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_layer_follows_the_sparsity_without_recompiling(backend):
    check_compiled_layer(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_opcheck(backend):
    opcheck_pst_ops(backend)
    opcheck_pst_ops(backend, dtype=torch.float64)


def test_compiled_function_equals_eager():
    """The functional op under torch.compile: float64 factors with a float32 weight (mixed compute dtype)."""
    ts = make(dtype=torch.float32, requires_grad=True)
    ts[5] = ts[5].detach().double().requires_grad_(True)

    def f(*ts):
        return ak.pst_masked_weight(*ts, sparsity=0.6, beta=0.7, backend="torch")

    torch._dynamo.reset()
    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(*ts), f(*ts)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, ts[1:], g), torch.autograd.grad(want, ts[1:], g)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
