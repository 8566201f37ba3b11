"""Every public entry point rejects bad input with a message that names the argument and the shapes."""

import pytest
import torch

import apt_kernels as ak


def attn(B=2, Hq=4, Hkv=2, N=5, M=6, D=8, P=3):
    q, k, v = torch.randn(B, Hq, N, D), torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
    pk, pv = torch.randn(Hkv, P, D), torch.randn(Hkv, P, D)
    return q, k, v, pk, pv


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda a: a.update(q=a["q"][0]), ValueError, r"q must be 4-D, got shape \(4, 5, 8\)"),
    (lambda a: a.update(k=a["k"].double()), TypeError, "dtypes must match"),
    (lambda a: a.update(q=a["q"].int()), TypeError, "q must have dtype"),
    (lambda a: a.update(q="x"), TypeError, "q must be a torch.Tensor"),
    (lambda a: a.update(v=a["v"][:, :, :4]), ValueError, "k and v must have the same shape"),
    (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), ValueError, r"must be \(B, Hkv, M, D\) with B = 2"),
    (lambda a: a.update(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError,
     r"Hq = 4 .* multiple of kv heads Hkv = 3"),
    (lambda a: a.update(prefix_v=None), ValueError, "prefix_k and prefix_v must be given together"),
    (lambda a: a.update(prefix_k=torch.randn(3, 3, 8), prefix_v=torch.randn(3, 3, 8)), ValueError,
     r"prefix_k \(3, 3, 8\) must be \(Hkv, P, D\)"),
    (lambda a: a.update(prefix_v=torch.randn(2, 4, 8)), ValueError, "must have the same shape"),
    (lambda a: a.update(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)), ValueError,
     r"must be \(Hkv, P, D\) = \(2, P, 8\) or \(B, Hkv, P, D\) = \(2, 2, P, 8\)"),  # a batch of 3, B = 2
    (lambda a: a.update(prefix_k=a["prefix_k"].double(), prefix_v=a["prefix_v"].double()), TypeError,
     "dtypes must match"),
    (lambda a: a.update(gate=torch.rand(2, 1, 1, 4)), ValueError, r"gate of shape \(2, 1, 1, 4\) does not broadcast"),
    (lambda a: a.update(gate=torch.rand(1, 2, 1, 1, 3)), ValueError, "has more dims"),
    (lambda a: a.update(attn_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"\(B, M\) = \(2, 6\)"),
    (lambda a: a.update(attn_mask=torch.ones(2, 6, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    (lambda a: a.update(attn_mask=torch.zeros(3, 1, 5, 6)), ValueError, "attn_mask of shape"),
    (lambda a: a.update(dropout_p=1.0), ValueError, r"dropout_p must lie in \[0.0, 1.0\)"),
    (lambda a: a.update(causal=1), TypeError, "causal must be a bool"),
    (lambda a: a.update(backend="tpu"), ValueError, "backend must be 'auto' or one of"),
])
def test_attention_errors(mutate, exc, pattern):
    q, k, v, pk, pv = attn()
    args = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        ak.gated_prefix_attention(**args)


def test_attention_accepts_every_documented_form():
    q, k, v, pk, pv = attn()
    B, Hq, N, P = 2, 4, 5, 3
    for gate in (None, torch.rand(B, 1, 1, P), torch.rand(B, 1, N, P), torch.rand(1, Hq, 1, P),
                 torch.rand(B, Hq, N, P), torch.rand(P), torch.rand(N, P)):
        for mask in (None, torch.rand(B, 6) > 0.2, torch.zeros(B, 1, N, 6), torch.zeros(N, 6),
                     torch.ones(B, Hq, N, 6, dtype=torch.bool)):
            out = ak.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=mask)
            assert out.shape == q.shape
    ak.gated_prefix_attention(q, k, v, pk[None].expand(B, -1, -1, -1), pv[None].expand(B, -1, -1, -1))
    ak.gated_prefix_attention(q, k, v, pk[None], pv[None])


def pst_args(n=5, k=6, rw=2, rs=3):
    return dict(w0=torch.randn(n, k), u=torch.randn(n, rw), v=torch.randn(rw, k), a=torch.randn(n, rs),
                b=torch.randn(rs, k), r=torch.randn(n), c=torch.randn(k))


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda a: a.update(w0=a["w0"][0]), ValueError, r"w0 must be 2-D, got shape \(6,\)"),
    (lambda a: a.update(v=torch.randn(2, 7)), ValueError, r"v must have shape \(2, 6\) for w0 \(5, 6\)"),
    (lambda a: a.update(b=torch.randn(2, 6)), ValueError, r"b must have shape \(3, 6\)"),
    (lambda a: a.update(r=torch.randn(6)), ValueError, r"r must have shape \(5,\)"),
    (lambda a: a.update(c=torch.randn(1, 6)), ValueError, "c must be 1-D"),
    (lambda a: a.update(u=a["u"].long()), TypeError, "u must have dtype"),
    (lambda a: a.update(sparsity=1.0), ValueError, r"sparsity must lie in \[0.0, 1.0\)"),
    (lambda a: a.update(sparsity=-0.1), ValueError, "sparsity must lie in"),
    (lambda a: a.update(sparsity=float("nan")), ValueError, "sparsity must lie in"),
    (lambda a: a.update(sparsity="0.5"), TypeError, "sparsity must be a real number"),
    (lambda a: a.update(beta=None), TypeError, "beta must be a real number"),
    (lambda a: a.update(beta=True), TypeError, "beta must be a real number"),  # a bool is not a number here
    (lambda a: a.update(backend="cuda"), ak.BackendUnavailable, "cuda"),
])
def test_pst_errors(mutate, exc, pattern):
    args = pst_args()
    args["sparsity"] = 0.5
    mutate(args)
    for fn in (ak.pst_masked_weight, ak.pst_mask):
        with pytest.raises(exc, match=pattern):
            fn(**args)


def test_pst_rank_zero_and_meta_device():
    args = pst_args(rw=0, rs=0)
    out = ak.pst_masked_weight(**args, sparsity=0.5)
    assert int((out == 0).sum()) == 15
    bad = pst_args()
    bad["u"] = bad["u"].to("meta")
    with pytest.raises(ValueError, match="u is on meta but w0 is on cpu"):
        ak.pst_mask(**bad, sparsity=0.5)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(reserve_p=0.0), ValueError, r"reserve_p must lie in \(0.0, 1.0\]"),
    (dict(reserve_p=1.5), ValueError, "reserve_p must lie in"),
    (dict(mode="X"), ValueError, r"mode must be one of \('F', 'D'\)"),
    (dict(mode="D"), ValueError, 'mode "D" needs masks'),
    (dict(semantics="hf"), ValueError, "semantics must be one of"),
    (dict(lr=-1.0), ValueError, "lr must lie in"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must lie in"),
    (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
    (dict(eps=-1e-8), ValueError, "eps must lie in"),
    (dict(eps=float("inf")), ValueError, "eps must lie in"),
    (dict(lr=float("inf")), ValueError, "lr must lie in"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must lie in"),
    (dict(seed=-1), ValueError, "seed must be an integer"),
    (dict(seed=1.5), ValueError, "seed must be an integer"),
    (dict(seed=2 ** 64), ValueError, "seed must be an integer"),  # would wrap to seed 0
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ak.BackendUnavailable, "child_tuning_adamw: backend='cuda' cannot run here"),
    (dict(mode="D", masks=[1]), TypeError, "masks must be a dict"),
])
def test_child_tuning_errors(kwargs, exc, pattern):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(exc, match=pattern):
        ak.ChildTuningAdamW(model.parameters(), **kwargs)


def test_child_tuning_mask_errors():
    model = torch.nn.Linear(3, 2)
    w = model.weight
    with pytest.raises(TypeError, match=r"mask of parameter \(2, 3\) must be a bool tensor"):
        ak.ChildTuningAdamW(model.parameters(), mode="D", masks={w: torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"mask of parameter \(2, 3\) has shape \(3, 2\)"):
        ak.ChildTuningAdamW(model.parameters(), mode="D", masks={w: torch.ones(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        ak.ChildTuningAdamW(model.parameters(), mode="D", masks={torch.nn.Parameter(torch.ones(2)): torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"reserve_p \(param group 1\) must lie in"):
        ak.ChildTuningAdamW([{"params": [w]}, {"params": [model.bias], "reserve_p": 2.0}])


def test_fisher_errors():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reserve_p must lie in"):
        ak.fisher_mask(model, [], 0.0)
    with pytest.raises(ValueError, match="max_grad_norm must lie in"):
        ak.fisher_mask(model, [], 0.5, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="no trainable parameter was selected"):
        ak.fisher_mask(model, [], 0.5, select=lambda n, p: False)
    with pytest.raises(ValueError, match="no scalar loss"):
        ak.fisher_mask(model, [torch.randn(4, 3)], 0.5, progress=False)


def test_seed_range_ends_at_two_to_the_64():
    model = torch.nn.Linear(3, 2)
    ak.ChildTuningAdamW(model.parameters(), seed=2 ** 64 - 1)  # the largest seed is taken


def test_pack_bits_takes_bool_masks_only():
    from apt_kernels.bits import pack_bits

    with pytest.raises(TypeError, match="mask must have dtype"):
        pack_bits(torch.ones(3))
