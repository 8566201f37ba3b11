// Child-Tuning's fused masked AdamW step: the launch interface shared by the kernels (child_tuning.cu)
// and their binding (child_tuning_bind.cpp). Plain CUDA, no framework headers: it compiles with nvcc
// alone and with a host C++ compiler. Design: docs/child_tuning.md; math: docs/math.md, section 4.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace apt {
namespace child_tuning {

// How a launch masks the gradient; the same numbers as apt_kernels/child_tuning/fused.py's MODE_*.
enum Mode : int {
  kModeNone = 0,  // no mask
  kModeF = 1,     // keep bit drawn in-kernel from the Philox stream, kept gradients divided by reserve_p
  kModeD = 2,     // keep bit read from the tensor's packed mask (1 bit per element, LSB first)
};

// Parameter (and gradient) dtype of a launch; moments are always float32.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kKeepBits = 24;        // keep iff (philox word 0 >> 8) < floor(reserve_p * 2^24)
constexpr int64_t kChunk = 32768;    // elements per chunk; one thread block updates one chunk
constexpr int kThreads = 256;        // threads per block

// One tensor of a launch: a row of the tensor table, which apt_kernels/child_tuning/fused.py builds as
// 9 int64 words (the static_asserts below hold it to that layout). All pointers are device pointers to
// contiguous memory; bits is null unless the launch's mode is kModeD.
struct TensorRow {
  void* param;              // numel elements of the launch's dtype, updated in place
  const void* grad;         // numel elements of the launch's dtype
  float* exp_avg;           // numel float32, updated in place
  float* exp_avg_sq;        // numel float32, updated in place
  const uint32_t* bits;     // ceil(numel / 32) words (kModeD)
  int64_t numel;
  int64_t elem_offset;      // global element index of element 0 (a shard of a larger tensor), kModeF
  uint32_t param_index;     // the parameter's index in the optimizer, kModeF
  uint32_t step;            // the parameter's step (1 for its first update), kModeF
  float step_size;          // official: lr * sqrt(1 - beta2^t) / (1 - beta1^t); torch: lr / (1 - beta1^t)
  float bc2_sqrt;           // torch semantics: sqrt(1 - beta2^t)
};

static_assert(sizeof(void*) == 8 && sizeof(TensorRow) == 72 && offsetof(TensorRow, numel) == 40 &&
                  offsetof(TensorRow, param_index) == 56 && offsetof(TensorRow, step_size) == 64,
              "TensorRow must be fused.py's row of 9 int64 words");

// One chunk: elements [chunk * kChunk, min((chunk + 1) * kChunk, numel)) of tensor `tensor`.
struct ChunkRow {
  int32_t tensor;
  int32_t chunk;
};
static_assert(sizeof(ChunkRow) == 8, "ChunkRow must be fused.py's pair of int32");

// The scalars shared by every tensor of a launch (computed once, in fused.py).
// decay: official semantics p = p + decay * p after the step (decay = -lr * weight_decay);
//        torch semantics    p = p * decay before it          (decay = 1 - lr * weight_decay).
// step != 0: every tensor's step is `step`, with these step_size and bc2_sqrt (they override the rows'
// values, so that tables cached across steps stay valid); step == 0: each row's own.
struct Hyper {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, inv_reserve_p;
  uint32_t seed_lo, seed_hi, threshold;
  uint32_t step;
  float step_size, bc2_sqrt;
};

}  // namespace child_tuning
}  // namespace apt

extern "C" {
// One launch: every chunk of `chunks` (device memory, n_chunks rows: every chunk of every tensor, in
// order) of the tensors of `tensors` (device memory). dtype is a DType, mode a Mode; official selects the paper's semantics (else torch.optim.AdamW's);
// has_decay whether weight decay applies. Returns the launch status.
cudaError_t apt_child_tuning_adamw(const apt::child_tuning::TensorRow* tensors, const apt::child_tuning::ChunkRow* chunks,
                                   int64_t n_chunks, apt::child_tuning::Hyper hyper, int dtype, int mode, bool official,
                                   bool has_decay, cudaStream_t stream);

// The F-mode keep bits of n elements starting at global element index elem_offset (1 byte each): the
// same device function the update kernel draws with, exposed so tests compare it with the definition.
cudaError_t apt_child_tuning_keep_mask(bool* out, int64_t n, int64_t elem_offset, uint32_t step, uint32_t param_index,
                                       uint32_t seed_lo, uint32_t seed_hi, uint32_t threshold, cudaStream_t stream);
}
