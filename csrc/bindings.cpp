// The Python module apt_kernels._C: each op family adds its functions from its own *_bind.cpp.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "apt_kernels CUDA C++ kernels";
  apt::bind_bitpack(m);
  apt::bind_pst(m);
  apt::bind_child_tuning(m);
}
