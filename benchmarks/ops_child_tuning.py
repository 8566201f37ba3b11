"""Benchmark cases for the Child-Tuning optimizer step (ChildTuningAdamW).

Parameters are a list of float32 tensors with BERT's real shapes (embeddings, per layer the q/k/v/out
projections, FFN and LayerNorms, pooler): BERT-base (110M) and BERT-large (335M) on CUDA, a ~2M-param
BERT-shaped list on CPU. Gradients are random and fixed; each timed call is one ``optimizer.step()``.

Modes: F (reserve_p 0.3, a fresh Bernoulli mask per step) and D (a fixed random bool mask per tensor,
keeping 30%).

Peers:
  * torch_adamw_fused (CUDA) / torch_adamw_foreach (CPU): torch.optim.AdamW, no mask (the floor of
    "AdamW with a mask" is "AdamW without one").
  * adamw_plus_mask: the masked gradient made by a separate multiply (F: a fresh Bernoulli mask / p,
    D: the fixed mask), then the same torch.optim.AdamW.
  * paper_optimizer: the Child-Tuning paper's optimizer (the old transformers AdamW with the HACK
    block), per parameter.

Bytes: a nominal 28 B per element (params 4 + grads 4 + two states 8 read; params and two states
12 written); the D mode's 1-byte mask and any in-kernel random bits are not counted.
"""

from __future__ import annotations

import math

import torch

import apt_kernels
from apt_kernels.registry import Probe

from .harness import OUR_BACKENDS, Case, Contender, fill, our_backend

OP = "child_tuning"
REGISTRY_OP = "child_tuning_adamw"
RESERVE_P = 0.3
LR, BETAS, EPS, WD = 2e-5, (0.9, 0.999), 1e-6, 0.01
BYTES_PER_ELEMENT = 28

# name: (vocab, hidden, layers, intermediate, max positions)
MODELS = {
    "bert-base": (30522, 768, 12, 3072, 512),
    "bert-large": (30522, 1024, 24, 4096, 512),
    "bert-mini": (12000, 128, 2, 512, 512),  # ~2M parameters, for CPU
}


def bert_shapes(vocab: int, hidden: int, layers: int, inter: int, max_pos: int = 512) -> list[tuple[int, ...]]:
    """Parameter shapes of Hugging Face's BertModel (with pooler), in named_parameters() order."""
    h = hidden
    shapes = [(vocab, h), (max_pos, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 3  # query, key, value
        shapes += [(h, h), (h,), (h,), (h,)]  # attention output dense + LayerNorm
        shapes += [(inter, h), (inter,)]  # intermediate
        shapes += [(h, inter), (h,), (h,), (h,)]  # output dense + LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def _inputs(shapes, mode, device):
    def make(seed: int) -> dict:
        s = 100_000 * (seed + 1)
        params, masks = [], []
        for i, shape in enumerate(shapes):
            p = fill(shape, seed=s + 3 * i, device=device, scale=0.02, requires_grad=True)
            p.grad = fill(shape, seed=s + 3 * i + 1, device=device, scale=1e-3)
            params.append(p)
            if mode == "D":
                masks.append(fill(shape, seed=s + 3 * i + 2, device=device, kind="rand") < RESERVE_P)
        return dict(params=params, masks=masks)

    return make


# ------------------------------------------------------------------------------------------ peers


class PaperChildTuningAdamW(torch.optim.Optimizer):
    """The Child-Tuning paper's optimizer: old transformers AdamW + the gradient-mask HACK, per parameter.

    One deviation for benchmarking: the paper masks ``p.grad`` in place (``grad *= mask``); a benchmark
    calls ``step()`` again on the same gradient, where in-place masking would zero (and rescale) it step
    after step, so this copy writes the masked gradient to a new tensor: the same reads and writes.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 reserve_p=1.0, mode=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias))
        self.gradient_mask = None
        self.reserve_p = reserve_p
        self.mode = mode

    def set_gradient_mask(self, gradient_mask):
        self.gradient_mask = gradient_mask

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data

                # =================== HACK BEGIN =======================
                if self.mode is not None:
                    if self.mode == "ChildTuning-D":
                        if p in self.gradient_mask:
                            grad = grad * self.gradient_mask[p]  # paper: grad *= ...
                    else:
                        # ChildTuning-F
                        grad_mask = torch.distributions.Bernoulli(grad.new_full(size=grad.size(), fill_value=self.reserve_p))
                        grad = grad * (grad_mask.sample() / self.reserve_p)  # paper: grad *= ...
                # =================== HACK END =======================

                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])

                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                p.data.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.data.add_(p.data, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _torch_adamw(params, device):
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)


def build_torch_adamw(device):
    def build(inp):
        return _torch_adamw(inp["params"], device).step

    return build


def build_adamw_plus_mask(mode, device):
    def build(inp):
        params = inp["params"]
        grads0 = [p.grad for p in params]  # pristine gradients; p.grad gets the masked copy each step
        opt = _torch_adamw(params, device)
        masks = inp["masks"]

        def run():
            if mode == "D":
                masked = torch._foreach_mul(grads0, masks)
            else:
                keeps = [torch.empty_like(g).bernoulli_(RESERVE_P) for g in grads0]
                masked = torch._foreach_mul(grads0, keeps)
                torch._foreach_mul_(masked, 1.0 / RESERVE_P)
            for p, g in zip(params, masked):
                p.grad = g
            opt.step()

        return run

    return build


def build_paper(mode):
    def build(inp):
        params = inp["params"]
        opt = PaperChildTuningAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, reserve_p=RESERVE_P,
                                    mode="ChildTuning-F" if mode == "F" else "ChildTuning-D")
        if mode == "D":
            opt.set_gradient_mask(dict(zip(params, inp["masks"])))
        return opt.step

    return build


# ------------------------------------------------------------------------------------------ ours


def build_ours(backend, mode):
    def build(inp):
        params = inp["params"]
        masks = dict(zip(params, inp["masks"])) if mode == "D" else None
        opt = apt_kernels.ChildTuningAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, reserve_p=RESERVE_P,
                                           mode=mode, masks=masks, backend=backend)
        return opt.step

    return build


def make_case(model: str, mode: str, *, device, shapes=None) -> Case:
    device = torch.device(device)
    shapes = shapes or bert_shapes(*MODELS[model])
    numel = sum(math.prod(s) for s in shapes)
    contenders = [our_backend(REGISTRY_OP, b, build_ours(b, mode), lambda inp: Probe.of(inp["params"][0]))
                  for b in OUR_BACKENDS]
    contenders += [Contender("torch_adamw_fused" if device.type == "cuda" else "torch_adamw_foreach", build_torch_adamw(device)),
                   Contender("adamw_plus_mask", build_adamw_plus_mask(mode, device)),
                   Contender("paper_optimizer", build_paper(mode))]
    return Case(op=OP, name=f"{model}-{mode}", params=dict(model=model, mode=mode, numel=numel, tensors=len(shapes),
                                                          reserve_p=RESERVE_P, dtype="float32"),
                make_inputs=_inputs(shapes, mode, device), contenders=contenders, modes=("fwd",),
                bytes={"fwd": BYTES_PER_ELEMENT * numel})


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    if device.type != "cuda":
        models = ["bert-mini"]
    else:
        models = ["bert-base"] if quick else ["bert-base", "bert-large"]
    return [make_case(m, mode, device=device) for m in models for mode in ("F", "D")]
