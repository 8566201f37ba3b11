#!/usr/bin/env python
"""apt-kernels quickstart: the three ops on a tiny BERT, with no downloads.

Run from the repository root after `pip install -e .`:

    python examples/quickstart.py            # a few seconds on a laptop CPU
    python examples/quickstart.py --steps 200 --seed 1

It shows, in order:
  0. which backend every op picks on this machine (the same text as `python -m apt_kernels`);
  a. gated_prefix_attention (Adaptive Prefix Tuning's op) on random q/k/v with a prefix shared by the
     batch and an APT gate per example, checked against the reference backend (forward and backward);
  b. pst_masked_weight (PST) on one linear weight of the model at sparsity 0.9, with a backward;
  c. Child-Tuning: a Fisher mask over a few batches, then ChildTuningAdamW in mode "D" (that mask) and
     in mode "F" (a fresh random mask every step), each from the same initial model, on a synthetic
     task: label 1 iff token 7 appears in the sequence.

The math of every op is in docs/math.md; the backends in docs/backends.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import apt_kernels
from apt_kernels import ChildTuningAdamW, fisher_mask, gated_prefix_attention, pst_masked_weight
from marker_task import MARKER, batches, evaluate, make_dataset, tiny_bert  # examples/marker_task.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per Child-Tuning mode (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the F-mode masks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reserve-p", type=float, default=0.3, help="fraction of the child network (default 0.3)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the tensors here are tiny, and more threads mostly "
                        "add synchronisation, badly so on a busy machine)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------

def show_backends(device: str) -> None:
    print("== backends (see `python -m apt_kernels`) ==")
    for op in ("gated_prefix_attention", "pst_masked_weight", "child_tuning_adamw", "child_tuning_keep_mask"):
        dtype = torch.bool if op == "child_tuning_keep_mask" else torch.float32
        print(apt_kernels.explain(op, device, dtype))
    print()


def demo_attention(device: str, seed: int) -> None:
    print("== (a) gated_prefix_attention ==")
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, N, P, D, d = 2, 4, 2, 8, 4, 16, 64  # grouped-query attention: 2 query heads per kv head

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = rand(B, Hq, N, D), rand(B, Hkv, N, D), rand(B, Hkv, N, D)
    prefix_k, prefix_v = rand(Hkv, P, D), rand(Hkv, P, D)  # one prefix shared by the batch
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    keep[1, 5:] = False  # example 1 is padded after 5 tokens

    # The APT gate: alpha = sigmoid(mean-pool(h) @ W + b) per example, times a layer scalar lambda.
    h = rand(B, N, d)
    W, bias, lam = rand(d, P) * 0.1, torch.zeros(P, device=device), torch.ones((), device=device)
    pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    gate = (lam * torch.sigmoid(pooled @ W + bias))[:, None, None, :]  # (B, 1, 1, P)

    leaves = [t.requires_grad_() for t in (q, k, v, prefix_k, prefix_v, gate.detach())]
    results = {}
    for backend in ("auto", "reference"):
        for t in leaves:
            t.grad = None
        out = gated_prefix_attention(*leaves, attn_mask=keep, causal=True, backend=backend)
        out.square().sum().backward()
        results[backend] = (out.detach(), [t.grad.clone() for t in leaves])
    (out_a, grads_a), (out_r, grads_r) = results["auto"], results["reference"]
    names = ("q", "k", "v", "prefix_k", "prefix_v", "gate")
    picked = apt_kernels.explain("gated_prefix_attention", device, q.dtype, "prefix", "gate").splitlines()[-1].split()[-1]
    print(f"auto ran the {picked!r} backend")
    print(f"out {tuple(out_a.shape)}; gate {tuple(gate.shape)}; prefix {tuple(prefix_k.shape)} shared by the batch")
    print(f"max |auto - reference| forward: {float((out_a - out_r).abs().max()):.2e}")
    grad_diff = max(float((ga - gr).abs().max()) for ga, gr in zip(grads_a, grads_r))
    print(f"max |auto - reference| gradients ({', '.join(names)}): {grad_diff:.2e}")
    print()


def demo_pst(model, device: str, seed: int, sparsity: float = 0.9, rank: int = 4) -> None:
    print("== (b) pst_masked_weight ==")
    linear = model.bert.encoder.layer[0].attention.self.query
    w0 = linear.weight.detach()  # the frozen weight (n, k)
    n, k = w0.shape
    g = torch.Generator().manual_seed(seed)
    # Initialised as the paper's code: U, A small random; V, B, R, C zero (training starts from
    # magnitude pruning).
    u = (torch.randn(n, rank, generator=g) * 0.02).to(device).requires_grad_()
    a = (torch.randn(n, rank, generator=g) * 0.02).to(device).requires_grad_()
    v = torch.zeros(rank, k, device=device, requires_grad=True)
    b = torch.zeros(rank, k, device=device, requires_grad=True)
    r = torch.zeros(n, device=device, requires_grad=True)
    c = torch.zeros(k, device=device, requires_grad=True)

    w = pst_masked_weight(w0, u, v, a, b, r, c, sparsity=sparsity)
    ref = pst_masked_weight(w0, u, v, a, b, r, c, sparsity=sparsity, backend="reference")
    zeros = int((w == 0).sum())
    print(f"weight {linear.__class__.__name__} {tuple(w0.shape)} at sparsity {sparsity}: "
          f"{zeros} of {w0.numel()} zeroed, realised sparsity {zeros / w0.numel():.4f}")
    print(f"auto and reference masks equal: {bool(torch.equal(w != 0, ref != 0))}")

    x = torch.randn(8, k, generator=g).to(device)
    y = F.linear(x, w, linear.bias.detach())
    y.square().mean().backward()  # straight-through: gradients reach the score and update factors
    norms = ", ".join(f"{name} {float(t.grad.norm()):.2e}" for name, t in zip("UVABRC", (u, v, a, b, r, c)))
    print(f"gradient norms: {norms}")
    print("(U and A get zero gradient at this init because V = B = 0; V, B, R, C do not)")
    print()


def train(model, opt, train_batches, steps: int, desc: str) -> None:
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=0.5)
    for step in bar:
        batch = train_batches[step % len(train_batches)]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def demo_child_tuning(model, args) -> None:
    print("== (c) Child-Tuning ==")
    g = torch.Generator().manual_seed(args.seed)
    train_data, eval_data = make_dataset(512, g), make_dataset(256, g)
    train_batches = batches(train_data, args.batch_size, args.device, g)
    eval_batches = batches(eval_data, 128, args.device)
    init_state = copy.deepcopy(model.state_dict())

    loss0, acc0 = evaluate(model, eval_batches)
    print(f"task: label 1 iff token {MARKER} appears; {len(train_data['labels'])} train, "
          f"{len(eval_data['labels'])} eval examples")
    print(f"before training: eval loss {loss0:.4f}, accuracy {acc0:.3f}")

    # Mode D: a fixed mask from Fisher information over a few batches (inside the encoder layers only;
    # embeddings and the classifier get full updates).
    masks = fisher_mask(model, train_batches[:4], args.reserve_p)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    print(f"Fisher mask: {len(masks)} parameters of the encoder layers, {kept} of {total} elements kept "
          f"({kept / total:.3f}, reserve_p = {args.reserve_p})")

    for mode in ("D", "F"):
        model.load_state_dict(init_state)
        opt = ChildTuningAdamW(model.parameters(), lr=args.lr, weight_decay=0.01, reserve_p=args.reserve_p,
                               mode=mode, masks=masks if mode == "D" else None, seed=args.seed)
        t0 = time.perf_counter()
        train(model, opt, train_batches, args.steps, f"Child-Tuning-{mode}")
        loss, acc = evaluate(model, eval_batches)
        print(f"Child-Tuning-{mode} after {args.steps} steps ({time.perf_counter() - t0:.1f}s): "
              f"eval loss {loss0:.4f} -> {loss:.4f}, accuracy {acc0:.3f} -> {acc:.3f}")
    print()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.steps < 0:
        raise SystemExit("--steps must be >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"apt-kernels {apt_kernels.__version__}, torch {torch.__version__}, device {args.device}, seed {args.seed}")
    print()
    show_backends(args.device)
    demo_attention(args.device, args.seed)
    model = tiny_bert(args.seed).to(args.device)
    print(f"tiny BERT: {sum(p.numel() for p in model.parameters())} parameters")
    print()
    demo_pst(model, args.device, args.seed)
    demo_child_tuning(model, args)
    print(f"quickstart done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
