#!/usr/bin/env python
"""PST fine-tuning of a small BERT-style classifier on generated data, then export to sparse nn.Linear.

Run from the repository root after `pip install -e .` (no downloads; a minute or two on a laptop CPU):

    python examples/train_pst.py
    python examples/train_pst.py --sparsity 0.8 --steps 600 --nm 2:4

What it does:
  1. builds a tiny BERT (transformers' BertForSequenceClassification, random weights) and "pre-trains" it
     densely on generated data (multi-label: which of the marker tokens 7, 9, 11, 13 occur in a sequence):
     this stands in for a pretrained checkpoint and gives PST its frozen W0;
  2. gives it a fresh 2-class head for the downstream task (label 1 iff exactly one of the tokens 7 and 9 occurs),
     apt_kernels.hf.apply_pst converts the 12 linear layers of its transformer blocks to PSTLinear (W0
     frozen; trainable: the low-rank factors U, V, A, B, R, C and the head) and fine-tunes while a
     SparsityScheduler ramps the sparsity from 0 to --sparsity along PST's cubic schedule (10% initial
     hold, 30% final hold);
  3. apt_kernels.hf.export_pst bakes W' into plain nn.Linear layers and the script checks the exported
     model against the PST model, then reports the realised sparsity and the trainable-parameter share.

Options: --steps (fine-tuning steps, default 400), --pretrain-steps (default 300), --sparsity (0.9),
--rank-w / --rank-s (8), --nm N:M (e.g. 2:4, instead of a global top-k), --backend (auto), --seed, --device.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import apt_kernels
from apt_kernels import SparsityScheduler
from apt_kernels.hf import apply_pst, export_pst, pst_layers, trainable_parameters
from apt_kernels.pst import REGISTRY as PST_REGISTRY
from apt_kernels.registry import Probe

VOCAB, SEQ, PAD = 100, 16, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="PST fine-tuning steps (default 400)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="dense pre-training steps (default 300)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final sparsity (default 0.9)")
    p.add_argument("--rank-w", type=int, default=8)
    p.add_argument("--rank-s", type=int, default=8)
    p.add_argument("--nm", default=None, help="N:M sparsity such as 2:4 instead of a global top-k")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of the PST factors and the head")
    p.add_argument("--backend", default="auto", help="PST backend: auto, torch, triton, cuda, reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


MARKERS = (7, 9, 11, 13)


def sequences(gen, size):
    """Random token sequences, each marker present (once) with probability 1/2; (tokens, presence (size, 4))."""
    x = torch.randint(1, VOCAB - len(MARKERS), (size, SEQ), generator=gen)
    for m in MARKERS:  # no marker by chance: skip over their values
        x = x + (x >= m).long()
    present = torch.rand(size, len(MARKERS), generator=gen) < 0.5
    pos = torch.stack([torch.randperm(SEQ, generator=gen)[: len(MARKERS)] for _ in range(size)])
    for j, m in enumerate(MARKERS):
        rows = present[:, j].nonzero().squeeze(1)
        x[rows, pos[rows, j]] = m
    return x, present


def pretrain_batch(gen, size, device):
    x, present = sequences(gen, size)
    return x.to(device), present.float().to(device)


def task_batch(gen, size, device):
    """The downstream task: label 1 iff exactly one of the markers 7 and 9 occurs (balanced; not linear in
    the pre-trained presence features, so the body must adapt, not only the head)."""
    x, present = sequences(gen, size)
    return x.to(device), (present[:, 0] ^ present[:, 1]).long().to(device)


def build_model(device):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=SEQ, num_labels=len(MARKERS), pad_token_id=PAD)
    return BertForSequenceClassification(cfg).to(device)


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    correct = 0
    for x, y in data:
        logits = model(input_ids=x).logits
        pred = (logits > 0).float() if y.dim() == 2 else logits.argmax(-1)
        correct += int((pred == y).all(-1).sum()) if y.dim() == 2 else int((pred == y).sum())
    model.train()
    return correct / sum(len(y) for _, y in data)


def train(model, steps, gen, args, desc, params, lr, scheduler=None):
    opt = torch.optim.AdamW(params, lr=lr)
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for _ in bar:
        if scheduler is None:  # pre-training: multi-label marker presence
            x, y = pretrain_batch(gen, args.batch_size, args.device)
            loss = F.binary_cross_entropy_with_logits(model(input_ids=x).logits, y)
        else:
            x, y = task_batch(gen, args.batch_size, args.device)
            loss = F.cross_entropy(model(input_ids=x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", target=f"{scheduler.current_sparsity:.3f}",
                            realised=f"{scheduler.realised_sparsity():.3f}")
        else:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    test_gen = torch.Generator().manual_seed(args.seed + 1)
    test_pre = [pretrain_batch(test_gen, 256, args.device) for _ in range(4)]
    test = [task_batch(test_gen, 256, args.device) for _ in range(4)]

    # say now, not after the dense pre-training, if the backend cannot run here
    PST_REGISTRY.select(args.backend, Probe(torch.device(args.device), torch.float32))
    model = build_model(args.device)
    train(model, args.pretrain_steps, gen, args, "dense pre-training", model.parameters(), lr=1e-3)
    print(f"pre-trained: all 4 marker labels right on {accuracy(model, test_pre):.3f} of the sequences")
    model.classifier = torch.nn.Linear(model.config.hidden_size, 2, device=args.device)  # the downstream head
    model.num_labels = model.config.num_labels = 2

    apply_pst(model, sparsity=args.sparsity, rank_w=args.rank_w, rank_s=args.rank_s, nm=nm, backend=args.backend)
    layers = pst_layers(model)
    trainable, total = trainable_parameters(model)
    print(f"PST on {len(layers)} linear layers; trainable parameters: {trainable} of {total} "
          f"({100 * trainable / total:.2f}%)")
    sched = SparsityScheduler(model, total_steps=args.steps)
    train(model, args.steps, gen, args, "PST fine-tuning", [p for p in model.parameters() if p.requires_grad],
          lr=args.lr, scheduler=sched)
    acc_pst = accuracy(model, test)
    print(f"PST model ({layers[0][1].last_backend} backend): target sparsity {sched.current_sparsity:.4f}, "
          f"realised {sched.realised_sparsity():.4f}, downstream accuracy {acc_pst:.3f}")

    model.eval()
    with torch.no_grad():
        before = torch.cat([model(input_ids=x).logits for x, _ in test])
    export_pst(model)
    with torch.no_grad():
        after = torch.cat([model(input_ids=x).logits for x, _ in test])
    zeros = numel = 0
    for name, _ in layers:
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        numel += w.numel()
    target = sum(layer.n_pruned for _, layer in layers) / numel
    print(f"exported {len(layers)} plain nn.Linear layers: {zeros} of {numel} weights are zero, realised sparsity "
          f"{zeros / numel:.4f} (target {target:.4f})")
    print(f"exported model matches the PST model: {torch.allclose(before, after, atol=1e-5, rtol=1e-5)} "
          f"(max |diff| {float((before - after).abs().max()):.2e}); downstream accuracy {accuracy(model, test):.3f}")
    print(f"apt_kernels {apt_kernels.__version__}: train_pst done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
