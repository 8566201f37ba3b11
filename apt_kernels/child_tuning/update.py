"""The masked AdamW update, reference and "torch" (foreach) backends.

A backend takes one param group's work: ``params, grads, exp_avgs, exp_avg_sqs, steps, keeps`` (lists
in step, ``steps`` already incremented, ``keeps[i]`` the bool keep-mask or None for "no masking") and
the hyper-parameters, and updates params and states in place. States are float32; bf16/fp16
parameters are updated in float32 and rounded back once.
"""

from __future__ import annotations

import math

import torch


def masked_grad(grad: torch.Tensor, keep: torch.Tensor | None, rescale: float | None) -> torch.Tensor:
    """keep * grad (/ reserve_p in mode F) in float32; the caller's .grad is never modified."""
    g = grad.float()
    if keep is None:
        return g
    if rescale is None:  # mode D: plain mask
        return g * keep
    return g * (keep.float() / rescale)  # mode F, as the paper's code: Bernoulli sample / reserve_p


def reference_update(params, grads, exp_avgs, exp_avg_sqs, steps, keeps, *, lr, beta1, beta2, eps,
                     weight_decay, rescale, semantics):
    """One parameter at a time, the formulas of the spec written out."""
    for p, grad, m, v, t, keep in zip(params, grads, exp_avgs, exp_avg_sqs, steps, keeps):
        g = masked_grad(grad, keep, rescale)
        w = p.detach().float()
        if semantics == "official":
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            w.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
            if weight_decay > 0:
                w.add_(w, alpha=-lr * weight_decay)
        else:  # torch.optim.AdamW
            if weight_decay != 0:
                w.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        p.detach().copy_(w)


def foreach_update(params, grads, exp_avgs, exp_avg_sqs, steps, keeps, *, lr, beta1, beta2, eps,
                   weight_decay, rescale, semantics):
    """The same update with torch._foreach_* ops: a few launches per dtype group instead of per tensor."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        ps = [params[i].detach() for i in idx]
        ws = ps if dtype == torch.float32 else [p.float() for p in ps]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        ts = [steps[i] for i in idx]
        gs = [masked_grad(grads[i], keeps[i], rescale) for i in idx]
        if semantics == "official":
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, gs, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, ms, denom, [-lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) for t in ts])
            if weight_decay > 0:
                torch._foreach_add_(ws, ws, alpha=-lr * weight_decay)
        else:
            if weight_decay != 0:
                torch._foreach_mul_(ws, 1 - lr * weight_decay)
            torch._foreach_lerp_(ms, gs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in ts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, ms, denom, [-lr / (1 - beta1 ** t) for t in ts])
        if ws is not ps:
            torch._foreach_copy_(ps, ws)
