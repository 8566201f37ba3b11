"""The backend registry, the environment report and packed bitmasks."""

import os
import subprocess
import sys

import pytest
import torch

import apt_kernels as ak
from apt_kernels import bits
from apt_kernels.registry import REGISTRIES, BackendUnavailable, Probe, Registry

OPS = ["gated_prefix_attention", "pst_masked_weight", "child_tuning_adamw", "child_tuning_keep_mask", "pack_bits"]


def test_every_op_is_registered_with_reference_and_torch():
    assert set(OPS) <= set(REGISTRIES)
    cpu = Probe(torch.device("cpu"), torch.float32)
    for op in OPS:
        for b in ("reference", "torch"):
            assert REGISTRIES[op].reason(b, cpu) is None
        assert REGISTRIES[op].select("auto", cpu)[0] == "torch"


def test_unavailable_backends_say_why():
    cpu = Probe(torch.device("cpu"), torch.float32)
    assert "no triton implementation yet" in REGISTRIES["pack_bits"].reason("triton", cpu)
    assert "float64" in REGISTRIES["gated_prefix_attention"].reason("triton", Probe(torch.device("cuda"), torch.float64))
    assert "CUDA tensors" in REGISTRIES["pack_bits"].reason("cuda", cpu)
    with pytest.raises(BackendUnavailable, match="pack_bits: backend='cuda' cannot run here"):
        bits.pack_bits(torch.ones(3, dtype=torch.bool), backend="cuda")
    text = ak.explain("gated_prefix_attention", "cpu", torch.float32)
    assert "auto ->   torch" in text and "reference available" in text


def test_auto_order_and_fallback():
    reg = Registry("toy")
    reg.register("reference")(lambda: "ref")
    reg.register("torch", lambda p: "not for bf16" if p.dtype == torch.bfloat16 else None)(lambda: "torch")
    cuda = Probe(torch.device("cuda"), torch.float32)
    assert reg.select("auto", Probe(torch.device("cpu"), torch.float32))[0] == "torch"
    assert reg.select("auto", Probe(torch.device("cpu"), torch.bfloat16))[0] == "reference"
    assert reg.select("auto", cuda)[0] == "torch"  # no cuda/triton entries: falls through to torch
    with pytest.raises(BackendUnavailable, match="not for bf16"):
        reg.select("torch", Probe(torch.device("cpu"), torch.bfloat16))
    with pytest.raises(ValueError, match="unknown backend"):
        reg.register("jax")


def test_per_op_auto_order_is_used_and_explained():
    from apt_kernels.registry import _Entry

    reg = Registry("toy2")
    for name in ("reference", "torch", "triton", "cuda"):  # every backend available (no extension checks)
        reg._entries[name] = _Entry(lambda: None, ())
    cuda = Probe(torch.device("cuda"), torch.float32)
    assert reg.select("auto", cuda)[0] == "cuda"  # the default order
    reg.prefer("cuda", ("triton", "cuda", "torch"), "measured faster")
    assert reg.select("auto", cuda)[0] == "triton"
    assert reg.select("auto", Probe(torch.device("cpu"), torch.float32))[0] == "torch"  # other devices unchanged
    assert "order triton > cuda > torch: measured faster" in reg.explain(cuda)


def test_triton_interpreter_availability_is_reported():
    reg = REGISTRIES["child_tuning_keep_mask"]
    why = reg.reason("triton", Probe(torch.device("cpu"), torch.bool))
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert why is None
    else:
        assert "TRITON_INTERPRET=1" in why


def test_environment_report_runs_and_tells_the_truth():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "apt_kernels"], capture_output=True, text=True, env=env,
                         check=True).stdout
    for needle in ["python", "torch", "triton", "transformers", "device"] + OPS:
        assert needle in out
    assert f"torch         {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "no CUDA device" in out and "CUDA tensors" in out
        assert "set TRITON_INTERPRET=1" in out


def test_built_extension_without_a_device_is_reported_not_raised(monkeypatch):
    """A CUDA build of torch with the extension built, on a machine without a GPU: the report says so
    (it used to raise from torch.cuda.get_device_capability)."""
    from apt_kernels import __main__ as main, _env

    monkeypatch.setattr(_env, "_load_extension", lambda: (object(), None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert "built, but torch sees no CUDA device" in _env.cuda_reason(torch.device("cuda"))
    assert "built, but torch sees no CUDA device" in main.report()


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 1000])
def test_pack_bits_round_trip(n):
    mask = torch.rand(n) > 0.5
    words = bits.pack_bits(mask)
    assert words.dtype == torch.int32 and words.numel() == (n + 31) // 32
    assert torch.equal(bits.unpack_bits(words, (n,)), mask)
    # bit j of word w is element 32 w + j, every byte of every word
    got = [bool((int(words[i // 32]) >> (i % 32)) & 1) for i in range(n)]
    assert got == mask.tolist()
    shaped = mask[: n - n % 7].view(-1, 7)
    assert torch.equal(bits.unpack_bits(bits.pack_bits(shaped), shaped.shape), shaped)
    full = torch.ones(64, dtype=torch.bool)
    assert torch.equal(bits.pack_bits(full), torch.full((2,), -1, dtype=torch.int32))
    with pytest.raises(ValueError, match="hold fewer than"):
        bits.unpack_bits(words, (n + 64,))


def test_backend_checks_trace_as_constants_under_compile():
    """torch.compile(fullgraph=True) of code selecting a backend before any eager call: the availability
    checks (importing the extension, finding triton) run eagerly as constants instead of being traced
    into importlib, which Dynamo refuses."""
    from apt_kernels import _env

    _env._load_extension.cache_clear()
    _env._triton_error = _env._UNSET

    def f(x):
        r = _env.cuda_reason(torch.device("cuda"))
        t = _env.triton_reason(torch.device("cuda"))
        return x + (1 if r is None else 2) + (1 if t is None else 2)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(1))
    assert torch.equal(got, f(torch.zeros(1)))


def test_explain_reads_the_dtype_as_the_ops_do():
    """explain(op, device, dtype) agrees with what a call in that dtype does: float64 PST inputs never reach the
    fused kernels; ChildTuningAdamW refuses float64 parameters on every backend."""
    import apt_kernels as ak

    text = ak.explain("pst_masked_weight", "cuda", torch.float64)
    assert "triton    unavailable: the fused PST kernels compute in float32" in text
    text = ak.explain("child_tuning_adamw", "cpu", torch.float64)
    assert "torch     unavailable: ChildTuningAdamW takes float32" in text and "auto ->   none" in text
    assert "auto ->   torch" in ak.explain("child_tuning_adamw", "cpu", torch.float32)
    with pytest.raises(ValueError, match="lr must lie in"):
        ak.ChildTuningAdamW([torch.nn.Parameter(torch.zeros(2))], lr=float("inf"))
