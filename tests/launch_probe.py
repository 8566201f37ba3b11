"""Run by tests/test_launch.py in a process of its own (compiled Triton, no interpreter, no GPU): the stub
GPU of benchmarks/triton_stub.py records what reaches Triton's launcher, so that a launch from
apt_kernels._launch's cache can be compared with the usual launch path, argument by argument.

Prints one JSON object: {"calls": [[case, round, path, kernel, grid, args], ...], "stats": {...},
"fusion": {kernel: [enable_fp_fusion as each launch asked, ...]}}.
Tensors are recorded as [dtype, shape, strides, data_ptr % 16] (each round allocates its own).
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks import triton_stub  # noqa: E402

CALLS = []
FUSION = {}  # kernel name -> the enable_fp_fusion option of each launch (None: Triton's default)


def _describe(a):
    if isinstance(a, torch.Tensor):
        return [str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
    if isinstance(a, (bool, int, float, str)) or a is None:
        return [type(a).__name__, a if not isinstance(a, float) or a == a else "nan"]
    return [type(a).__name__, str(a)]


def main():
    triton_stub.install(lambda name, grid, args: CALLS.append((name, list(grid), [_describe(a) for a in args])))
    import apt_kernels
    from apt_kernels import _launch

    assert _launch.ENABLED, f"the launch cache is off for triton {triton.__version__}"
    where = {}

    cached_launch = _launch.launch

    def launch(fn, grid, args, kwargs):  # tags the recorded call with the path it took
        before = _launch.stats["cached"]
        jit = fn
        while not hasattr(jit, "params"):  # the JITFunction under an autotuner
            jit = jit.fn
        FUSION.setdefault(jit.__name__, []).append(kwargs.get("enable_fp_fusion"))
        compiled = cached_launch(fn, grid, args, kwargs)
        path = "cached" if _launch.stats["cached"] > before else "usual"
        CALLS[-1] = (where["case"], where["round"], path) + CALLS[-1]
        return compiled

    _launch.launch = launch  # (the launchers call it through _launch.run)

    def case(name, B, Hq, Hkv, N, M, P, D, gate_shape=None, mask=None, causal=False, dropout=0.0, lse=False,
             shared=True, rounds=2, misalign=False, reseed=False):
        for rnd in range(rounds):
            where.update(case=name, round=rnd)
            q = torch.randn(B, Hq, N, D)
            if misalign and rnd == rounds - 1:  # a view 4 bytes into its storage: another specialisation
                q = torch.randn(q.numel() + 1)[1:].view(q.shape)
            k, v = torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
            pk = pv = gate = None
            if P:
                lead = (Hkv,) if shared else (B, Hkv)
                pk, pv = torch.randn(*lead, P, D), torch.randn(*lead, P, D)
                gate = None if gate_shape is None else torch.rand(*gate_shape)
            am = None
            if mask == "padding":
                am = torch.ones(B, M, dtype=torch.bool)
                am[0, M // 2:] = False
            elif mask == "float":
                am = torch.randn(B, 1, N, M)
            for t in (q, k, v, pk, pv, gate):
                if t is not None:
                    t.requires_grad_(True)
            torch.manual_seed(8 if reseed and rnd == rounds - 1 else 7)  # dropout seed: the same unless reseed
            out = apt_kernels.gated_prefix_attention(q, k, v, pk, pv, gate, attn_mask=am, causal=causal,
                                                     dropout_p=dropout, return_lse=lse, backend="triton")
            out = out[0] + out[1][..., None] if lse else out
            out.backward(torch.randn_like(out))

    # the launchers' paths: gates, masks, GQA, causal, dropout, lse, prefix splits, per-example prefix
    case("encoder", 2, 4, 4, 24, 24, 5, 16, gate_shape=(2, 1, 1, 5), mask="padding")
    case("decoder", 1, 4, 2, 20, 20, 6, 32, gate_shape=(1, 1, 20, 6), causal=True, lse=True)
    case("plain", 2, 2, 2, 17, 9, 0, 16)
    case("float mask, per-example prefix", 2, 2, 1, 8, 11, 3, 16, gate_shape=(1, 2, 1, 3), mask="float",
         shared=False)
    case("dropout", 1, 2, 2, 12, 12, 4, 16, gate_shape=(1, 1, 1, 4), dropout=0.25, rounds=3,
         reseed=True)
    case("misaligned", 1, 2, 2, 12, 12, 4, 16, gate_shape=(1, 1, 1, 4), rounds=3, misalign=True)

    # PST (forward passes and backward) and the Child-Tuning step. The PST rounds move the pruned count
    # (k_target, do_not_specialize), the optimizer's rounds its step and step size.
    w0 = torch.randn(40, 72).to(torch.bfloat16)
    for rnd, sparsity in enumerate((0.5, 0.6)):
        where.update(case="pst", round=rnd)
        u, a = torch.randn(40, 3, requires_grad=True), torch.randn(40, 2, requires_grad=True)
        v, b = torch.randn(3, 72, requires_grad=True), torch.randn(2, 72, requires_grad=True)
        r, c = torch.randn(40, requires_grad=True), torch.randn(72, requires_grad=True)
        out = apt_kernels.pst_masked_weight(w0, u, v, a, b, r, c, sparsity=sparsity, backend="triton")
        out.float().sum().backward()
    # the same with the sampled bracket forced on (its ranks move with the sparsity too)
    from apt_kernels.pst import triton_pst

    triton_pst.BRACKET_MIN = 0
    for rnd, sparsity in enumerate((0.5, 0.6)):
        where.update(case="pst bracket", round=rnd)
        apt_kernels.pst_masked_weight(w0, u, v, a, b, r, c, sparsity=sparsity, backend="triton")
    triton_pst.BRACKET_MIN = -1
    where.update(case="kth_smallest", round=0)
    from apt_kernels.pst.triton_pst import kth_smallest

    kth_smallest([torch.rand(50), torch.rand(7, 3)], [3])  # the radix passes and the threshold kernel
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7, 5))]
    opt = apt_kernels.ChildTuningAdamW(params, lr=1e-3, reserve_p=0.5, backend="triton")
    for rnd in range(3):
        where.update(case="child-tuning", round=rnd)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    json.dump({"calls": CALLS, "stats": dict(_launch.stats), "triton": triton.__version__, "fusion": FUSION},
              sys.stdout)


if __name__ == "__main__":
    main()
