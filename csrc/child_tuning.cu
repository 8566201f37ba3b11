// Child-Tuning's fused masked AdamW step: one multi-tensor launch per (dtype, mode) group.
// Block b updates chunk chunks[b] of tensor tensors[chunks[b].tensor]; the per-element math and the
// chunk loop are child_tuning_kernel.cuh's (shared with the host build the tests run on CPU).
#include "child_tuning.cuh"
#include "child_tuning_kernel.cuh"

namespace apt {
namespace child_tuning {
namespace {

template <typename P, int kMode, bool kOfficial, bool kDecay>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const TensorRow* __restrict__ tensors, const ChunkRow* __restrict__ chunks, Hyper h) {
  const ChunkRow c = chunks[blockIdx.x];
  TensorRow t = tensors[c.tensor];
  if (h.step != 0) {  // the step every tensor shares (see Hyper)
    t.step = h.step;
    t.step_size = h.step_size;
    t.bc2_sqrt = h.bc2_sqrt;
  }
  // The pointers come from memory, so the compiler cannot tell they are global: say so, for LDG/STG.
  __builtin_assume(__isGlobal(t.param));
  __builtin_assume(__isGlobal(t.grad));
  __builtin_assume(__isGlobal(t.exp_avg));
  __builtin_assume(__isGlobal(t.exp_avg_sq));
  if constexpr (kMode == kModeD) __builtin_assume(__isGlobal(t.bits));
  update_chunk<P, kMode, kOfficial, kDecay>(t, c.chunk, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), h);
}

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t n, int64_t elem_offset, uint32_t step,
                                 uint32_t param_index, uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = keep_bit(i + elem_offset, step, param_index, seed_lo, seed_hi, threshold);
  }
}

}  // namespace
}  // namespace child_tuning
}  // namespace apt

extern "C" cudaError_t apt_child_tuning_adamw(const apt::child_tuning::TensorRow* tensors,
                                              const apt::child_tuning::ChunkRow* chunks, int64_t n_chunks,
                                              apt::child_tuning::Hyper hyper, int dtype, int mode, bool official,
                                              bool has_decay, cudaStream_t stream) {
  namespace ct = apt::child_tuning;
  if (n_chunks <= 0) return cudaSuccess;
  if (n_chunks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  return ct::dispatch(dtype, mode, official, has_decay, [&](auto p, auto m, auto o, auto d) -> cudaError_t {
    using P = typename decltype(p)::type;
    ct::adamw_kernel<P, decltype(m)::value, decltype(o)::value, decltype(d)::value>
        <<<static_cast<unsigned int>(n_chunks), ct::kThreads, 0, stream>>>(tensors, chunks, hyper);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t apt_child_tuning_keep_mask(bool* out, int64_t n, int64_t elem_offset, uint32_t step,
                                                  uint32_t param_index, uint32_t seed_lo, uint32_t seed_hi,
                                                  uint32_t threshold, cudaStream_t stream) {
  namespace ct = apt::child_tuning;
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + ct::kThreads - 1) / ct::kThreads;
  const unsigned int grid = static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
  ct::keep_mask_kernel<<<grid, ct::kThreads, 0, stream>>>(out, n, elem_offset, step, param_index, seed_lo, seed_hi,
                                                         threshold);
  return cudaGetLastError();
}
