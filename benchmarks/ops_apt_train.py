"""Benchmark cases: one APT training step on Hugging Face models against PEFT prefix tuning.

A timed call is one optimizer step: forward, backward, AdamW over the trainable parameters.

Cases (CUDA, bf16 weights, fp32 trainable parameters): BERT-base classifier, B=32, N=512, P=16,
with padding; a small Llama-style decoder (hidden 1024, 8 layers, 16 query / 4 kv heads), B=2,
N=2048, P=64, causal. On CPU (quick): tiny versions of both in fp32.

Contenders:
  * apt (ours): apply_apt (token and layer gates) on our kernels (backend auto).
  * prefix (ours): apply_prefix_tuning, the same prefix without gates, on our kernels.
  * peft_prefix_eager / peft_prefix_sdpa: PEFT's PrefixTuningConfig (the prefix concatenated
    through past_key_values, expanded per batch each step) with HF eager or SDPA attention.
    If PEFT is missing or fails on this transformers version, "hf_cache_prefix_sdpa" reproduces
    its computation (a prefix cache filled each step, SDPA attention) and the reason is recorded.
"""

from __future__ import annotations

import copy

import torch

from .harness import Case, Contender, Skip, fill

OP = "apt_train"


def _configs(device, quick):
    import transformers as tf

    if device.type == "cuda" and not quick:
        # bert-base, with room for the P positions PEFT's prefix (through past_key_values) shifts the
        # tokens by: at N = 512 a real BERT checkpoint (512 positions) cannot run PEFT prefix tuning at all
        bert = tf.BertConfig(num_labels=2, max_position_embeddings=512 + 16)
        llama = tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, num_labels=2,
                               pad_token_id=0)
        return [("bert-base-b32-n512-p16", bert, 32, 512, 16, tf.BertForSequenceClassification),
                ("llama-small-b2-n2048-p64", llama, 2, 2048, 64, tf.LlamaForSequenceClassification)]
    bert = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=1000, num_labels=2)
    llama = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, num_labels=2, pad_token_id=0)
    return [("bert-tiny-b8-n64-p8", bert, 8, 64, 8, tf.BertForSequenceClassification),
            ("llama-tiny-b2-n128-p8", llama, 2, 128, 8, tf.LlamaForSequenceClassification)]


def _make_inputs(cfg, B, N, device):
    def make(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(5, cfg.vocab_size, (B, N), generator=g)
        lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
        lengths[0] = N
        mask = (torch.arange(N)[None] < lengths[:, None]).long()
        labels = torch.randint(0, 2, (B,), generator=g)
        return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))

    return make


def _step_contender(name, cls, cfg, device, dtype, setup, ours):
    """A contender whose model is built once (lazily) and reused across input sets."""
    state = {}

    def build(inputs):
        if "step" not in state:
            torch.manual_seed(0)
            model = cls(copy.deepcopy(cfg)).to(device=device, dtype=dtype)
            model = setup(model)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()  # trainable parameters in fp32 (mixed precision as usual)
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(batch):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            state["step"] = step
        return lambda: state["step"](inputs)

    return Contender(name, build, ours=ours)


def _peft(attn, P):
    def setup(model):
        try:
            from peft import PrefixTuningConfig, TaskType, get_peft_model
        except ImportError as e:
            raise Skip(f"peft is not installed ({e})")
        model.set_attn_implementation(attn)
        try:
            return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=P))
        except Exception as e:  # noqa: BLE001 - record why PEFT cannot run here
            raise Skip(f"PEFT prefix tuning fails on this transformers version: {type(e).__name__}: {e}")

    return setup


def _hf_cache_prefix(P):
    """PEFT's computation without PEFT: per-layer prefix K/V through a fresh cache every step."""

    def setup(model):
        import transformers as tf
        from apt_kernels.hf._heads import task_head
        from apt_kernels.hf.apt import _dims, _family, _get

        _, fam = _family(model)
        if model.config.model_type != "llama":
            raise Skip("the cache-based stand-in is written for decoders with a Cache (Llama)")
        _, _, kvh, hd = _dims(model.config)
        L = len(_get(model.base_model, fam.layers))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in task_head(model) or ():
            p.requires_grad_(True)
        dev = next(model.parameters()).device
        model.prefix_kv = torch.nn.Parameter(torch.randn(2, L, kvh, P, hd, device=dev) * 0.02)
        model.set_attn_implementation("sdpa")
        forward = model.forward

        def with_prefix(input_ids=None, attention_mask=None, labels=None, **kw):
            B, N = input_ids.shape
            cache = tf.DynamicCache(config=model.config)
            for i in range(L):
                kv = model.prefix_kv.to(model.dtype)
                cache.update(kv[0, i][None].expand(B, -1, -1, -1), kv[1, i][None].expand(B, -1, -1, -1), i)
            mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
            pos = torch.arange(N, device=input_ids.device)[None].expand(B, -1)
            return forward(input_ids=input_ids, attention_mask=mask, labels=labels, past_key_values=cache,
                           position_ids=pos, **kw)

        model.forward = with_prefix
        return model

    return setup


def cases(device: torch.device, quick: bool) -> list[Case]:
    from apt_kernels.hf import apply_apt, apply_prefix_tuning

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for name, cfg, B, N, P, cls in _configs(device, quick):
        contenders = [
            _step_contender("apt", cls, cfg, device, dtype, lambda m, P=P: apply_apt(m, P), ours=True),
            _step_contender("prefix", cls, cfg, device, dtype, lambda m, P=P: apply_prefix_tuning(m, P), ours=True),
            _step_contender("peft_prefix_eager", cls, cfg, device, dtype, _peft("eager", P), ours=False),
            _step_contender("peft_prefix_sdpa", cls, cfg, device, dtype, _peft("sdpa", P), ours=False),
            _step_contender("hf_cache_prefix_sdpa", cls, cfg, device, dtype, _hf_cache_prefix(P), ours=False),
        ]
        out.append(Case(OP, name, dict(B=B, N=N, P=P, dtype=str(dtype).replace("torch.", "")),
                        _make_inputs(cfg, B, N, device), contenders, modes=("step",), profile_peers=True))
    return out
