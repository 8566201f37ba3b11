// Torch-facing side of bitpack.cu: argument checks, device guard, stream.
#include "bindings.h"
#include "bitpack.cuh"

namespace {

torch::Tensor pack_bits(const torch::Tensor& mask) {
  APT_CHECK(mask.is_cuda() && mask.scalar_type() == torch::kBool, "pack_bits: mask must be a CUDA bool tensor");
  const auto flat = mask.contiguous().view(-1);
  const c10::cuda::CUDAGuard guard(mask.device());
  auto words = torch::empty({(flat.numel() + 31) / 32}, flat.options().dtype(torch::kInt32));
  apt::check_cuda(apt_pack_bits(flat.data_ptr<bool>(), reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()),
                                flat.numel(), c10::cuda::getCurrentCUDAStream()),
                  "apt_pack_bits");
  return words;
}

torch::Tensor unpack_bits(const torch::Tensor& words, int64_t n) {
  APT_CHECK(words.is_cuda() && words.scalar_type() == torch::kInt32, "unpack_bits: words must be a CUDA int32 tensor");
  APT_CHECK(words.numel() * 32 >= n, "unpack_bits: ", words.numel(), " words hold fewer than ", n, " bits");
  const auto flat = words.contiguous();
  const c10::cuda::CUDAGuard guard(words.device());
  auto mask = torch::empty({n}, flat.options().dtype(torch::kBool));
  apt::check_cuda(apt_unpack_bits(reinterpret_cast<const uint32_t*>(flat.data_ptr<int32_t>()), mask.data_ptr<bool>(),
                                  n, c10::cuda::getCurrentCUDAStream()),
                  "apt_unpack_bits");
  return mask;
}

}  // namespace

void apt::bind_bitpack(pybind11::module_& m) {
  m.def("pack_bits", &pack_bits, "pack a bool mask into int32 words, LSB first");
  m.def("unpack_bits", &unpack_bits, "unpack n bools from int32 words");
}
