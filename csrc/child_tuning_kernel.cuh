// Child-Tuning's fused masked AdamW: the per-element math and the per-chunk loop, as __host__ __device__
// templates that child_tuning.cu runs in its kernels. The tests also run those kernels on CPU memory
// (child_tuning.cu compiled for the host with tests/cuda_host_sim.h; tests/test_child_tuning_kernels.py),
// since a machine without a GPU can compile CUDA but not run it. Plain CUDA, no framework headers.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "child_tuning.cuh"

#define APT_CT_HD __host__ __device__ __forceinline__

namespace apt {
namespace child_tuning {

// ---------------------------------------------------------------------------------------------------
// The F-mode random stream (definition: apt_kernels/child_tuning/rng.py, docs/math.md 4.3)
// ---------------------------------------------------------------------------------------------------

APT_CT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al., Random123) on counter c with key (k0, k1); c receives the output.
APT_CT_HD void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    const uint32_t c1 = c[1], c3 = c[3];
    c[0] = hi1 ^ c1 ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c3 ^ k1;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The stream's draw for group q (elements 4q .. 4q+3): out[j] = Philox4x32-10(counter = (q lo, q hi, step,
// param_index), key = (seed lo, seed hi))[j] is the word of element 4q + j.
APT_CT_HD void group_words(uint64_t q, uint32_t step, uint32_t param_index, uint32_t seed_lo, uint32_t seed_hi,
                           uint32_t (&out)[4]) {
  out[0] = static_cast<uint32_t>(q);
  out[1] = static_cast<uint32_t>(q >> 32);
  out[2] = step;
  out[3] = param_index;
  philox4x32_10(out, seed_lo, seed_hi);
}

// Word j (0..3, a run-time value) of a group, without indexing the array dynamically (no local memory).
APT_CT_HD uint32_t word_of(const uint32_t (&w)[4], uint32_t j) {
  return j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3];
}

APT_CT_HD bool keeps(uint32_t x, uint32_t threshold) { return (x >> (32 - kKeepBits)) < threshold; }

// Whether global element `elem` of parameter `param_index` is kept at `step` (rng.py, docs/math.md 4.3):
// x = word (elem mod 4) of the draw for group elem div 4; keep iff (x >> 8) < threshold = floor(reserve_p * 2^24).
APT_CT_HD bool keep_bit(int64_t elem, uint32_t step, uint32_t param_index, uint32_t seed_lo, uint32_t seed_hi,
                        uint32_t threshold) {
  const uint64_t e = static_cast<uint64_t>(elem);
  uint32_t w[4];
  group_words(e >> 2, step, param_index, seed_lo, seed_hi, w);
  return keeps(word_of(w, static_cast<uint32_t>(e & 3)), threshold);
}

// Keep bits of the four global elements elem .. elem+3 (bit k for elem + k): one draw when elem is a multiple
// of 4 (a tensor whose element offset is, i.e. normally), two when the four straddle two groups.
APT_CT_HD uint32_t keep_bits4(int64_t elem, uint32_t step, uint32_t param_index, uint32_t seed_lo, uint32_t seed_hi,
                              uint32_t threshold) {
  const uint64_t e = static_cast<uint64_t>(elem);
  const uint32_t shift = static_cast<uint32_t>(e & 3);
  uint32_t a[4], b[4] = {0, 0, 0, 0};
  group_words(e >> 2, step, param_index, seed_lo, seed_hi, a);
  if (shift != 0) group_words((e >> 2) + 1, step, param_index, seed_lo, seed_hi, b);
  uint32_t bits = 0;
#pragma unroll
  for (uint32_t k = 0; k < 4; ++k) {
    const uint32_t j = shift + k;
    bits |= static_cast<uint32_t>(keeps(j < 4 ? word_of(a, j) : word_of(b, j - 4), threshold)) << k;
  }
  return bits;
}

// ---------------------------------------------------------------------------------------------------
// Element types and correctly rounded sqrt/div (__fsqrt_rn/__fdiv_rn; products and sums may be contracted
// into FMAs, as in torch's and Triton's kernels: backends agree to rounding, not to the bit)
// ---------------------------------------------------------------------------------------------------

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  APT_CT_HD static float load(float x) { return x; }
  APT_CT_HD static float store(float x) { return x; }
};
template <>
struct Elem<__nv_bfloat16> {
  APT_CT_HD static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  APT_CT_HD static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<__half> {
  APT_CT_HD static float load(__half x) { return __half2float(x); }
  APT_CT_HD static __half store(float x) { return __float2half_rn(x); }
};

APT_CT_HD float sqrt_rn(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

APT_CT_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---------------------------------------------------------------------------------------------------
// The update of one element (docs/math.md 4.2), w the parameter in float32, g the masked gradient
// ---------------------------------------------------------------------------------------------------

template <bool kOfficial, bool kDecay>
APT_CT_HD void adamw_element(float& w, float g, float& m, float& v, const Hyper& h, float step_size, float bc2_sqrt) {
  if constexpr (kOfficial) {  // the paper's optimizer: eps before bias correction, decay after the step
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    w = w - step_size * div_rn(m, sqrt_rn(v) + h.eps);
    if constexpr (kDecay) w = w + h.decay * w;
  } else {  // torch.optim.AdamW
    if constexpr (kDecay) w = w * h.decay;
    m = m + h.one_minus_beta1 * (g - m);
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    w = w - step_size * div_rn(m, div_rn(sqrt_rn(v), bc2_sqrt) + h.eps);
  }
}

// The gradient of local element i of tensor t, masked per kMode; `keep` is its F-mode keep bit when the
// caller drew it for a group of four (keep < 0: draw it here).
template <int kMode>
APT_CT_HD float masked_grad(float g, const TensorRow& t, int64_t i, const Hyper& h, int keep = -1) {
  if constexpr (kMode == kModeF) {
    if (keep < 0) keep = keep_bit(i + t.elem_offset, t.step, t.param_index, h.seed_lo, h.seed_hi, h.threshold);
    return g * (keep ? h.inv_reserve_p : 0.0f);
  } else if constexpr (kMode == kModeD) {
    return g * static_cast<float>((t.bits[i >> 5] >> (i & 31)) & 1u);
  }
  return g;
}

template <typename P, int kMode, bool kOfficial, bool kDecay>
APT_CT_HD void update_element(const TensorRow& t, int64_t i, const Hyper& h) {
  P* param = static_cast<P*>(t.param);
  float w = Elem<P>::load(param[i]);
  float m = t.exp_avg[i], v = t.exp_avg_sq[i];
  const float g = masked_grad<kMode>(Elem<P>::load(static_cast<const P*>(t.grad)[i]), t, i, h);
  adamw_element<kOfficial, kDecay>(w, g, m, v, h, t.step_size, t.bc2_sqrt);
  t.exp_avg[i] = m;
  t.exp_avg_sq[i] = v;
  param[i] = Elem<P>::store(w);
}

// Four consecutive elements, with one vector load and store per array and (mode F) one or two draws.
template <typename P>
struct alignas(4 * sizeof(P)) Vec4 {
  P x[4];
};

template <typename P, int kMode, bool kOfficial, bool kDecay>
APT_CT_HD void update_vec4(const TensorRow& t, int64_t i, const Hyper& h) {
  Vec4<P> p = *reinterpret_cast<const Vec4<P>*>(static_cast<const P*>(t.param) + i);
  const Vec4<P> g = *reinterpret_cast<const Vec4<P>*>(static_cast<const P*>(t.grad) + i);
  float4 m = *reinterpret_cast<const float4*>(t.exp_avg + i);
  float4 v = *reinterpret_cast<const float4*>(t.exp_avg_sq + i);
  float* ms[4] = {&m.x, &m.y, &m.z, &m.w};
  float* vs[4] = {&v.x, &v.y, &v.z, &v.w};
  const uint32_t keep =
      kMode == kModeF ? keep_bits4(i + t.elem_offset, t.step, t.param_index, h.seed_lo, h.seed_hi, h.threshold) : 0u;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float w = Elem<P>::load(p.x[k]);
    const float gk = masked_grad<kMode>(Elem<P>::load(g.x[k]), t, i + k, h, static_cast<int>((keep >> k) & 1u));
    adamw_element<kOfficial, kDecay>(w, gk, *ms[k], *vs[k], h, t.step_size, t.bc2_sqrt);
    p.x[k] = Elem<P>::store(w);
  }
  *reinterpret_cast<float4*>(t.exp_avg + i) = m;
  *reinterpret_cast<float4*>(t.exp_avg_sq + i) = v;
  *reinterpret_cast<Vec4<P>*>(static_cast<P*>(t.param) + i) = p;
}

APT_CT_HD bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Lane `lane` of `lanes` (a thread of a block) updates its share of one chunk of tensor t: groups of four
// elements with vector accesses when the addresses allow it, the remainder one element at a time.
template <typename P, int kMode, bool kOfficial, bool kDecay>
APT_CT_HD void update_chunk(const TensorRow& t, int64_t chunk, int lane, int lanes, const Hyper& h) {
  const int64_t start = chunk * kChunk;
  const int64_t end = t.numel < start + kChunk ? t.numel : start + kChunk;
  const bool vec = aligned_to(t.param, 4 * sizeof(P)) && aligned_to(t.grad, 4 * sizeof(P)) &&
                   aligned_to(t.exp_avg, 16) && aligned_to(t.exp_avg_sq, 16);
  const int64_t vec_end = vec ? start + ((end - start) & ~int64_t{3}) : start;  // start is a multiple of 4
  for (int64_t i = start + 4 * int64_t{lane}; i < vec_end; i += 4 * int64_t{lanes}) {
    update_vec4<P, kMode, kOfficial, kDecay>(t, i, h);
  }
  for (int64_t i = vec_end + lane; i < end; i += lanes) {
    update_element<P, kMode, kOfficial, kDecay>(t, i, h);
  }
}

// Calls f(Type<P>, integral_constant<int, mode>, bool_constant<official>, bool_constant<decay>) with the
// compile-time parameters matching the run-time ones: the one place a launch picks its instantiation.
template <typename T>
struct Type {
  using type = T;
};

template <typename F>
cudaError_t dispatch(int dtype, int mode, bool official, bool has_decay, F&& f) {
  auto with_flags = [&](auto p, auto m) -> cudaError_t {
    if (official) {
      return has_decay ? f(p, m, std::true_type{}, std::true_type{}) : f(p, m, std::true_type{}, std::false_type{});
    }
    return has_decay ? f(p, m, std::false_type{}, std::true_type{}) : f(p, m, std::false_type{}, std::false_type{});
  };
  auto with_mode = [&](auto p) -> cudaError_t {
    switch (mode) {
      case kModeNone: return with_flags(p, std::integral_constant<int, kModeNone>{});
      case kModeF: return with_flags(p, std::integral_constant<int, kModeF>{});
      case kModeD: return with_flags(p, std::integral_constant<int, kModeD>{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (dtype) {
    case kFloat32: return with_mode(Type<float>{});
    case kBFloat16: return with_mode(Type<__nv_bfloat16>{});
    case kFloat16: return with_mode(Type<__half>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace child_tuning
}  // namespace apt
