// Bit packing of bool masks: 1 bit per element, LSB first (bit j of word w is element 32 * w + j).
// Plain CUDA: no torch headers, so it compiles with nvcc alone (the CI compile lane does that).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

extern "C" {
// words must hold ceil(n / 32) uint32 values. Returns the launch status.
cudaError_t apt_pack_bits(const bool* mask, uint32_t* words, int64_t n, cudaStream_t stream);
// mask must hold n bools.
cudaError_t apt_unpack_bits(const uint32_t* words, bool* mask, int64_t n, cudaStream_t stream);
}
