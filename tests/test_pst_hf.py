"""PSTLinear, SparsityScheduler, apply_pst / export_pst on transformers models, and examples/train_pst.py."""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import apt_kernels as ak
from apt_kernels.hf import apply_pst, export_pst, pst_layers, trainable_parameters
from apt_kernels.pst.schedule import cubic_sparsity

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK_LINEARS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]


def tiny_bert(num_labels=2, seed=0, hidden=32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def ids(n=3, seq=10):
    return torch.randint(1, 50, (n, seq))


# --------------------------------------------------------------------------------------------------
# PSTLinear
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pstlinear_is_a_drop_in_linear(dtype):
    lin = nn.Linear(24, 40).to(dtype)
    layer = ak.PSTLinear.from_linear(lin, sparsity=0.0)
    x = torch.randn(5, 7, 24).to(dtype)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # shared, not copied
    assert not layer.weight.requires_grad
    assert torch.equal(layer(x), lin(x))  # V = B = 0 at init and sparsity 0: W' = W0 exactly
    assert layer.pst_u.dtype == torch.float32  # factors train in float32 under a half-precision weight
    layer.sparsity = 0.5
    y = layer(x)
    assert y.dtype == dtype and y.shape == (5, 7, 40)
    y.float().sum().backward()
    assert all(p.grad is not None for p in layer.factors())
    assert layer.weight.grad is None
    assert layer.realised_sparsity == 0.5
    mask = layer.mask()
    # at init the mask is magnitude pruning of W0
    assert torch.equal(mask, ak.pst_mask(lin.weight.float(), *[p.detach() for p in layer.factors()], sparsity=0.5))


def test_pstlinear_constructor_state_dict_and_repr():
    layer = ak.PSTLinear(16, 8, bias=False, sparsity=0.75, rank_w=3, rank_s=2)
    names = dict(layer.named_parameters())
    assert set(names) == {"weight", "pst_u", "pst_v", "pst_a", "pst_b", "pst_r", "pst_c"}
    assert names["pst_u"].shape == (8, 3) and names["pst_v"].shape == (3, 16) and names["pst_b"].shape == (2, 16)
    assert torch.count_nonzero(layer.pst_v) == 0 and torch.count_nonzero(layer.pst_c) == 0
    assert set(layer.state_dict()) == set(names) | {"_extra_state"}  # the sparsity
    assert "sparsity=0.75" in repr(layer) and "rank_w=3" in repr(layer)
    assert int((layer.masked_weight() == 0).sum()) == 96
    with pytest.raises(ValueError, match="sparsity must lie in"):
        ak.PSTLinear(4, 4, sparsity=1.0)
    with pytest.raises(ValueError, match="multiple of M = 4"):
        ak.PSTLinear(6, 4, nm=(2, 4))
    with pytest.raises(TypeError, match="unexpected PSTLinear options"):
        ak.PSTLinear.from_linear(nn.Linear(4, 4), spasity=0.5)
    for bad in (1.0, -0.1, float("nan")):  # the scheduler's setter validates too
        with pytest.raises(ValueError, match="sparsity must"):
            layer.sparsity = bad
    assert layer.sparsity == 0.75 and int((layer.masked_weight() == 0).sum()) == 96
    layer.sparsity = 0.5
    assert int((layer.masked_weight() == 0).sum()) == 64


def test_pstlinear_nm_and_to_linear():
    layer = ak.PSTLinear.from_linear(nn.Linear(32, 6), nm=(2, 4))
    assert layer.final_sparsity == 0.5 and layer.n_pruned == 96
    layer.sparsity = 0.5  # N:M fixes the sparsity
    with pytest.raises(ValueError, match="fixed at 1 - N/M = 0.5"):
        layer.sparsity = 0.6
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and lin.bias is layer.bias
    groups = (lin.weight != 0).view(6, 8, 4)
    assert torch.all(groups.sum(-1) == 2)
    assert not torch.signbit(lin.weight[lin.weight == 0]).any()  # exact +0.0
    with pytest.raises(ValueError, match="need CUDA"):
        layer.to_linear(semi_structured=True)


# --------------------------------------------------------------------------------------------------
# SparsityScheduler
# --------------------------------------------------------------------------------------------------

def test_cubic_schedule_values():
    s = lambda t: cubic_sparsity(t, 100, 0.0, 0.9)  # noqa: E731  holds: [0, 10) initial, [70, 100] final
    assert s(0) == s(9) == 0.0
    assert s(10) == 0.0 and s(70) == s(100) == 0.9
    assert math.isclose(s(40), 0.9 + (0.0 - 0.9) * (1 - 30 / 60) ** 3)
    vals = [s(t) for t in range(101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert cubic_sparsity(5, None, 0.1, 0.9) == 0.1
    assert cubic_sparsity(50, 100, 0.2, 0.8, 0.5, 0.5) == 0.8  # no ramp left: jump at the end of the hold


@pytest.mark.parametrize("compiled", [False, True])
def test_scheduler_plain_loop_and_realised_sparsity(compiled):
    from torch._dynamo.testing import CompileCounterWithBackend

    model = apply_pst(tiny_bert(), sparsity=0.8)
    sched = ak.SparsityScheduler(model, total_steps=20, initial_fraction=0.1, final_fraction=0.3)
    layers = [m for _, m in pst_layers(model)]
    assert len(sched.layers) == 12 and all(m.sparsity == 0.0 for m in layers)
    seen = []
    x = ids()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, fullgraph=True, backend=counter) if compiled else model
    for step in range(20):
        forward(input_ids=x).logits.sum().backward()
        seen.append((sched.current_sparsity, sched.realised_sparsity()))
        sched.step()
    assert counter.frame_count == int(compiled)  # compiled once for the whole ramp
    targets = [t for t, _ in seen]
    assert targets[0] == targets[1] == 0.0 and all(b >= a for a, b in zip(targets, targets[1:]))
    assert all(t == r for t, r in seen)  # exact selection: realised == target at every step
    total = sum(m.weight.numel() for m in layers)
    assert seen[-1][0] == sum(math.floor(m.weight.numel() * 0.8) for m in layers) / total
    assert repr(sched).startswith("SparsityScheduler(step 20/20")
    state = sched.state_dict()
    other = ak.SparsityScheduler(model, final_sparsity=0.5)
    other.load_state_dict(state)
    assert other.step_count == 20 and all(m.sparsity == 0.5 for m in layers)
    with pytest.raises(ValueError, match="no PSTLinear"):
        ak.SparsityScheduler(nn.Linear(3, 3))
    forgot = ak.SparsityScheduler(model)  # a plain loop without total_steps would never leave s(0)
    with pytest.raises(ValueError, match="needs total_steps"):
        forgot.step()


def test_scheduler_as_trainer_callback():
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    model = apply_pst(tiny_bert(), sparsity=0.9)
    sched = ak.SparsityScheduler(model)  # total steps taken from the Trainer
    handler = CallbackHandler([sched], model, None, None, None)
    state, control = TrainerState(max_steps=50, global_step=0), TrainerControl()
    handler.on_init_end(None, state, control)
    handler.on_train_begin(None, state, control)
    assert sched.total_steps == 50
    for step in (0, 10, 30, 40):
        state.global_step = step
        handler.on_step_begin(None, state, control)
        assert sched.current_sparsity == pytest.approx(cubic_sparsity(step, 50, 0.0, 0.9), abs=1e-3)
    handler.on_epoch_end(None, state, control)  # events the scheduler does not use are no-ops
    logs = {}
    handler.on_log(None, state, control, logs)
    assert logs["pst_sparsity"] == pytest.approx(0.9, abs=1e-3) and "pst_realised_sparsity" in logs
    with pytest.raises(AttributeError):
        sched.not_an_event


def test_scheduler_values_reach_the_trainer_log_history(tmp_path):
    """A real Trainer: the values land in state.log_history (Trainer copies the logs there before on_log)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = apply_pst(tiny_bert(), sparsity=0.9)
    data = [{"input_ids": ids()[0], "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(ak.SparsityScheduler(model))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("pst_sparsity" in h and "pst_realised_sparsity" in h for h in logged)


def test_state_dict_keeps_the_sparsity_and_the_conv1d_layout():
    """A checkpoint reloads at the sparsity it was saved at (a schedule's position; .to(dtype) keeps it exact),
    and a GPT-2 layer's W0 is saved in Conv1D's (in, out) layout under Conv1D's key, so the base class reads
    the same weights (a square c_proj loaded transposed before)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layer = ak.PSTLinear(24, 16, sparsity=0.9)
    layer.sparsity = 0.6337
    fresh = ak.PSTLinear(24, 16, sparsity=0.9)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.sparsity == 0.6337 and torch.equal(fresh.masked_weight(), layer.masked_weight())
    assert layer.to(torch.bfloat16).state_dict()["_extra_state"].item() == 0.6337

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    base = GPT2LMHeadModel(cfg).eval()
    want = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_pst(base, sparsity=0.5)
    sd = model.state_dict()
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"):
        assert torch.equal(sd[key], want[key])
    torch.manual_seed(1)
    other = apply_pst(GPT2LMHeadModel(cfg).eval(), sparsity=0.9)
    other.load_state_dict(sd)
    x = ids()
    with torch.no_grad():
        assert torch.equal(other(input_ids=x).logits, model(input_ids=x).logits)
    assert all(layer.sparsity == 0.5 for _, layer in pst_layers(other))
    assert torch.equal(sd["transformer.h.0.attn.c_proj.weight"], want["transformer.h.0.attn.c_proj.weight"])
    # a checkpoint from before (no _extra_state, W0 stored (out, in)) still loads, strict, as it was saved
    old = {k: v.t() if k.endswith("attn.c_proj.weight") or k.endswith("c_attn.weight") or ".mlp.c_" in k and
           k.endswith("weight") else v for k, v in sd.items() if not k.endswith("_extra_state")}
    third = apply_pst(GPT2LMHeadModel(cfg).eval(), sparsity=0.5)
    third.load_state_dict(old)
    assign = apply_pst(GPT2LMHeadModel(cfg).eval(), sparsity=0.9)
    assign.load_state_dict(sd, assign=True)
    with torch.no_grad():
        assert torch.equal(third(input_ids=x).logits, model(input_ids=x).logits)
        assert torch.equal(assign(input_ids=x).logits, model(input_ids=x).logits)
    assert all(layer.weight.is_contiguous() for _, layer in pst_layers(assign))


# --------------------------------------------------------------------------------------------------
# apply_pst / export_pst
# --------------------------------------------------------------------------------------------------

def test_apply_pst_converts_block_linears_and_freezes_the_rest():
    model = tiny_bert()
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    apply_pst(model, sparsity=0.0)
    names = [n for n, _ in pst_layers(model)]
    assert names == [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in BLOCK_LINEARS]
    assert isinstance(model.bert.pooler.dense, nn.Linear) and isinstance(model.classifier, nn.Linear)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)  # sparsity 0 at init: the same function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in names for f in ("pst_u", "pst_v", "pst_a", "pst_b", "pst_r", "pst_c")} \
        | {"classifier.weight", "classifier.bias"}
    t, total = trainable_parameters(model)
    assert t == sum(model.get_parameter(n).numel() for n in trainable) and t < total


def test_apply_pst_targets_head_and_bias_options():
    model = apply_pst(tiny_bert(), targets=["query$", "value$"], train_head=False, train_bias=True, rank_w=2)
    names = [n for n, _ in pst_layers(model)]
    assert names == [f"bert.encoder.layer.{i}.attention.self.{s}" for i in range(2) for s in ("query", "value")]
    assert not model.classifier.weight.requires_grad
    assert all(m.bias.requires_grad and m.pst_u.shape[1] == 2 for _, m in pst_layers(model))
    model = apply_pst(tiny_bert(), targets=lambda name, mod: mod.out_features == 64)
    assert [n for n, _ in pst_layers(model)] == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    with pytest.raises(ValueError, match="no linear layers"):
        apply_pst(tiny_bert(), targets="nothing_matches")
    with pytest.raises(ValueError, match="inside transformer blocks"):
        apply_pst(nn.Sequential(nn.Linear(3, 3)))


def test_apply_pst_gpt2_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    apply_pst(model, sparsity=0.0)
    assert len(pst_layers(model)) == 8  # c_attn, c_proj, c_fc, mlp c_proj per block
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    # the LM head is tied to the input embeddings: it stays frozen even with train_head=True
    assert not model.lm_head.weight.requires_grad
    for _, layer in pst_layers(model):
        layer.sparsity = 0.6
    with torch.no_grad():
        pruned = model(input_ids=x).logits
        export_pst(model)
        assert type(model.transformer.h[0].attn.c_attn) is Conv1D  # GPT-2's own layout comes back
        assert torch.equal(model(input_ids=x).logits, pruned)
    model.save_pretrained(tmp_path)  # and the exported model is a plain GPT-2 checkpoint
    with torch.no_grad():
        assert torch.equal(GPT2LMHeadModel.from_pretrained(tmp_path).eval()(input_ids=x).logits, pruned)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_export_bakes_exact_sparsity_and_matches(nm):
    model = apply_pst(tiny_bert(), sparsity=0.9, nm=nm)
    layers = pst_layers(model)
    with torch.no_grad():  # move the factors off their init so that the mask is not plain magnitude pruning
        for _, m in layers:
            for p in m.factors():
                p.add_(torch.randn_like(p) * 0.05)
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    copy = export_pst(model, inplace=False)
    assert len(pst_layers(model)) == 12 and not pst_layers(copy)
    export_pst(model)
    for name, layer in layers:
        lin = model.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == layer.weight.dtype
        zeros = int((lin.weight == 0).sum())
        if nm is None:
            assert zeros == math.floor(lin.weight.numel() * 0.9)
        else:
            assert torch.all((lin.weight != 0).view(lin.out_features, -1, 4).sum(-1) == 2)
        assert not torch.signbit(lin.weight[lin.weight == 0]).any()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)
        assert torch.equal(copy(input_ids=x).logits, want)
    with pytest.raises(ValueError, match="no PSTLinear"):
        export_pst(model)


def test_training_with_bf16_weights_moves_only_the_factors():
    model = apply_pst(tiny_bert().to(torch.bfloat16), sparsity=0.5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids(), labels=torch.tensor([0, 1, 0])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(m.pst_v.abs().sum() > 0 and m.pst_v.dtype == torch.float32 for _, m in pst_layers(model))


@pytest.mark.gpu
def test_gpu_semi_structured_export():
    model = apply_pst(tiny_bert(hidden=128).cuda().half(), nm=(2, 4), targets=["intermediate.dense$", "output.dense$"])
    x = ids(n=8, seq=16).cuda()
    with torch.no_grad():
        want = model(input_ids=x).logits
    try:
        export_pst(model, semi_structured=True)
    except ValueError as e:  # shapes below the sparse kernels' minimum on this GPU/torch: say so
        pytest.skip(str(e))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------------
# The example
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--nm", "2:4"]])
def test_train_pst_example_runs(extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "examples/train_pst.py", "--steps", "12", "--pretrain-steps", "4",
                          "--batch-size", "8", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{out}\nstderr:\n{res.stderr[-3000:]}"
    m = re.search(r"trainable parameters: (\d+) of (\d+) \(([\d.]+)%\)", out)
    assert m and 0 < int(m.group(1)) < int(m.group(2)), out
    m = re.search(r"realised sparsity ([\d.]+) \(target ([\d.]+)\)", out)
    assert m and m.group(1) == m.group(2), out
    assert float(m.group(1)) == pytest.approx(0.5 if extra else 0.9, abs=1e-3)
    assert "exported model matches the PST model: True" in out
    assert "train_pst done in" in out


def test_apply_pst_refuses_layers_their_parents_read_directly():
    """torch.nn.MultiheadAttention reads out_proj.weight, nn.Transformer*Layer's fast path linear1/2.weight:
    a PSTLinear there would never prune. Refused, with the model left as it was."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                enable_nested_tensor=False)
    flags = [p.requires_grad for p in enc.parameters()]
    with pytest.raises(ValueError, match="read directly"):
        apply_pst(enc, sparsity=0.5)
    with pytest.raises(ValueError, match="out_proj"):
        apply_pst(enc, sparsity=0.5, targets=r"out_proj")
    assert flags == [p.requires_grad for p in enc.parameters()] and not pst_layers(enc)


def test_apply_pst_argument_errors_leave_the_model():
    model = tiny_bert()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for bad in (dict(sparsity=1.5), dict(nm=(2, 64)), dict(backend="cdua"), dict(factor_dtype=3)):
        with pytest.raises((ValueError, TypeError)):
            apply_pst(model, **{"sparsity": 0.5, **bad})
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()} and not pst_layers(model), bad
    with pytest.raises(TypeError, match="targets must be"):
        apply_pst(model, sparsity=0.5, targets=5)
    apply_pst(model, sparsity=0.5, targets=re.compile(r"attention\.self\.query$"))  # a compiled regex
    assert [n for n, _ in pst_layers(model)] == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)]


def test_export_keeps_the_pruned_weights_frozen():
    """W' is derived from the frozen W0: exported weights do not require grad (an optimizer over
    requires_grad parameters would otherwise train them densely)."""
    model = export_pst(apply_pst(tiny_bert(), sparsity=0.9))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert.encoder"))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_masks_ignore_autocast(backend):
    """Under torch.autocast the scores' matrix products stay float32 (math.md 3): the same mask and W'."""
    torch.manual_seed(0)
    w0, u, v, a, b = torch.randn(64, 64), torch.randn(64, 8), torch.randn(8, 64), torch.randn(64, 8), torch.randn(8, 64)
    r, c = torch.randn(64), torch.randn(64)
    want = ak.pst_masked_weight(w0, u, v, a, b, r, c, sparsity=0.5, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ak.pst_masked_weight(w0, u, v, a, b, r, c, sparsity=0.5, backend=backend)
    assert torch.equal(got, want)


def test_train_pst_example_refuses_an_unavailable_backend_before_training():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "examples/train_pst.py", "--backend", "cuda", "--device", "cpu"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "cannot run here" in res.stderr and "pre-trained" not in res.stdout


def test_train_head_leaves_a_language_models_output_embeddings_frozen():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=64, tie_word_embeddings=False)
    model = apply_pst(LlamaForCausalLM(cfg), sparsity=0.5)
    assert not model.lm_head.weight.requires_grad
    assert all(n.split(".")[-1].startswith("pst_") for n, p in model.named_parameters() if p.requires_grad)


def test_scheduler_step_k_applies_s_of_k_and_checks_its_fractions():
    """After k calls of step() every layer holds s(k) of the cubic schedule (no lag of one step); hold
    fractions that overlap are refused."""
    layer = ak.PSTLinear.from_linear(nn.Linear(40, 30), sparsity=0.8)
    sched = ak.SparsityScheduler(layer, total_steps=20, initial_fraction=0.1, final_fraction=0.3)
    assert layer.sparsity == cubic_sparsity(0, 20, 0.0, 0.8, 0.1, 0.3)
    for k in range(1, 15):
        sched.step()
        assert layer.sparsity == cubic_sparsity(k, 20, 0.0, 0.8, 0.1, 0.3), k
    assert 0.0 < cubic_sparsity(5, 20, 0.0, 0.8, 0.1, 0.3) < cubic_sparsity(6, 20, 0.0, 0.8, 0.1, 0.3)
    with pytest.raises(ValueError, match="initial_fraction \\+ final_fraction must be at most 1"):
        ak.SparsityScheduler(layer, total_steps=10, initial_fraction=0.6, final_fraction=0.6)


def test_nm_other_than_two_four_prunes_m_minus_n_per_group():
    layer = ak.PSTLinear(8, 4, nm=(1, 4))
    assert layer.n_pruned == 24 and layer.final_sparsity == 0.75
    sched = ak.SparsityScheduler(layer)
    assert sched.current_sparsity == 0.75 == layer.realised_sparsity
    groups = (layer.to_linear().weight != 0).view(4, 2, 4)
    assert torch.all(groups.sum(-1) == 1)


def test_first_mask_is_magnitude_pruning():
    """At initialisation the low-rank terms are zero (V, B, R, C start at 0): the first mask prunes the
    smallest |W0|, as the paper's PST starts from magnitude pruning."""
    torch.manual_seed(0)
    layer = ak.PSTLinear.from_linear(nn.Linear(64, 32), sparsity=0.5)
    w0 = layer.weight.detach()
    keep = layer.mask()
    want = w0.abs().flatten().argsort(stable=True)[w0.numel() // 2:]
    expected = torch.zeros(w0.numel(), dtype=torch.bool)
    expected[want] = True
    assert torch.equal(keep.flatten(), expected)
