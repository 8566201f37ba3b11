#!/usr/bin/env python
"""Child-Tuning F and D on a small BERT classifier, as a plain training loop and with transformers' Trainer.

Run from the repository root after `pip install -e .` (no downloads: the model is built from a
BertConfig and the data is generated):

    python examples/train_child_tuning.py                 # well under a minute on a laptop CPU
    python examples/train_child_tuning.py --steps 300 --reserve-p 0.2 --save-masks masks.safetensors

The task: label 1 iff a marker token appears somewhere in a padded random sequence. In order:

  1. a Fisher mask for Child-Tuning-D over a few training batches (``apt_kernels.fisher_mask``), kept for
     the parameters inside the encoder layers (embeddings, pooler and classifier get full updates);
     optionally saved with ``apt_kernels.child_tuning.save_masks`` (and read back with ``load_masks``);
  2. a plain loop (forward, backward, gradient clipping, ``ChildTuningAdamW.step()``) in mode F (a fresh
     Bernoulli(reserve_p) gradient mask per step) and in mode D (the Fisher mask), from the same start;
  3. the same two runs with ``transformers.Trainer(..., optimizers=(ChildTuningAdamW(...), None))`` (the
     Trainer adds its linear learning-rate schedule and clipping; it needs the ``accelerate`` package).

Every run prints its eval loss and accuracy before and after. The optimizer picks its backend itself
(``backend="auto"``: the CUDA kernel on a GPU when the extension is built, else Triton, else torch).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time

import torch
from tqdm.auto import tqdm

import apt_kernels
from apt_kernels import ChildTuningAdamW, fisher_mask
from apt_kernels.child_tuning import load_masks, save_masks
from marker_task import MARKER, batches, evaluate, make_dataset, tiny_bert  # examples/marker_task.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the F-mode masks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1024, help="generated training examples (default 1024)")
    p.add_argument("--eval-size", type=int, default=256, help="generated evaluation examples (default 256)")
    p.add_argument("--reserve-p", type=float, default=0.3, help="fraction of the child network (default 0.3)")
    p.add_argument("--fisher-batches", type=int, default=8, help="training batches for the Fisher mask (default 8)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--modes", default="F,D", help="Child-Tuning modes to run, comma-separated (default F,D)")
    p.add_argument("--no-trainer", action="store_true", help="skip the transformers.Trainer runs")
    p.add_argument("--save-masks", metavar="PATH", help="also save the Fisher mask (safetensors) and reload it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.modes = [m.strip().upper() for m in args.modes.split(",") if m.strip()]
    if args.steps < 0 or any(m not in ("F", "D") for m in args.modes):
        p.error("--steps must be >= 0 and --modes a list of F and D")
    if args.fisher_batches < 1:
        p.error("--fisher-batches must be >= 1")
    if args.save_masks and "D" not in args.modes:
        p.error("--save-masks saves the Fisher mask of mode D: add D to --modes")
    return args


# ----------------------------------------------------------------------------------------------------
# Data for transformers' Trainer (the task and the model: examples/marker_task.py)
# ----------------------------------------------------------------------------------------------------

class DictDataset(torch.utils.data.Dataset):
    """Rows of a dict of tensors, as transformers' Trainer and its default collator expect."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __len__(self) -> int:
        return self.data["labels"].numel()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.data.items()}


# ----------------------------------------------------------------------------------------------------
# Child-Tuning
# ----------------------------------------------------------------------------------------------------

def param_groups(model, weight_decay: float) -> list[dict]:
    """The paper's grouping: no weight decay for biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, mode: str, masks, args) -> ChildTuningAdamW:
    return ChildTuningAdamW(param_groups(model, args.weight_decay), lr=args.lr, reserve_p=args.reserve_p, mode=mode,
                            masks=masks if mode == "D" else None, seed=args.seed)


def train_loop(model, opt, train_batches, steps: int, desc: str, progress: bool) -> None:
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=0.5, disable=not progress)
    for step in bar:
        loss = model(**train_batches[step % len(train_batches)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def train_with_trainer(model, opt, train_data, steps: int, args, output_dir: str) -> None:
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr, max_grad_norm=1.0, save_strategy="no", report_to=[],
                              logging_strategy="no", disable_tqdm=args.no_progress, seed=args.seed,
                              use_cpu=args.device == "cpu", dataloader_num_workers=0)
    # The Trainer builds a linear schedule around our optimizer; it uses the optimizer's own lr per group.
    trainer = Trainer(model=model, args=targs, train_dataset=DictDataset(train_data), optimizers=(opt, None))
    trainer.train()


def report(name: str, before: tuple[float, float], after: tuple[float, float], seconds: float, steps: int) -> None:
    print(f"{name}: {steps} steps in {seconds:.1f}s, eval loss {before[0]:.4f} -> {after[0]:.4f}, "
          f"accuracy {before[1]:.3f} -> {after[1]:.3f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    train_data, eval_data = make_dataset(args.train_size, g), make_dataset(args.eval_size, g)
    train_batches = batches(train_data, args.batch_size, args.device, g)
    eval_batches = batches(eval_data, 128, args.device)

    model = tiny_bert(args.seed).to(args.device)
    init_state = copy.deepcopy(model.state_dict())
    before = evaluate(model, eval_batches)
    print(f"apt-kernels {apt_kernels.__version__}, torch {torch.__version__}, device {args.device}")
    print(apt_kernels.explain("child_tuning_adamw", args.device, torch.float32).splitlines()[-1].strip())
    print(f"tiny BERT: {sum(p.numel() for p in model.parameters())} parameters; task: label 1 iff token {MARKER} "
          f"appears; {args.train_size} train / {args.eval_size} eval examples")
    print(f"before training: eval loss {before[0]:.4f}, accuracy {before[1]:.3f}")

    masks = None
    if "D" in args.modes:
        masks = fisher_mask(model, train_batches[:args.fisher_batches], args.reserve_p,
                            progress=not args.no_progress)
        kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
        print(f"Fisher mask: {len(masks)} parameters of the encoder layers, {kept} of {total} elements kept "
              f"({kept / total:.3f}, reserve_p = {args.reserve_p})")
        if args.save_masks:
            save_masks(masks, model, args.save_masks)
            assert all(torch.equal(masks[p], m) for p, m in load_masks(model, args.save_masks).items())
            print(f"saved the Fisher mask to {args.save_masks} ({os.path.getsize(args.save_masks)} bytes, packed)")

    for mode in args.modes:  # 2. the plain loop
        model.load_state_dict(init_state)
        opt = make_optimizer(model, mode, masks, args)
        t0 = time.perf_counter()
        train_loop(model, opt, train_batches, args.steps, f"Child-Tuning-{mode}", not args.no_progress)
        report(f"Child-Tuning-{mode} (loop)", before, evaluate(model, eval_batches), time.perf_counter() - t0,
               args.steps)

    if args.no_trainer:
        pass
    elif importlib.util.find_spec("accelerate") is None:
        print("Trainer runs skipped: transformers' Trainer needs the accelerate package (pip install accelerate)")
    else:  # 3. transformers' Trainer with our optimizer
        with tempfile.TemporaryDirectory() as out_dir:
            for mode in args.modes:
                model.load_state_dict(init_state)
                opt = make_optimizer(model, mode, masks, args)
                t0 = time.perf_counter()
                train_with_trainer(model, opt, train_data, args.steps, args, out_dir)
                report(f"Child-Tuning-{mode} (Trainer)", before, evaluate(model, eval_batches),
                       time.perf_counter() - t0, args.steps)
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
