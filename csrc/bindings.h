// Shared by the torch-facing binding files (*_bind.cpp). Kernel sources (*.cu, *.cuh) never include this.
#pragma once
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace apt {

inline void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

// One function per op family, each defined in its own <family>_bind.cpp.
void bind_bitpack(pybind11::module_& m);
void bind_pst(pybind11::module_& m);
void bind_child_tuning(pybind11::module_& m);

}  // namespace apt
