"""Benchmark cases for PST's masked weight W' = M * (W0 + U V) with top-k importance scores.

Shapes (CUDA): W0 in bf16 (frozen), the trainable factors U, V, A, B, R, C in float32, rank 8,
sparsity 0.9, matrices 768x768, 768x3072, 3072x768 (BERT-base), 4096x4096, 4096x11008 (Llama-7B/8B).
CPU: float32, small matrices.

Peers (both compute the dense score matrix S in float32 and use the straight-through surrogate
W' = (M + S - S.detach()) * W, whose forward is M * W and whose backward is dS = G W, dW = (M + |W|) G,
the gradients of :func:`apt_kernels.pst_masked_weight`):
  * paper_dense_argsort: argsort of the flattened S, the k smallest indices zeroed in a dense mask.
  * torch_kthvalue: the k-th smallest score by ``kthvalue``, mask = S > threshold (ties may differ).
  * torch_topk: the indices of the k smallest scores by ``topk(largest=False, sorted=False)``, zeroed in
    a dense mask (CUDA's topk has a multi-block path; kthvalue works one block per slice).

Ours: every backend as ``auto`` would run it, and each fused backend's two selections apart (``cuda_bracket`` and
``triton_bracket``: the sampled bracket on every matrix; ``cuda_radix`` and ``triton_radix``: the radix passes
alone; ``cuda`` and ``triton`` take the bracket from their module's ``BRACKET_MIN`` entries on,
apt_kernels.pst.bracket.BRACKET_MIN by default).

Bytes: fwd 2 passes over W's bytes (read W0, write W'), bwd 2 (read G and W0: dS = G * W needs W), and
fwd+bwd the issue's floor of 3 passes (so its target is stricter than the 4 passes these add up to).
"""

from __future__ import annotations

import math

import torch

import apt_kernels
from apt_kernels.registry import Probe

from .harness import OUR_BACKENDS, Case, Contender, fill, our_backend

OP = "pst"
REGISTRY_OP = "pst_masked_weight"
RANK = 8
SPARSITY = 0.9
BETA = ALPHA1 = ALPHA2 = 1.0
GRAD_NAMES = ("u", "v", "a", "b", "r", "c")


def _inputs(n, k, rank, device, wdtype):
    def make(seed: int) -> dict:
        s = 1000 * (seed + 1)
        f = dict(device=device, dtype=torch.float32, requires_grad=True)
        return dict(
            w0=fill((n, k), seed=s + 1, device=device, dtype=wdtype, scale=0.02),
            u=fill((n, rank), seed=s + 2, scale=0.02, **f),
            v=fill((rank, k), seed=s + 3, scale=0.02, **f),
            a=fill((n, rank), seed=s + 4, scale=0.02, **f),
            b=fill((rank, k), seed=s + 5, scale=0.02, **f),
            r=fill((n,), seed=s + 6, scale=0.01, **f),
            c=fill((k,), seed=s + 7, scale=0.01, **f),
        )

    return make


def _dense(inp):
    """W (float32) and S (float32), differentiable."""
    w = inp["w0"].float() + BETA * (inp["u"] @ inp["v"])
    s = w.abs() + ALPHA1 * (inp["a"] @ inp["b"]) + ALPHA2 * (inp["r"][:, None] + inp["c"][None, :])
    return w, s


def _zero_at(shape_like: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    m = torch.ones(shape_like.numel(), device=shape_like.device, dtype=shape_like.dtype)
    m[idx] = 0.0
    return m.view_as(shape_like)


# Each peer's mask from the detached scores: the paper's argsort, kthvalue's threshold, topk's indices.
PEER_MASKS = {
    "paper_dense_argsort": lambda sd, n: _zero_at(sd, torch.argsort(sd.flatten())[:n]),
    "torch_kthvalue": lambda sd, n: (sd > sd.flatten().kthvalue(n).values).to(sd.dtype),
    "torch_topk": lambda sd, n: _topk_mask(sd, n),
}


def _topk_mask(sd: torch.Tensor, n: int) -> torch.Tensor:
    """topk on the smaller side: the n smallest to prune, or (pruning most) the numel - n largest to keep,
    as a user would write it."""
    flat = sd.flatten()
    if 2 * n <= flat.numel():
        return _zero_at(sd, torch.topk(flat, n, largest=False, sorted=False).indices)
    m = torch.zeros(flat.numel(), device=sd.device, dtype=sd.dtype)
    m[torch.topk(flat, flat.numel() - n, largest=True, sorted=False).indices] = 1.0
    return m.view_as(sd)


def build_peer(name: str, n_pruned: int):
    """Dense S, the peer's mask, and the straight-through surrogate (M + S - S.detach()) * W."""
    mask_of = PEER_MASKS[name]

    def build(inp):
        def run():
            w, s = _dense(inp)
            sd = s.detach()
            return ((mask_of(sd, n_pruned) + s - sd) * w).to(inp["w0"].dtype)

        return run

    return build


def build_ours(backend, bracket_min: int | None = None):
    """bracket_min: the backend's BRACKET_MIN (apt_kernels.pst.cuda_pst's or triton_pst's) during the call
    (None: as set)."""
    def build(inp):
        args = tuple(inp[x] for x in ("w0", "u", "v", "a", "b", "r", "c"))

        def call():
            return apt_kernels.pst_masked_weight(*args, sparsity=SPARSITY, beta=BETA, alpha1=ALPHA1, alpha2=ALPHA2,
                                                 backend=backend)

        if bracket_min is None:
            return call

        def run():
            import importlib

            module = importlib.import_module(f"apt_kernels.pst.{backend}_pst")
            saved, module.BRACKET_MIN = module.BRACKET_MIN, bracket_min
            try:
                return call()
            finally:
                module.BRACKET_MIN = saved

        return run

    return build


def make_case(n: int, k: int, *, device, wdtype, rank: int = RANK) -> Case:
    n_pruned = int(math.floor(n * k * SPARSITY))
    wbytes = n * k * torch.empty((), dtype=wdtype).element_size()
    probe = lambda inp: Probe.of(inp["w0"])  # noqa: E731
    contenders = [our_backend(REGISTRY_OP, b, build_ours(b), probe) for b in OUR_BACKENDS]
    # each fused backend's two selections apart: the sampled bracket on every matrix, and the radix passes alone
    # (forward only: the backward does not depend on how the mask was selected)
    contenders += [our_backend(REGISTRY_OP, b, build_ours(b, bracket_min=m), probe, name=f"{b}_{kind}",
                               modes=("fwd", "fwd+bwd"))
                   for b in ("cuda", "triton") for kind, m in (("bracket", 0), ("radix", -1))]
    contenders += [Contender(name, build_peer(name, n_pruned)) for name in PEER_MASKS]
    return Case(op=OP, name=f"{n}x{k}", params=dict(n=n, k=k, rank=rank, sparsity=SPARSITY,
                                                  w_dtype=str(wdtype).replace("torch.", ""), factor_dtype="float32"),
                make_inputs=_inputs(n, k, rank, device, wdtype), contenders=contenders,
                modes=("fwd", "bwd", "fwd+bwd"), grad_names=GRAD_NAMES,
                bytes={"fwd": 2 * wbytes, "bwd": 2 * wbytes, "fwd+bwd": 3 * wbytes})


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    if device.type != "cuda":
        shapes = [(256, 384)] if quick else [(256, 384), (768, 768), (768, 3072)]
        return [make_case(n, k, device=device, wdtype=torch.float32) for n, k in shapes]
    shapes = [(768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008)]
    if quick:
        shapes = [(768, 3072), (4096, 11008)]
    return [make_case(n, k, device=device, wdtype=torch.bfloat16) for n, k in shapes]
