// Torch-facing side of child_tuning.cu: argument checks, device guard, stream. Called by
// apt_kernels/child_tuning/optimizer.py (backend "cuda") with the tables of one launch of fused.py's plan.
#include "bindings.h"
#include "child_tuning.cuh"

namespace {

namespace ct = apt::child_tuning;

// One launch of fused.py's tables (one device, parameter dtype and mask mode): `rows` is the tensor table
// (int64 [tensors, 9], TensorRow), `chunks` the chunk table (int32 [chunks, 2], ChunkRow), both on the
// device. fused.py checked the tensors the rows point to (dtype, shape, device, contiguity).
void child_tuning_adamw(const torch::Tensor& rows, const torch::Tensor& chunks, int64_t chunk, int64_t dtype,
                        int64_t mode, bool official, bool has_decay, double beta1, double one_minus_beta1,
                        double beta2, double one_minus_beta2, double eps, double decay, double inv_reserve_p,
                        int64_t seed_lo, int64_t seed_hi, int64_t threshold, int64_t step, double step_size,
                        double bc2_sqrt) {
  APT_CHECK(chunk == ct::kChunk, "child_tuning_adamw: the chunk table must cut tensors into ", ct::kChunk,
            "-element chunks (the kernel's kChunk), got ", chunk);
  APT_CHECK(dtype == ct::kFloat32 || dtype == ct::kBFloat16 || dtype == ct::kFloat16,
            "child_tuning_adamw: unknown dtype code ", dtype);
  APT_CHECK(mode == ct::kModeNone || mode == ct::kModeF || mode == ct::kModeD, "child_tuning_adamw: unknown mode ",
            mode);
  APT_CHECK(rows.is_cuda() && rows.scalar_type() == torch::kInt64 && rows.dim() == 2 &&
                rows.size(1) * 8 == static_cast<int64_t>(sizeof(ct::TensorRow)) && rows.is_contiguous(),
            "child_tuning_adamw: the tensor table must be a contiguous CUDA int64 tensor of shape [tensors, ",
            sizeof(ct::TensorRow) / 8, "]");
  APT_CHECK(chunks.is_cuda() && chunks.device() == rows.device() && chunks.scalar_type() == torch::kInt32 &&
                chunks.dim() == 2 && chunks.size(1) == 2 && chunks.is_contiguous(),
            "child_tuning_adamw: the chunk table must be a contiguous int32 tensor of shape [chunks, 2] on the "
            "tensor table's device");
  APT_CHECK(chunks.size(0) <= 0x7FFFFFFF, "child_tuning_adamw: too many chunks (", chunks.size(0), ")");
  APT_CHECK(seed_lo >= 0 && seed_lo <= 0xFFFFFFFFLL && seed_hi >= 0 && seed_hi <= 0xFFFFFFFFLL && threshold >= 0 &&
                threshold <= (1LL << ct::kKeepBits) && step >= 0 && step <= 0xFFFFFFFFLL,
            "child_tuning_adamw: seed words and step must be uint32 and the threshold in [0, 2^24]");
  if (chunks.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  const ct::Hyper hyper{static_cast<float>(beta1),
                        static_cast<float>(one_minus_beta1),
                        static_cast<float>(beta2),
                        static_cast<float>(one_minus_beta2),
                        static_cast<float>(eps),
                        static_cast<float>(decay),
                        static_cast<float>(inv_reserve_p),
                        static_cast<uint32_t>(seed_lo),
                        static_cast<uint32_t>(seed_hi),
                        static_cast<uint32_t>(threshold),
                        static_cast<uint32_t>(step),
                        static_cast<float>(step_size),
                        static_cast<float>(bc2_sqrt)};
  apt::check_cuda(apt_child_tuning_adamw(reinterpret_cast<const ct::TensorRow*>(rows.data_ptr<int64_t>()),
                                         reinterpret_cast<const ct::ChunkRow*>(chunks.data_ptr<int32_t>()),
                                         chunks.size(0), hyper, static_cast<int>(dtype), static_cast<int>(mode),
                                         official, has_decay, c10::cuda::getCurrentCUDAStream()),
                  "apt_child_tuning_adamw");
}

torch::Tensor child_tuning_keep_mask(int64_t numel, int64_t elem_offset, int64_t step, int64_t param_index,
                                     int64_t seed_lo, int64_t seed_hi, int64_t threshold, int64_t device_index) {
  APT_CHECK(numel >= 0 && elem_offset >= 0, "child_tuning_keep_mask: numel and offset must be >= 0");
  const torch::Device device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  const c10::cuda::CUDAGuard guard(device);
  auto out = torch::empty({numel}, torch::dtype(torch::kBool).device(device));
  apt::check_cuda(apt_child_tuning_keep_mask(out.data_ptr<bool>(), numel, elem_offset, static_cast<uint32_t>(step),
                                             static_cast<uint32_t>(param_index), static_cast<uint32_t>(seed_lo),
                                             static_cast<uint32_t>(seed_hi), static_cast<uint32_t>(threshold),
                                             c10::cuda::getCurrentCUDAStream()),
                  "apt_child_tuning_keep_mask");
  return out;
}

}  // namespace

void apt::bind_child_tuning(pybind11::module_& m) {
  m.def("child_tuning_adamw", &child_tuning_adamw,
        "Child-Tuning masked AdamW: one multi-tensor launch over fused.py's tensor and chunk tables "
        "(rows, chunks, chunk, dtype code, mode, official, has_decay, hyper scalars, shared step and its scalars)");
  m.def("child_tuning_keep_mask", &child_tuning_keep_mask,
        "the F-mode keep bits the update kernel draws (numel, offset, step, param index, seed lo/hi, threshold, device)");
}
