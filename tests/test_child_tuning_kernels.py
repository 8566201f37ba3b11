"""The fused Child-Tuning backends (Triton, CUDA C++), packed D masks, saved masks, and the example.

Lanes:
  * triton: the Triton kernel through the interpreter on CPU (compiled on a GPU) against the torch backend;
    its F masks bit-exactly against the stream's definition.
  * nvcc: the CUDA kernels themselves (csrc/child_tuning.cu) compiled for the host and run on CPU threads
    by tests/cuda_host_sim.h, called through the binding's Python-side signature, against the torch backend.
  * gpu: the built extension on a CUDA device: the cuda and triton backends against torch, the masks
    bit-exactly.
"""

import copy
import ctypes
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import apt_kernels as ak
from apt_kernels import bits
from apt_kernels.child_tuning import fused, keep_mask, load_masks, optimizer, save_masks
from apt_kernels.child_tuning.update import Masking

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
ULP_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


# ---------------------------------------------------------------------------------------------------
# Helpers: parameters of awkward sizes, fake gradients, a comparison of two optimizer runs
# ---------------------------------------------------------------------------------------------------

def make_params(dtype, device, sizes=((37, 29), (29,), (1000,), (5, 3, 7)), seed=0):
    """Parameters with given sizes, plus a misaligned view (odd storage offset) and a transposed one."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in sizes]
    base = torch.randn(1 + 333, generator=g).to(device=device, dtype=dtype)
    ps.append(base[1:])  # contiguous, but its address is not 16-byte aligned: the kernels' scalar path
    ps.append(torch.randn(13, 11, generator=g).to(device=device, dtype=dtype).t())  # not contiguous
    return [torch.nn.Parameter(p) for p in ps]


def set_grads(params, step, *, value=None, inplace=False):
    """Fresh gradients; ``inplace``: written into the existing .grad tensors (same addresses)."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        full = torch.randn(p.shape, generator=g) if value is None else torch.full(p.shape, float(value))
        if inplace and p.grad is not None:
            p.grad.copy_(full)
        else:
            p.grad = full.to(device=p.device, dtype=p.dtype)


def masks_for(params):
    return {p: (torch.arange(p.numel(), device=p.device) % 3 != 1).view(p.shape) for p in params[::2]}


def run_opt(params, backend, steps=3, lag=False, inplace=False, **kw):
    """``steps`` optimizer steps; ``lag``: parameter 1 has no gradient at the first, so its step lags one
    behind the others' (the fused kernels then read each tensor's own step, not one shared step);
    ``inplace``: gradients written into the same tensors every step (as DDP's bucket views are)."""
    masks = masks_for(params) if kw.get("mode") == "D" else None
    opt = ak.ChildTuningAdamW(params, backend=backend, masks=masks, **kw)
    opt.initial = {p: p.detach().float().clone() for p in params}
    for step in range(steps):
        set_grads(params, step, inplace=inplace)
        if lag and step == 0:
            params[1].grad = None
        opt.step()
    return opt


def assert_same_run(params_a, opt_a, params_b, opt_b, dtype):
    """Same states up to float rounding. A parameter may differ by an ulp of its dtype, plus 1e-3 of the
    distance it moved: m / sqrt(v) amplifies last-bit differences of m where v is tiny, and the kernels
    round differently from PyTorch's CPU ops (FMA contraction); a wrong mask or formula moves it by ~lr."""
    for pa, pb in zip(params_a, params_b):
        got, want = pb.detach().float(), pa.detach().float()
        rtol, atol = ULP_RTOL[dtype], 1e-7 + 1e-3 * float((want - opt_a.initial[pa]).abs().max())
        apart = (got - want).abs() > atol + rtol * want.abs()
        if dtype != torch.float32 and apart.any():
            # A 16-bit parameter is rounded at every step. Where the float32 result lands within a float32
            # rounding of a halfway point, the two runs may round to different neighbours, and the next steps
            # start from there (the CUDA build and Triton round apart from torch's CUDA ops at 2 of 3.1M
            # float16 elements over 5 steps). Allowed at no more than 1 element in 10^5, one ulp per step.
            assert int(apart.sum()) <= max(1, want.numel() // 100_000), f"{int(apart.sum())} elements apart"
            rtol *= opt_a.state[pa]["step"]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        for key in ("exp_avg", "exp_avg_sq"):  # a few float32 ulps of the terms (m may cancel to ~0)
            ref = opt_a.state[pa][key]
            scale = max(1.0, float(ref.abs().max()))
            torch.testing.assert_close(opt_b.state[pb][key], ref, rtol=2e-6, atol=1e-6 * scale)
        assert opt_a.state[pa]["step"] == opt_b.state[pb]["step"]


def drawn_keep_masks(backend, params, *, reserve_p, seed, steps=2):
    """The keep mask a backend applied, read from the moments: grad 1, beta1 0, lr 0 make exp_avg = keep / p."""
    opt = ak.ChildTuningAdamW(params, lr=0.0, betas=(0.0, 0.5), reserve_p=reserve_p, seed=seed, backend=backend)
    for _ in range(steps):
        set_grads(params, 0, value=1.0)
        opt.step()
    return [opt.state[p]["exp_avg"] != 0 for p in params]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 elements in 64-element blocks, so small tensors span several programs."""
    from apt_kernels.child_tuning import triton_update

    monkeypatch.setattr(triton_update, "CHUNK", 256)
    monkeypatch.setattr(triton_update, "BLOCK", 64)


# ---------------------------------------------------------------------------------------------------
# The optimizer/backend interface: packed D masks in the state, F masks never materialised by fused paths
# ---------------------------------------------------------------------------------------------------

def test_d_masks_are_kept_packed_and_round_trip_state_dict():
    params = make_params(torch.float32, "cpu")
    masks = masks_for(params)
    opt = ak.ChildTuningAdamW(params, lr=1e-2, mode="D", masks=masks)
    for p, m in masks.items():
        words = opt.state[p]["mask_bits"]
        assert words.dtype == torch.int32 and words.numel() == (p.numel() + 31) // 32
        assert torch.equal(bits.unpack_bits(words, p.shape), m)
    assert all(torch.equal(opt.masks()[p], m) for p, m in masks.items())
    set_grads(params, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ak.ChildTuningAdamW(clones, lr=1e-2, mode="D", masks={})
    opt2.load_state_dict(sd)
    for step in range(1, 4):
        set_grads(params, step)
        set_grads(clones, step)
        opt.step()
        opt2.step()
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_state_dict_with_bool_masks_still_loads():
    """A state_dict from before masks were packed (state["mask"], bool) loads into packed bits."""
    params = make_params(torch.float32, "cpu")
    masks = masks_for(params)
    opt = ak.ChildTuningAdamW(params, lr=1e-2, mode="D", masks=masks)
    sd = opt.state_dict()
    for pid, s in sd["state"].items():
        if "mask_bits" in s:
            p = params[pid]
            s["mask"] = bits.unpack_bits(s.pop("mask_bits"), p.shape)
    opt2 = ak.ChildTuningAdamW(params, lr=1e-2, mode="D", masks={})
    opt2.load_state_dict(sd)
    assert set(opt2.masks()) == set(masks)
    assert all(torch.equal(opt2.masks()[p], m) for p, m in masks.items())


def test_reference_and_torch_backends_draw_f_masks_from_the_masking():
    p = torch.nn.Parameter(torch.zeros(3000))
    masking = Masking("F", reserve_p=0.25, seed=3, indices=[7], offsets=[123])
    assert torch.equal(masking.keep(0, p, 5), keep_mask(3, 5, 7, (3000,), 0.25, offset=123))
    assert Masking("F", reserve_p=1.0, indices=[0]).keep(0, p, 1) is None
    assert Masking.none(1).keep(0, p, 1) is None


def test_fused_plan_splits_by_dtype_and_mode():
    params = make_params(torch.float32, "cpu")[:3] + make_params(torch.bfloat16, "cpu")[:2]
    set_grads(params, 0)
    ms = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    vs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    words = [bits.pack_bits(torch.ones(p.shape, dtype=torch.bool)) if j % 2 == 0 else None
             for j, p in enumerate(params)]
    launches, write_back = fused.plan(params, [p.grad for p in params], ms, vs, [1, 2, 3, 1, 2],
                                      Masking("D", bits=words), lr=1e-3, beta1=0.9, beta2=0.999, official=False)
    seen = {(la.dtype, la.mode): (len(la), la.steps, la.step_sizes, len(la.bits)) for la in launches}
    size = {t: 1e-3 / (1 - 0.9 ** t) for t in (1, 2, 3)}
    assert seen == {(torch.float32, fused.MODE_D): (2, [1, 3], [size[1], size[3]], 2),
                    (torch.float32, fused.MODE_NONE): (1, [2], [size[2]], 0),
                    (torch.bfloat16, fused.MODE_D): (1, [2], [size[2]], 1),
                    (torch.bfloat16, fused.MODE_NONE): (1, [1], [size[1]], 0)}
    assert write_back == []


def test_fused_tables_layout():
    """The tensor table is csrc/child_tuning.cuh's TensorRow (9 int64 words, read by both kernels) and the
    chunk table covers every tensor, a shard's chunks starting on the stream's groups of four if asked."""
    sizes = [5, 9000, 1, 4097]
    ps = [torch.zeros(n) for n in sizes]
    gs, ms, vs = ([torch.zeros(n) for n in sizes] for _ in range(3))
    words = [bits.pack_bits(torch.ones(n, dtype=torch.bool)) for n in sizes]
    offsets, indices, steps = [0, 6, 2 ** 40 + 3, 2], [0, 2 ** 32 - 1, 2 ** 31, 7], [1, 2 ** 31 + 5, 2 ** 32 - 1, 9]
    masking = Masking("F", 0.5, seed=1, indices=indices, offsets=offsets)
    (launch,), _ = fused.plan(ps, gs, ms, vs, steps, masking, lr=1e-3, beta1=0.9, beta2=0.999, official=True)
    launch.mode, launch.bits = fused.MODE_D, words  # a D launch's bits too, on the same rows
    addresses = [(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr()) for p, g, m, v in zip(ps, gs, ms, vs)]
    rows = fused.rows(launch, addresses)
    assert rows.dtype == torch.int64 and rows.shape == (4, fused.ROW_WORDS)
    halves, floats = rows.view(torch.int32).view(4, 18), rows.view(torch.float32).view(4, 18)
    for j in range(4):
        assert rows[j, :7].tolist() == [*addresses[j], words[j].data_ptr(), sizes[j], offsets[j]]
        assert [int(x) % 2 ** 32 for x in halves[j, 14:16]] == [indices[j], steps[j]]
        sc = fused._step_scalars(steps[j], lr=1e-3, beta1=0.9, beta2=0.999, official=True)
        assert floats[j, 16:18].tolist() == torch.tensor(sc, dtype=torch.float32).tolist()
    leads = [o % 4 for o in offsets]  # 0, 2, 3, 2
    table = fused.chunks(sizes, leads, 4096)
    assert table.dtype == torch.int32
    assert table.tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [3, 0], [3, 1]]
    assert fused.chunks(sizes, [0] * 4, 4096).tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [3, 0], [3, 1]]
    assert fused.chunks([4094, 4095], [2, 2], 4096).tolist() == [[0, 0], [1, 0], [1, 1]]


class RecordingKernel:
    """A fused.Kernel whose launches are recorded (the tables and the shared step), not run."""

    def __init__(self):
        self.calls = []
        self.kernel = fused.Kernel(chunk=64, group_chunks=True, split_vector=True,
                                   launch=lambda t, h, s: self.calls.append((t, s)))

    def run(self, params, grads, ms, vs, steps, masking, cache):
        self.calls.clear()
        fused.run(self.kernel, params, grads, ms, vs, steps, masking, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, semantics="torch", cache=cache)
        return self.calls


def test_fused_cache_reuses_tables_until_the_tensors_change():
    k = RecordingKernel()
    ps = [torch.zeros(100), torch.zeros(3, 7)]
    gs, ms, vs = ([torch.zeros_like(p) for p in ps] for _ in range(3))
    masking = Masking("F", 0.5, seed=1, indices=[0, 1])
    cache = {}
    (t1, s1), = k.run(ps, gs, ms, vs, [1, 1], masking, cache)
    assert s1.step == 1 and s1.step_size == pytest.approx(1e-3 / 0.1) and s1.bc2_sqrt == pytest.approx(0.001 ** 0.5)
    (t2, s2), = k.run(ps, gs, ms, vs, [2, 2], masking, cache)
    assert t2 is t1 and s2.step == 2  # reused: the step goes to the kernel as an argument
    new = [torch.zeros_like(p) for p in gs]  # new gradients (the old ones still alive: new addresses)
    (t3, _), = k.run(ps, new, ms, vs, [3, 3], masking, cache)
    assert t3 is not t1 and t3.rows[0, 1] == new[0].data_ptr()
    ((t4, _),) = k.run(ps, new, ms, vs, [4, 4], masking, cache)
    assert t4 is t3
    # steps that differ: tables rebuilt with each row's step, the kernel told to read them
    ((t5, s5),) = k.run(ps, new, ms, vs, [5, 4], masking, cache)
    assert t5 is not t3 and s5 == fused.PER_ROW and cache == {}
    assert [int(x) for x in t5.rows.view(torch.int32).view(2, 18)[:, 15]] == [5, 4]
    # a non-contiguous gradient is updated through a copy: nothing cached
    ((t6, _),) = k.run(ps, [new[0], torch.zeros(7, 3).t()], ms, vs, [6, 6], masking, cache)
    assert cache == {} and t6.rows[1, 1] != new[1].data_ptr()
    ((t7, _),) = k.run(ps, new, ms, vs, [7, 7], masking, cache)
    ((t8, _),) = k.run(ps, new, ms, vs, [8, 8], masking, cache)
    assert t8 is t7
    # the masking's structure: reserve_p = 1 is an unmasked launch, other indices other tables
    ((t9, _),) = k.run(ps, new, ms, vs, [9, 9], Masking("F", 1.0, seed=1, indices=[0, 1]), cache)
    assert t9.mode == fused.MODE_NONE
    ((t10, _),) = k.run(ps, new, ms, vs, [10, 10], Masking("F", 0.5, seed=1, indices=[4, 5]), cache)
    assert t10.mode == fused.MODE_F and [int(x) for x in t10.rows.view(torch.int32).view(2, 18)[:, 14]] == [4, 5]
    ((t11, _),) = k.run(ps, new, ms, vs, [11, 11], Masking("F", 0.3, seed=2, indices=[4, 5]), cache)
    assert t11 is t10  # seed and reserve_p < 1 are kernel arguments
    # a parameter replaced by a tensor of another size at the same address is not the same tensor
    storage = torch.zeros(100)
    ps2 = [storage, ps[1]]
    ((t12, _),) = k.run(ps2, new, ms, vs, [12, 12], masking, cache)
    ((t13, _),) = k.run([storage[:50], ps[1]], [new[0][:50], new[1]], [ms[0][:50], ms[1]], [vs[0][:50], vs[1]],
                        [13, 13], masking, cache)
    assert t13 is not t12 and t13.rows[0, 5] == 50


def test_optimizer_drops_cached_tables_when_it_replaces_state(monkeypatch):
    params = make_params(torch.float32, "cpu")[:3]
    calls = []
    kernel = fused.Kernel(chunk=64, group_chunks=True, split_vector=True, launch=lambda t, h, s: calls.append(t))
    monkeypatch.setattr(optimizer.REGISTRY._entries["torch"], "fn", lambda *a, **kw: fused.run(kernel, *a, **kw))
    opt = ak.ChildTuningAdamW(params, lr=1e-3, reserve_p=0.5, backend="torch")
    set_grads(params, 0)
    opt.step()
    opt.step()
    assert calls[0] is calls[1] and len(opt._plans) == 1
    opt.load_state_dict(opt.state_dict())
    assert opt._plans == {}
    opt.step()
    assert calls[2] is not calls[1]


# ---------------------------------------------------------------------------------------------------
# Triton lane
# ---------------------------------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("semantics", ["official", "torch"])
@pytest.mark.parametrize("mode,reserve_p", [("F", 0.4), ("F", 1.0), ("F", 1e-39), ("D", 0.3)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_triton_backend_matches_torch(small_chunks, dtype, semantics, mode, reserve_p, weight_decay):
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, reserve_p=reserve_p, mode=mode,
              semantics=semantics, seed=12)
    pa, pb = make_params(dtype, DEVICE), make_params(dtype, DEVICE)
    oa, ob = run_opt(pa, "torch", **kw), run_opt(pb, "triton", **kw)
    assert_same_run(pa, oa, pb, ob, dtype)


@pytest.fixture
def table_builds(monkeypatch):
    """The number of launches fused.py built tables for (not counting reused ones)."""
    built = []
    real = fused.tables

    def counted(kernel, launch):
        out = real(kernel, launch)
        built.extend(out)
        return out

    monkeypatch.setattr(fused, "tables", counted)
    return built


@pytest.mark.triton
@pytest.mark.parametrize("semantics", ["official", "torch"])
@pytest.mark.parametrize("mode", ["F", "D"])
def test_triton_backend_reusing_its_tables_across_steps(small_chunks, table_builds, semantics, mode):
    """Contiguous parameters and gradients kept in place, so steps 2 and 3 run on the tables of step 1
    with the step passed to the kernel."""
    kw = dict(lr=1e-2, weight_decay=0.05, reserve_p=0.4, mode=mode, semantics=semantics, seed=3)
    pa, pb = make_params(torch.bfloat16, DEVICE)[:5], make_params(torch.bfloat16, DEVICE)[:5]
    oa, ob = run_opt(pa, "torch", inplace=True, **kw), run_opt(pb, "triton", inplace=True, **kw)
    # step 1 only. F: the aligned and the misaligned (params[4]) tensors; D: those of the masked ones
    # (params[::2]) and the unmasked aligned ones
    assert len(table_builds) == (2 if mode == "F" else 3)
    assert_same_run(pa, oa, pb, ob, torch.bfloat16)


@pytest.mark.triton
@pytest.mark.parametrize("semantics", ["official", "torch"])
def test_triton_backend_with_steps_that_differ(small_chunks, semantics):
    kw = dict(lr=1e-2, weight_decay=0.05, reserve_p=0.4, mode="F", semantics=semantics, seed=3)
    pa, pb = make_params(torch.float32, DEVICE), make_params(torch.float32, DEVICE)
    oa, ob = run_opt(pa, "torch", lag=True, **kw), run_opt(pb, "triton", lag=True, **kw)
    assert ob.state[pb[1]]["step"] == 2 and ob.state[pb[0]]["step"] == 3
    assert_same_run(pa, oa, pb, ob, torch.float32)


@pytest.mark.triton
def test_triton_backend_default_chunking():
    """The launcher's own CHUNK/BLOCK: two full 8192-element chunks and a tail, F and D."""
    for mode in ("F", "D"):
        kw = dict(lr=1e-2, weight_decay=0.05, reserve_p=0.3, mode=mode, seed=4)
        pa, pb = (make_params(torch.bfloat16, DEVICE, sizes=((2 * 8192 + 5,),)) for _ in range(2))
        oa, ob = run_opt(pa, "torch", steps=2, **kw), run_opt(pb, "triton", steps=2, **kw)
        assert_same_run(pa, oa, pb, ob, torch.bfloat16)


@pytest.mark.triton
@pytest.mark.parametrize("reserve_p", [0.3, 0.9])
def test_triton_f_masks_are_the_stream(small_chunks, reserve_p):
    params = make_params(torch.float32, DEVICE, sizes=((700,), (3, 50), (1,)))
    got = drawn_keep_masks("triton", params, reserve_p=reserve_p, seed=2 ** 64 - 3)
    for i, (p, m) in enumerate(zip(params, got)):
        assert torch.equal(m.cpu(), keep_mask(2 ** 64 - 3, 2, i, p.shape, reserve_p, backend="reference")), i


def shard_keep_bits(update_fn, offset, numel=300, device=DEVICE):
    """The keep bits an F-mode step of update_fn draws for a tensor whose first element is global element
    ``offset`` (read back from exp_avg: all gradients 1, beta1 0)."""
    p = torch.zeros(numel, device=device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    update_fn([p], [torch.ones_like(p)], [m], [v], [4], Masking("F", 0.5, seed=9, indices=[6], offsets=[offset]),
              lr=0.0, beta1=0.0, beta2=0.5, eps=1e-6, weight_decay=0.0, semantics="official")
    return (m != 0).cpu()


# offsets: group-aligned, and cutting the stream's groups of four (1, 2 or 3 elements before the tensor); the last
# two past 2**34, where the group index needs the counter's high word
SHARD_OFFSETS = [2 ** 32 - 100, 2 ** 32 - 99, 6, 2 ** 32 - 1, 8193, 2 ** 34 + 6, 2 ** 40 + 1]


@pytest.mark.triton
@pytest.mark.parametrize("offset", SHARD_OFFSETS)
def test_triton_f_masks_of_a_shard_use_the_global_index(small_chunks, offset):
    """A tensor with a large element offset (a shard of a huge parameter) draws the global bits."""
    from apt_kernels.child_tuning.optimizer import triton_update

    want = keep_mask(9, 4, 6, (300,), 0.5, offset=offset, backend="reference")
    assert torch.equal(shard_keep_bits(triton_update, offset), want)
    assert torch.equal(keep_mask(9, 4, 6, (300,), 0.5, DEVICE, offset, backend="triton").cpu(), want)


def test_torch_f_masks_of_a_shard_use_the_global_index():
    from apt_kernels.child_tuning.update import foreach_update

    for offset in SHARD_OFFSETS:
        want = keep_mask(9, 4, 6, (300,), 0.5, offset=offset, backend="reference")
        assert torch.equal(shard_keep_bits(foreach_update, offset, device="cpu"), want), offset


@pytest.mark.triton
def test_triton_d_masks_read_packed_bits(small_chunks):
    params = make_params(torch.bfloat16, DEVICE, sizes=((300,), (4, 33)))
    masks = {p: torch.rand(p.shape, device=DEVICE) < 0.3 for p in params}
    opt = ak.ChildTuningAdamW(params, lr=0.0, betas=(0.0, 0.5), mode="D", masks=masks, backend="triton")
    set_grads(params, 0, value=1.0)
    opt.step()
    for p in params:
        if p in masks:
            assert torch.equal(opt.state[p]["exp_avg"] != 0, masks[p])
        else:
            assert bool((opt.state[p]["exp_avg"] != 0).all())


@pytest.mark.triton
def test_triton_state_dict_resume_is_bit_exact(small_chunks):
    kw = dict(lr=1e-2, reserve_p=0.4, seed=5, weight_decay=0.01, backend="triton")
    ref = make_params(torch.float32, DEVICE, sizes=((300,), (7, 9)))
    opt = ak.ChildTuningAdamW(ref, **kw)
    half = make_params(torch.float32, DEVICE, sizes=((300,), (7, 9)))
    opt_h = ak.ChildTuningAdamW(half, **kw)
    for step in range(4):
        set_grads(ref, step)
        opt.step()
        if step < 2:
            set_grads(half, step)
            opt_h.step()
    saved = copy.deepcopy(opt_h.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt_r = ak.ChildTuningAdamW(resumed, lr=0.5, reserve_p=0.9, seed=99, backend="triton")
    opt_r.load_state_dict(saved)
    for step in range(2, 4):
        set_grads(resumed, step)
        opt_r.step()
    for a, b in zip(ref, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton),
                                     pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_step_equals_eager(small_chunks, backend):
    """torch.compile(opt.step), PyTorch's pattern for compiled optimizers: torch and reference are traced, the
    fused launchers run eagerly behind a graph break; same parameters and states as eager steps."""
    device = "cuda" if backend == "cuda" else DEVICE
    torch._dynamo.reset()
    kw = dict(lr=1e-2, reserve_p=0.4, seed=5, weight_decay=0.01, backend=backend)
    sizes = ((37, 29), (29,), (300,))
    eager, compiled = make_params(torch.float32, device, sizes), make_params(torch.float32, device, sizes)
    opt_e, opt_c = ak.ChildTuningAdamW(eager, **kw), ak.ChildTuningAdamW(compiled, **kw)
    step = torch.compile(opt_c.step, backend="inductor" if device == "cuda" else "aot_eager")
    for i in range(3):
        set_grads(eager, i)
        set_grads(compiled, i)
        opt_e.step()
        step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)
        assert opt_c.state[b]["step"] == opt_e.state[a]["step"] == 3
        torch.testing.assert_close(opt_c.state[b]["exp_avg_sq"], opt_e.state[a]["exp_avg_sq"], rtol=2e-6, atol=0)


TRITON_COMPILE = r"""
import itertools, re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apt_kernels.child_tuning import triton_update as tu
sig = {"rows": "*i64", "chunks": "*i32", "step0": "i32", "step_size0": "fp32", "bc2_sqrt0": "fp32",
       "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
       "decay": "fp32", "inv_reserve_p": "fp32", "seed_lo": "i64", "seed_hi": "i32", "threshold": "i32"}
for dt, mode, official, aligned in [(tl.float32, 1, True, True), (tl.bfloat16, 2, False, True),
                                    (tl.float16, 0, True, False), (tl.bfloat16, 1, False, True)]:
    consts = dict(P_DTYPE=dt, MODE=mode, OFFICIAL=official, HAS_DECAY=True, ALIGNED=aligned, CHUNK=tu.CHUNK,
                  BLOCK=tu.BLOCK)
    c = triton.compile(ASTSource(tu._child_tuning_adamw_kernel, {**sig, **{k: "constexpr" for k in consts}},
                                 constexprs=consts), target=GPUTarget("cuda", 90, 32))
    vec = len(re.findall(r"ld\.global\.v4", c.asm["ptx"]))
    assert (vec > 0) == aligned, (dt, mode, aligned, vec)
    sig["step0"] = "i64" if sig["step0"] == "i32" else "i32"  # steps >= 2^31 come as i64
# Triton turns an int argument whose value is 1 into a constexpr: seeds 1 and 2**32 .. 2**33-1 do that.
ones = dict(P_DTYPE=tl.float32, MODE=1, OFFICIAL=True, HAS_DECAY=True, ALIGNED=True, CHUNK=tu.CHUNK,
            BLOCK=tu.BLOCK, seed_lo=1, seed_hi=1)
triton.compile(ASTSource(tu._child_tuning_adamw_kernel, {**sig, **{k: "constexpr" for k in ones}}, constexprs=ones),
               target=GPUTarget("cuda", 90, 32))
from apt_kernels.child_tuning import triton_rng as tr
rng_sig = {"out_ptr": "*i8", "numel": "i32", "offset": "i64", "threshold": "i32"}
rng_ones = dict(step=1, param_index=1, seed_lo=1, seed_hi=1, BLOCK=1024)
triton.compile(ASTSource(tr._keep_mask_kernel, {**rng_sig, **{k: "constexpr" for k in rng_ones}},
                         constexprs=rng_ones), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="an offline sm_90 compile check for the CPU lanes; on a GPU the kernels compile for real")
def test_triton_kernel_compiles_for_sm90_and_vectorises():
    """The interpreter is lenient; compile the kernel for sm_90 for real (no GPU needed), and check that
    aligned launches get 128-bit accesses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", TRITON_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------
# nvcc lane: the CUDA kernels, compiled for the host (tests/cuda_host_sim.h), run on CPU tensors
# ---------------------------------------------------------------------------------------------------

HOST_HARNESS = r"""
// Host entry points over child_tuning.cu's own launch functions (run by tests/cuda_host_sim.h) and
// the Philox function of child_tuning_kernel.cuh.
#include "child_tuning_kernel.cuh"
namespace ct = apt::child_tuning;

extern "C" void host_philox(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
  ct::philox4x32_10(c, key[0], key[1]);
  for (int i = 0; i < 4; ++i) out[i] = c[i];
}

extern "C" int host_keep_mask(bool* out, int64_t n, int64_t offset, uint32_t step, uint32_t index, uint32_t seed_lo,
                              uint32_t seed_hi, uint32_t threshold) {
  return apt_child_tuning_keep_mask(out, n, offset, step, index, seed_lo, seed_hi, threshold, nullptr);
}

extern "C" int host_adamw(const void* rows, const void* chunks, int64_t n_chunks, const double* f, const int64_t* u,
                          int dtype, int mode, int official, int has_decay) {
  const ct::Hyper h{float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]),
                    uint32_t(u[0]), uint32_t(u[1]), uint32_t(u[2]), uint32_t(u[3]), float(f[7]), float(f[8])};
  return apt_child_tuning_adamw(static_cast<const ct::TensorRow*>(rows), static_cast<const ct::ChunkRow*>(chunks),
                                n_chunks, h, dtype, mode, official != 0, has_decay != 0, nullptr);
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    from cuda_host import build_host_kernels

    return build_host_kernels(tmp_path_factory.mktemp("ct_host"), ["child_tuning.cu"], HOST_HARNESS)


class HostExtension:
    """Stands in for apt_kernels._C: the binding's Python-side signature, the kernel's code run on the host
    over the tables fused.py built (on the host: the tests' tensors are CPU tensors)."""

    def __init__(self, lib):
        self.lib = lib

    def child_tuning_adamw(self, rows, chunks, chunk, dtype, mode, official, has_decay, beta1, one_minus_beta1,
                           beta2, one_minus_beta2, eps, decay, inv_reserve_p, seed_lo, seed_hi, threshold, step,
                           step_size, bc2_sqrt):
        assert chunk == 32768 and rows.dtype == torch.int64 and rows.shape[1] == 9 and chunks.dtype == torch.int32
        assert rows.is_contiguous() and chunks.is_contiguous() and chunks.shape[1] == 2
        rc = self.lib.host_adamw(
            ctypes.c_void_p(rows.data_ptr()), ctypes.c_void_p(chunks.data_ptr()), ctypes.c_int64(chunks.shape[0]),
            (ctypes.c_double * 9)(beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p,
                                  step_size, bc2_sqrt),
            (ctypes.c_int64 * 4)(seed_lo, seed_hi, threshold, step), dtype, mode, int(official), int(has_decay))
        assert rc == 0

    def child_tuning_keep_mask(self, numel, offset, step, index, seed_lo, seed_hi, threshold, device_index):
        out = torch.empty(numel, dtype=torch.bool)
        rc = self.lib.host_keep_mask(ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(numel), ctypes.c_int64(offset),
                                     ctypes.c_uint32(step), ctypes.c_uint32(index), ctypes.c_uint32(seed_lo),
                                     ctypes.c_uint32(seed_hi), ctypes.c_uint32(threshold))
        assert rc == 0
        return out


@pytest.fixture
def cuda_on_host(host_kernels, monkeypatch):
    """backend="cuda" on CPU tensors runs the CUDA kernel's code compiled for the host."""
    from apt_kernels import _env
    from apt_kernels.child_tuning import rng

    monkeypatch.setattr(_env, "cuda_extension", lambda: HostExtension(host_kernels))
    for reg, name in ((optimizer.REGISTRY, "cuda"), (rng.REGISTRY, "cuda")):
        monkeypatch.setattr(reg._entries[name], "checks", ())
    return host_kernels


@pytest.mark.nvcc
def test_cuda_philox_known_answers_and_stream(cuda_on_host):
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        out = (ctypes.c_uint32 * 4)()
        cuda_on_host.host_philox((ctypes.c_uint32 * 4)(*ctr), (ctypes.c_uint32 * 2)(*key), out)
        assert tuple(out) == want
    for seed, step, index, n, p, offset in [(0, 1, 0, 5000, 0.3, 0), (2 ** 64 - 1, 2 ** 32 - 1, 70000, 999, 0.5, 0),
                                            (5, 3, 2, 1000, 0.9, 2 ** 32 - 500), (1234, 1, 0, 8, 0.5, 0),
                                            (5, 3, 2, 1001, 0.4, 2 ** 32 - 3), (6, 1, 1, 2, 0.5, 7)]:
        got = keep_mask(seed, step, index, (n,), p, offset=offset, backend="cuda")
        assert torch.equal(got, keep_mask(seed, step, index, (n,), p, offset=offset, backend="reference"))


@pytest.mark.nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("semantics", ["official", "torch"])
@pytest.mark.parametrize("mode,reserve_p", [("F", 0.4), ("F", 1.0), ("F", 1e-39), ("D", 0.3)])
def test_cuda_kernel_code_matches_torch(cuda_on_host, dtype, semantics, mode, reserve_p):
    # (300, 257): three 32768-element chunks and a tail that is not a multiple of 4.
    sizes = ((300, 257), (29,), (1000,), (5, 3, 7))
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, reserve_p=reserve_p, mode=mode,
              semantics=semantics, seed=12)
    pa, pb = make_params(dtype, "cpu", sizes), make_params(dtype, "cpu", sizes)
    oa, ob = run_opt(pa, "torch", **kw), run_opt(pb, "cuda", **kw)
    assert_same_run(pa, oa, pb, ob, dtype)


@pytest.mark.nvcc
@pytest.mark.parametrize("semantics", ["official", "torch"])
@pytest.mark.parametrize("mode", ["F", "D"])
def test_cuda_kernel_code_reusing_its_tables_across_steps(cuda_on_host, table_builds, semantics, mode):
    kw = dict(lr=1e-2, weight_decay=0.05, reserve_p=0.4, mode=mode, semantics=semantics, seed=3)
    pa, pb = make_params(torch.bfloat16, "cpu")[:5], make_params(torch.bfloat16, "cpu")[:5]
    oa, ob = run_opt(pa, "torch", inplace=True, **kw), run_opt(pb, "cuda", inplace=True, **kw)
    assert len(table_builds) == (1 if mode == "F" else 2)  # step 1 only: F one launch; D masked, unmasked
    assert_same_run(pa, oa, pb, ob, torch.bfloat16)


@pytest.mark.nvcc
@pytest.mark.parametrize("semantics", ["official", "torch"])
def test_cuda_kernel_code_with_steps_that_differ(cuda_on_host, semantics):
    kw = dict(lr=1e-2, weight_decay=0.05, reserve_p=0.4, mode="F", semantics=semantics, seed=3)
    pa, pb = make_params(torch.float32, "cpu"), make_params(torch.float32, "cpu")
    oa, ob = run_opt(pa, "torch", lag=True, **kw), run_opt(pb, "cuda", lag=True, **kw)
    assert ob.state[pb[1]]["step"] == 2 and ob.state[pb[0]]["step"] == 3
    assert_same_run(pa, oa, pb, ob, torch.float32)


@pytest.mark.nvcc
@pytest.mark.parametrize("offset", SHARD_OFFSETS)
def test_cuda_kernel_code_f_masks_of_a_shard_use_the_global_index(cuda_on_host, offset):
    from apt_kernels.child_tuning.optimizer import cuda_update

    want = keep_mask(9, 4, 6, (300,), 0.5, offset=offset, backend="reference")
    assert torch.equal(shard_keep_bits(cuda_update, offset, device="cpu"), want)


@pytest.mark.nvcc
def test_cuda_kernel_code_f_masks_are_the_stream(cuda_on_host):
    params = make_params(torch.float32, "cpu", sizes=((300, 257), (3, 50)))
    got = drawn_keep_masks("cuda", params, reserve_p=0.3, seed=77)
    for i, (p, m) in enumerate(zip(params, got)):
        assert torch.equal(m, keep_mask(77, 2, i, p.shape, 0.3, backend="reference")), i


FUSED_BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.nvcc)]


def _fused_backend(request, backend):
    """The device for ``backend``: the CUDA kernels run on the host (cuda_on_host) on CPU tensors."""
    if backend == "cuda":
        request.getfixturevalue("cuda_on_host")
        return "cpu"
    return DEVICE


@pytest.mark.parametrize("backend", ["reference", "torch", *FUSED_BACKENDS])
def test_f_keep_is_strictly_below_the_threshold(request, small_chunks, backend):
    """keep iff (x >> 8) < floor(reserve_p 2^24) (rng.py): with reserve_p chosen so that the threshold equals
    (x >> 8) of one element, that element is dropped (and kept one threshold step higher), by each backend's
    keep_mask and by its update's own draw. Random draws hit the threshold with probability 2^-24: this one does."""
    from apt_kernels.child_tuning.rng import KEEP_BITS, keep_threshold, random_bits

    device = _fused_backend(request, backend)
    seed, e = 31, 5
    thr = int(random_bits(seed, 2, 0, 64)[e]) >> (32 - KEEP_BITS)
    for reserve_p, kept in (((thr + 0.5) / 2 ** KEEP_BITS, False), ((thr + 1.5) / 2 ** KEEP_BITS, True)):
        assert keep_threshold(reserve_p) == thr + kept
        want = keep_mask(seed, 2, 0, (64,), reserve_p, backend="reference")
        assert bool(want[e]) == kept
        assert torch.equal(keep_mask(seed, 2, 0, (64,), reserve_p, device, backend=backend).cpu(), want)
        params = [torch.nn.Parameter(torch.zeros(64, device=device))]
        assert torch.equal(drawn_keep_masks(backend, params, reserve_p=reserve_p, seed=seed)[0].cpu(), want)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
# eps = 0: the interpreter's numpy warns of 0 / 0 in the block's lanes past the tensor's end (masked, never stored)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bf16_parameters_round_half_to_even(request, small_chunks, backend):
    """The update rounds the float32 result into a bf16 parameter to nearest, ties to even (torch's copy_), checked
    on exact halfway values: lr = 2^-8, betas (0.5, 0.75), eps 0 and gradient -1 make the first step exactly
    w + 2^-8, halfway between bf16 neighbours of 1 and 1 + 2^-7."""
    device = _fused_backend(request, backend)
    w = torch.where(torch.arange(64) % 2 == 0, 1.0, 1.0 + 2.0 ** -7)
    p = torch.nn.Parameter(w.to(device=device, dtype=torch.bfloat16))
    opt = ak.ChildTuningAdamW([p], lr=2.0 ** -8, betas=(0.5, 0.75), eps=0.0, reserve_p=1.0, backend=backend)
    p.grad = torch.full_like(p, -1.0)
    opt.step()
    want = (w + 2.0 ** -8).to(torch.bfloat16)  # 1 + 2^-8 -> 1 (even), 1 + 3 2^-8 -> 1 + 2^-6 (even)
    assert torch.equal(p.detach().cpu(), want)


# ---------------------------------------------------------------------------------------------------
# GPU lane: the real extension and compiled Triton
# ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("semantics", ["official", "torch"])
@pytest.mark.parametrize("mode,reserve_p", [("F", 0.3), ("F", 1.0), ("D", 0.3)])
def test_gpu_backends_match_torch(backend, dtype, semantics, mode, reserve_p):
    sizes = ((1024, 3072), (3072,), (300, 257), (5, 3, 7))
    kw = dict(lr=1e-3, weight_decay=0.01, reserve_p=reserve_p, mode=mode, semantics=semantics, seed=3)
    pa, pb = make_params(dtype, "cuda", sizes), make_params(dtype, "cuda", sizes)
    oa, ob = run_opt(pa, "torch", steps=5, **kw), run_opt(pb, backend, steps=5, **kw)
    assert_same_run(pa, oa, pb, ob, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["F", "D"])
def test_gpu_backends_reusing_their_tables_and_with_steps_that_differ(table_builds, backend, mode):
    sizes = ((1024, 3072), (3072,), (300, 257), (5, 3, 7))
    kw = dict(lr=1e-3, weight_decay=0.01, reserve_p=0.3, mode=mode, seed=3)
    pa, pb = make_params(torch.bfloat16, "cuda", sizes)[:5], make_params(torch.bfloat16, "cuda", sizes)[:5]
    oa, ob = run_opt(pa, "torch", steps=5, inplace=True, **kw), run_opt(pb, backend, steps=5, inplace=True, **kw)
    first = len(table_builds)
    assert 0 < first <= 3  # step 1's tables only
    assert_same_run(pa, oa, pb, ob, torch.bfloat16)
    pa, pb = make_params(torch.bfloat16, "cuda", sizes), make_params(torch.bfloat16, "cuda", sizes)
    oa, ob = run_opt(pa, "torch", lag=True, **kw), run_opt(pb, backend, lag=True, **kw)
    assert_same_run(pa, oa, pb, ob, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_f_masks_are_bit_exact(backend):
    params = make_params(torch.float32, "cuda", sizes=((1024, 3072), (300, 257), (7,)))
    got = drawn_keep_masks(backend, params, reserve_p=0.3, seed=2 ** 63 + 5)
    for i, (p, m) in enumerate(zip(params, got)):
        assert torch.equal(m.cpu(), keep_mask(2 ** 63 + 5, 2, i, p.shape, 0.3, backend="reference")), i
    for offset in (0, 2 ** 32 - 1000, 2 ** 32 - 999, 3):
        # shard_keep_bits draws seed 9, step 4, parameter 6, reserve_p 0.5
        want = keep_mask(9, 4, 6, (5000,), 0.5, offset=offset, backend="reference")
        assert torch.equal(shard_keep_bits(optimizer.REGISTRY._entries[backend].fn, offset, 5000, "cuda"), want)
        want = keep_mask(11, 3, 4, (5000,), 0.7, offset=offset, backend="reference")
        assert torch.equal(keep_mask(11, 3, 4, (5000,), 0.7, "cuda", offset, backend=backend).cpu(), want)


@pytest.mark.gpu
def test_gpu_auto_picks_cuda_and_matches_cpu_run():
    assert optimizer.REGISTRY.select("auto", optimizer.Probe(torch.device("cuda"), torch.bfloat16))[0] == "cuda"
    kw = dict(lr=1e-3, weight_decay=0.01, reserve_p=0.3, seed=3)
    pc, pg = make_params(torch.float32, "cpu"), make_params(torch.float32, "cuda")
    oc, og = run_opt(pc, "torch", **kw), run_opt(pg, "auto", **kw)
    for a, b in zip(pc, pg):
        moved = float((a.detach() - oc.initial[a]).abs().max())
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=2e-6, atol=1e-7 + 1e-3 * moved)


# ---------------------------------------------------------------------------------------------------
# Saved masks
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [True, False])
def test_save_and_load_masks(tmp_path, packed):
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Linear(13, 5))
    masks = {p: torch.rand(p.shape) < 0.3 for p in model.parameters() if p.dim() == 2}
    path = tmp_path / "masks.safetensors"
    save_masks(masks, model, path, packed=packed)
    other = copy.deepcopy(model)
    loaded = load_masks(other, path)
    by_name = dict(other.named_parameters())
    assert {id(p) for p in loaded} == {id(by_name["0.weight"]), id(by_name["1.weight"])}
    for (name, p) in model.named_parameters():
        if p in masks:
            assert torch.equal(loaded[by_name[name]], masks[p])
    ak.ChildTuningAdamW(other.parameters(), mode="D", masks=loaded)  # usable as they are
    smaller = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Linear(13, 4))
    with pytest.raises(ValueError, match=r"1.weight .* has shape \(5, 13\)"):
        load_masks(smaller, path)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        load_masks(torch.nn.Sequential(torch.nn.Linear(7, 13)), path)
    assert len(load_masks(torch.nn.Sequential(torch.nn.Linear(7, 13)), path, strict=False)) == 1


def test_packed_masks_file_is_small(tmp_path):
    model = torch.nn.Linear(512, 512)
    masks = {model.weight: torch.rand(512, 512) < 0.5}
    save_masks(masks, model, tmp_path / "p.safetensors")
    save_masks(masks, model, tmp_path / "b.safetensors", packed=False)
    assert (tmp_path / "p.safetensors").stat().st_size * 6 < (tmp_path / "b.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------------------
# The example
# ---------------------------------------------------------------------------------------------------

def test_train_child_tuning_example_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "examples/train_child_tuning.py", "--steps", "3", "--train-size", "64",
                          "--eval-size", "32", "--fisher-batches", "2", "--no-progress",
                          "--save-masks", str(tmp_path / "masks.safetensors")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, f"stdout:\n{out}\nstderr:\n{res.stderr[-4000:]}"
    needles = ["Fisher mask", "saved the Fisher mask", "Child-Tuning-F (loop): 3 steps", "Child-Tuning-D (loop): 3 steps"]
    if importlib.util.find_spec("accelerate") is not None:
        needles += ["Child-Tuning-F (Trainer): 3 steps", "Child-Tuning-D (Trainer): 3 steps"]
    else:
        needles += ["Trainer runs skipped: transformers' Trainer needs the accelerate package"]
    for needle in needles:
        assert needle in out, out


def test_fused_plan_rejects_bad_tensors_with_clear_errors():
    """fused.plan's per-tensor check (a cheap combined test first, then the detailed message)."""
    launched = []

    def plan(params, grads, ms, vs, masking=None, steps=None):
        masking = masking or Masking("F", 0.5, seed=1, indices=list(range(len(params))))
        launches, _ = fused.plan(params, grads, ms, vs, steps or [1] * len(params), masking, lr=1e-3, beta1=0.9,
                                 beta2=0.999, official=True)
        launched.extend(len(la) for la in launches)

    p = torch.zeros(5)
    f32 = lambda: torch.zeros(5)  # noqa: E731
    plan([p], [f32()], [f32()], [f32()])
    assert launched == [1]
    with pytest.raises(TypeError, match="float32/bfloat16/float16 parameters, got torch.float64"):
        plan([p.double()], [f32().double()], [f32()], [f32()])
    with pytest.raises(TypeError, match="gradient dtype torch.bfloat16 differs"):
        plan([p], [f32().bfloat16()], [f32()], [f32()])
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 must be torch.float32 of shape \(5,\)"):
        plan([p], [f32()], [torch.zeros(6)], [f32()])
    with pytest.raises(ValueError, match="exp_avg_sq of parameter 0 must be torch.float32"):
        plan([p], [f32()], [f32()], [f32().bfloat16()])
    with pytest.raises(ValueError, match=r"gradient of parameter 0 must be .* of shape \(5,\)"):
        plan([p], [torch.zeros(2, 3)], [f32()], [f32()])
    with pytest.raises(ValueError, match="packed mask of parameter 0 must be 1 int32 words"):
        plan([p], [f32()], [f32()], [f32()], Masking("D", bits=[torch.zeros(2, dtype=torch.int32)]))
    with pytest.raises(ValueError, match=r"steps in \[1, 2\^32\).*parameter 0 has step 4294967296, index 0"):
        plan([p], [f32()], [f32()], [f32()], steps=[2 ** 32])
    with pytest.raises(ValueError, match="parameter 0 has step 1, index -1"):
        plan([p], [f32()], [f32()], [f32()], Masking("F", 0.5, seed=1, indices=[-1]))
    assert launched == [1]


@pytest.mark.gpu
def test_gpu_fisher_quantile_uses_the_radix_select_and_matches_numpy():
    import numpy as np

    from apt_kernels.child_tuning.fisher import quantile_threshold

    g = torch.Generator().manual_seed(0)
    vals = torch.rand(1_000_003, generator=g) ** 2
    vals[::5] = 0.0
    for q in (0.0, 0.3, 0.9, 0.999, 1.0):
        want = float(np.percentile(vals.double().numpy(), 100 * q))
        assert quantile_threshold(vals.cuda(), q) == pytest.approx(want, rel=1e-6, abs=0.0), q
    # the torch-ops selection that serves past 2^31 values (and without Triton), on the GPU
    from apt_kernels.child_tuning.fisher import radix_kth

    srt = vals.sort().values
    parts = [vals[:400_000].cuda(), vals[400_000:].cuda()]
    for k in (1, 500_000, 1_000_003):
        assert radix_kth(parts, k, chunk=300_000) == float(srt[k - 1]), k


@pytest.mark.parametrize("argv,error", [(["--save-masks", "m.safetensors", "--modes", "F"], "add D to --modes"),
                                        (["--fisher-batches", "0"], "--fisher-batches must be >= 1")])
def test_train_child_tuning_example_argument_errors(argv, error):
    res = subprocess.run([sys.executable, "examples/train_child_tuning.py", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 2 and error in res.stderr
