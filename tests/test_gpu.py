"""GPU-only checks of what exists today (skipped without CUDA): the CUDA extension, the torch
backends on CUDA in half precision against the float64 reference, the optimizer on CUDA."""

import pytest
import torch

import apt_kernels as ak
from apt_kernels import _env, bits
from apt_kernels.testing import assert_parity
from attention_cases import cast, make_inputs

pytestmark = pytest.mark.gpu


def test_cuda_extension_is_built_and_packs_bits():
    assert _env.cuda_extension() is not None, _env.cuda_reason(torch.device("cuda"))
    for n in (1, 31, 33, 12345, 1 << 20):
        mask = torch.rand(n, device="cuda") > 0.5
        assert torch.equal(bits.pack_bits(mask, backend="cuda"), bits.pack_bits(mask, backend="torch"))
        assert torch.equal(bits.unpack_bits(bits.pack_bits(mask, backend="cuda"), (n,)), mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate", ["example", "token"])
def test_attention_torch_backend_on_cuda(dtype, gate):
    tensors, keep = make_inputs(B=2, Hq=8, Hkv=2, N=130, M=257, D=64, P=16, gate=gate, device="cuda",
                                requires_grad=True)
    keep = keep.cuda()
    grad = torch.randn(2, 8, 130, 64, device="cuda", dtype=torch.float64)

    def run(ts, backend):
        out = ak.gated_prefix_attention(*ts, attn_mask=keep, causal=True, backend=backend)
        return [out.detach()] + list(torch.autograd.grad(out, [t for t in ts if t is not None], grad.to(out.dtype)))

    truth, lowp, fast = run(tensors, "reference"), run(cast(tensors, dtype), "reference"), run(cast(tensors, dtype), "torch")
    for name, f, lp, t in zip(["out", "dq", "dk", "dv", "dpk", "dpv", "dgate"], fast, lowp, truth):
        assert_parity(f, lp, t, name=name, dtype=dtype)


def test_pst_and_optimizer_on_cuda():
    w0 = torch.randn(300, 500, device="cuda", dtype=torch.bfloat16)
    u, v = torch.randn(300, 8, device="cuda"), torch.zeros(8, 500, device="cuda")
    a, b = torch.randn(300, 8, device="cuda"), torch.zeros(8, 500, device="cuda")
    r, c = torch.zeros(300, device="cuda"), torch.zeros(500, device="cuda")
    m_ref = ak.pst_mask(w0, u, v, a, b, r, c, sparsity=0.9, backend="reference")
    assert torch.equal(ak.pst_mask(w0, u, v, a, b, r, c, sparsity=0.9, backend="torch"), m_ref)
    assert torch.equal(m_ref.cpu(), ak.pst_mask(w0.cpu(), u.cpu(), v.cpu(), a.cpu(), b.cpu(), r.cpu(), c.cpu(),
                                                sparsity=0.9, backend="reference"))
    model = torch.nn.Linear(64, 64).cuda()
    opt = ak.ChildTuningAdamW(model.parameters(), lr=1e-3, reserve_p=0.3)
    model(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()
    keep = ak.child_tuning.keep_mask(0, 1, 0, (64, 64), 0.3, "cuda")
    assert torch.equal(keep.cpu(), ak.child_tuning.keep_mask(0, 1, 0, (64, 64), 0.3, "cpu"))


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_pst_layer_compiles_with_the_extension(backend):
    """torch.compile(fullgraph=True) of a PSTLinear whose backend selection checks the CUDA extension (the
    host-simulated compile test removes that check)."""
    from test_pst import check_compiled_layer

    check_compiled_layer(backend, "cuda", torch.bfloat16)
