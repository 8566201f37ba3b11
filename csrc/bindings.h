// Shared by the torch-facing binding files (*_bind.cpp). Kernel sources (*.cu, *.cuh) never include this.
#pragma once
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

namespace apt {

// Error messages are put together here, never by streaming numbers (TORCH_CHECK streams its arguments into
// a std::ostringstream). A toolchain that links its own libstdc++ into the extension (the H200 image's
// /opt/gcc does) leaves that copy's locale not set up, and streaming an integer (num_put) then crashed the
// process instead of raising; strings stream safely. std::to_string formats through the C library.
namespace detail {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string piece(T x) {
  return std::to_string(x);
}
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (out.append(detail::piece(args)), ...);
  return out;
}

}  // namespace apt

// TORCH_CHECK with the message built by apt::message (a RuntimeError in Python, as TORCH_CHECK's).
#define APT_CHECK(cond, ...) TORCH_CHECK(cond, ::apt::message(__VA_ARGS__))

namespace apt {

inline void check_cuda(cudaError_t status, const char* what) {
  APT_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

// One function per op family, each defined in its own <family>_bind.cpp.
void bind_bitpack(pybind11::module_& m);
void bind_pst(pybind11::module_& m);
void bind_child_tuning(pybind11::module_& m);

}  // namespace apt
