// Torch-facing side of pst.cu: argument checks, dtype conversion of the (small) factors, device
// guard, stream, output and workspace allocation.
#include "bindings.h"
#include "pst.cuh"

namespace {

int w0_dtype_code(const torch::Tensor& w0) {
  switch (w0.scalar_type()) {
    case torch::kFloat: return APT_PST_F32;
    case torch::kHalf: return APT_PST_F16;
    case torch::kBFloat16: return APT_PST_BF16;
    default: APT_CHECK(false, "pst_forward: w0 must be float32, float16 or bfloat16, got ", w0.scalar_type());
  }
  return APT_PST_F32;
}

// What both entry points share: the checks of w0 and the factors, and the problem in csrc/pst.cuh's terms
// (w0 contiguous, the factors as float32, kept alive here). r and c: null for the backward.
struct Problem {
  torch::Tensor w, u, v, a, b, r, c;
  AptPstProblem p{};
  int64_t n = 0, k = 0, rw = 0, rs = 0;

  Problem(const char* op, const torch::Tensor& w0, const torch::Tensor& u0, const torch::Tensor& v0,
          const torch::Tensor& a0, const torch::Tensor& b0, const torch::Tensor* r0, const torch::Tensor* c0,
          double beta, double alpha1, double alpha2) {
    APT_CHECK(w0.is_cuda() && w0.dim() == 2, op, ": w0 must be a 2-D CUDA tensor");
    n = w0.size(0);
    k = w0.size(1);
    rw = u0.dim() == 2 ? u0.size(1) : -1;
    rs = a0.dim() == 2 ? a0.size(1) : -1;
    APT_CHECK(u0.sizes() == torch::IntArrayRef({n, rw}) && v0.sizes() == torch::IntArrayRef({rw, k}), op,
              ": u must be (n, rw) and v (rw, k)");
    APT_CHECK(a0.sizes() == torch::IntArrayRef({n, rs}) && b0.sizes() == torch::IntArrayRef({rs, k}), op,
              ": a must be (n, rs) and b (rs, k)");
    APT_CHECK(!r0 || (r0->sizes() == torch::IntArrayRef({n}) && c0->sizes() == torch::IntArrayRef({k})), op,
              ": r must be (n,) and c (k,)");
    for (const auto* t : {&u0, &v0, &a0, &b0, r0, c0})
      APT_CHECK(!t || t->device() == w0.device(), op, ": every tensor must be on w0's device");
    auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat).contiguous(); };
    w = w0.contiguous();
    u = f32(u0);
    v = f32(v0);
    a = f32(a0);
    b = f32(b0);
    p.w0 = w.data_ptr();
    p.w0_dtype = w0_dtype_code(w);
    p.u = u.data_ptr<float>();
    p.v = v.data_ptr<float>();
    p.a = a.data_ptr<float>();
    p.b = b.data_ptr<float>();
    if (r0) {
      r = f32(*r0);
      c = f32(*c0);
      p.r = r.data_ptr<float>();
      p.c = c.data_ptr<float>();
    }
    p.n = n;
    p.k = k;
    p.rw = static_cast<int>(rw);
    p.rs = static_cast<int>(rs);
    p.beta = static_cast<float>(beta);
    p.alpha1 = static_cast<float>(alpha1);
    p.alpha2 = static_cast<float>(alpha2);
  }
};

std::vector<torch::Tensor> pst_forward(const torch::Tensor& w0, const torch::Tensor& u, const torch::Tensor& v,
                                       const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& r,
                                       const torch::Tensor& c, double beta, double alpha1, double alpha2,
                                       int64_t n_pruned, int64_t nm_n, int64_t nm_m, int64_t bracket_min) {
  const Problem pr("pst_forward", w0, u, v, a, b, &r, &c, beta, alpha1, alpha2);
  const c10::cuda::CUDAGuard guard(w0.device());
  const int64_t n = pr.n, k = pr.k;
  APT_CHECK(nm_m == 0 ? (n_pruned >= 0 && (n * k == 0 || n_pruned < n * k))
                      : (nm_m <= 32 && 0 <= nm_n && nm_n <= nm_m && k % nm_m == 0),
            "pst_forward: need 0 <= n_pruned < n * k, or N:M with M <= 32, 0 <= N <= M and k % M == 0");
  auto out = torch::empty_like(pr.w);
  auto words = torch::empty({(n * k + 31) / 32}, pr.w.options().dtype(torch::kInt32));
  auto ws = torch::empty({static_cast<int64_t>(apt_pst_workspace_bytes(n, k))}, pr.w.options().dtype(torch::kUInt8));
  apt::check_cuda(apt_pst_forward(&pr.p, n_pruned, static_cast<int>(nm_n), static_cast<int>(nm_m), bracket_min,
                                  out.data_ptr(),
                                  reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()), ws.data_ptr(),
                                  static_cast<size_t>(ws.numel()), c10::cuda::getCurrentCUDAStream()),
                  "apt_pst_forward");
  return {out, words};
}

// Straight-through gradients [dW0 (w0's dtype; empty unless need_w0), dU, dV, dA, dB, dR, dC (float32)].
std::vector<torch::Tensor> pst_backward(const torch::Tensor& grad, const torch::Tensor& words, const torch::Tensor& w0,
                                        const torch::Tensor& u, const torch::Tensor& v, const torch::Tensor& a,
                                        const torch::Tensor& b, double beta, double alpha1, double alpha2,
                                        bool need_w0, bool wide) {
  const Problem pr("pst_backward", w0, u, v, a, b, nullptr, nullptr, beta, alpha1, alpha2);
  const c10::cuda::CUDAGuard guard(w0.device());
  const int64_t n = pr.n, k = pr.k, rw = pr.rw, rs = pr.rs;
  APT_CHECK(rw <= APT_PST_BACKWARD_MAX_RANK && rs <= APT_PST_BACKWARD_MAX_RANK,
            "pst_backward: ranks of at most ", APT_PST_BACKWARD_MAX_RANK, ", got rw = ", rw, ", rs = ", rs);
  APT_CHECK(grad.sizes() == w0.sizes() && grad.device() == w0.device(),
            "pst_backward: grad must have w0's shape and device");
  APT_CHECK(words.scalar_type() == torch::kInt32 && words.dim() == 1 && words.numel() == (n * k + 31) / 32 &&
                words.device() == w0.device(),
            "pst_backward: words must be the forward's int32 bitmask of ceil(n * k / 32) words, on w0's device");
  const auto g = grad.to(pr.w.scalar_type()).contiguous();
  const auto bits = words.contiguous();
  // the six float32 accumulators: one zeroed buffer
  const int64_t sizes[6] = {n * rw, rw * k, n * rs, rs * k, n, k};
  auto flat = torch::zeros({sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4] + sizes[5]},
                           pr.w.options().dtype(torch::kFloat));
  std::vector<torch::Tensor> parts;
  int64_t at = 0;
  for (const int64_t size : sizes) {
    parts.push_back(flat.narrow(0, at, size));
    at += size;
  }
  auto dw0 = need_w0 ? torch::empty_like(pr.w) : pr.w.new_empty({0});
  AptPstGrads out;
  out.du = parts[0].data_ptr<float>();
  out.dv = parts[1].data_ptr<float>();
  out.da = parts[2].data_ptr<float>();
  out.db = parts[3].data_ptr<float>();
  out.dr = parts[4].data_ptr<float>();
  out.dc = parts[5].data_ptr<float>();
  out.dw0 = need_w0 ? dw0.data_ptr() : nullptr;
  apt::check_cuda(apt_pst_backward(&pr.p, g.data_ptr(), reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>()),
                                   &out, wide ? 1 : 0, c10::cuda::getCurrentCUDAStream()),
                  "apt_pst_backward");
  return {dw0, parts[0].view({n, rw}), parts[1].view({rw, k}), parts[2].view({n, rs}), parts[3].view({rs, k}),
          parts[4], parts[5]};
}

}  // namespace

void apt::bind_pst(pybind11::module_& m) {
  m.def("pst_forward", &pst_forward,
        "PST selection + mask passes: (W' in w0's dtype, packed keep bits as int32 words)",
        pybind11::arg("w0"), pybind11::arg("u"), pybind11::arg("v"), pybind11::arg("a"), pybind11::arg("b"),
        pybind11::arg("r"), pybind11::arg("c"), pybind11::arg("beta"), pybind11::arg("alpha1"),
        pybind11::arg("alpha2"), pybind11::arg("n_pruned"), pybind11::arg("nm_n"), pybind11::arg("nm_m"),
        pybind11::arg("bracket_min") = -1);
  m.def("pst_backward", &pst_backward,
        "PST straight-through backward: [dW0 (empty unless need_w0), dU, dV, dA, dB, dR, dC]", pybind11::arg("grad"),
        pybind11::arg("words"), pybind11::arg("w0"), pybind11::arg("u"), pybind11::arg("v"), pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("beta"), pybind11::arg("alpha1"), pybind11::arg("alpha2"),
        pybind11::arg("need_w0"), pybind11::arg("wide") = false);
}
