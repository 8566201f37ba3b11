"""Input builders for attention tests (shared by the CPU, Triton and GPU lanes)."""

import torch


def make_inputs(B=2, Hq=4, Hkv=2, N=5, M=7, D=8, P=3, *, shared_prefix=True, gate="token", mask="bool",
                dtype=torch.float64, device="cpu", requires_grad=False):
    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, M, D), rnd(B, Hkv, M, D)
    pk = pv = g = None
    if P is not None:
        pshape = (Hkv, P, D) if shared_prefix else (B, Hkv, P, D)
        pk, pv = rnd(*pshape), rnd(*pshape)
        gshape = {"none": None, "example": (B, 1, 1, P), "token": (B, 1, N, P), "head": (1, Hq, 1, P),
                  "full": (B, Hq, N, P), "head_scalar": (B, Hq, 1, 1), "token_scalar": (1, 1, N, 1)}[gate]
        g = None if gshape is None else torch.rand(*gshape, dtype=dtype, device=device) * 1.5
    am = None
    if mask == "bool":
        am = torch.rand(B, M, device=device) > 0.3
        am[:, -1] = True  # every row sees at least one token
    elif mask == "float":
        am = torch.randn(B, 1, N, M, dtype=dtype, device=device)
        am[..., 1] = torch.finfo(dtype).min  # hides key 1 (HF convention); no row is left empty
    tensors = [q, k, v, pk, pv, g]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors, am


def cast(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]
