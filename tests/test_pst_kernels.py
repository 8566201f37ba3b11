"""PST's fused backends: the Triton kernels (interpreter on CPU, compiled on GPU) and the CUDA C++ ones (GPU).

Mask rules checked here:

* **Exact** equality with the reference backend wherever the low-rank products are exactly representable:
  V = B = 0 and R = C = 0 (as at initialisation) with bf16-valued W0, which also makes many equal scores
  (ties). Then every backend computes S = |W0| bit-for-bit and must pick the same entries.
* **Exact** equality with ``reference_keep_mask(fused_order_scores(...))`` for any data: the kernels'
  documented evaluation order, emulated in PyTorch, gives the same float32 bits.
* **Against the reference with arbitrary low-rank terms** (whose ``U @ V`` is a library matmul with its own
  summation order), the tolerance rule: let S* be the float64 scores, tau* the n_pruned-th smallest of S*,
  and E = (max(rw, rs) + 5) * 2**-24 * max_e(|W0| + |beta| |U||V| + |alpha1| |A||B| + |alpha2| (|R| + |C|))
  a bound on the distance of either float32 score from S*. An entry with S* < tau* - 2E is pruned by both,
  one with S* > tau* + 2E kept by both; masks may differ only where |S* - tau*| <= 2E, and both prune
  exactly n_pruned entries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import apt_kernels as ak
from apt_kernels import _env, bits
from apt_kernels.pst import _run
from apt_kernels.pst.reference import fused_order_scores, n_pruned, reference_keep_mask, ste_backward
from apt_kernels.testing import assert_parity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = _env.triton_reason(torch.device(DEVICE)) is None


def _interpreter_fma_is_exact() -> bool:
    """Whether tl.fma rounds once here. Compiled it always does (fma.rn.f32); Triton's CPU interpreter
    does in recent releases (3.9 here; 3.6 computes x * y + z in two float32 steps), and the fused score
    order is made of FMAs, so the bit-exact tests need it."""
    if DEVICE == "cuda" or not TRITON_OK:
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def probe(a_ptr, b_ptr, c_ptr, out_ptr):
        tl.store(out_ptr, tl.fma(tl.load(a_ptr), tl.load(b_ptr), tl.load(c_ptr)))

    # a * b = 2^-24 - 2^-70 beside c = 1 + 2^-23: rounded once 1 + 2^-23, rounded twice 1 + 2^-22
    a, b, c = (torch.tensor([x], dtype=torch.float32) for x in
               (2.0 ** -12 * (1 + 2.0 ** -23), 2.0 ** -12 * (1 - 2.0 ** -23), 1 + 2.0 ** -23))
    out = torch.empty(1)
    probe[(1,)](a, b, c, out)
    return out.item() == 1 + 2.0 ** -23


FMA_EXACT = _interpreter_fma_is_exact()
needs_triton = pytest.mark.skipif(
    not TRITON_OK or not FMA_EXACT,
    reason=f"triton cannot run here: {_env.triton_reason(torch.device(DEVICE))}" if not TRITON_OK else
    "this Triton's CPU interpreter rounds tl.fma twice (3.9 rounds once, as the GPU does)")
SPARSITIES = [0.0, 0.5, 0.9, 0.99]
SHAPES = [(37, 53), (64, 96), (1, 1), (1, 13), (13, 1), (33, 64)]


def make(n, k, rw=3, rs=2, *, ties=False, dtype=torch.float32, fdtype=torch.float32, device=DEVICE):
    """Inputs as at initialisation (ties=True: bf16-valued W0 on a coarse grid, V = B = R = C = 0) or random."""
    if ties:
        w0 = (torch.randint(-6, 7, (n, k)).float() / 4).to(torch.bfloat16).float()
    else:
        w0 = torch.randn(n, k)
    u, a = torch.randn(n, rw) * 0.1, torch.randn(n, rs) * 0.1
    if ties:
        v, b, r, c = torch.zeros(rw, k), torch.zeros(rs, k), torch.zeros(n), torch.zeros(k)
    else:
        v, b = torch.randn(rw, k) * 0.1, torch.randn(rs, k) * 0.1
        r, c = torch.randn(n) * 0.1, torch.randn(k) * 0.1
    return [w0.to(device=device, dtype=dtype)] + [t.to(device=device, dtype=fdtype) for t in (u, v, a, b, r, c)]


def make_special_values(device=DEVICE):
    """Tie-style inputs (9 x 40) whose W0 holds -0.0, +0.0, NaN, +inf and -inf (a NaN at [2, 3], +inf at
    [3, 4], -inf at [4, 5]), and whose scores also hold a NaN the kernels make themselves: |W0| = +inf at
    [5, 3] and alpha2 R = -inf on row 5 give inf - inf there (a NaN with its sign bit set on x86 CPUs, where
    the interpreter and the host build run) and -inf on the rest of row 5; +inf at [6, 7] comes after that
    NaN in row-major order. Every NaN is the largest score (reference.ordered_key), above +inf."""
    ts = make(9, 40, ties=True, device=device)
    w0 = ts[0]
    w0[0, :5] = -0.0
    w0[1, :5] = 0.0
    w0[2, 3] = float("nan")
    w0[3, 4] = float("inf")
    w0[4, 5] = -float("inf")
    w0[5, 3] = float("inf")
    ts[5][5] = -float("inf")
    w0[6, 7] = float("inf")
    return ts


# n_pruned of 360 weights: 36, 180, 356, then all but the five specials (two NaNs, three infinities), all but the
# two NaNs
SPECIAL_SPARSITIES = (0.1, 0.5, 0.99, 355.5 / 360, 358.5 / 360)


def make_scores_equal(ts):
    """Tie-style inputs (V = B = R = C = 0) made to have every score equal: W0 = +-1 (same |W|)."""
    ts[0] = torch.ones_like(ts[0])
    ts[0].view(-1)[::3] *= -1


def make_threshold_at_bracket_top(n, k, *, dtype=torch.float32, device=DEVICE):
    """(inputs, sparsity) for the sampled bracket's edge: scores of three values, -9 < -8 < -7 (|W0| - 10 through
    C: negative, so their ordered keys end in ten one bits, as the bracket's upper end does), every sampled entry
    -8, about a third of the others -9 and the rest -7. The sample brackets -8 alone (lo its key's prefix, hi the
    key itself), and the sparsity prunes the -9s and the -8s: the threshold is the bracket's top key and its
    rank the list's last (n_pruned == below + listed)."""
    from apt_kernels.pst import bracket

    ts = make(n, k, ties=True, device="cpu")
    hit = bracket.sampled_entries(n, k).reshape(-1)
    w = torch.full((n * k,), 3.0)
    w[hit] = 2.0
    w[(~hit).nonzero().view(-1)[: n * k // 3]] = 1.0
    sign = torch.where(torch.rand(n * k, generator=torch.Generator().manual_seed(7)) < 0.5, -1.0, 1.0)
    ts[0] = (w * sign).view(n, k)
    ts[6] = torch.full((k,), -10.0)
    kp = int((w < 3.0).sum())
    ts = [ts[0].to(device=device, dtype=dtype)] + [t.to(device) for t in ts[1:]]
    return ts, (kp + 0.5) / (n * k)


def make_bf16_rounding_ties(device=DEVICE):
    """bf16 W0 of +-1 and +-(1 + 2^-7), U = 1, V = 2^-8 (rank 1), B = R = C = 0: W = W0 + 2^-8 is exact in float32
    and lies halfway between two bf16 values wherever W0 = 1 or -(1 + 2^-7) (ties to even: 1 and -(1 + 2^-7))."""
    n, k = 6, 40
    ts = make(n, k, rw=1, rs=1, ties=True, dtype=torch.bfloat16, device=device)
    i = torch.arange(n * k, device=device).view(n, k)
    ts[0] = (torch.where(i % 2 == 0, 1.0, 1.0 + 2.0 ** -7) * torch.where(i % 3 == 0, -1.0, 1.0)).to(torch.bfloat16)
    ts[1] = torch.ones(n, 1, device=device)
    ts[2] = torch.full((1, k), 2.0 ** -8, device=device)
    return ts


def numpy_mask(ts, sparsity):
    """An independent stable sort (numpy) of the float64 scores."""
    w0, u, v, a, b, r, c = [t.detach().double().cpu().numpy() for t in ts]
    S = np.abs(w0 + u @ v) + a @ b + (r[:, None] + c[None, :])
    kp = math.floor(S.size * sparsity)
    keep = np.ones(S.size, dtype=bool)
    keep[np.argsort(S.reshape(-1), kind="stable")[:kp]] = False
    return torch.from_numpy(keep.reshape(S.shape))


def tolerance_band(ts, sparsity, beta=1.0, a1=1.0, a2=1.0):
    """Entries where two float32 evaluations of the scores may legitimately disagree (see the module doc)."""
    w0, u, v, a, b, r, c = [t.detach().double().cpu() for t in ts]
    s = (w0 + beta * u @ v).abs() + a1 * a @ b + a2 * (r[:, None] + c[None, :])
    mag = w0.abs() + abs(beta) * u.abs() @ v.abs() + abs(a1) * a.abs() @ b.abs() + abs(a2) * (r.abs()[:, None]
                                                                                            + c.abs()[None, :])
    e = (max(u.shape[1], a.shape[1]) + 5) * 2.0 ** -24 * float(mag.max())
    kp = n_pruned(s.numel(), sparsity)
    if kp == 0:
        return torch.zeros(s.shape, dtype=torch.bool)
    tau = s.reshape(-1).kthvalue(kp).values
    return (s - tau).abs() <= 2 * e


def _emulated(ts, sparsity=None, nm=None, beta=1.0, a1=1.0, a2=1.0):
    w, s = fused_order_scores(*ts, beta, a1, a2)
    if nm is not None:
        keep = ak.pst.composite.nm_keep_mask(s, nm)
    else:
        keep = reference_keep_mask(s, n_pruned(s.numel(), sparsity))
    return keep, (w * keep).to(ts[0].dtype)


@pytest.fixture
def small_tiles(monkeypatch):
    """Small tiles so that small matrices span several tiles in both directions (edges, cross-tile ties)."""
    if not TRITON_OK:
        pytest.skip("triton cannot run here")
    from apt_kernels.pst import triton_pst

    monkeypatch.setattr(triton_pst, "FWD_BLOCK", (16, 32))
    monkeypatch.setattr(triton_pst, "CUT_BLOCK", 32)
    monkeypatch.setattr(triton_pst, "BWD_BLOCK", (16, 16))
    monkeypatch.setattr(triton_pst, "BWD_SPLIT", 2)
    return triton_pst


# --------------------------------------------------------------------------------------------------
# Triton: masks
# --------------------------------------------------------------------------------------------------

@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_triton_ties_equal_reference_exactly(small_tiles, shape, sparsity):
    ts = make(*shape, ties=True)
    want = ak.pst_mask(*ts, sparsity=sparsity, backend="reference")
    got = ak.pst_mask(*ts, sparsity=sparsity, backend="triton")
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(got.cpu(), numpy_mask(ts, sparsity))
    assert int((~got).sum()) == n_pruned(got.numel(), sparsity)
    wp = ak.pst_masked_weight(*ts, sparsity=sparsity, backend="triton")
    assert torch.equal(wp, ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("ties", [True, False])
def test_triton_default_tiles(ties):
    """The production tile sizes (one test: on CPU the interpreter is slow with big tiles)."""
    ts = make(70, 300, rw=8, rs=8, ties=ties)
    keep, wp = _emulated(ts, 0.9)
    got_w, words, _ = _run(*ts, 0.9, 1.0, 1.0, 1.0, "triton")
    assert torch.equal(bits.unpack_bits(words, keep.shape), keep) and torch.equal(got_w, wp)
    if ties:
        assert torch.equal(keep, ak.pst_mask(*ts, sparsity=0.9, backend="reference"))
    ts = [t.requires_grad_(i > 0) for i, t in enumerate(ts)]
    out = ak.pst_masked_weight(*ts, sparsity=0.9, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, ts[1:], g)
    want = ste_backward(g.double(), keep, *[t.detach().double() for t in ts[:5]], 1.0, 1.0, 1.0, (False,) + (True,) * 6)
    lowp = ste_backward(g, keep, *[t.detach() for t in ts[:5]], 1.0, 1.0, 1.0, (False,) + (True,) * 6)
    for name, x, lp, t in zip("uvabrc", got, lowp[1:], want[1:]):
        assert_parity(x, lp, t, name=f"d{name}", dtype=torch.float32)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ties", [True, False])
def test_triton_dtypes_equal_fused_order_emulation(small_tiles, dtype, ties):
    """Any data: the mask and W' are those of the documented evaluation order, bit for bit, in every dtype."""
    ts = make(37, 53, ties=ties, dtype=dtype)
    for sparsity in (0.5, 0.9):
        w, s = fused_order_scores(*ts, 1.0, 1.0, 1.0)
        want = reference_keep_mask(s, n_pruned(s.numel(), sparsity))
        wp, words, name = _run(*ts, sparsity, 1.0, 1.0, 1.0, "triton")
        assert name == "triton" and wp.dtype == dtype
        assert torch.equal(bits.unpack_bits(words, s.shape), want)
        assert torch.equal(wp, (w * want).to(dtype))
        if ties:
            assert torch.equal(wp, ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(37, 53), (64, 96)])
def test_triton_vs_reference_within_rounding(small_tiles, shape):
    beta, a1, a2 = 0.7, 1.3, 0.4
    ts = make(*shape, rw=8, rs=8)
    for sparsity in (0.3, 0.9):
        ref = ak.pst_mask(*ts, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend="reference").cpu()
        got = ak.pst_mask(*ts, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend="triton").cpu()
        band = tolerance_band(ts, sparsity, beta, a1, a2)
        assert int((~got).sum()) == int((~ref).sum()) == n_pruned(got.numel(), sparsity)
        assert not bool(((got != ref) & ~band).any()), "masks differ outside the rounding band of the threshold"
        w, s = fused_order_scores(*ts, beta, a1, a2)
        assert torch.equal(got, reference_keep_mask(s, n_pruned(s.numel(), sparsity)).cpu())


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(7, 9), (37, 53), (1, 40)])
def test_triton_one_pruned_and_all_equal_scores(small_tiles, shape):
    n, k = shape
    ts = make(n, k, ties=True)
    one = 1.5 / (n * k)  # floor(n k s) == 1
    assert torch.equal(ak.pst_mask(*ts, sparsity=one, backend="triton"), ak.pst_mask(*ts, sparsity=one, backend="reference"))
    make_scores_equal(ts)  # the first n_pruned entries in row-major order go
    for sparsity in (0.3, 0.9):
        got = ak.pst_mask(*ts, sparsity=sparsity, backend="triton").reshape(-1).cpu()
        kp = n_pruned(n * k, sparsity)
        assert not got[:kp].any() and got[kp:].all()


@pytest.mark.triton
@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf - inf
def test_triton_signed_zeros_nan_and_inf(small_tiles):
    ts = make_special_values()
    for sparsity in SPECIAL_SPARSITIES:
        ref = ak.pst_mask(*ts, sparsity=sparsity, backend="reference")
        got = ak.pst_mask(*ts, sparsity=sparsity, backend="triton")
        assert bool(ref[5, 3]) and torch.equal(got, ref), sparsity
    wp = ak.pst_masked_weight(*ts, sparsity=0.9, backend="triton")
    assert torch.isnan(wp[2, 3]) and wp[3, 4] == float("inf") and wp[4, 5] == -float("inf")


@pytest.mark.triton
@needs_triton
def test_triton_bf16_weight_rounds_half_to_even(small_tiles):
    """W' in bf16 is W rounded to nearest, ties to even, as torch's cast (checked on exact halfway values)."""
    ts = make_bf16_rounding_ties()
    w, _ = fused_order_scores(*ts, 1.0, 1.0, 1.0)
    assert bool(((w.to(torch.bfloat16).float() - w).abs() == 2.0 ** -8).any())  # halfway values are there
    for sparsity in (0.0, 0.5):
        keep, want = _emulated(ts, sparsity)
        got, words, _ = _run(*ts, sparsity, 1.0, 1.0, 1.0, "triton")
        assert torch.equal(bits.unpack_bits(words, keep.shape), keep)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("k", [64, 53])
def test_triton_bitmask_layout(small_tiles, k):
    """Words as apt_kernels.bits packs them: aligned rows (k % 32 == 0, plain stores) and straddling rows."""
    ts = make(11, k)
    _, words, _ = _run(*ts, 0.6, 1.0, 1.0, 1.0, "triton")
    mask = ak.pst_mask(*ts, sparsity=0.6, backend="triton")
    assert words.dtype == torch.int32 and words.numel() == (11 * k + 31) // 32
    assert torch.equal(words, bits.pack_bits(mask, backend="torch"))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (0, 4), (16, 32)])
@pytest.mark.parametrize("ties", [True, False])
def test_triton_nm_equals_reference(small_tiles, nm, ties):
    ts = make(13, 64, ties=ties)
    got = ak.pst_mask(*ts, nm=nm, backend="triton")
    if ties:  # exact scores: the reference's stable sort per group
        assert torch.equal(got, ak.pst_mask(*ts, nm=nm, backend="reference"))
    keep, wp = _emulated(ts, nm=nm)
    assert torch.equal(got, keep)
    assert torch.all(got.view(13, -1, nm[1]).sum(-1) == nm[0])
    assert torch.equal(ak.pst_masked_weight(*ts, nm=nm, backend="triton"), wp)


# --------------------------------------------------------------------------------------------------
# Triton: the sampled bracket (apt_kernels.pst.bracket; triton_pst._bracket_passes)
# --------------------------------------------------------------------------------------------------

class _Scratch:
    """Keeps the last forward's scratch and list tensors (triton_pst.ALLOC): the bracket's (lo, hi, below, listed)."""

    def __init__(self):
        self.scratch = self.list = None

    def __call__(self, tag, t):
        if tag == "scratch":
            self.scratch, self.list = t, None
        elif tag == "list":
            self.list = t

    def bracket(self):
        lo, hi, below, listed = (int(x) for x in self.scratch[2:6].cpu())
        return lo, hi, below, listed

    def radix_ran(self) -> bool:
        """Whether the radix passes ran after the bracket (their histograms, zeroed, are filled only then)."""
        from apt_kernels.pst import triton_pst as tp

        return bool(self.scratch[6:].view(torch.int32)[:tp.NPASS * tp.BINS].any())


@pytest.fixture
def triton_bracket(small_tiles, monkeypatch):
    """The triton backend with the sampled bracket on every matrix it takes (1024 entries and more), and its
    scratch in view."""
    monkeypatch.setattr(small_tiles, "BRACKET_MIN", 0)
    spy = _Scratch()
    monkeypatch.setattr(small_tiles, "ALLOC", spy)
    return spy


def _held(spy, n, k, sparsity):
    from apt_kernels.pst import bracket

    assert spy.list is not None, "the bracket did not run"
    _, _, below, listed = spy.bracket()
    kp = n_pruned(n * k, sparsity)
    held = listed <= bracket.list_cap(n, k) and below < kp <= below + listed
    assert spy.radix_ran() != held, "the radix passes run exactly when the bracket misses"
    return held


# numel >= 1024: several tiles both ways (small tiles), k % 32 == 0 and not, n == 1, rank 0 factors
TRITON_BRACKET_CASES = [(37, 53, 3, 2), (64, 96, 8, 8), (1, 1100, 2, 1), (40, 45, 0, 0)]


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("n,k,rw,rs", TRITON_BRACKET_CASES)
def test_triton_bracket_equals_fused_order_emulation(triton_bracket, n, k, rw, rs):
    """The bracket holds the threshold of random scores (the sample, one pass over W, the list's exact selection,
    the fixup of its kept entries): the documented order's mask and W' bit for bit, in every dtype, at sparsities
    from one pruned entry (the bracket open below) to 0.999 (open above)."""
    numel = n * k
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        ts = make(n, k, rw=rw, rs=rs, dtype=dtype)
        for sparsity in (1.5 / numel, 0.5, 0.9, 0.999):
            want_keep, want_w = _emulated(ts, sparsity, beta=0.7, a1=1.3, a2=-0.4)
            wp, words, _ = _run(*ts, sparsity, 0.7, 1.3, -0.4, "triton")
            assert _held(triton_bracket, n, k, sparsity), (dtype, sparsity, triton_bracket.bracket())
            assert triton_bracket.bracket()[3] < numel // 2, "a bracket, not the matrix"
            assert torch.equal(bits.unpack_bits(words, (n, k)), want_keep), (dtype, sparsity)
            assert torch.equal(wp.view(-1).view(torch.uint8), want_w.view(-1).view(torch.uint8)), (dtype, sparsity)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(37, 53), (40, 64)])
@pytest.mark.parametrize("sparsity", [0.3, 0.45, 0.9])
def test_triton_bracket_splits_listed_ties(triton_bracket, shape, sparsity):
    """Few distinct scores (bf16-valued W0, V = B = R = C = 0: each value of |W0| a tie class of a tenth of the
    entries or more, which these shapes' lists still hold): the threshold's ties are split in row-major order
    from the list's row counts and the cut; equal to the reference."""
    ts = make(*shape, ties=True)
    got = ak.pst_mask(*ts, sparsity=sparsity, backend="triton")
    assert _held(triton_bracket, *shape, sparsity), triton_bracket.bracket()
    assert torch.equal(got, ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))
    assert torch.equal(ak.pst_masked_weight(*ts, sparsity=sparsity, backend="triton"),
                       ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(40, 64), (37, 53)])
def test_triton_bracket_threshold_at_its_top(triton_bracket, shape):
    """The threshold is the bracket's top key (all of its ties pruned) and the list's last rank: the bracket
    holds (its upper end is the whole 22-bit bucket), the pass keeps nothing at its top, and the mask is the
    reference's."""
    ts, sparsity = make_threshold_at_bracket_top(*shape, dtype=torch.bfloat16)
    got = ak.pst_mask(*ts, sparsity=sparsity, backend="triton")
    lo, hi, below, listed = triton_bracket.bracket()
    assert _held(triton_bracket, *shape, sparsity) and below + listed == n_pruned(got.numel(), sparsity)
    assert hi & 0x3FF == 0x3FF and lo & 0x3FF == 0 and lo < hi
    assert torch.equal(got, ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape", [(64, 96), (40, 45)])
def test_triton_bracket_too_full_falls_back(triton_bracket, shape):
    """All scores equal: the bracket holds every entry, more than its list takes, so the radix passes run after
    it and write everything (the mask words cleared first where k % 32 != 0); the first n_pruned go."""
    n, k = shape
    ts = make(n, k, ties=True)
    make_scores_equal(ts)
    for sparsity in (0.3, 0.9):
        keep = ak.pst_mask(*ts, sparsity=sparsity, backend="triton").reshape(-1).cpu()
        assert not _held(triton_bracket, n, k, sparsity) and triton_bracket.bracket()[3] == n * k
        kp = n_pruned(n * k, sparsity)
        assert not keep[:kp].any() and keep[kp:].all(), sparsity


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize("shape", [(64, 96), (40, 45)])
def test_triton_bracket_missed_by_its_sample_falls_back(triton_bracket, side, shape):
    """A sample unlike the matrix (its entries' scores made the largest, or the smallest, of all: the bracket lies
    above, or below, the threshold): the bracket pass counts too many entries below it (too few up to its end),
    the radix passes run after it; the mask and W' are still the documented order's."""
    from apt_kernels.pst import bracket

    n, k = shape
    ts = make(n, k, rw=8, rs=8)
    hit = bracket.sampled_entries(n, k).to(ts[0].device)
    ts[0] = torch.where(hit, ts[0].sign() * (50.0 if side == "above" else 1e-3), ts[0] * 0.1 + ts[0].sign())
    for sparsity in (0.3, 0.5):  # (at 0.9 the small samples' upper rank is past their end: an open bracket)
        want_keep, want_w = _emulated(ts, sparsity)
        wp, words, _ = _run(*ts, sparsity, 1.0, 1.0, 1.0, "triton")
        _, _, below, listed = triton_bracket.bracket()
        kp = n_pruned(n * k, sparsity)
        assert below >= kp if side == "above" else below + listed < kp
        assert not _held(triton_bracket, n, k, sparsity)
        assert torch.equal(bits.unpack_bits(words, (n, k)), want_keep) and torch.equal(wp, want_w)


@pytest.mark.triton
@needs_triton
def test_triton_bracket_memory_is_its_list_and_histograms(small_tiles, monkeypatch):
    """What the bracket adds to the forward's allocations: its list, (n + k) * 16 entries of 8 bytes, and 36 KB of
    histograms; the sample's keys live in W''s buffer."""
    from apt_kernels.pst import bracket

    n, k = 48, 96
    ts = make(n, k, rw=4, rs=4, dtype=torch.bfloat16)
    totals = {}
    for on in (False, True):
        monkeypatch.setattr(small_tiles, "BRACKET_MIN", 0 if on else -1)
        spy = _Spy()
        monkeypatch.setattr(small_tiles, "ALLOC", spy)
        ak.pst_masked_weight(*ts, sparsity=0.9, backend="triton")
        totals[on] = spy.total()
        assert ("list" in dict(spy.log)) == on
    histograms = 4 * (2 * small_tiles.SAMPLE_PASSES * small_tiles.SAMPLE_BINS + small_tiles.NPASS * small_tiles.BINS)
    assert totals[True] - totals[False] == bracket.list_cap(n, k) * 8 + histograms


_AOT = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apt_kernels.pst import triton_pst as tp

def build(fn, types, consts, opts):
    sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options=opts)

w = "*bf16"
t = dict(w0_ptr=w, out_ptr=w, g_ptr=w, dw0_ptr=w, hist_ptr="*i32", rowcnt_ptr="*i32", state_ptr="*i64",
         bstate_ptr="*i64", keys_ptr="*i32", tags_ptr="*i32", words_ptr="*i32", n="i32", k="i32", RW="i32",
         RS="i32", beta="fp32", alpha1="fp32", alpha2="fp32", k_target="i32", n_pruned="i32", cap="i32", SPLIT="i32",
         ldu="i32", numel="i32", runs="i32", length="i32", k_a="i32", k_b="i32", r_lo="i32", r_hi="i32", nwords="i32")
t.update({f"{x}_ptr": "*fp32" for x in ("u", "v", "a", "b", "r", "c", "du", "dv", "da", "db", "dr", "dc")})
sel = dict(BITS=tp.RADIX_BITS, NBINS=tp.BINS)
nofma = dict(enable_fp_fusion=False)
# 16-bit W0: pass 1 reads the cached top 16 bits, the others compute scores; float32: passes 1-3 read
# the radix passes alone (MODE 0) and after the sampled bracket (MODE 1: gated on it)
score_kernels = [build(tp._hist_kernel, dict(t, cache_ptr="*i16"),
                       dict(PASS=p, BN=32, BK=128, CACHE_BITS=16, MODE=mode, **sel), nofma)
                 for p in (0, 2, 3) for mode in (0, 1)]
cached = [build(tp._hist_kernel, dict(t, cache_ptr="*i16"), dict(PASS=1, BN=32, BK=128, CACHE_BITS=16, MODE=0, **sel),
                nofma)]
cached += [build(tp._hist_kernel, dict(t, cache_ptr="*i32"), dict(PASS=p, BN=32, BK=128, CACHE_BITS=32, MODE=0, **sel),
                 nofma) for p in (1, 2, 3)]
assert all(not re.search(r"\bfma\.", c.asm["ptx"]) for c in cached)  # they compute no scores
score_kernels += [build(tp._tie_rows_kernel, t, dict(NDONE=tp.NPASS, BN=32, BK=128, MODE=1, **sel), nofma)]
score_kernels += [build(tp._cut_kernel, t, dict(NDONE=tp.NPASS, ROWB=1024, BK=1024, MODE=mode, **sel), nofma)
                  for mode in (0, 1, 2)]
score_kernels += [build(tp._mask_kernel, t, dict(NM_N=nn, NM_M=m, ALIGNED=al, BRACKET=br, MODE=mode, BN=32, BK=128),
                        nofma)
                  for nn, m, al, br, mode in ((0, 0, True, False, 0), (0, 0, False, False, 1), (2, 4, True, False, 0),
                                              (0, 0, True, True, 0), (0, 0, False, True, 0))]
# the sampled bracket's own kernels
score_kernels += [build(tp._sample_kernel, t, dict(RUNS=64, RUN=32), nofma),
                  build(tp._fixup_kernel, t, dict(BLOCK=4096), nofma)]
ssel = dict(PASSES=tp.SAMPLE_PASSES, BITS=tp.SAMPLE_BITS, NBINS=tp.SAMPLE_BINS)
for p in (0, 1):
    build(tp._keys_hist_kernel, t, dict(PASS=p, NSEL=2, LIST=False, BLOCK=4096, **ssel), {})
for p in range(tp.NPASS):
    build(tp._keys_hist_kernel, t, dict(PASS=p, PASSES=tp.NPASS, NSEL=1, LIST=True, BLOCK=4096, **sel), {})
build(tp._bounds_kernel, t, dict(LO_OPEN=False, HI_OPEN=True, **ssel), {})
build(tp._list_ties_kernel, t, dict(BLOCK=4096, **sel), {})
build(tp._clear_words_kernel, t, dict(BLOCK=4096), {})
for need in (False, True):
    build(tp._bwd_kernel, t, dict(RWP=16, RSP=16, NEED_W0=need, BN=32, BK=64), {})
for kern in score_kernels:  # the documented order: the written FMAs (round to nearest), no flush-to-zero
    ptx = kern.asm["ptx"]
    assert re.search(r"\bfma\.rn\.f32", ptx) and ".ftz" not in ptx, kern.name
print("compiled", len(score_kernels) + len(cached) + 2 + 9)
"""


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="an offline sm_90 compile check for the CPU lanes; on a GPU the kernels compile for real")
def test_triton_kernels_compile_for_sm90_with_the_documented_fmas():
    """Compile every Triton kernel for sm_90 (Triton's own ptxas, no GPU needed): lowering errors that the
    interpreter cannot see (histogram, reshapes, dot shapes) show up here, and the score kernels must keep
    the documented float32 operation order."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences Triton's notice; the score kernels pass False explicitly
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("Triton's NVIDIA toolchain (ptxas) is not available")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled 32" in res.stdout


def test_nm_reference_and_torch_agree_and_validate():
    ts = make(6, 24, ties=True, device="cpu")
    for nm in [(2, 4), (1, 3), (2, 6), (5, 8), (4, 4)]:
        assert torch.equal(ak.pst_mask(*ts, nm=nm, backend="torch"), ak.pst_mask(*ts, nm=nm, backend="reference"))
    with pytest.raises(ValueError, match="multiple of M = 5"):
        ak.pst_mask(*ts, nm=(2, 5))
    with pytest.raises(ValueError, match="not both"):
        ak.pst_mask(*ts, nm=(2, 4), sparsity=0.5)
    with pytest.raises(TypeError, match="needs sparsity"):
        ak.pst_mask(*ts)
    with pytest.raises(ValueError, match="0 <= N <= M"):
        ak.pst_mask(*ts, nm=(5, 4))


def test_fused_backends_refuse_float64_and_odd_groups_with_reasons():
    from apt_kernels.pst import REGISTRY, _probe

    ts = make(4, 6, device="cpu", dtype=torch.float64)
    why = REGISTRY.reason("triton", _probe(*ts, None))
    assert why and "float32" in why
    ts = make(4, 6, device="cpu")
    assert "power of two" in REGISTRY.reason("triton", _probe(*ts, (2, 6)))
    assert "CUDA tensors" in REGISTRY.reason("cuda", _probe(*ts, None))


# --------------------------------------------------------------------------------------------------
# Triton: backward and memory
# --------------------------------------------------------------------------------------------------

def _grads(ts, sparsity, backend, g, beta, a1, a2, w0_grad):
    ts = [t.detach().clone().requires_grad_(i > 0 or w0_grad) for i, t in enumerate(ts)]
    out = ak.pst_masked_weight(*ts, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend=backend)
    return torch.autograd.grad(out, [t for t in ts if t.requires_grad], g.to(out.dtype))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("shape,rw,rs", [((37, 53), 3, 2), ((64, 96), 8, 8), ((13, 1), 1, 2), ((20, 30), 0, 0)])
@pytest.mark.parametrize("w0_grad", [False, True])
def test_triton_backward_matches_reference(small_tiles, shape, rw, rs, w0_grad):
    beta, a1, a2, sparsity = 0.7, 1.3, 0.4, 0.6
    ts = make(*shape, rw=rw, rs=rs)
    g = torch.randn(*shape, device=DEVICE)
    # the gradients depend on the mask: compare with the reference run on the kernel's own mask
    keep = ak.pst_mask(*ts, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend="triton")
    needs = (w0_grad,) + (True,) * 6
    truth = ste_backward(g.double(), keep, *[t.double() for t in ts[:5]], beta, a1, a2, needs)
    lowp = ste_backward(g, keep, *ts[:5], beta, a1, a2, needs)
    got = _grads(ts, sparsity, "triton", g, beta, a1, a2, w0_grad)
    names = (["w0"] if w0_grad else []) + ["u", "v", "a", "b", "r", "c"]
    for name, x, lp, t in zip(names, got, [x for x in lowp if x is not None], [x for x in truth if x is not None]):
        assert x.dtype == torch.float32
        assert_parity(x, lp, t, name=f"d{name}", dtype=torch.float32)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("split", [1, 3])
def test_triton_backward_bf16_weight_and_splits(small_tiles, monkeypatch, split):
    monkeypatch.setattr(small_tiles, "BWD_SPLIT", split)
    ts = make(33, 70, rw=4, rs=4, dtype=torch.bfloat16)
    g = torch.randn(33, 70, device=DEVICE)
    keep = ak.pst_mask(*ts, sparsity=0.5, backend="triton")
    truth = ste_backward(g.to(torch.bfloat16).double(), keep, *[t.double() for t in ts[:5]], 1.0, 1.0, 1.0, (True,) * 7)
    lowp = ste_backward(g.to(torch.bfloat16), keep, *ts[:5], 1.0, 1.0, 1.0, (True,) * 7)
    got = _grads(ts, 0.5, "triton", g, 1.0, 1.0, 1.0, True)
    assert got[0].dtype == torch.bfloat16
    assert_parity(got[0], lowp[0].to(torch.bfloat16), truth[0], name="dw0", dtype=torch.bfloat16)
    for name, x, lp, t in zip("uvabrc", got[1:], lowp[1:], truth[1:]):
        assert_parity(x, lp, t, name=f"d{name}", dtype=torch.float32)


class _Spy:
    def __init__(self):
        self.log = []

    def __call__(self, tag, t):
        self.log.append((tag, t.numel() * t.element_size()))

    def total(self, exclude=()):
        return sum(b for tag, b in self.log if tag not in exclude)


@pytest.mark.triton
@needs_triton
def test_triton_extra_memory_is_bitmask_plus_small(small_tiles, monkeypatch):
    """Every tensor the fused path allocates, and what autograd saves: W', the bitmask, O((n + k) rank)."""
    n, k, r = 48, 96, 4
    ts = make(n, k, rw=r, rs=r, dtype=torch.bfloat16)
    for t in ts[1:]:
        t.requires_grad_(True)
    spy = _Spy()
    monkeypatch.setattr(small_tiles, "ALLOC", spy)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ak.pst_masked_weight(*ts, sparsity=0.9, backend="triton")
    bitmask = 4 * ((n * k + 31) // 32)
    columns = 2 * 4 * r * (n + 64)  # U and A transposed, rows padded (triton_pst._columns): O(n rank)
    small = 4 * (n + k) * (r + 1) + columns + 16 * 1024  # O((n + k) rank) + histograms and state
    assert dict(spy.log)["out"] == out.numel() * out.element_size()
    assert spy.total(exclude=("out",)) <= bitmask + small, spy.log
    inputs = {t.data_ptr() for t in ts}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    assert len(extra) == 1 and extra[0].dtype == torch.int32 and extra[0].numel() * 4 == bitmask
    spy.log.clear()
    out.backward(torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE))
    grads = 4 * (n * r * 2 + r * k * 2 + n + k)
    assert spy.total() <= grads + columns + 64, spy.log  # gradient accumulators and factor copies: no dS, dW, mask
    assert all(b < n * k for tag, b in spy.log if tag != "grads")  # ("grads": the six accumulators, bounded above)


# --------------------------------------------------------------------------------------------------
# GPU: compiled Triton at real sizes, the CUDA C++ backend, measured memory
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(768, 3072), (1000, 771), (1, 4099), (4099, 1)])
def test_gpu_fused_masks_and_weights(backend, dtype, shape):
    for ties in (True, False):
        ts = make(*shape, rw=8, rs=8, ties=ties, dtype=dtype, device="cuda")
        for sparsity in SPARSITIES:
            keep, wp = _emulated(ts, sparsity)
            got_w, words, name = _run(*ts, sparsity, 1.0, 1.0, 1.0, backend)
            assert name == backend
            got = bits.unpack_bits(words, shape)
            assert torch.equal(got, keep), (ties, sparsity)
            assert torch.equal(got_w, wp)
            if ties:
                assert torch.equal(got, ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))
            else:
                ref = ak.pst_mask(*ts, sparsity=sparsity, backend="reference").cpu()
                assert not bool(((got.cpu() != ref) & ~tolerance_band(ts, sparsity)).any())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("bracket_min", [0, -1])
def test_gpu_both_selections(monkeypatch, backend, bracket_min):
    """The sampled bracket forced on every matrix (0) and off (-1), at a size the default leaves to the radix
    passes and at one it gives the bracket: the same masks and W' (ties split from the bracket's list, or a miss
    by a too-full list at initialisation-style ties)."""
    import importlib

    monkeypatch.setattr(importlib.import_module(f"apt_kernels.pst.{backend}_pst"), "BRACKET_MIN", bracket_min)
    for shape in [(1000, 771), (768, 3072)]:
        for ties in (True, False):
            ts = make(*shape, rw=8, rs=8, ties=ties, dtype=torch.bfloat16, device="cuda")
            for sparsity in (0.5, 0.9, 0.99):
                keep, wp = _emulated(ts, sparsity)
                got_w, words, _ = _run(*ts, sparsity, 1.0, 1.0, 1.0, backend)
                assert torch.equal(bits.unpack_bits(words, shape), keep), (shape, ties, sparsity)
                assert torch.equal(got_w, wp), (shape, ties, sparsity)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_fused_nm_and_edge_cases(backend):
    for nm in [(2, 4), (1, 8), (4, 8), (0, 4)]:
        ts = make(300, 512, ties=True, dtype=torch.bfloat16, device="cuda")
        assert torch.equal(ak.pst_mask(*ts, nm=nm, backend=backend), ak.pst_mask(*ts, nm=nm, backend="reference"))
        ts = make(300, 512, dtype=torch.bfloat16, device="cuda")
        keep, wp = _emulated(ts, nm=nm)
        assert torch.equal(ak.pst_mask(*ts, nm=nm, backend=backend), keep)
        assert torch.equal(ak.pst_masked_weight(*ts, nm=nm, backend=backend), wp)
    ts = make(50, 70, ties=True, device="cuda")
    ts[0] = torch.ones_like(ts[0])
    got = ak.pst_mask(*ts, sparsity=0.37, backend=backend).reshape(-1)
    kp = n_pruned(3500, 0.37)
    assert not got[:kp].any() and got[kp:].all()
    ts[0][3, 4] = float("nan")
    assert bool(ak.pst_mask(*ts, sparsity=0.99, backend=backend)[3, 4])


@pytest.mark.gpu
def test_gpu_cuda_and_triton_agree_bit_for_bit():
    for shape in [(4096, 4096), (3072, 768), (123, 4567)]:
        ts = make(*shape, rw=8, rs=8, dtype=torch.bfloat16, device="cuda")
        for sparsity in (0.5, 0.9):
            a = _run(*ts, sparsity, 0.7, 1.3, 0.4, "triton")
            b = _run(*ts, sparsity, 0.7, 1.3, 0.4, "cuda")
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda-wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_backward_matches_reference(backend, dtype, monkeypatch):
    if backend == "cuda-wide":  # the backward's tuning variant (4 columns per thread at rank 8)
        from apt_kernels.pst import cuda_pst

        monkeypatch.setattr(cuda_pst, "WIDE_BACKWARD", True)
        backend = "cuda"
    shape = (768, 3072)
    ts = make(*shape, rw=8, rs=8, dtype=dtype, device="cuda")
    g = torch.randn(*shape, device="cuda").to(dtype)
    keep = ak.pst_mask(*ts, sparsity=0.9, beta=0.7, alpha1=1.3, alpha2=0.4, backend=backend)
    truth = ste_backward(g.double(), keep, *[t.double() for t in ts[:5]], 0.7, 1.3, 0.4, (True,) * 7)
    lowp = ste_backward(g, keep, *ts[:5], 0.7, 1.3, 0.4, (True,) * 7)
    got = _grads(ts, 0.9, backend, g, 0.7, 1.3, 0.4, True)
    assert_parity(got[0], lowp[0].to(dtype), truth[0], name="dw0", dtype=dtype)
    for name, x, lp, t in zip("uvabrc", got[1:], lowp[1:], truth[1:]):
        assert_parity(x, lp, t, name=f"d{name}", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_extra_memory_is_bitmask_plus_small(backend):
    """torch.cuda.max_memory_allocated: forward + backward need W', the bitmask and O((n + k) rank) more."""
    n, k, r = 4096, 4096, 8
    ts = make(n, k, rw=r, rs=r, dtype=torch.bfloat16, device="cuda")
    for t in ts[1:]:
        t.requires_grad_(True)
    g = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    wbytes, bitmask = n * k * 2, 4 * ((n * k + 31) // 32)
    small = 4 * (n + k) * (r + 1) * 4 + (1 << 20)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ak.pst_masked_weight(*ts, sparsity=0.9, backend=backend)
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base
    assert fwd_peak <= wbytes + bitmask + small, (fwd_peak, wbytes, bitmask)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # W', the bitmask, G
    out.backward(g)
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    assert bwd_peak <= small + 2 * 4 * (n + k) * (2 * r + 1), bwd_peak  # the gradients (float32 accumulators)
    # for scale: the dense torch path keeps float32 W, S and masks of n x k
    for t in ts[1:]:
        t.grad = None


@pytest.mark.gpu
def test_gpu_cuda_extension_rejects_bad_arguments():
    ext = _env.cuda_extension()
    assert ext is not None, _env.cuda_reason(torch.device("cuda"))
    ts = make(8, 12, device="cuda")
    with pytest.raises(RuntimeError, match="n_pruned"):
        ext.pst_forward(*ts, 1.0, 1.0, 1.0, 96, 0, 0)
    with pytest.raises(RuntimeError, match="N:M"):
        ext.pst_forward(*ts, 1.0, 1.0, 1.0, 0, 2, 5)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ext.pst_forward(ts[0].double(), *ts[1:], 1.0, 1.0, 1.0, 10, 0, 0)
    words = ext.pst_forward(*ts, 1.0, 1.0, 1.0, 10, 0, 0)[1]
    w0, u, v, a, b = ts[:5]
    with pytest.raises(RuntimeError, match="bitmask"):
        ext.pst_backward(torch.ones_like(w0), words[1:], w0, u, v, a, b, 1.0, 1.0, 1.0, False)
    # numbers in the message: streamed by TORCH_CHECK, they crashed the process with the H200 image's toolchain
    with pytest.raises(RuntimeError, match="ranks of at most 32, got rw = 33, rs = 2"):
        big = make(8, 12, rw=33, device="cuda")
        ext.pst_backward(torch.ones_like(w0), words, w0, big[1], big[2], a, b, 1.0, 1.0, 1.0, False)


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here")
def test_kth_smallest_by_the_radix_passes():
    """fisher_mask's exact quantile on a GPU: the k-th smallest of non-negative values (ties, zeros, a
    length that is not a multiple of the 4096-wide rows)."""
    from apt_kernels.pst.triton_pst import kth_smallest

    g = torch.Generator().manual_seed(5)
    vals = torch.rand(5000, generator=g) ** 3
    vals[::7] = 0.0
    vals[1::11] = 0.25  # ties
    vals = vals.to(DEVICE)
    srt = vals.cpu().sort().values
    ks = [1, 2, 2500, 5000]
    assert kth_smallest(vals, ks) == [float(srt[k - 1]) for k in ks]
    # a list of tensors is taken together (no concatenation by the caller)
    assert kth_smallest([vals[:1234], vals[1234:].view(-1, 2)], ks) == [float(srt[k - 1]) for k in ks]
    with pytest.raises(ValueError, match="outside"):
        kth_smallest(vals, [0])


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_under_torch_compile(small_tiles, dtype):
    """fullgraph compile (aot_eager on CPU, inductor on GPU) runs the kernels as custom ops: one graph for
    every sparsity, the eager masks and gradients; opcheck of both ops' fake implementations."""
    from test_pst import check_compiled_layer, opcheck_pst_ops

    check_compiled_layer("triton", DEVICE, dtype)
    opcheck_pst_ops("triton", DEVICE, dtype)
