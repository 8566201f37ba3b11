// The Python module apt_kernels._C: each op family adds its functions from its own *_bind.cpp.
//
// The *_bind.cpp files are compiled here, as one translation unit (setup.py builds this file and the .cu
// files): the torch headers take about 35 s to compile per translation unit, and without ninja the
// extension's sources compile one after the other.
#include "bindings.h"

#include "bitpack_bind.cpp"
#include "child_tuning_bind.cpp"
#include "pst_bind.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "apt_kernels CUDA C++ kernels";
  apt::bind_bitpack(m);
  apt::bind_pst(m);
  apt::bind_child_tuning(m);
}
