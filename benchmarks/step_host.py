"""Host work of one APT training step: ``python -m benchmarks.step_host [--steps 30]``.

The H200 run of 2026-11-22 timed the small Llama step at 40.5 ms (APT) and 28.3 ms (PEFT prefix tuning with
SDPA) while the eight heaviest kernel classes of our step summed to 7.6 ms: at that size a step is mostly host time, and it is
what the host spends issuing it. This script counts that work on any machine, for the models of
``benchmarks/ops_apt_train.py`` shrunk to hidden size 64 (same layer counts, head layout, prefix lengths,
bf16 weights, float32 trainable parameters and autocast as there, but B = 2, N = 64), so that the CPU's own
arithmetic is small beside the dispatch:

* **ops**: the aten operations one step (forward, backward, AdamW) dispatches, and how many of them are not
  views (each of those is a kernel launch on a GPU);
* **host us**: the wall clock of a step (the best of three medians of ``--steps``, one CPU thread), with
  Triton's launch path stubbed
  (``benchmarks/triton_stub.py``) so that our kernels cost their launch path and nothing else.

Our contenders run the "triton" backend through the stub; PEFT's run SDPA on the CPU. ``apt_per_layer`` and
``prefix_per_layer`` (asked for by name) have each layer select and cast its own slice of the adapter's stacked
parameters, as before the per-forward sharing of ``APTAdapter._shared``. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def _models():
    import transformers as tf

    bert = tf.BertConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128,
                         vocab_size=1000, num_labels=2, max_position_embeddings=128)
    llama = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=1, vocab_size=1000, num_labels=2, pad_token_id=0)
    return [("bert-12L-p16", bert, tf.BertForSequenceClassification, 16),
            ("llama-8L-p64", llama, tf.LlamaForSequenceClassification, 64)]


def _contenders(P):
    from apt_kernels.hf import apply_apt, apply_prefix_tuning

    def peft(attn):
        def setup(model):
            from peft import PrefixTuningConfig, TaskType, get_peft_model

            model.set_attn_implementation(attn)
            return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=P))

        return setup

    def per_layer(setup):  # each layer selects and casts its own slice (what the per-forward sharing replaced)
        def build(model):
            model = setup(model)
            model.apt_adapter._shared = lambda *args, **kwargs: None
            return model

        return build

    ours = {"apt": lambda m: apply_apt(m, P, backend="triton"),
            "prefix": lambda m: apply_prefix_tuning(m, P, backend="triton")}
    return {**ours, "peft_prefix_sdpa": peft("sdpa"), **{f"{n}_per_layer": per_layer(f) for n, f in ours.items()}}


def _step(model, dtype):
    """As ``ops_apt_train`` steps: the model in ``dtype`` with float32 trainable parameters, under autocast."""
    import torch

    model.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(steps: int = 30, B: int = 2, N: int = 64, only=None, rounds: int = 3, dtype=None) -> list[dict]:
    """One row per model and contender: the operation census of a step and its host time, the best of
    ``rounds`` medians of ``steps`` steps (the contenders of a model take turns: a slow spell of the machine
    falls on all of them). One CPU thread: the ops' own arithmetic stays serial, as the host's work is."""
    from . import triton_stub

    triton_stub.install()
    import torch

    from apt_kernels.attention import fused
    from apt_kernels.testing import OpCount

    dtype = dtype or torch.bfloat16
    fused.run = lambda *args: None  # no kernel runs: outputs stay as allocated,
    torch.set_flush_denormal(True)  # and whatever they hold must not slow the CPU's arithmetic after them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for case, cfg, cls, P in _models():
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(5, cfg.vocab_size, (B, N), generator=g)
            mask = torch.ones(B, N, dtype=torch.long)
            mask[1, N // 2:] = 0
            batch = dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
            timed = []
            for name, setup in _contenders(P).items():
                if only and name not in only:
                    continue
                torch.manual_seed(0)
                try:
                    model = setup(cls(copy.deepcopy(cfg)))
                except ImportError as e:  # peft is not installed
                    rows.append(dict(case=case, contender=name, skipped=str(e)))
                    continue
                model.train()
                step = _step(model, dtype)
                for _ in range(3):
                    step(batch)
                counter = OpCount()
                with counter:
                    step(batch)
                row = dict(case=case, contender=name, ops=counter.ops, kernels=sum(counter.kernels.values()),
                           host_us=float("inf"), by_op=dict(counter.kernels))
                rows.append(row)
                timed.append((row, step))
            for _ in range(rounds):
                for row, step in timed:
                    times = []
                    for _ in range(steps):
                        t = time.perf_counter()
                        step(batch)
                        times.append(time.perf_counter() - t)
                    row["host_us"] = min(row["host_us"], statistics.median(times) * 1e6)
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="contenders to run (default: all but the *_per_layer ablations)")
    parser.add_argument("--ops", action="store_true", help="also list each step's non-view ops by name")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    import torch
    import triton

    print(f"one training step's host work (torch {torch.__version__}, triton {triton.__version__}; "
          f"hidden 64, B=2, N=64, {args.dtype} model under autocast, float32 trainables; our kernels' launches "
          "stubbed)")
    print(f"{'case':14s} {'contender':18s} {'aten ops':>8s} {'non-view':>8s} {'host us':>9s}")
    only = args.only or ("apt", "prefix", "peft_prefix_sdpa")
    for r in measure(args.steps, only=only, dtype=getattr(torch, args.dtype)):
        if "skipped" in r:
            print(f"{r['case']:14s} {r['contender']:18s} skipped: {r['skipped']}")
            continue
        print(f"{r['case']:14s} {r['contender']:18s} {r['ops']:8d} {r['kernels']:8d} {r['host_us']:9.0f}")
        if args.ops:
            print("    " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_op"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
