"""The CUDA C++ kernels of csrc/ executed on the CPU (nvcc lane; no GPU needed).

tests/cuda_host_sim.h runs each launch of the real kernel code on host threads with CUDA's block and
warp semantics (shared memory, __syncthreads, warp ballots and shuffles, atomics). Stand-ins for the
extension's Python-facing functions (``HostExtension``, the binding's arguments and allocations, outputs
poisoned) are patched in as ``apt_kernels._C``, so ``backend="cuda"`` runs on CPU tensors through the
package's own code path. The GPU lane (tests/test_gpu.py) runs the same kernels compiled for sm_90.

Covered here: PST's selection (three radix passes, each picked by its last block; the tie split's row
counts, cut by their last block) and mask passes, its N:M path, its fused backward, and the bit packing
kernels. Child-Tuning's kernels run on the host in tests/test_child_tuning_kernels.py.
"""

from __future__ import annotations

import ctypes
import struct

import pytest
import torch

import apt_kernels as ak
from apt_kernels import _env, bits
from apt_kernels.pst import REGISTRY as PST_REGISTRY
from apt_kernels.pst import _run
from apt_kernels.pst import bracket as bracket_mod
from apt_kernels.pst.reference import n_pruned, ste_backward
from apt_kernels.testing import assert_parity
from cuda_host import build_host_kernels
from test_pst_kernels import (SPECIAL_SPARSITIES, _emulated, make, make_scores_equal, make_special_values,
                              make_threshold_at_bracket_top, numpy_mask, tolerance_band)

pytestmark = pytest.mark.nvcc

_PTR = ctypes.c_void_p


class _Problem(ctypes.Structure):  # csrc/pst.cuh: AptPstProblem
    _fields_ = [("w0", _PTR), ("w0_dtype", ctypes.c_int), ("u", _PTR), ("v", _PTR), ("a", _PTR), ("b", _PTR),
                ("r", _PTR), ("c", _PTR), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("rw", ctypes.c_int),
                ("rs", ctypes.c_int), ("beta", ctypes.c_float), ("alpha1", ctypes.c_float),
                ("alpha2", ctypes.c_float)]


class _Grads(ctypes.Structure):  # csrc/pst.cuh: AptPstGrads
    _fields_ = [(name, _PTR) for name in ("du", "dv", "da", "db", "dr", "dc", "dw0")]


def _poisoned(shape, dtype):
    """An output buffer full of a byte pattern that no kernel writes by chance (0x5A5A... / NaN-free)."""
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0x5A)
    return t


class HostExtension:
    """apt_kernels._C as the bindings (csrc/*_bind.cpp) call csrc/'s C API, on CPU tensors."""

    _DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def __init__(self, lib):
        self.lib = lib
        lib.apt_pst_workspace_bytes.restype = ctypes.c_size_t
        lib.apt_pst_workspace_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64]
        lib.apt_pst_forward.argtypes = [ctypes.POINTER(_Problem), ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int64, _PTR, _PTR, _PTR, ctypes.c_size_t, _PTR]
        lib.apt_pst_backward.argtypes = [ctypes.POINTER(_Problem), _PTR, _PTR, ctypes.POINTER(_Grads), ctypes.c_int,
                                         _PTR]
        for name in ("apt_pack_bits", "apt_unpack_bits"):
            getattr(lib, name).argtypes = [_PTR, _PTR, ctypes.c_int64, _PTR]

    def pst_forward(self, w0, u, v, a, b, r, c, beta, alpha1, alpha2, n_pruned, nm_n, nm_m, bracket_min=-1):
        assert w0.dim() == 2 and w0.device.type == "cpu"
        n, k = w0.shape
        rw, rs = u.shape[1], a.shape[1]
        assert u.shape == (n, rw) and v.shape == (rw, k) and a.shape == (n, rs) and b.shape == (rs, k)
        assert r.shape == (n,) and c.shape == (k,)
        w = w0.contiguous()
        f32 = [t.float().contiguous() for t in (u, v, a, b, r, c)]
        out = _poisoned(w.shape, w.dtype)
        words = _poisoned(((n * k + 31) // 32,), torch.int32)
        ws = _poisoned((self.lib.apt_pst_workspace_bytes(n, k),), torch.uint8)
        p = _Problem(w.data_ptr(), self._DTYPES[w.dtype], *[t.data_ptr() for t in f32], n, k, rw, rs, beta, alpha1,
                     alpha2)
        rc = self.lib.apt_pst_forward(ctypes.byref(p), n_pruned, nm_n, nm_m, bracket_min, out.data_ptr(),
                                      words.data_ptr(), ws.data_ptr(), ws.numel(), None)
        if rc:
            raise RuntimeError(f"apt_pst_forward: cuda error {rc}")
        self.last_workspace = ws
        return [out, words]

    def pst_backward(self, grad, words, w0, u, v, a, b, beta, alpha1, alpha2, need_w0, wide=False):
        n, k = w0.shape
        rw, rs = u.shape[1], a.shape[1]
        assert grad.shape == w0.shape and words.dtype == torch.int32 and words.numel() == (n * k + 31) // 32
        w = w0.contiguous()
        g = grad.to(w.dtype).contiguous()
        f32 = [t.float().contiguous() for t in (u, v, a, b)]
        sizes = (n * rw, rw * k, n * rs, rs * k, n, k)
        flat = torch.zeros(sum(sizes), dtype=torch.float32)  # the accumulators: zeroed, as the binding's
        parts = list(flat.split(sizes))
        dw0 = _poisoned(w.shape, w.dtype) if need_w0 else w.new_empty((0,))
        p = _Problem(w.data_ptr(), self._DTYPES[w.dtype], *[t.data_ptr() for t in f32], None, None, n, k, rw, rs,
                     beta, alpha1, alpha2)
        out = _Grads(*[t.data_ptr() for t in parts], dw0.data_ptr() if need_w0 else None)
        rc = self.lib.apt_pst_backward(ctypes.byref(p), g.data_ptr(), words.contiguous().data_ptr(), ctypes.byref(out),
                                       int(wide), None)
        if rc:
            raise RuntimeError(f"apt_pst_backward: cuda error {rc}")
        shapes = ((n, rw), (rw, k), (n, rs), (rs, k), (n,), (k,))
        return [dw0] + [t.view(shape) for t, shape in zip(parts, shapes)]

    def pack_bits(self, mask):
        flat = mask.contiguous().view(-1)
        words = _poisoned(((flat.numel() + 31) // 32,), torch.int32)
        assert self.lib.apt_pack_bits(flat.data_ptr(), words.data_ptr(), flat.numel(), None) == 0
        return words

    def unpack_bits(self, words, n):
        mask = _poisoned((n,), torch.bool)
        mask.view(torch.uint8).fill_(2)  # neither False nor True
        assert self.lib.apt_unpack_bits(words.contiguous().data_ptr(), mask.data_ptr(), n, None) == 0
        return mask


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    try:
        return build_host_kernels(tmp_path_factory.mktemp("csrc_host"), ["pst.cu", "bitpack.cu"])
    except RuntimeError as e:
        if "no C++ compiler" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture
def cuda_on_host(host_lib, monkeypatch):
    """backend="cuda" on CPU tensors runs csrc/'s kernels on the host."""
    ext = HostExtension(host_lib)
    monkeypatch.setattr(_env, "cuda_extension", lambda: ext)
    for reg in (PST_REGISTRY, bits.REGISTRY):
        monkeypatch.setattr(reg._entries["cuda"], "checks", ())
    return ext


def _cuda(ts, sparsity=None, nm=None, beta=1.0, a1=1.0, a2=1.0):
    """(W', keep mask) of the cuda backend."""
    wp, words, name = _run(*ts, sparsity, beta, a1, a2, "cuda", nm=nm)
    assert name == "cuda"
    return wp, bits.unpack_bits(words, ts[0].shape)


@pytest.mark.parametrize("shape", [(37, 53), (64, 96), (1, 1), (1, 13), (13, 1), (33, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_pst_ties_equal_reference_exactly(cuda_on_host, shape, sparsity):
    ts = make(*shape, ties=True, device="cpu")
    wp, keep = _cuda(ts, sparsity)
    assert torch.equal(keep, ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))
    assert torch.equal(keep, numpy_mask(ts, sparsity))
    assert int((~keep).sum()) == n_pruned(keep.numel(), sparsity)
    assert torch.equal(wp, ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ties", [True, False])
def test_pst_dtypes_equal_fused_order_emulation(cuda_on_host, dtype, ties):
    """Any data: the mask and W' of the documented FMA order, bit for bit, in every dtype."""
    ts = make(37, 53, rw=8, rs=5, ties=ties, dtype=dtype, device="cpu")
    for sparsity, (beta, a1, a2) in ((0.5, (1.0, 1.0, 1.0)), (0.9, (0.7, 1.3, -0.4))):
        want_keep, want_w = _emulated(ts, sparsity, beta=beta, a1=a1, a2=a2)
        wp, keep = _cuda(ts, sparsity, beta=beta, a1=a1, a2=a2)
        assert wp.dtype == dtype
        assert torch.equal(keep, want_keep) and torch.equal(wp, want_w)


# (n, k, rw, rs): every rank bucket of the score tiles (8, 16, 32; above 32 the per-entry path), rows and
# columns not multiples of a tile (16 rows x 256 * 32 / R columns), several column tiles, and more tiles
# than the 1024 blocks of a launch: runs of two tiles per block that stay in one column tile (16400 x 1)
# or cross into the next one every time (1 x 262200: the column factors are reloaded).
# Tiles of 1 to 16 rows (csrc/pst.cu: tile_rows_log2; fewer rows where 16 would give under 256 tiles): most
# cases have 1-row tiles; 2 rows with a 1-row last tile (1001 x 40), 8 with a 3-row last one (2051 x 5), 2 over
# two column tiles (300 x 600, rank 16), 16 with two tiles a block (16400 x 1).
TILE_CASES = [(37, 53, 0, 0), (20, 1100, 8, 8), (37, 300, 9, 3), (19, 70, 16, 16), (21, 600, 17, 2),
              (5, 40, 32, 1), (6, 45, 33, 2), (16400, 1, 20, 1), (1, 262200, 20, 1), (1001, 40, 8, 8),
              (2051, 5, 8, 3), (300, 600, 16, 16)]


@pytest.mark.parametrize("n,k,rw,rs", TILE_CASES)
def test_pst_score_tiles_equal_fused_order_emulation(cuda_on_host, n, k, rw, rs):
    for dtype in (torch.bfloat16, torch.float32):  # the first pass caches 16 or all 32 key bits in W'
        ts = make(n, k, rw=rw, rs=rs, dtype=dtype, device="cpu")
        want_keep, want_w = _emulated(ts, 0.6, beta=0.7, a1=1.3, a2=-0.4)
        wp, keep = _cuda(ts, 0.6, beta=0.7, a1=1.3, a2=-0.4)
        assert torch.equal(keep, want_keep) and torch.equal(wp, want_w)
        assert torch.equal(wp.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want_w.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # -0.0 too


def _misaligned(w0: torch.Tensor) -> torch.Tensor:
    """w0's values in a view one element into a larger buffer: contiguous, but its rows no longer start on a
    multiple of 4 entries' bytes (the kernels' packed loads and stores must then go entry by entry)."""
    flat = torch.empty(w0.numel() + 1, dtype=w0.dtype)
    view = flat[1:].view(w0.shape)
    view.copy_(w0)
    return view


@pytest.mark.parametrize("n,k,rw,rs", [(23, 300, 8, 8), (40, 1100, 8, 2), (9, 258, 16, 16)])
def test_pst_packed_and_entrywise_tiles_agree(cuda_on_host, n, k, rw, rs):
    """A thread's consecutive columns move as one load (W0) and one store (W') when k is a multiple of their
    number and W0 is aligned; the same matrix in a misaligned view goes entry by entry. Both give the
    documented order's W' and mask bit for bit, with split ties, and k not a multiple of 32 (the mask words
    straddle rows)."""
    for dtype in (torch.bfloat16, torch.float32):
        ts = make(n, k, rw=rw, rs=rs, dtype=dtype, device="cpu")
        want_keep, want_w = _emulated(ts, 0.6, beta=0.7, a1=1.3, a2=-0.4)
        shifted = [_misaligned(ts[0])] + ts[1:]
        assert shifted[0].data_ptr() % 8 and torch.equal(shifted[0], ts[0])
        for inputs in (ts, shifted):
            wp, keep = _cuda(inputs, 0.6, beta=0.7, a1=1.3, a2=-0.4)
            assert torch.equal(keep, want_keep) and torch.equal(wp, want_w)
        tied = make(n, k, rw=rw, rs=rs, ties=True, dtype=dtype, device="cpu")
        want = ak.pst_mask(*tied, sparsity=0.45, backend="reference")
        for inputs in (tied, [_misaligned(tied[0])] + tied[1:]):
            assert torch.equal(_cuda(inputs, 0.45)[1], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,rw,rs", [(20, 1100, 8, 8), (37, 300, 9, 3), (6, 45, 33, 2)])
def test_pst_score_tiles_split_ties(cuda_on_host, n, k, rw, rs, dtype):
    """The tie counts of the tiles (a ballot per warp and row) with ties spread over several tiles, from
    the whole cached key (float32 W0) and from its top 16 bits (16-bit W0: keys computed where they match)."""
    ts = make(n, k, rw=rw, rs=rs, ties=True, dtype=dtype, device="cpu")
    for sparsity in (0.37, 0.9):
        assert torch.equal(_cuda(ts, sparsity)[1], ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.parametrize("shape", [(37, 53), (64, 96)])
def test_pst_vs_reference_within_rounding(cuda_on_host, shape):
    beta, a1, a2 = 0.7, 1.3, 0.4
    ts = make(*shape, rw=8, rs=8, device="cpu")
    for sparsity in (0.3, 0.9):
        ref = ak.pst_mask(*ts, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend="reference")
        _, got = _cuda(ts, sparsity, beta=beta, a1=a1, a2=a2)
        band = tolerance_band(ts, sparsity, beta, a1, a2)
        assert int((~got).sum()) == int((~ref).sum()) == n_pruned(got.numel(), sparsity)
        assert not bool(((got != ref) & ~band).any()), "masks differ outside the rounding band of the threshold"


@pytest.mark.parametrize("shape", [(7, 9), (37, 53), (1, 40), (1100, 2)])
def test_pst_tie_split(cuda_on_host, shape):
    """Ties split in row-major order: the row counts and the cut by their last block (1100 rows: 69 blocks
    count, and the cut's scan over the row counts takes five rounds of the block's 256 threads)."""
    n, k = shape
    ts = make(n, k, ties=True, device="cpu")
    one = 1.5 / (n * k)  # floor(n k s) == 1
    assert torch.equal(_cuda(ts, one)[1], ak.pst_mask(*ts, sparsity=one, backend="reference"))
    make_scores_equal(ts)  # the first n_pruned entries in row-major order go
    for sparsity in (0.3, 0.9, 0.999):
        keep = _cuda(ts, sparsity)[1].reshape(-1)
        kp = n_pruned(n * k, sparsity)
        assert not keep[:kp].any() and keep[kp:].all(), sparsity


def _selection_state(ext):
    """(prefix, need, count, listed, pass 0's histogram) of csrc/pst.cu's State after the last forward, read
    from its workspace: State is {prefix, need, count, f_excl: 8 bytes each; arrived: 4 x 4 bytes; listed: 8
    bytes; count0: 8 bytes}, the histograms of 2048 64-bit counters per pass start at byte 256."""
    raw = ext.last_workspace.numpy().tobytes()
    prefix, need, count, _ = struct.unpack_from("<Qqqq", raw, 0)
    (listed,) = struct.unpack_from("<Q", raw, 48)
    return prefix, need, count, listed, struct.unpack_from("<2048Q", raw, 256)


def _one_bucket_of_four_values(ts, seed=0, dense_rows=False):
    """Tie-style inputs whose W0 puts 40% of the entries at |0.25|, 40% at |3.0| and 20% spread over four
    neighbouring bf16 values in one bucket of the first radix digit (1.0 .. 1.0234375): at sparsity 0.5 the
    threshold is a tied value among other values of pass 1's list. dense_rows: those values only in the
    first 16 rows, 70% of their entries (about 22 of every 32 consecutive entries: the stages fill fast)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(ts[0].shape, generator=g)
    near_one = 1.0 + torch.randint(0, 4, ts[0].shape, generator=g).float() / 128
    w = torch.where(pick < 0.4, 0.25, torch.where(pick < 0.8, 3.0, near_one))
    if dense_rows:  # the first 16 rows (the first block's whole run at k = 1024) 70% candidates, no others
        w[16:] = torch.where(pick[16:] < 0.5, 0.25, 3.0)
        w[:16] = torch.where(pick[:16] < 0.7, near_one[:16], 3.0)
    ts[0] = (w * torch.where(torch.rand(ts[0].shape, generator=g) < 0.5, -1.0, 1.0)).to(ts[0].dtype)


# ---- the sampled bracket (csrc/pst.cu: bracket_passes) ----------------------------------------------------------

BRACKET_OK, BRACKET_MISSED = 1, 2  # csrc/pst.cu: State::mode


def _bracket_state(ext):
    """(mode, entries inside the bracket, entries below it) of the last forward, from its workspace: State's
    fields after count0 (byte 56) are sample (two selections of 24 bytes), arrived_b (7 x 4 bytes), mode (int,
    byte 140), blisted (byte 144), below (byte 152)."""
    raw = ext.last_workspace.numpy().tobytes()
    (mode,) = struct.unpack_from("<i", raw, 140)
    blisted, below = struct.unpack_from("<QQ", raw, 144)
    return mode, blisted, below


@pytest.fixture
def bracket(cuda_on_host, monkeypatch):
    """The cuda backend with the sampled bracket on every matrix it takes (1024 entries and more)."""
    from apt_kernels.pst import cuda_pst

    monkeypatch.setattr(cuda_pst, "BRACKET_MIN", 0)
    return cuda_on_host


# numel >= 1024: rank buckets 0 (above 32), 8, 16, 32; tiles of 1 to 16 rows; several column tiles; k % 32 != 0
BRACKET_CASES = [(37, 53, 3, 2), (20, 1100, 8, 8), (37, 300, 9, 3), (19, 70, 16, 16), (21, 600, 17, 2),
                 (40, 45, 33, 2), (1001, 40, 8, 8), (2051, 5, 8, 3), (300, 600, 16, 16), (1, 262200, 20, 1)]


@pytest.mark.parametrize("n,k,rw,rs", BRACKET_CASES)
def test_pst_bracket_equals_fused_order_emulation(bracket, n, k, rw, rs):
    """The bracket holds the threshold of random scores (one pass over W, the list's exact selection, the
    fixup of its kept entries): the documented order's mask and W' bit for bit, in every dtype, at sparsities
    from one pruned entry (the bracket open below) to 0.999 (open above, on the small matrices)."""
    numel = n * k
    heavy = numel > 5000  # many blocks, which the host simulator runs slowly: one dtype, two sparsities
    for dtype in (torch.bfloat16,) if heavy else (torch.bfloat16, torch.float32, torch.float16):
        ts = make(n, k, rw=rw, rs=rs, dtype=dtype, device="cpu")
        for sparsity in ((0.9,) if numel > 100_000 else (1.5 / numel, 0.9)) if heavy else (1.5 / numel, 0.5, 0.9, 0.999):
            want_keep, want_w = _emulated(ts, sparsity, beta=0.7, a1=1.3, a2=-0.4)
            wp, keep = _cuda(ts, sparsity, beta=0.7, a1=1.3, a2=-0.4)
            mode, listed, below = _bracket_state(bracket)
            assert mode == BRACKET_OK, (dtype, sparsity, listed, below)
            assert listed < numel // 4 or numel < 5000, listed  # a bracket, not the matrix
            assert torch.equal(keep, want_keep) and torch.equal(wp.view(-1).view(torch.uint8),
                                                                want_w.view(-1).view(torch.uint8))
        if dtype != torch.bfloat16 or heavy:
            continue
        shifted = [_misaligned(ts[0])] + ts[1:]  # W0 and W' entry by entry
        wp, keep = _cuda(shifted, 0.6, beta=0.7, a1=1.3, a2=-0.4)
        assert _bracket_state(bracket)[0] == BRACKET_OK
        want_keep, want_w = _emulated(ts, 0.6, beta=0.7, a1=1.3, a2=-0.4)
        assert torch.equal(keep, want_keep) and torch.equal(wp, want_w)


@pytest.mark.parametrize("shape", [(37, 53), (40, 45)])
@pytest.mark.parametrize("sparsity", [0.3, 0.45, 0.9])
def test_pst_bracket_splits_listed_ties(bracket, shape, sparsity):
    """Few distinct scores (bf16-valued W0, V = B = R = C = 0; each of the seven values of |W0| is a tie class of
    a tenth of the entries or more, which these shapes' lists still hold): the threshold's ties are split, in
    row-major order, from the list's row counts and the cut; equal to the reference."""
    ts = make(*shape, ties=True, device="cpu")
    wp, keep = _cuda(ts, sparsity)
    mode, listed, _ = _bracket_state(bracket)
    assert mode == BRACKET_OK, listed
    assert torch.equal(keep, ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))
    assert torch.equal(wp, ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.parametrize("shape", [(40, 64), (37, 53)])
def test_pst_bracket_threshold_at_its_top(bracket, shape):
    """The threshold is the bracket's top key (all of its ties pruned) and the list's last rank: the bracket
    holds (its upper end is the whole 22-bit bucket), the pass keeps nothing at its top, and the mask is the
    reference's."""
    ts, sparsity = make_threshold_at_bracket_top(*shape, dtype=torch.bfloat16, device="cpu")
    wp, keep = _cuda(ts, sparsity)
    mode, listed, below = _bracket_state(bracket)
    assert mode == BRACKET_OK and below + listed == n_pruned(keep.numel(), sparsity), (mode, listed, below)
    assert torch.equal(keep, ak.pst_mask(*ts, sparsity=sparsity, backend="reference"))
    assert torch.equal(wp, ak.pst_masked_weight(*ts, sparsity=sparsity, backend="reference"))


@pytest.mark.parametrize("shape", [(64, 96), (40, 45), (300, 37)])
def test_pst_bracket_too_full_falls_back(bracket, shape):
    """All scores equal: the bracket holds every entry, more than its list takes, so the radix passes run after
    it and write everything (the mask words cleared first where k % 32 != 0); the first n_pruned go."""
    n, k = shape
    ts = make(n, k, ties=True, device="cpu")
    make_scores_equal(ts)
    for sparsity in (0.3, 0.9):
        keep = _cuda(ts, sparsity)[1].reshape(-1)
        mode, listed, _ = _bracket_state(bracket)
        assert mode == BRACKET_MISSED and listed == n * k
        kp = n_pruned(n * k, sparsity)
        assert not keep[:kp].any() and keep[kp:].all(), sparsity


@pytest.mark.parametrize("side", ["above", "below"])
@pytest.mark.parametrize("shape", [(64, 96), (40, 45)])
def test_pst_bracket_missed_by_its_sample_falls_back(bracket, side, shape):
    """A sample unlike the matrix: the sampled entries' scores made the largest (or the smallest) of all, so that
    the bracket lies above (below) the threshold. The bracket pass finds too many entries below it (too few up to
    its end), the radix passes run after it; the mask and W' are still the documented order's."""
    n, k = shape
    ts = make(n, k, rw=8, rs=8, device="cpu")
    hit = bracket_mod.sampled_entries(n, k)
    ts[0] = torch.where(hit, ts[0].sign() * (50.0 if side == "above" else 1e-3), ts[0] * 0.1 + ts[0].sign())
    for sparsity in (0.3, 0.5):  # (at 0.9 the small samples' upper rank is past their end: an open bracket)
        want_keep, want_w = _emulated(ts, sparsity)
        wp, keep = _cuda(ts, sparsity)
        mode, listed, below = _bracket_state(bracket)
        assert mode == BRACKET_MISSED, (listed, below)
        kp = n_pruned(n * k, sparsity)
        assert below >= kp if side == "above" else below + listed < kp
        assert torch.equal(keep, want_keep) and torch.equal(wp, want_w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pst_candidate_list(cuda_on_host, dtype):
    """Pass 1 lists its candidates (pass 0's bucket) in W''s buffer when they fit (8 bytes each: a quarter of
    a 16-bit W's entries, half of a float32 one's), and pass 2 and the tie count read that list instead of
    recomputing the scores; when they do not fit, the passes recompute. Each way, ties split or not, the
    mask and W' are the documented order's bit for bit, and a list holds exactly pass 0's bucket. The 64 x
    1024 cases give each of their four blocks thousands of candidates: the shared-memory stage is flushed
    to the list many times."""
    seen = set()
    for n, k, kind, sparsity in ((64, 96, "random", 0.5), (37, 300, "ties", 0.9), (64, 1024, "random", 0.5),
                                 (64, 1024, "four", 0.5), (64, 1024, "dense", 0.45), (40, 96, "four", 0.5),
                                 (7, 9, "equal", 0.3), (40, 96, "single", (40 * 96 // 2 + 1) / (40 * 96))):
        ts = make(n, k, rw=8, rs=5, ties=kind != "random", dtype=dtype, device="cpu")
        if kind == "equal":
            make_scores_equal(ts)  # one bucket holds every entry: no list fits
        elif kind in ("four", "dense"):
            _one_bucket_of_four_values(ts, dense_rows=kind == "dense")
        elif kind == "single":  # pass 0's bucket holds one entry, the threshold: one warp stages one record
            ts[0] = torch.where(torch.arange(n * k).reshape(n, k) < n * k // 2, 0.25, 3.0).to(dtype)
            ts[0][n - 1, 5] = 1.0
        want_keep, want_w = _emulated(ts, sparsity)
        wp, keep = _cuda(ts, sparsity)
        assert torch.equal(keep, want_keep) and torch.equal(wp, want_w), (n, k, kind, sparsity)
        prefix, need, count, listed, hist0 = _selection_state(cuda_on_host)
        bucket0 = hist0[prefix >> 21]
        cap = n * k * (4 if dtype == torch.float32 else 2) // 8
        assert listed == (bucket0 if bucket0 <= cap else 0), (n, k, kind, sparsity, listed, bucket0, cap)
        seen.add((kind, listed > 0, need < count, listed > count))
    assert {("random", True, False, True), ("ties", True, True, False), ("four", True, True, True),
            ("dense", True, True, True), ("equal", False, True, False), ("single", True, False, False)} <= seen, seen


def test_pst_signed_zeros_nan_and_inf(cuda_on_host):
    ts = make_special_values(device="cpu")
    for sparsity in SPECIAL_SPARSITIES:
        want = ak.pst_mask(*ts, sparsity=sparsity, backend="reference")
        assert bool(want[5, 3]) and torch.equal(_cuda(ts, sparsity)[1], want), sparsity
    wp = _cuda(ts, 0.9)[0]
    assert torch.isnan(wp[2, 3]) and wp[3, 4] == float("inf") and wp[4, 5] == -float("inf")


@pytest.mark.parametrize("k", [64, 53, 3])
def test_pst_bitmask_layout(cuda_on_host, k):
    """Words as apt_kernels.bits packs them, for rows that straddle words too."""
    ts = make(11, k, device="cpu")
    _, words, _ = _run(*ts, 0.6, 1.0, 1.0, 1.0, "cuda")
    mask = bits.unpack_bits(words, (11, k))
    assert words.dtype == torch.int32 and words.numel() == (11 * k + 31) // 32
    assert torch.equal(words, bits.pack_bits(mask, backend="torch"))
    assert torch.equal(mask, _emulated(ts, 0.6)[0])


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (0, 4), (16, 32), (2, 3), (5, 6)])
@pytest.mark.parametrize("ties", [True, False])
def test_pst_nm(cuda_on_host, nm, ties):
    """N:M, group sizes that are not powers of two included (the cuda path's own; Triton's needs them)."""
    ts = make(13, 96, ties=ties, device="cpu")
    wp, keep = _cuda(ts, nm=nm)
    want_keep, want_w = _emulated(ts, nm=nm)
    assert torch.equal(keep, want_keep) and torch.equal(wp, want_w)
    assert torch.all(keep.view(13, -1, nm[1]).sum(-1) == nm[0])
    if ties:  # exact scores: the reference's stable sort per group
        assert torch.equal(keep, ak.pst_mask(*ts, nm=nm, backend="reference"))


_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("shape,rw,rs,dtype", [((37, 53), 3, 2, _F32), ((200, 40), 8, 8, _F32), ((13, 1), 1, 2, _F32),
                                               ((20, 30), 0, 0, _F32), ((1, 1), 1, 1, _F32), ((21, 600), 9, 16, _F32),
                                               ((18, 70), 20, 32, _F32), ((37, 53), 3, 2, _BF16),
                                               ((200, 40), 8, 8, _BF16), ((37, 53), 3, 2, _F16),
                                               ((200, 40), 8, 8, _F16)])
@pytest.mark.parametrize("w0_grad", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_pst_cuda_backward_matches_reference(cuda_on_host, monkeypatch, shape, rw, rs, dtype, w0_grad, wide):
    """The extension's fused backward against the float64 STE on the forward's own mask: every rank bucket
    (8, 16, 32) with 1, 2 or 4 columns per thread (the default and the wide variant), rows and columns off the
    tile sizes, blocks owning one or several 16-row tiles (200 rows), several column tiles (600 columns),
    ranks 0, one entry, every W0 dtype."""
    from apt_kernels.pst import cuda_pst

    monkeypatch.setattr(cuda_pst, "WIDE_BACKWARD", wide)
    _check_cuda_backward(make(*shape, rw=rw, rs=rs, dtype=dtype, device="cpu"), dtype, w0_grad)


@pytest.mark.parametrize("dtype", [_F32, _BF16])
@pytest.mark.parametrize("wide", [False, True])
def test_pst_cuda_backward_of_a_misaligned_w0(cuda_on_host, monkeypatch, dtype, wide):
    """A thread's consecutive columns of W0, G and dW0 move as one load or store each where k is a multiple of
    their number and the tensors are aligned; a misaligned view of W0 (and so of dW0) goes entry by entry."""
    from apt_kernels.pst import cuda_pst

    monkeypatch.setattr(cuda_pst, "WIDE_BACKWARD", wide)
    ts = make(200, 40, rw=8, rs=8, dtype=dtype, device="cpu")
    ts[0] = _misaligned(ts[0])
    assert ts[0].data_ptr() % 8
    _check_cuda_backward(ts, dtype, w0_grad=True)


def _check_cuda_backward(ts, dtype, w0_grad):
    shape = tuple(ts[0].shape)
    beta, a1, a2, sparsity = 0.7, 1.3, 0.4, 0.6
    g = torch.randn(*shape).to(dtype)
    keep = ak.pst_mask(*ts, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend="cuda")
    needs = (w0_grad,) + (True,) * 6
    truth = ste_backward(g.double(), keep, *[t.double() for t in ts[:5]], beta, a1, a2, needs)
    lowp = ste_backward(g.float(), keep, *[t.float() for t in ts[:5]], beta, a1, a2, needs)
    leaves = [t.detach().requires_grad_(i > 0 or w0_grad) for i, t in enumerate(ts)]  # views: W0's alignment kept
    assert leaves[0].data_ptr() == ts[0].data_ptr()
    out = ak.pst_masked_weight(*leaves, sparsity=sparsity, beta=beta, alpha1=a1, alpha2=a2, backend="cuda")
    got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
    names = (["w0"] if w0_grad else []) + ["u", "v", "a", "b", "r", "c"]
    for name, x, lp, t in zip(names, got, [x for x in lowp if x is not None], [x for x in truth if x is not None]):
        want_dtype = dtype if name == "w0" else torch.float32
        assert x.dtype == want_dtype, name
        assert_parity(x, lp.to(want_dtype), t, name=f"d{name}", dtype=want_dtype)


def test_pst_cuda_backward_ranks_above_its_limit_fall_back(cuda_on_host, monkeypatch):
    """Ranks above APT_PST_BACKWARD_MAX_RANK never reach the extension's backward (the C API refuses them)."""
    from apt_kernels.pst import cuda_pst

    ts = [t.requires_grad_(i > 0) for i, t in enumerate(make(9, 40, rw=33, rs=2, device="cpu"))]
    out = ak.pst_masked_weight(*ts, sparsity=0.5, backend="cuda")
    monkeypatch.setattr(HostExtension, "pst_backward", None)  # calling it would fail the test
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, ts[1:], g)
    want = torch.autograd.grad(ak.pst_masked_weight(*ts, sparsity=0.5, backend="reference"), ts[1:], g)
    for name, x, y in zip("uvabrc", got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"d{name}")
    p = _Problem(None, 0, None, None, None, None, None, None, 4, 8, cuda_pst.MAX_BACKWARD_RANK + 1, 1, 1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="cuda error 1"):
        rc = cuda_on_host.lib.apt_pst_backward(ctypes.byref(p), None, None, ctypes.byref(_Grads()), 0, None)
        raise RuntimeError(f"cuda error {rc}")


def test_pst_gradients_through_the_cuda_backend(cuda_on_host):
    """The cuda backend's forward feeds its backward."""
    ts = [t.requires_grad_(i > 0) for i, t in enumerate(make(19, 45, rw=4, rs=4, device="cpu"))]
    out = ak.pst_masked_weight(*ts, sparsity=0.7, backend="cuda")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, ts[1:], g)
    want = torch.autograd.grad(ak.pst_masked_weight(*ts, sparsity=0.7, backend="reference"), ts[1:], g)
    for name, x, y in zip("uvabrc", got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_pst_under_torch_compile(cuda_on_host):
    """The cuda backend as the custom ops torch.compile sees: one graph for every sparsity, eager's masks
    and gradients, fake implementations checked by opcheck."""
    from test_pst import check_compiled_layer, opcheck_pst_ops

    check_compiled_layer("cuda")
    opcheck_pst_ops("cuda")
    opcheck_pst_ops("cuda", dtype=torch.bfloat16)


def test_pst_rejects_what_the_c_api_rejects(cuda_on_host, host_lib):
    """The C API's own argument checks (the binding checks first; these guard other callers)."""
    w = torch.zeros(4, 8)
    f = [torch.zeros(4, 1), torch.zeros(1, 8), torch.zeros(4, 1), torch.zeros(1, 8), torch.zeros(4), torch.zeros(8)]
    for n_pruned_, nm_n, nm_m in ((32, 0, 0), (-1, 0, 0), (0, 1, 3), (0, 5, 4), (0, 1, 64)):
        with pytest.raises(RuntimeError, match="cuda error 1"):  # cudaErrorInvalidValue
            cuda_on_host.pst_forward(w, *f, 1.0, 1.0, 1.0, n_pruned_, nm_n, nm_m)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 1000])
def test_bitpack_kernels(cuda_on_host, n):
    mask = torch.rand(n) < 0.4
    words = bits.pack_bits(mask, backend="cuda")
    if n:
        assert torch.equal(words, bits.pack_bits(mask, backend="torch"))
        assert torch.equal(cuda_on_host.unpack_bits(words, n), mask)
    shaped = torch.rand(3, 7, 5) < 0.5
    assert torch.equal(bits.unpack_bits(bits.pack_bits(shaped, backend="cuda"), shaped.shape), shaped)


def test_pst_cuda_agrees_with_triton_bit_for_bit(cuda_on_host):
    """Two independent implementations of one contract: same W' and words (Triton via its interpreter)."""
    from test_pst_kernels import FMA_EXACT, TRITON_OK

    if not (TRITON_OK and FMA_EXACT):
        pytest.skip("Triton's interpreter cannot run the bit-exact score order here")
    for ties, dtype in ((True, torch.bfloat16), (False, torch.float32), (False, torch.float16)):
        ts = make(33, 70, rw=8, rs=8, ties=ties, dtype=dtype, device="cpu")
        got_w, got_words, _ = _run(*ts, 0.8, 0.5, 2.0, 0.25, "cuda")
        want_w, want_words, _ = _run(*ts, 0.8, 0.5, 2.0, 0.25, "triton")
        assert torch.equal(got_w, want_w) and torch.equal(got_words, want_words)
