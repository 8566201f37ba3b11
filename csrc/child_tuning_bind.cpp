// Torch-facing side of child_tuning.cu: argument checks, the tensor and chunk tables, device guard, stream.
// Called by apt_kernels/child_tuning/optimizer.py (backend "cuda") with one launch of fused.py's plan.
#include <cstring>

#include "bindings.h"
#include "child_tuning.cuh"

namespace {

namespace ct = apt::child_tuning;

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return ct::kFloat32;
    case torch::kBFloat16: return ct::kBFloat16;
    case torch::kFloat16: return ct::kFloat16;
    default: TORCH_CHECK(false, "child_tuning_adamw: parameters must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return -1;
}

void check_tensor(const char* name, size_t i, const torch::Tensor& t, const torch::Tensor& param, torch::ScalarType dtype,
                  int64_t numel) {
  TORCH_CHECK(t.device() == param.device(), "child_tuning_adamw: ", name, "[", i, "] is on ", t.device(),
              " but the parameters are on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, "child_tuning_adamw: ", name, "[", i, "] must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "child_tuning_adamw: ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(t.numel() == numel, "child_tuning_adamw: ", name, "[", i, "] has ", t.numel(), " elements, expected ",
              numel);
}

// A host array copied to the device asynchronously on the current stream (through pinned memory).
torch::Tensor to_device(const void* data, size_t bytes, const torch::Device& device) {
  auto host = torch::empty({static_cast<int64_t>(bytes)}, torch::dtype(torch::kUInt8).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, bytes);
  return host.to(device, torch::kUInt8, /*non_blocking=*/true);
}

// One launch: every tensor of one device, one parameter dtype and one mask mode (fused.py's Launch).
void child_tuning_adamw(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                        const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                        const std::vector<torch::Tensor>& bits, const std::vector<int64_t>& elem_offsets,
                        const std::vector<int64_t>& param_indices, const std::vector<int64_t>& steps,
                        const std::vector<double>& step_sizes, const std::vector<double>& bc2_sqrts, double beta1,
                        double one_minus_beta1, double beta2, double one_minus_beta2, double eps, double decay,
                        bool has_decay, double inv_reserve_p, int64_t seed_lo, int64_t seed_hi, int64_t threshold,
                        bool official, int64_t mode) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && elem_offsets.size() == n &&
                  param_indices.size() == n && steps.size() == n && step_sizes.size() == n && bc2_sqrts.size() == n,
              "child_tuning_adamw: every per-tensor list must have one entry per parameter (", n, ")");
  TORCH_CHECK(mode == ct::kModeNone || mode == ct::kModeF || mode == ct::kModeD, "child_tuning_adamw: unknown mode ",
              mode);
  TORCH_CHECK(mode == ct::kModeD ? bits.size() == n : bits.empty(),
              "child_tuning_adamw: packed masks are given exactly in mode D, one per parameter");
  TORCH_CHECK(seed_lo >= 0 && seed_lo <= 0xFFFFFFFFLL && seed_hi >= 0 && seed_hi <= 0xFFFFFFFFLL && threshold >= 0 &&
                  threshold <= (1LL << ct::kKeepBits),
              "child_tuning_adamw: seed words must be uint32 and the threshold in [0, 2^24]");
  if (n == 0) return;
  const auto& first = params[0];
  TORCH_CHECK(first.is_cuda(), "child_tuning_adamw: parameters must be CUDA tensors, got ", first.device());
  const int dtype = dtype_code(first);

  std::vector<ct::TensorRow> rows(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const int64_t numel = p.numel();
    check_tensor("params", i, p, first, first.scalar_type(), numel);
    check_tensor("grads", i, grads[i], first, first.scalar_type(), numel);
    check_tensor("exp_avgs", i, exp_avgs[i], first, torch::kFloat32, numel);
    check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], first, torch::kFloat32, numel);
    if (mode == ct::kModeD) check_tensor("bits", i, bits[i], first, torch::kInt32, (numel + 31) / 32);
    TORCH_CHECK(steps[i] >= 1 && steps[i] <= 0xFFFFFFFFLL && param_indices[i] >= 0 && param_indices[i] <= 0xFFFFFFFFLL,
                "child_tuning_adamw: step and parameter index must be uint32 (tensor ", i, ")");
    TORCH_CHECK(elem_offsets[i] >= 0, "child_tuning_adamw: element offsets must be >= 0");
    TORCH_CHECK((numel + ct::kChunk - 1) / ct::kChunk <= 0x7FFFFFFF, "child_tuning_adamw: tensor ", i, " is too large");
    rows[i] = ct::TensorRow{p.data_ptr(),
                            grads[i].data_ptr(),
                            exp_avgs[i].data_ptr<float>(),
                            exp_avg_sqs[i].data_ptr<float>(),
                            mode == ct::kModeD ? reinterpret_cast<const uint32_t*>(bits[i].data_ptr<int32_t>()) : nullptr,
                            numel,
                            elem_offsets[i],
                            static_cast<uint32_t>(param_indices[i]),
                            static_cast<uint32_t>(steps[i]),
                            static_cast<float>(step_sizes[i]),
                            static_cast<float>(bc2_sqrts[i])};
  }
  const std::vector<ct::ChunkRow> chunks = ct::chunk_table(rows.data(), static_cast<int64_t>(n));
  if (chunks.empty()) return;

  const c10::cuda::CUDAGuard guard(first.device());
  const auto tensor_table = to_device(rows.data(), rows.size() * sizeof(ct::TensorRow), first.device());
  const auto chunk_table = to_device(chunks.data(), chunks.size() * sizeof(ct::ChunkRow), first.device());
  const ct::Hyper hyper{static_cast<float>(beta1),
                        static_cast<float>(one_minus_beta1),
                        static_cast<float>(beta2),
                        static_cast<float>(one_minus_beta2),
                        static_cast<float>(eps),
                        static_cast<float>(decay),
                        static_cast<float>(inv_reserve_p),
                        static_cast<uint32_t>(seed_lo),
                        static_cast<uint32_t>(seed_hi),
                        static_cast<uint32_t>(threshold)};
  apt::check_cuda(apt_child_tuning_adamw(reinterpret_cast<const ct::TensorRow*>(tensor_table.data_ptr()),
                                         reinterpret_cast<const ct::ChunkRow*>(chunk_table.data_ptr()),
                                         static_cast<int64_t>(chunks.size()), hyper, dtype, static_cast<int>(mode),
                                         official, has_decay, c10::cuda::getCurrentCUDAStream()),
                  "apt_child_tuning_adamw");
}

torch::Tensor child_tuning_keep_mask(int64_t numel, int64_t elem_offset, int64_t step, int64_t param_index,
                                     int64_t seed_lo, int64_t seed_hi, int64_t threshold, int64_t device_index) {
  TORCH_CHECK(numel >= 0 && elem_offset >= 0, "child_tuning_keep_mask: numel and offset must be >= 0");
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
        "Child-Tuning masked AdamW: one multi-tensor launch (one device, parameter dtype and mask mode)");
  m.def("child_tuning_keep_mask", &child_tuning_keep_mask,
        "the F-mode keep bits the update kernel draws (numel, offset, step, param index, seed lo/hi, threshold, device)");
}
