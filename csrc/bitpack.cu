#include "bitpack.cuh"

namespace {

constexpr int kThreads = 256;

// One warp packs 32 consecutive elements into one word with a ballot.
__global__ void pack_bits_kernel(const bool* __restrict__ mask, uint32_t* __restrict__ words, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool bit = i < n && mask[i];
  const uint32_t word = __ballot_sync(0xffffffffu, bit);
  if ((threadIdx.x & 31) == 0 && i < n) words[i >> 5] = word;
}

__global__ void unpack_bits_kernel(const uint32_t* __restrict__ words, bool* __restrict__ mask, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) mask[i] = (words[i >> 5] >> (i & 31)) & 1u;
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

}  // namespace

extern "C" cudaError_t apt_pack_bits(const bool* mask, uint32_t* words, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  pack_bits_kernel<<<blocks_for(n), kThreads, 0, stream>>>(mask, words, n);
  return cudaGetLastError();
}

extern "C" cudaError_t apt_unpack_bits(const uint32_t* words, bool* mask, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  unpack_bits_kernel<<<blocks_for(n), kThreads, 0, stream>>>(words, mask, n);
  return cudaGetLastError();
}
