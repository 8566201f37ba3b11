"""Adaptive Prefix Tuning on every claimed Hugging Face family, on tiny random-init configs."""

import copy

import pytest
import torch
import transformers as tf

import apt_kernels as ak
from apt_kernels.hf import (apply_apt, apply_prefix_tuning, apply_prompt_tuning, gate_report, load_apt, remove_apt,
                            save_apt)

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64)
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DEC = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def configs():
    return {
        "bert": (tf.BertConfig(**COMMON, **NO_DROP), False),
        "roberta": (tf.RobertaConfig(**COMMON, **NO_DROP, pad_token_id=1), False),
        "xlm-roberta": (tf.XLMRobertaConfig(**COMMON, **NO_DROP, pad_token_id=1), False),
        "deberta-v2": (tf.DebertaV2Config(**COMMON, **NO_DROP, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                          max_relative_positions=16), False),
        "gpt2": (tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, **DEC), True),
        "llama": (tf.LlamaConfig(**COMMON, num_key_value_heads=2, **DEC), True),
        "qwen2": (tf.Qwen2Config(**COMMON, num_key_value_heads=2, **DEC), True),
        "mistral": (tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None, **DEC), True),
    }


FAMILIES = list(configs())
DECODERS = [f for f in FAMILIES if configs()[f][1]]


def build(family, head="base", seed=0, apt=True, **kw):
    cfg, _ = configs()[family]
    torch.manual_seed(seed)
    cls = {"base": tf.AutoModel, "cls": tf.AutoModelForSequenceClassification,
           "lm": tf.AutoModelForCausalLM}[head]
    model = cls.from_config(copy.deepcopy(cfg))
    model.eval()
    if apt:
        torch.manual_seed(seed + 1)
        apply_apt(model, **{"prefix_len": 3, **kw})
        with torch.no_grad():  # move the gates off their initial values so they matter
            for n, p in model.apt_adapter.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if "gate" in n or "layer" in n else 0.5))
    return model


def hidden(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_and_batch_independence(family):
    model = build(family)
    torch.manual_seed(5)
    a, b = torch.randint(3, 64, (1, 5)), torch.randint(3, 64, (1, 7))
    alone_a, alone_b = hidden(model, a), hidden(model, b)
    pad = torch.zeros(1, 2, dtype=torch.long) + 3
    ids = torch.cat([torch.cat([a, pad], 1), b])  # right padding
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    both = hidden(model, ids, mask)
    torch.testing.assert_close(both[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], alone_b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deberta-v2"])  # DeBERTa: patched, own mask
def test_masks_reach_the_kernels_as_sdpa_mask_builds_them(family, monkeypatch):
    """The "apt" mask function gives sdpa_mask's values; the kernels get the padding row expanded over
    the queries (stride 0: their MASK_N1 path), with causal=True for a decoder."""
    from transformers.masking_utils import sdpa_mask

    import apt_kernels.hf.apt as hf_apt

    model = build(family)
    seen, built, flags = [], [], []
    real_attention, real_mask = hf_apt.gated_prefix_attention, hf_apt.apt_mask

    def attention(*a, attn_mask=None, causal=False, **k):
        seen.append(attn_mask)
        flags.append(causal)
        return real_attention(*a, attn_mask=attn_mask, causal=causal, **k)

    monkeypatch.setattr(hf_apt, "gated_prefix_attention", attention)
    from transformers import AttentionMaskInterface

    def spy(*a, **k):
        built.append((sdpa_mask(*a, **k), real_mask(*a, **k)))
        return built[-1][1]

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, hf_apt.ATTN_NAME, spy)
    ids = torch.randint(3, 64, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    mask[2, 3] = 0  # a hole
    hidden(model, ids, mask)
    assert built and len(seen) == model.config.num_hidden_layers and all(m is seen[0] for m in seen)
    for want, got in built:
        assert got.shape == want.shape and torch.equal(got, want)
    assert seen[0].shape == (3, 1, 6, 6) and seen[0].stride(2) == 0
    decoder = family in DECODERS
    assert flags == [decoder] * len(flags)
    if decoder:  # causal attention with the padding row: sdpa_mask's mask, split exactly
        tril = torch.ones(6, 6, dtype=torch.bool).tril()
        assert torch.equal(built[0][1], seen[0] & tril)
    built.clear()
    hidden(model, ids)  # no padding: no mask for either kind of model
    assert [got for _, got in built] == [None] * len(built)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_compiled_models_keep_the_fast_mask_layout(family, monkeypatch):
    """Under torch.compile(fullgraph=True) the kernels get the same layout as in eager: the padding row
    with query stride 0, and causal=True for a decoder (the row travels as a tensor attribute)."""
    import apt_kernels.hf.apt as hf_apt

    torch._dynamo.reset()
    model = build(family)
    calls = []
    real_attention = hf_apt.gated_prefix_attention

    def attention(*a, attn_mask=None, causal=False, **k):
        calls.append((causal, None if attn_mask is None else attn_mask.stride(2)))
        return real_attention(*a, attn_mask=attn_mask, causal=causal, **k)

    monkeypatch.setattr(hf_apt, "gated_prefix_attention", attention)
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    hidden(torch.compile(model, fullgraph=True, backend="aot_eager"), ids, mask)
    assert calls == [(family in DECODERS, 0)] * model.config.num_hidden_layers


@pytest.mark.parametrize("bidirectional", [False, True])
def test_apt_mask_values_equal_sdpa_mask(bidirectional):
    """apt_mask directly, over query/key lengths and offsets (training, prefill, chunked prefill with a
    cache, decoding) and padding patterns (none, all ones, left, right, holes): sdpa_mask's values, and
    a carried padding row that reproduces the mask with the kernels' bottom-right causal rule."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    from apt_kernels.hf.apt import apt_mask

    fn = bidirectional_mask_function if bidirectional else causal_mask_function
    torch.manual_seed(0)
    split = 0
    for q_len, kv_len, q_off, kv_off in [(5, 5, 0, 0), (3, 7, 4, 0), (1, 7, 6, 0), (4, 4, 0, 0), (2, 6, 1, 0)]:
        pads = [None, torch.ones(3, kv_len + kv_off, dtype=torch.long)]
        for _ in range(3):
            pads.append((torch.rand(3, kv_len + kv_off) > 0.3).long())
        pads[-1][0, :2] = 0  # left padding
        for pad in pads:
            kw = dict(mask_function=fn, attention_mask=pad, allow_is_bidirectional_skip=bidirectional)
            want = sdpa_mask(3, q_len, kv_len, q_off, kv_off, **kw)
            got = apt_mask(3, q_len, kv_len, q_off, kv_off, **kw)
            assert (got is None) == (want is None), (q_len, kv_len, q_off, pad)
            if want is None:
                continue
            assert got.shape == want.shape and torch.equal(got, want)
            rows = getattr(got, "apt_causal_rows", None)
            if rows is not None:
                split += 1
                assert not bidirectional and rows.stride(2) == 0
                causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
                assert torch.equal(rows & causal, want)
    assert bidirectional or split >= 8


@pytest.mark.parametrize("family", DECODERS)
def test_causal_decoders_do_not_see_the_future(family):
    model = build(family)
    ids = torch.randint(3, 64, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(3, 64, (2, 3))
    torch.testing.assert_close(hidden(model, ids)[:, :5], hidden(model, changed)[:, :5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden(model, ids)[:, 5:], hidden(model, changed)[:, 5:])


def test_encoder_configured_as_decoder_is_causal():
    """BertLMHeadModel with is_decoder=True attends causally: its gates pool per token by default, a mean
    pool (which would let a position see later tokens) is refused, and earlier outputs ignore later tokens."""
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, is_decoder=True)
    with pytest.raises(ValueError, match="is_decoder=True"):
        apply_apt(tf.BertLMHeadModel(config), prefix_len=3, pool="mean")
    torch.manual_seed(0)
    model = apply_apt(tf.BertLMHeadModel(config), prefix_len=3).eval()
    assert model.apt_adapter.cfg.pool == "token"
    ids = torch.randint(3, 64, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(3, 64, (2, 3))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_in_outputs_and_gradients(family):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled on a GPU, interpreted on CPU
    results = {}
    ids = torch.randint(3, 64, (2, 6), device=device)
    mask = torch.ones(2, 6, dtype=torch.long, device=device)
    mask[1, 4:] = 0
    for backend in ("reference", "torch", "triton"):
        model = build(family, backend=backend).to(device)
        out = hidden(model, ids, mask)
        (out * mask[..., None]).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.apt_adapter.named_parameters()}
        results[backend] = (out.detach(), grads)
    ref_out, ref_grads = results["reference"]
    for backend in ("torch", "triton"):
        out, grads = results[backend]
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=f"{backend} {n}")


def check_compiled_equals_eager(family, backend, device="cpu"):
    """torch.compile(model, fullgraph=True): no graph break anywhere in the model (the attention runs as
    apt_kernels' custom op or traced torch code), eager's outputs and APT gradients."""
    torch._dynamo.reset()
    model = build(family, backend=backend).to(device)
    ids = torch.randint(3, 64, (2, 7), device=device)
    mask = torch.ones(2, 7, dtype=torch.long, device=device)
    mask[1, :2] = 0  # left padding
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")):
        model.zero_grad(set_to_none=True)
        out = hidden(fn, ids, mask)
        (out * mask[..., None]).square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.apt_adapter.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph(family):
    check_compiled_equals_eager(family, "torch")


@pytest.mark.triton
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_torch_compile_fullgraph_triton(family):
    check_compiled_equals_eager(family, "triton", "cuda" if torch.cuda.is_available() else "cpu")


def enable_checkpointing(model, reentrant=False):
    """transformers >= 5.2x names it activation checkpointing (the old name warns); older 5.x do not."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing(family, reentrant, monkeypatch):
    """Checkpointed layers recompute their attention (and gates) in the backward and give the plain run's
    gradients, with two forwards of different batches (and padding) before one backward: nothing a
    recomputation reads may come from the other forward."""
    from apt_kernels.hf import apt as hf_apt

    calls = [0]
    inner = hf_apt.gated_prefix_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(hf_apt, "gated_prefix_attention", counted)
    ids = torch.randint(3, 64, (2, 6))
    ids2 = torch.randint(3, 64, (2, 6))
    mask2 = torch.ones(2, 6, dtype=torch.long)
    mask2[1, 3:] = 0
    grads, counts = [], []
    for ckpt in (False, True):
        model = build(family, head="cls")
        model.config.pad_token_id = model.config.pad_token_id or 0
        model.train()
        if ckpt:
            enable_checkpointing(model, reentrant)
        calls[0] = 0
        first = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
        second = model(input_ids=ids2, attention_mask=mask2, labels=torch.tensor([1, 0])).loss
        (first + 2 * second).backward()
        counts.append(calls[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    # checkpointing really ran: every layer's attention was recomputed in the backward
    assert counts[0] > 0 and counts[1] == 2 * counts[0], counts
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("apt_adapter.") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", DECODERS)
def test_generate_keeps_the_prefix_out_of_the_cache(family):
    model = build(family, head="lm")
    ids = torch.randint(3, 64, (2, 5))
    with_cache = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)
    out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values.get_seq_length() == 5  # real tokens only: the prefix lives in attention


def test_prefix_tuning_equals_hf_cache_path_on_llama():
    """Plain prefix tuning must equal Hugging Face's own prefix path (keys/values pre-filled in the
    cache, positions not shifted), computed with the stock eager attention."""
    model = build("llama", prefix_len=4, token_gate=False, layer_gate=False)
    ids = torch.randint(3, 64, (2, 6))
    ours = hidden(model, ids)
    pk, pv = model.apt_adapter.prefix_k.detach(), model.apt_adapter.prefix_v.detach()
    ref = copy.deepcopy(model)
    remove_apt(ref)
    ref.set_attn_implementation("eager")
    cache = tf.DynamicCache(config=ref.config)
    for layer in range(2):
        cache.update(pk[layer][None].expand(2, -1, -1, -1), pv[layer][None].expand(2, -1, -1, -1), layer)
    mask = torch.ones(2, 4 + 6, dtype=torch.long)
    out = ref(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=torch.arange(6)[None].expand(2, -1))
    torch.testing.assert_close(ours, out.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_trainable_parameters_and_unsupported_models():
    model = build("bert", head="cls", apt=False)
    apply_apt(model, prefix_len=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("apt_adapter.", "classifier.")) for n in trainable)
    assert {"classifier.weight", "apt_adapter.prefix_k", "apt_adapter.gate_weight"} <= trainable
    apt_count = sum(p.numel() for p in model.apt_adapter.parameters())
    prefix_model = build("bert", head="cls", apt=False)
    apply_prefix_tuning(prefix_model, prefix_len=16)
    pt_count = sum(p.numel() for p in prefix_model.apt_adapter.parameters())
    assert 1.4 < apt_count / pt_count < 1.6  # gates add d * P + P + 1 per layer to 2 * d * P
    with pytest.raises(ValueError, match="already has APT"):
        apply_apt(model)
    t5 = tf.T5Model(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32, d_kv=8))
    with pytest.raises(ValueError, match="model_type 't5'"):
        apply_apt(t5)
    with pytest.raises(ValueError, match="pool='mean' lets a token's gate see later tokens"):
        apply_apt(build("llama", apt=False), pool="mean")
    with pytest.raises(ValueError, match="prefix_len must be a positive int"):
        apply_apt(build("bert", apt=False), prefix_len=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_remove_restores_the_model(family):
    model = build(family, apt=False)
    ids = torch.randint(3, 64, (2, 6))
    before = hidden(model, ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_apt(model)
    assert not torch.allclose(hidden(model, ids), before)
    remove_apt(model)
    assert torch.equal(hidden(model, ids), before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not hasattr(model, "apt_adapter")
    for module in model.modules():  # every hook and reference apply_apt left is gone (the backbone's too)
        assert not any(k.startswith("_apt") for k in module.__dict__), type(module).__name__
        assert not module._forward_pre_hooks and not module._forward_hooks, type(module).__name__


def _kernel_counts(fn):
    """(result of fn(), {aten op: calls} of the non-view ops it dispatched)."""
    from apt_kernels.testing import OpCount

    with OpCount() as count:
        out = fn()
    return out, count.kernels


@pytest.mark.parametrize("family,kw", [("bert", {}), ("bert", dict(pool="first")), ("llama", {}),
                                       ("deberta-v2", {}), ("bert", dict(reparam_hidden=8)),
                                       ("llama", dict(token_gate=False, layer_gate=False))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_share_the_adapter_per_forward(family, kw, dtype, monkeypatch):
    """Inside a forward of the model the layers take their prefixes, gate weights and the mask's pooling
    weights from one cast and unbind per forward (APTAdapter._shared): the same outputs and gradients, bit
    for bit, as each layer selecting and casting its own (what a layer called alone does), with no
    select_backward, no per-layer cast and fewer launches; nothing is left on the adapter after the forward,
    nor after a forward that raised."""
    from apt_kernels.hf.apt import APTAdapter

    model = build(family, head="cls", **kw).to(dtype)
    model.apt_adapter.float()  # trainable parameters in float32, the model in dtype: the casts are real ones
    torch.manual_seed(3)
    ids = torch.randint(3, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).logits.float().square().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    (loss, grads), shared = _kernel_counts(step)
    assert "_forward_cache" not in model.apt_adapter.__dict__
    monkeypatch.setattr(APTAdapter, "_shared", lambda self, *args: None)
    (loss_alone, grads_alone), alone = _kernel_counts(step)
    monkeypatch.undo()
    assert torch.equal(loss, loss_alone)
    assert grads.keys() == grads_alone.keys() and any(n.startswith("apt_adapter.") for n in grads)
    cfg = model.apt_adapter.cfg
    for n in grads:
        if cfg.reparam_hidden and "prefix_" in n:  # one MLP for every layer's rows: its weight gradients are
            # summed in another order than the per-layer evaluations'
            torch.testing.assert_close(grads[n], grads_alone[n], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(grads[n], grads_alone[n]), n
    selected = (0 if cfg.reparam_hidden else 2) + 2 * cfg.token_gate + cfg.layer_gate  # (L, ...) parameters
    layers = model.apt_adapter.n_layers
    once = 2 if cfg.reparam_hidden else 0  # the MLP output's keys and values, selected once per forward
    assert alone["select_backward"] - shared["select_backward"] == selected * layers - once
    assert sum(shared.values()) <= sum(alone.values()) - 2 * layers
    with pytest.raises(IndexError):  # the forward fails (an id beyond the vocabulary): the hooks still close it
        model(input_ids=ids + 1000)
    assert "_forward_cache" not in model.apt_adapter.__dict__ and "_forward_depth" not in model.apt_adapter.__dict__
    assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss.detach(),
                       model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss.detach())
    # what a no-grad stretch of a forward made (a reentrant checkpoint's first pass) is not handed to grad mode
    from apt_kernels.hf.apt import _close_forward, _open_forward

    _open_forward(model.base_model, (), {})
    with torch.no_grad():
        made = model.apt_adapter.layer_prefix(1, dtype)[0]
    taken = model.apt_adapter.layer_prefix(1, dtype)[0]
    assert taken is not made
    taken.float().sum().backward()
    assert any(p.grad is not None for p in model.apt_adapter.parameters())
    _close_forward(model.base_model, (), {}, None)
    assert "_forward_cache" not in model.apt_adapter.__dict__


def test_reparametrised_prefixes_per_layer():
    """Each layer evaluates the MLP's last linear layer for its own outputs only: the same prefixes as the
    whole MLP's output (P-Tuning v2's reparametrisation), and gradients reach every MLP weight."""
    model = build("bert", head="cls", reparam_hidden=8)
    adapter = model.apt_adapter
    pk_all, pv_all = adapter.prefixes()
    for layer in range(adapter.n_layers):
        pk, pv = adapter.layer_prefix(layer)
        torch.testing.assert_close(pk, pk_all[layer], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pv, pv_all[layer], rtol=1e-6, atol=1e-7)
    ids = torch.randint(3, 64, (2, 6))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.prefix_mlp.parameters())
    assert adapter.prefix_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reparam", [None, 8])
def test_save_load_round_trip_is_exact(tmp_path, reparam):
    model = build("bert", head="cls", reparam_hidden=reparam)
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    want = model(input_ids=ids).logits
    save_apt(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["apt_adapter.safetensors", "apt_config.json"]
    fresh = build("bert", head="cls", apt=False)
    load_apt(fresh, tmp_path)
    assert torch.equal(fresh(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="trained on bert, not llama"):
        load_apt(build("llama", apt=False), tmp_path)


def test_gate_report_probes_every_layer():
    model = build("bert")
    ids = torch.randint(3, 64, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    rep = gate_report(model, dict(input_ids=ids, attention_mask=mask))
    assert rep["layer"].shape == (2,) and rep["layer_prefix"].shape == (2, 3)
    adapter = model.apt_adapter
    h0 = model.embeddings(input_ids=ids)
    expected = adapter.gate(0, h0).mean((0, 1, 2))
    torch.testing.assert_close(rep["layer_prefix"][0], expected, rtol=1e-5, atol=1e-6)


def test_prompt_tuning():
    model = build("bert", head="cls", apt=False)
    with pytest.raises(ValueError, match="prefix_len"):
        apply_prompt_tuning(model, prefix_len=0)
    apply_prompt_tuning(model, prefix_len=4)
    ids = torch.randint(3, 64, (2, 6))
    out = model(input_ids=ids, attention_mask=torch.ones(2, 6, dtype=torch.long), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.apt_adapter.embedding.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("bert."))
    remove_apt(model)
    assert model(input_ids=ids).logits.shape == (2, 2)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_prompt_tuning_causal_lm_labels_and_generate():
    """A causal LM's token-level labels gain P leading -100s (no loss on the prompt: the loss is the plain
    model's on inputs_embeds = [prompt, tokens] with those labels); generate() is refused, clearly."""
    model = build("gpt2", head="lm", apt=False)
    apply_prompt_tuning(model, prefix_len=3)
    ids = torch.randint(3, 64, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[1] == 9
    plain = remove_apt(copy.deepcopy(model))  # the same weights, no prompt hooks
    prompt = model.apt_adapter.embedding[None].expand(2, -1, -1)
    embeds = torch.cat([prompt, model.get_input_embeddings()(ids)], 1)
    want = plain(inputs_embeds=embeds, labels=torch.cat([torch.full((2, 3), -100), ids], 1)).loss
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.apt_adapter.embedding.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="apply_prefix_tuning"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_deepcopy_gates_with_its_own_parameters():
    """A deep copy (EMA model, snapshot) runs its own gates and prefixes, trains them, and remove_apt on it
    leaves the original applied."""
    model = build("bert", head="cls")
    clone = copy.deepcopy(model)
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        clone.apt_adapter.layer_scale.fill_(0.0)
        clone.apt_adapter.gate_weight.mul_(-1.0)
    fresh = build("bert", head="cls")
    fresh.load_state_dict(clone.state_dict())
    torch.testing.assert_close(clone(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert not torch.allclose(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    with torch.no_grad():
        clone.apt_adapter.layer_scale.fill_(1.0)
    clone(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert clone.apt_adapter.gate_weight.grad is not None and model.apt_adapter.gate_weight.grad is None
    before = model(input_ids=ids).logits
    remove_apt(clone)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert getattr(model, "apt_adapter", None) is not None


def test_bf16_model_runs():
    model = build("llama", head="cls").to(torch.bfloat16)
    ids = torch.randint(3, 64, (2, 6))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and model.apt_adapter.prefix_k.grad is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_under_autocast(family):
    """torch.autocast (Trainer(bf16=True)): rotary families hand over float32 q, k beside a bf16 v, without a
    cache to promote v; the op runs in the autocast dtype as SDPA does. The loss is near the float32 one."""
    model = build(family, head="cls")
    ids = torch.randint(3, 64, (2, 6))
    labels = torch.tensor([0, 1])
    want = model(input_ids=ids, labels=labels, use_cache=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    assert model.apt_adapter.prefix_k.grad is not None and torch.isfinite(model.apt_adapter.prefix_k.grad).all()
    torch.testing.assert_close(out.loss.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.triton
def test_deberta_relative_bias_gradients_on_every_backend():
    """DeBERTa's c2p/p2c terms reach the attention as a float mask computed from q and k: its gradient
    carries the relative terms' share of the earlier layers' prefix and gate gradients. With trained-size
    relative embeddings and projections (where that share is large) every backend gives the reference's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled on a GPU, interpreted on CPU
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    upstream = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5)).to(device)
    results = {}
    for backend in ("reference", "torch", "triton"):
        model = _deberta()
        torch.manual_seed(1)
        apply_apt(model, prefix_len=3, backend=backend)
        with torch.no_grad():
            for p in model.apt_adapter.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        model.to(device)
        (model(input_ids=ids).last_hidden_state * upstream).sum().backward()
        results[backend] = {n: p.grad.clone() for n, p in model.apt_adapter.named_parameters()}
    for backend in ("torch", "triton"):
        for n, want in results["reference"].items():
            torch.testing.assert_close(results[backend][n], want, rtol=1e-4, atol=1e-6, msg=f"{backend} {n}")


def test_load_apt_mismatch_names_the_tensor_and_leaves_the_model(tmp_path):
    """A saved head of another shape is named in the error, and the model is left as it was; backend=
    overrides the saved backend; apply_apt refuses an unknown backend up front."""
    with pytest.raises(ValueError, match="backend must be one of"):
        build("bert", head="cls", backend="trition")
    model = build("bert", head="cls", backend="reference")
    save_apt(model, tmp_path)
    other = tf.BertForSequenceClassification(tf.BertConfig(**COMMON, **NO_DROP, num_labels=3))
    flags = {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"head\.classifier\.\w+' of shape \(2.*this model's is \(3"):
        load_apt(other, tmp_path)
    assert getattr(other, "apt_adapter", None) is None and "_apt_undo" not in other.__dict__
    assert flags == {n: p.requires_grad for n, p in other.named_parameters()}
    same = tf.BertForSequenceClassification(tf.BertConfig(**COMMON, **NO_DROP))
    assert load_apt(same, tmp_path, backend="torch").apt_adapter.cfg.backend == "torch"


def test_prompt_tuning_refuses_heads_that_read_input_positions():
    """A decoder's sequence classification (last non-pad token from input_ids) and question answering (span
    positions) would read positions the prompt shifts: refused. A sequence-level head keeps its labels as
    they are, whatever their width (multi-label with num_labels == sequence length)."""
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification"):
        apply_prompt_tuning(build("gpt2", head="cls", apt=False), prefix_len=2)
    qa = tf.BertForQuestionAnswering(tf.BertConfig(**COMMON, **NO_DROP))
    with pytest.raises(ValueError, match="BertForQuestionAnswering"):
        apply_prompt_tuning(qa, prefix_len=2)
    cfg = tf.BertConfig(**COMMON, **NO_DROP, num_labels=6, problem_type="multi_label_classification")
    model = apply_prompt_tuning(tf.BertForSequenceClassification(cfg), prefix_len=2)
    out = model(input_ids=torch.randint(3, 64, (2, 6)), labels=torch.randint(0, 2, (2, 6)).float())
    assert out.logits.shape == (2, 6) and torch.isfinite(out.loss)
    remove_apt(model)
    assert not any("_apt_prompt_of" in m.__dict__ for m in model.modules())


def test_real_tokens_from_every_mask_form():
    """Mean pooling reads the real tokens from the diagonal of the mask an encoder layer receives: the "apt"
    interface's bool mask, DeBERTa's 0/1 product mask, a user's additive float mask (hidden = finfo.min)."""
    from apt_kernels.hf.apt import _keep_from_mask

    keep = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    bool_mask = keep[:, None, None, :].expand(2, 1, 3, 3)
    float_mask = torch.zeros(2, 1, 3, 3).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    deberta = (keep[:, None, None, :] * keep[:, None, :, None]).long()
    for mask in (bool_mask, float_mask, deberta):
        assert torch.equal(_keep_from_mask(mask), keep), mask.dtype
    assert _keep_from_mask(None) is None


def test_load_apt_reads_old_configs_with_reparam_hidden_0(tmp_path):
    import json

    model = build("bert", head="cls")
    save_apt(model, tmp_path)
    cfg = json.loads((tmp_path / "apt_config.json").read_text())
    assert cfg["reparam_hidden"] is None
    cfg["reparam_hidden"] = 0  # what an adapter saved with reparam_hidden=0 holds
    (tmp_path / "apt_config.json").write_text(json.dumps(cfg))
    fresh = load_apt(build("bert", head="cls", apt=False), tmp_path)
    assert fresh.apt_adapter.cfg.reparam_hidden is None


def test_numpy_integer_sizes_are_taken_as_ints(tmp_path):
    """prefix_len and reparam_hidden accept numpy integers (a sweep's values) and store plain ints: the config
    is saved as JSON."""
    import json

    import numpy as np

    model = build("bert", head="cls", apt=False)
    apply_apt(model, np.int64(4), reparam_hidden=np.int32(8))
    assert type(model.apt_adapter.cfg.prefix_len) is int and type(model.apt_adapter.cfg.reparam_hidden) is int
    save_apt(model, tmp_path)
    cfg = json.loads((tmp_path / "apt_config.json").read_text())
    assert (cfg["prefix_len"], cfg["reparam_hidden"]) == (4, 8)
    for bad in (np.int64(0), np.float32(4.0)):
        with pytest.raises(ValueError, match="prefix_len must be a positive int"):
            apply_apt(build("bert", apt=False), bad)


def test_argument_errors_name_what_is_wrong():
    model = build("bert", apt=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="reparam_hidden must be None"):
            apply_apt(model, 3, reparam_hidden=bad)
    assert getattr(model, "apt_adapter", None) is None
    apply_prompt_tuning(model, 3)
    with pytest.raises(ValueError, match="already has prompt tuning applied"):
        apply_prompt_tuning(model, 3)
    with pytest.raises(ValueError, match="already has prompt tuning applied"):
        apply_apt(model, 3)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deberta-v2"])
def test_switching_the_attention_implementation_away_is_refused(family):
    """After apply_apt, set_attn_implementation('sdpa') would run the model without the prefix while the gates
    still train nothing: the next forward raises instead; switching back works."""
    model = build(family)
    ids = torch.randint(3, 64, (2, 5))
    want = hidden(model, ids)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="prefix would be ignored"):
        hidden(model, ids)
    model.set_attn_implementation("apt")
    torch.testing.assert_close(hidden(model, ids), want)


def test_encoder_decoder_encoder_gets_the_prefix():
    """EncoderDecoderModel(encoder=..., decoder=...) gives the encoder a new config object that its layers do
    not hold: the layers' own configs are switched too (APT was silently inactive), and restored by remove_apt."""
    enc_cfg, _ = configs()["bert"]
    dec_cfg = tf.BertConfig(**COMMON, **NO_DROP, is_decoder=True, add_cross_attention=True)
    torch.manual_seed(0)
    ed = tf.EncoderDecoderModel(encoder=tf.BertModel(copy.deepcopy(enc_cfg)), decoder=tf.BertLMHeadModel(dec_cfg)).eval()
    ids = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        base = ed.encoder(input_ids=ids).last_hidden_state
        apply_apt(ed.encoder, 3)
        with_apt = ed.encoder(input_ids=ids).last_hidden_state
        assert (with_apt - base).abs().max() > 1e-3
        remove_apt(ed.encoder)
        torch.testing.assert_close(ed.encoder(input_ids=ids).last_hidden_state, base)


def test_deepcopy_after_a_training_step():
    """The gate is used once and dropped: a copy (EMA, AveragedModel) after a forward with grad works, and no
    forward's graph stays alive on the attention modules."""
    model = build("llama", head="cls")
    model(input_ids=torch.randint(3, 64, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    copy.deepcopy(model)
    torch.optim.swa_utils.AveragedModel(model)
    assert all("gate" not in m.__dict__.get("_apt_state", {}) for m in model.modules())


def test_compiled_wrappers_and_lm_heads(tmp_path):
    """apply/save/load/gate_report/remove accept a torch.compile wrapper (its module underneath); a causal LM's
    output embeddings (an untied lm_head: vocabulary-sized) are not a task head and stay frozen."""
    cfg = tf.LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False, **DEC)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    compiled = torch.compile(model, backend="eager")
    assert apply_apt(compiled, 3) is compiled
    assert not model.lm_head.weight.requires_grad
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"apt_adapter"}
    ids = torch.randint(3, 64, (2, 5))
    assert gate_report(compiled, {"input_ids": ids})["layer"].shape == (2,)
    with torch.no_grad():
        model.apt_adapter.prefix_k.add_(1.0)
    saved = model.apt_adapter.prefix_k.detach().clone()
    save_apt(compiled, tmp_path)
    remove_apt(compiled)
    assert not hasattr(model, "apt_adapter") and model.config._attn_implementation != "apt"
    torch.manual_seed(0)
    fresh = torch.compile(tf.LlamaForCausalLM(cfg).eval(), backend="eager")
    assert load_apt(fresh, tmp_path) is fresh
    assert torch.equal(fresh._orig_mod.apt_adapter.prefix_k, saved)


def test_first_token_pool_reads_the_first_real_token():
    """pool='first' under left padding pools the first real token, not the pad before it."""
    model = build("roberta", pool="first")
    ids = torch.randint(3, 64, (1, 5))
    want = hidden(model, ids)
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), ids], 1)  # RoBERTa's pad id 1, on the left
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    pos = torch.cat([torch.ones(1, 2, dtype=torch.long), torch.arange(2, 7)[None]], 1)
    got = model(input_ids=padded, attention_mask=mask, position_ids=pos).last_hidden_state[:, 2:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_output_attentions_warns_and_prompt_length_is_checked():
    model = build("bert")
    with pytest.warns(UserWarning, match="returns no attention weights"):
        model(input_ids=torch.randint(3, 64, (1, 4)), output_attentions=True)
    cfg = copy.deepcopy(configs()["bert"][0])
    cfg.max_position_embeddings = 8
    m = tf.BertModel(cfg)
    apply_prompt_tuning(m, 4)
    with pytest.raises(ValueError, match="more than the model.s 8 position embeddings"):
        m(input_ids=torch.randint(3, 64, (1, 6)))
    cfg = copy.deepcopy(configs()["roberta"][0])  # positions start after the padding index (1): 8 - 2 usable
    cfg.max_position_embeddings = 8
    m = tf.RobertaModel(cfg)
    apply_prompt_tuning(m, 4)
    m(input_ids=torch.randint(3, 64, (1, 2)))
    with pytest.raises(ValueError, match="more than the model.s 6 position embeddings"):
        m(input_ids=torch.randint(3, 64, (1, 3)))
    cfg = copy.deepcopy(configs()["llama"][0])  # rotary positions: no table to run past
    cfg.max_position_embeddings = 8
    m = tf.LlamaModel(cfg)
    apply_prompt_tuning(m, 4)
    m(input_ids=torch.randint(3, 64, (1, 6)))


def test_peft_beside_apt(tmp_path):
    """LoRA beside APT, as docs/apt_hf.md says: APT first, then PEFT, then the adapter re-enabled; both train.
    apply_apt on the wrapper is refused (freezing the backbone would freeze LoRA); save_apt, gate_report and
    remove_apt see through it."""
    peft = pytest.importorskip("peft")
    model = build("llama", head="lm")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not a PEFT wrapper"):
        apply_apt(wrapped, 3)
    wrapped.get_base_model().apt_adapter.requires_grad_(True)
    ids = torch.randint(3, 64, (2, 5))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in wrapped.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("lora_B" in n for n in trained) and any("apt_adapter.prefix_k" in n for n in trained)
    save_apt(wrapped, tmp_path)
    assert gate_report(wrapped, {"input_ids": ids})["layer"].shape == (2,)
    remove_apt(wrapped)
    assert not hasattr(model, "apt_adapter")


def test_train_head_flag_and_an_unknown_attention_backend_at_apply_time():
    """train_head=False leaves the task head frozen (the default trains it); a backend the attention op does
    not have ("cuda") is refused by apply_apt itself, not at the first forward."""
    frozen = apply_apt(build("bert", head="cls", apt=False), 3, train_head=False)
    trained = apply_apt(build("bert", head="cls", apt=False), 3)
    for model, want in ((frozen, False), (trained, True)):
        head = [p.requires_grad for n, p in model.named_parameters() if n.startswith("classifier.")]
        assert head and all(flag is want for flag in head)
    with pytest.raises(ValueError, match="backend must be one of"):
        apply_apt(build("bert", apt=False), 3, backend="cuda")


def test_prompt_tuning_marks_the_prompt_visible():
    """The prompt's mask columns are ones: a full attention mask gives what no mask gives, and the prompt
    gets a nonzero gradient."""
    model = apply_prompt_tuning(build("bert", head="cls", apt=False), prefix_len=4)
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        model.apt_adapter.embedding.normal_()
    no_mask = model(input_ids=ids).logits
    full = model(input_ids=ids, attention_mask=torch.ones(2, 6, dtype=torch.long), labels=torch.tensor([0, 1]))
    torch.testing.assert_close(full.logits, no_mask, rtol=1e-5, atol=1e-6)
    full.loss.backward()
    assert model.apt_adapter.embedding.grad.abs().sum() > 0


def test_load_apt_refuses_an_adapter_missing_a_parameter(tmp_path):
    from safetensors.torch import load_file, save_file

    from apt_kernels.hf.apt import WEIGHTS_NAME

    save_apt(build("bert", head="cls"), tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    del tensors["apt.layer_scale"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    model = build("bert", head="cls", apt=False)
    with pytest.raises(ValueError, match=r"lacks \['layer_scale'\]"):
        load_apt(model, tmp_path)
    assert getattr(model, "apt_adapter", None) is None


def test_gate_report_averages_real_tokens_only():
    """Per-token gates (pool="token") are averaged over the real positions: a right-padded example reports
    what it reports alone."""
    model = build("bert", pool="token")
    a = torch.randint(3, 64, (1, 5))
    padded = torch.cat([a, torch.full((1, 4), 3)], 1)
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[:, 5:] = 0
    alone = gate_report(model, dict(input_ids=a, attention_mask=torch.ones(1, 5, dtype=torch.long)))
    both = gate_report(model, dict(input_ids=padded, attention_mask=mask))
    torch.testing.assert_close(both["layer_prefix"], alone["layer_prefix"], rtol=1e-5, atol=1e-6)


def _deberta(**over):
    cfg = tf.DebertaV2Config(**{**COMMON, **NO_DROP, **over}, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             max_relative_positions=16)
    torch.manual_seed(0)
    model = tf.DebertaV2Model(cfg).eval()
    with torch.no_grad():  # trained-size relative terms, so that a wrong scale shows
        model.encoder.rel_embeddings.weight.mul_(50.0)
        for layer in model.encoder.layer:
            for lin in (layer.attention.self.query_proj, layer.attention.self.key_proj):
                lin.weight.mul_(10.0)
    return model


def test_deberta_patched_attention_without_a_prefix_is_deberta():
    """The patched DisentangledSelfAttention.forward with no prefix state computes Hugging Face's own (scale
    1 / sqrt(D * scale_factor), c2p + p2c bias, padding), on the real tokens."""
    import types

    from apt_kernels.hf.apt import _deberta_forward

    model = _deberta()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    want = hidden(model, ids, mask)
    for layer in model.encoder.layer:
        attn = layer.attention.self
        attn.forward = types.MethodType(_deberta_forward, attn)
    got = hidden(model, ids, mask)
    torch.testing.assert_close(got[0, :4], want[0, :4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_deberta_attention_dropout_only_in_training():
    model = _deberta(attention_probs_dropout_prob=0.5)
    apply_apt(model, prefix_len=3)
    ids = torch.randint(3, 64, (2, 6))
    model.eval()
    torch.testing.assert_close(hidden(model, ids), hidden(model, ids), rtol=0, atol=0)
    model.train()
    assert not torch.equal(hidden(model, ids), hidden(model, ids))


def _spec_gate(adapter, layer, h, keep):
    """SPEC section 2's gate in float64: lambda * sigmoid(pool(h) @ W + b), pooled before the matmul."""
    h = h.double()
    W, b = adapter.gate_weight[layer].double(), adapter.gate_bias[layer].double()
    pool = adapter.cfg.pool
    if pool == "token":
        pooled = h
    elif pool == "first":
        pooled = torch.stack([h[i, int(keep[i].nonzero()[0])] for i in range(h.shape[0])])[:, None]
    else:
        w = keep.double()[..., None]
        pooled = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    return (torch.sigmoid(pooled @ W + b) * adapter.layer_scale[layer].double())[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool", ["mean", "first", "token"])
def test_gate_matches_the_spec(pool, dtype):
    """The gate (pooled logits, the hidden states in their own dtype) against SPEC's formula in float64, on
    left- and right-padded rows. bf16: W rounded to bf16 and bf16 per-token logits, as under autocast."""
    model = build("bert", pool=pool)
    adapter = model.apt_adapter
    torch.manual_seed(3)
    h = torch.randn(3, 7, 32).to(dtype)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 5:] = False  # right padding
    keep[1, :2] = False  # left padding
    got = adapter.gate(1, h, keep)
    assert got.dtype == torch.float32 and got.shape == ((3, 1, 7, 3) if pool == "token" else (3, 1, 1, 3))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=4e-3)
    torch.testing.assert_close(got.double(), _spec_gate(adapter, 1, h, keep), **tol)


def test_gate_makes_no_copy_of_the_hidden_states():
    """A bf16 model's gate (mean pool) makes no tensor as large as the (B, N, d) hidden states in its forward
    (neither a float32 copy nor one weighted by the mask) and one, the hidden states' own gradient, in its
    backward. The old formulation made three in the forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= h.numel():
                    self.big.append(str(func))
            return out

    model = build("bert", pool="mean")
    adapter = model.apt_adapter
    h = torch.randn(4, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.arange(64)[None] < torch.tensor([[64], [40], [33], [64]])
    with Sizes() as fwd:
        g = adapter.gate(0, h, keep)
    with Sizes() as bwd:
        g.sum().backward()
    assert fwd.big == [], fwd.big
    assert len(bwd.big) == 1, bwd.big
    assert h.grad.dtype == torch.bfloat16


def test_gate_logits_are_pooled_in_float32_under_autocast():
    """A float32 model under bf16 autocast: the gate's matmul runs in bf16, its logits are pooled in float32."""
    model = build("bert", pool="mean")
    adapter = model.apt_adapter
    h = torch.randn(2, 9, 32)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    from apt_kernels.hf import apt as hf_apt

    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = hf_apt._logits(h, adapter.gate_weight[0])
        g = adapter.gate(0, h, keep)
    assert z.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(g.double(), _spec_gate(adapter, 0, h, keep), rtol=0, atol=4e-3)
