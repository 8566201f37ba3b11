"""ChildTuningAdamW and fisher_mask against torch.optim.AdamW, the paper's optimizer and numpy."""

import copy
import math

import numpy as np
import pytest
import torch

import apt_kernels as ak
from apt_kernels.child_tuning import keep_mask
from apt_kernels.child_tuning.rng import philox4x32

BACKENDS = ["reference", "torch"]
DOC_EXAMPLE = [False, True, False, True, True, True, True, False]  # docs/math.md 4.3


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
    return m.to(dtype)


def fake_grads(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def step_together(a, opt_a, b, opt_b, steps):
    """The same fake gradients for both models at every step; their parameters must then agree."""
    for step in range(steps):
        fake_grads(a, step)
        fake_grads(b, step)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


class PaperChildTuningAdamW:
    """A literal copy of the Child-Tuning paper's optimizer step (old transformers AdamW + grad mask),
    with the F-mode Bernoulli draw replaced by the exposed keep mask of the same (seed, step, index)."""

    def __init__(self, params, lr, betas, eps, weight_decay, reserve_p, mode, masks=None, seed=0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.reserve_p, self.mode, self.masks, self.seed = reserve_p, mode, masks or {}, seed
        self.state = {}

    def step(self):
        for i, p in enumerate(self.params):
            grad = p.grad.data.clone()
            if self.mode == "D":
                if p in self.masks:
                    grad *= self.masks[p]
            else:
                st = self.state.get(i, {}).get("step", 0) + 1
                grad_mask = keep_mask(self.seed, st, i, p.shape, self.reserve_p).float()
                grad *= grad_mask / self.reserve_p
            state = self.state.setdefault(i, {})
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p.data)
                state["exp_avg_sq"] = torch.zeros_like(p.data)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            beta1, beta2 = self.betas
            state["step"] += 1
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(self.eps)
            step_size = self.lr
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
            p.data.addcdiv_(exp_avg, denom, value=-step_size)
            if self.wd > 0.0:
                p.data.add_(p.data, alpha=-self.lr * self.wd)


def test_philox_known_answers():
    # Random123's published known-answer vectors for philox4x32-10.
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = tuple(int(x) for x in philox4x32(*ctr, *key))
        assert got == want


def test_stream_definition_literally():
    """Element e is word e mod 4 of the draw for group e div 4 (docs/math.md 4.3), element by element."""
    from apt_kernels.child_tuning.rng import KEEP_BITS, MASK32, keep_threshold

    seed, step, index, p = 2 ** 64 - 7, 3, 5, 0.37
    for offset, n in [(0, 9), (2 ** 32 * 4 - 6, 11), (2 ** 34 + 1, 6), (3, 1)]:
        got = keep_mask(seed, step, index, (n,), p, offset=offset)
        for k in range(n):
            e = offset + k
            q, j = e // 4, e % 4
            x = int(philox4x32(q & MASK32, q >> 32, step, index, seed & MASK32, seed >> 32)[j])
            assert bool(got[k]) == ((x >> (32 - KEEP_BITS)) < keep_threshold(p)), (offset, k)
    # the documented example
    assert keep_mask(1234, 1, 0, (8,), 0.5).tolist() == DOC_EXAMPLE


@pytest.mark.parametrize("draw", ["numpy", "torch"])
def test_batched_keep_masks_equal_each_tensors_own_draw(monkeypatch, draw):
    """The torch backend draws a whole step's masks in one pass over concatenated counters (numpy on the CPU,
    philox4x32 on other devices, both run here): each tensor's mask is its own reference draw. Empty and
    one-element tensors, shards at unaligned offsets and past 2**32 groups, a step past 2**32 (counters
    are uint32), a seed past 2**63, and chunks of 7 groups so that tensors straddle chunk boundaries."""
    from apt_kernels.child_tuning import rng

    monkeypatch.setattr(rng, "_NUMPY_CHUNK", 7)
    if draw == "torch":
        monkeypatch.setattr(rng, "_draw_numpy", rng._draw_torch)
    shapes = [(5, 3), (0,), (1,), (37,), (4, 0, 2), (2, 9), (13,)]
    steps = [1, 2, 3, 1, 7, 2 ** 32 + 5, 4]
    indices = [0, 4, 2, 9, 1, 3, 2 ** 32 - 1]
    offsets = [0, 3, 2 ** 34 + 6, 1, 5, 2 ** 40 + 1, 2]
    seed, p = 2 ** 64 - 3, 0.3
    got = rng.keep_masks(seed, steps, indices, shapes, p, "cpu", offsets)
    assert len(got) == len(shapes)
    for g, t, i, sh, o in zip(got, steps, indices, shapes, offsets):
        assert g.dtype == torch.bool and g.shape == sh
        assert torch.equal(g, keep_mask(seed, t, i, sh, p, offset=o, backend="reference")), (t, i, sh, o)
    assert sum(m.sum().item() for m in got) > 0
    assert rng.keep_masks(seed, [], [], [], p) == []


def test_keep_rate_and_independence():
    p = 0.3
    m = keep_mask(7, 1, 0, (1 << 20,), p)
    rate = m.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / m.numel())
    others = [keep_mask(7, 2, 0, (1 << 20,), p), keep_mask(7, 1, 1, (1 << 20,), p), keep_mask(8, 1, 0, (1 << 20,), p)]
    for o in others:  # other step / parameter / seed: independent draws agree on ~p^2 + (1-p)^2
        agree = (o == m).float().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    assert torch.equal(keep_mask(7, 1, 0, (1 << 20,), p), m)  # deterministic
    assert torch.equal(keep_mask(7, 1, 0, (100,), p, offset=1000), m[1000:1100])  # shard = slice
    assert keep_mask(7, 1, 0, (1000,), 1.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_torch_semantics_full_reserve_equals_torch_adamw(backend, wd):
    a, b = small_model(), small_model()
    opt_a = ak.ChildTuningAdamW(a.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd,
                                reserve_p=1.0, semantics="torch", backend=backend)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd, foreach=False)
    step_together(a, opt_a, b, opt_b, 60)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["F", "D"])
def test_official_semantics_equals_paper_loop(backend, mode):
    a, b = small_model(), small_model()
    masks_a = masks_b = None
    if mode == "D":
        pa, pb = list(a.parameters()), list(b.parameters())
        raw = [torch.rand(p.shape) > 0.6 for p in pa[:3]]  # the last bias gets full updates
        masks_a, masks_b = dict(zip(pa, raw)), dict(zip(pb, raw))
    kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, reserve_p=0.35, mode=mode)
    opt_a = ak.ChildTuningAdamW(a.parameters(), **kw, masks=masks_a, seed=11, backend=backend)
    opt_b = PaperChildTuningAdamW(b.parameters(), **kw, masks=masks_b, seed=11)
    step_together(a, opt_a, b, opt_b, 40)
    if mode == "D":  # masked-out weights moved only by weight decay: p * (1 - lr*wd)^40
        p0 = list(small_model().parameters())[0]
        p1, m = list(a.parameters())[0], raw[0]
        torch.testing.assert_close(p1[~m], p0[~m] * (1 - 2e-3 * 0.01) ** 40, rtol=1e-5, atol=0)


@pytest.mark.parametrize("semantics", ["official", "torch"])
@pytest.mark.parametrize("mode", ["F", "D"])
def test_backends_agree(semantics, mode):
    models = [small_model(), small_model()]
    opts = []
    for m, backend in zip(models, BACKENDS):
        masks = {p: torch.ones(p.shape, dtype=torch.bool).tril() if p.dim() == 2 else None for p in m.parameters()}
        masks = {p: x for p, x in masks.items() if x is not None} if mode == "D" else None
        opts.append(ak.ChildTuningAdamW(m.parameters(), lr=1e-3, weight_decay=0.1, reserve_p=0.5, mode=mode,
                                        masks=masks, semantics=semantics, backend=backend))
    for step in range(20):
        for m, o in zip(models, opts):
            fake_grads(m, step)
            o.step()
    for pa, pb in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_keep_fp32_states(backend):
    m32, m16 = small_model(), small_model(torch.bfloat16)
    o32 = ak.ChildTuningAdamW(m32.parameters(), lr=1e-3, reserve_p=0.5, backend=backend)
    o16 = ak.ChildTuningAdamW(m16.parameters(), lr=1e-3, reserve_p=0.5, backend=backend)
    for p32, p16 in zip(m32.parameters(), m16.parameters()):
        p32.data.copy_(p16.data.float())
    for step in range(5):
        fake_grads(m16, step)
        for p32, p16 in zip(m32.parameters(), m16.parameters()):
            p32.grad = p16.grad.float()
        o32.step()
        o16.step()
        for p32, p16 in zip(m32.parameters(), m16.parameters()):
            assert o16.state[p16]["exp_avg"].dtype == torch.float32
            assert torch.equal(p16.data, p32.data.to(torch.bfloat16))  # one rounding per step
            p32.data.copy_(p16.data.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resume_is_bit_exact(backend):
    def make(m):
        return ak.ChildTuningAdamW(m.parameters(), lr=1e-2, reserve_p=0.4, seed=5, weight_decay=0.01, backend=backend)

    ref = small_model()
    opt = make(ref)
    for step in range(10):
        fake_grads(ref, step)
        opt.step()
    half = small_model()
    opt_h = make(half)
    for step in range(5):
        fake_grads(half, step)
        opt_h.step()
    saved_model, saved_opt = copy.deepcopy(half.state_dict()), copy.deepcopy(opt_h.state_dict())
    resumed = small_model()
    resumed.load_state_dict(saved_model)
    opt_r = ak.ChildTuningAdamW(resumed.parameters(), lr=0.5, reserve_p=0.9, seed=99, backend=backend)
    opt_r.load_state_dict(saved_opt)  # hyper-parameters and seed come back with the state
    for step in range(5, 10):
        fake_grads(resumed, step)
        opt_r.step()
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bf16_state_dict_keeps_fp32_moments():
    m = small_model(torch.bfloat16)
    opt = ak.ChildTuningAdamW(m.parameters(), lr=1e-3)
    fake_grads(m, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = ak.ChildTuningAdamW(m.parameters(), lr=1e-3)
    opt2.load_state_dict(sd)
    for p in m.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_grad_scaler_skips_inf_steps():
    m = small_model()
    opt = ak.ChildTuningAdamW(m.parameters(), lr=1e-2, reserve_p=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(4, 7)
    scaler.scale(m(x).sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in m.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(m(x).sum()).backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: inf found after unscale
    scaler.update()
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)
    assert opt.state_dict()["state"][0]["step"] == state_before["state"][0]["step"] == 1


def test_params_without_grad_are_skipped_and_grads_untouched():
    m = small_model()
    opt = ak.ChildTuningAdamW(m.parameters(), lr=1e-2, reserve_p=0.3)
    fake_grads(m, 0)
    frozen = m[2].weight
    frozen.grad = None
    w = frozen.detach().clone()
    g = m[0].weight.grad.clone()
    opt.step()
    assert torch.equal(frozen, w) and frozen not in opt.state
    assert torch.equal(m[0].weight.grad, g)


def test_sparse_grad_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ak.ChildTuningAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_param_groups_have_their_own_reserve_p_and_lr():
    m = small_model()
    opt = ak.ChildTuningAdamW([{"params": m[0].parameters(), "reserve_p": 0.1, "lr": 0.0},
                               {"params": m[2].parameters()}], lr=1e-2, reserve_p=1.0)
    before = [p.detach().clone() for p in m.parameters()]
    fake_grads(m, 0)
    opt.step()
    after = list(m.parameters())
    assert torch.equal(after[0], before[0])  # lr 0
    assert not torch.equal(after[2], before[2])
    assert opt.param_groups[0]["reserve_p"] == 0.1 and opt.param_groups[1]["reserve_p"] == 1.0


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, labels=None):
        h = self.embed(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        logits = self.head(h)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_fisher_mask_matches_paper_computation():
    torch.manual_seed(3)
    model = TinyClassifier()
    batches = [{"x": torch.randn(5, 6), "labels": torch.randint(0, 3, (5,))} for _ in range(4)]
    reserve_p = 0.3
    masks = ak.fisher_mask(model, batches, reserve_p, max_grad_norm=0.5, progress=False)
    # The paper's calculate_fisher on the same data: per-parameter clipping, numpy percentile.
    ref = copy.deepcopy(model)
    acc = {n: torch.zeros_like(p) for n, p in ref.named_parameters() if n.startswith("layers.")}
    for batch in batches:
        ref(**batch)["loss"].backward()
        for n, p in ref.named_parameters():
            if n in acc:
                torch.nn.utils.clip_grad_norm_(p, 0.5)
                acc[n] += p.grad ** 2 / len(batches)
        ref.zero_grad()
    r = np.concatenate([v.reshape(-1).numpy().astype(np.float64) for v in acc.values()])
    polar = np.percentile(r, (1 - reserve_p) * 100)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in masks) == sorted(acc)
    for p, m in masks.items():
        want = torch.from_numpy(acc[names[id(p)]].double().numpy() >= polar)
        assert torch.equal(m, want)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(kept - reserve_p) < 0.02
    assert all(p.grad is None for p in model.parameters())


def test_fisher_mask_drives_mode_d():
    model = TinyClassifier()
    batches = [{"x": torch.randn(5, 6), "labels": torch.randint(0, 3, (5,))} for _ in range(3)]
    masks = ak.fisher_mask(model, batches, 0.2, progress=False, select=lambda n, p: n.endswith("weight"))
    assert all(p.dim() == 2 for p in masks)
    opt = ak.ChildTuningAdamW(model.parameters(), lr=1e-2, mode="D", masks=masks)
    before = {p: p.detach().clone() for p in masks}
    model(**batches[0])["loss"].backward()
    opt.step()
    for p, m in masks.items():
        assert torch.equal(p[~m], before[p][~m])
        assert bool((p[m] != before[p][m]).all())
    assert sum(int(m.sum()) for m in masks.values()) > 0
    with pytest.raises(ValueError, match="at least one batch"):
        ak.fisher_mask(model, [], 0.2, progress=False)


def test_radix_kth_selects_exactly_across_tensors_and_chunks():
    """fisher_mask's selection without Triton on a GPU (and past 2^31 values): exact k-th smallest over
    several tensors, chunk boundaries inside them, ties, zeros, inf and NaN (the largest)."""
    from apt_kernels.child_tuning.fisher import quantile_threshold, radix_kth

    g = torch.Generator().manual_seed(3)
    parts = [torch.rand(700, generator=g) ** 3, torch.rand(13, 9, generator=g), torch.zeros(5), torch.rand(1, generator=g)]
    parts[0][::9] = 0.125  # ties
    parts[1][2, 3] = float("inf")
    parts[1][4, 4] = float("nan")
    flat = torch.cat([t.reshape(-1) for t in parts])
    srt = flat.sort().values  # NaN sorts last
    for k in (1, 2, 5, 6, 300, 700, flat.numel() - 1, flat.numel()):
        got = radix_kth(parts, k, chunk=64)
        want = float(srt[k - 1])
        assert (got == want) or (math.isnan(got) and math.isnan(want)), k
    with pytest.raises(ValueError, match="outside"):
        radix_kth(parts, 0)
    finite = [t.nan_to_num(posinf=2.0) for t in parts]
    for q in (0.0, 0.37, 0.9, 1.0):
        want = float(np.percentile(torch.cat([t.reshape(-1) for t in finite]).double().numpy(), 100 * q))
        assert quantile_threshold(finite, q) == pytest.approx(want, rel=1e-6, abs=0.0), q


def test_masks_for_f_mode_parameters_are_refused():
    """A mask given to a parameter of an F-mode group would be ignored (F draws its own): an error, not a
    silently dense update; a D group next to it takes its masks."""
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match='read in mode "D" only'):
        ak.ChildTuningAdamW(a.parameters(), lr=0.1, masks={a.weight: torch.zeros(3, 4, dtype=torch.bool)})
    opt = ak.ChildTuningAdamW([{"params": a.parameters(), "mode": "D"}, {"params": b.parameters()}], lr=0.1,
                              masks={a.weight: torch.zeros(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="in mode 'F'"):
        ak.ChildTuningAdamW([{"params": a.parameters(), "mode": "D"}, {"params": b.parameters()}], lr=0.1,
                            masks={b.weight: torch.zeros(3, 4, dtype=torch.bool)})
    before = a.weight.detach().clone()
    (a(torch.randn(2, 4)).sum() + b(torch.randn(2, 4)).sum()).backward()
    opt.step()
    assert torch.equal(a.weight, before)  # every element masked out


def test_parameter_dtypes_and_group_checks():
    """float64 (rounded to float32 every step) and complex parameters are refused; a rejected param group is
    not kept; a group's seed is checked like the constructor's."""
    for dtype in (torch.float64, torch.complex64):
        with pytest.raises(TypeError, match="float32, bfloat16 and float16 parameters"):
            ak.ChildTuningAdamW([torch.zeros(4, dtype=dtype, requires_grad=True)], lr=0.1)
    p1, p2 = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = ak.ChildTuningAdamW([p1], lr=0.1)
    with pytest.raises(ValueError, match="reserve_p"):
        opt.add_param_group({"params": [p2], "reserve_p": 0.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="seed"):
        opt.add_param_group({"params": [p2], "seed": -3})
    assert len(opt.param_groups) == 1


def test_fisher_mask_restores_every_module_mode():
    model = TinyClassifier()
    model.layers[1].eval()  # a submodule the user froze in eval mode
    batches = [{"x": torch.randn(5, 6), "labels": torch.randint(0, 3, (5,))}]
    ak.fisher_mask(model, batches, 0.3, progress=False)
    assert model.training and not model.layers[1].training and model.layers[0].training


def test_fisher_mask_refuses_non_finite_fisher_information():
    """A NaN gradient in one batch would make the quantile NaN and keep nothing (D mode then trains nothing):
    refused, naming the parameter."""
    model = TinyClassifier()
    batches = [{"x": torch.randn(5, 6), "labels": torch.randint(0, 3, (5,))} for _ in range(2)]

    def loss_fn(m, batch):
        loss = m(**batch)["loss"]
        return loss + m.layers[0].bias.sum() * float("nan")  # NaN reaches layers.0.bias only

    with pytest.raises(ValueError, match=r"layers\.0\.bias is not finite"):
        ak.fisher_mask(model, batches, 0.3, loss_fn=loss_fn, max_grad_norm=None, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_draw_with_global_parameter_indices(backend):
    """The F-mode parameter index counts across param groups: splitting the parameters into groups (with
    the same hyper-parameters) changes nothing, bit for bit."""
    results = []
    for grouped in (False, True):
        a, b = (torch.nn.Parameter(torch.zeros(64)) for _ in range(2))
        params = [{"params": [a]}, {"params": [b]}] if grouped else [a, b]
        opt = ak.ChildTuningAdamW(params, lr=0.1, reserve_p=0.5, seed=3, backend=backend)
        for _ in range(2):
            a.grad, b.grad = torch.ones(64), torch.ones(64)
            opt.step()
        results.append((a.detach().clone(), b.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0] != 0, results[0][1] != 0)  # the two parameters drew different masks


def test_load_state_dict_copies_the_state():
    """Stepping after load_state_dict(sd) leaves sd (and the optimizer it came from) untouched."""
    model = small_model()
    opt = ak.ChildTuningAdamW(model.parameters(), lr=1e-2, reserve_p=0.5, seed=1)
    fake_grads(model, 0)
    opt.step()
    sd = opt.state_dict()
    before = copy.deepcopy(sd)
    other = small_model()
    opt2 = ak.ChildTuningAdamW(other.parameters(), lr=1e-2, reserve_p=0.5, seed=1)
    opt2.load_state_dict(sd)
    fake_grads(other, 1)
    opt2.step()
    for i, state in before["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(sd["state"][i][name], value), name
                assert torch.equal(opt.state_dict()["state"][i][name], value), name


def test_fisher_mask_full_reserve_frozen_parameters_and_clipping():
    """reserve_p = 1 keeps every element (ties at the threshold included); frozen parameters get no mask;
    clipping acts on each parameter's gradient (a loss scaled 100x clips: the masks differ from unclipped)."""
    torch.manual_seed(3)
    model = TinyClassifier()
    batches = [{"x": torch.randn(5, 6), "labels": torch.randint(0, 3, (5,))} for _ in range(4)]
    full = ak.fisher_mask(model, batches, 1.0, progress=False)
    assert len(full) == 6 and all(bool(m.all()) for m in full.values())
    model.layers[0].requires_grad_(False)
    masks = ak.fisher_mask(model, batches, 0.3, progress=False)
    frozen = {id(p) for p in model.layers[0].parameters()}
    assert len(masks) == 4 and not frozen & {id(p) for p in masks}
    model.layers[0].requires_grad_(True)

    def scaled(m, b):
        return 100 * m(**b)["loss"]

    clipped = ak.fisher_mask(model, batches, 0.3, loss_fn=scaled, max_grad_norm=0.5, progress=False)
    unclipped = ak.fisher_mask(model, batches, 0.3, loss_fn=scaled, max_grad_norm=None, progress=False)
    assert any(not torch.equal(clipped[p], unclipped[p]) for p in clipped)


def test_layer_stack_is_the_largest_module_list_first_one_on_ties():
    """The default Fisher selection: the ModuleList holding the most parameters; between equal ones, the
    first in module order (deterministic); with no ModuleList, every parameter."""
    from apt_kernels.child_tuning.fisher import layer_stack_parameters

    def ids(module):
        return {id(p) for p in module.parameters()}

    class TwoStacks(torch.nn.Module):
        def __init__(self, first, second):
            super().__init__()
            self.a = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(first))
            self.b = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(second))

    tied = TwoStacks(2, 2)
    assert layer_stack_parameters(tied) == ids(tied.a)
    larger_second = TwoStacks(2, 3)
    assert layer_stack_parameters(larger_second) == ids(larger_second.b)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert layer_stack_parameters(plain) == ids(plain)


def test_per_step_helpers_copy_no_python_data_to_the_device(monkeypatch):
    """The torch paths that run every step (the F-mode keep masks, packing and unpacking bits) make their
    small tables on the device: torch.tensor(data, device=...) copies from host memory, which on CUDA
    synchronises the stream (the GPU then idles while Python prepares the next launch)."""
    from apt_kernels import bits
    from apt_kernels.child_tuning.rng import keep_mask_torch

    real, calls = torch.tensor, []

    def recording(*args, **kwargs):
        if kwargs.get("device") is not None:
            calls.append(kwargs["device"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording)
    m = keep_mask_torch(7, 3, 2, (5, 37), 0.4, device="cpu")
    words = bits.pack_bits(m, backend="torch")
    assert torch.equal(bits.unpack_bits(words, m.shape), m)
    assert calls == []
    torch.tensor([1], device="cpu")  # the recorder sees such a call
    assert calls == ["cpu"]
