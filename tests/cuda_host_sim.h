// Runs the CUDA C++ kernels of csrc/ on the host, for tests on machines without a GPU.
//
// A .cu file is compiled as plain C++ (g++), with this header included first and its launches
// `kernel<<<grid, block, shmem, stream>>>(args)` rewritten by the test (tests/cuda_host.py) to
// `::sim::Launch(grid, block, shmem, stream)(kernel, args)`. A launch runs the blocks one after the
// other; inside a block every CUDA thread is a fiber (ucontext) on the calling thread, switched at
// the synchronisation points, so that __syncthreads, __syncwarp, the warp collectives (__shfl_sync,
// __shfl_up_sync, __shfl_xor_sync, __ballot_sync) and shared memory have their CUDA meaning:
//   * __shared__ variables are function statics (one block runs at a time, so one copy suffices);
//   * __syncthreads waits for every live thread of the block, a warp collective for the warp's 32
//     lanes; the scheduler runs the threads round-robin in between (one legal interleaving);
//   * atomics are plain read-modify-writes (one host thread runs at a time).
// Only what csrc/ uses is provided; blocks must be a multiple of 32 threads and every lane of a warp
// must reach each warp collective (full masks only), as on the GPU: a block whose threads wait on
// each other forever aborts the test ("deadlock"). Device-only arithmetic written as inline PTX must
// have a host branch (#ifdef __CUDA_ARCH__) in the source.
#pragma once

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __builtin_assume(x) ((void)0)
#define __isGlobal(p) true

#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace sim {

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack;
  Wait wait = Wait::kNone;
};

// Fiber stacks, allocated once (untouched pages cost nothing) and reused by every block.
inline char* stack_of(int thread, size_t size) {
  static std::vector<char*> stacks;
  while (static_cast<int>(stacks.size()) <= thread) stacks.push_back(static_cast<char*>(std::malloc(size)));
  return stacks[thread];
}

// One block's threads as fibers, run by Block::run on the calling thread.
class Block {
 public:
  static constexpr size_t kStack = 64 * 1024;

  explicit Block(int threads) : exchange(threads), fibers_(threads) {
    for (int t = 0; t < threads; ++t) fibers_[t].stack = stack_of(t, kStack);
  }

  void run(const std::function<void()>& body) {
    body_ = &body;
    for (int t = 0; t < static_cast<int>(fibers_.size()); ++t) {
      Fiber& f = fibers_[t];
      f.wait = Wait::kNone;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &main_;
      makecontext(&f.ctx, &Block::entry, 0);
    }
    const int n = static_cast<int>(fibers_.size());
    for (;;) {
      bool ran = false;
      for (int t = 0; t < n; ++t) {
        if (fibers_[t].wait != Wait::kNone) continue;
        switch_to(t);
        ran = true;
      }
      if (ran) continue;
      int done = 0, at_block = 0;
      for (const Fiber& f : fibers_) {
        done += f.wait == Wait::kDone;
        at_block += f.wait == Wait::kBlock;
      }
      if (done == n) return;
      bool released = false;
      for (int w = 0; w < n / 32; ++w) {  // a warp whose 32 lanes all wait at a collective
        bool all = true;
        for (int l = 0; l < 32 && all; ++l) all = fibers_[32 * w + l].wait == Wait::kWarp;
        if (all) {
          for (int l = 0; l < 32; ++l) fibers_[32 * w + l].wait = Wait::kNone;
          released = true;
        }
      }
      if (!released && at_block > 0 && at_block + done == n) {  // __syncthreads: every live thread is there
        for (Fiber& f : fibers_)
          if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
        released = true;
      }
      if (!released) {
        std::fprintf(stderr, "cuda_host_sim: deadlock in block (%u, %u, %u)\n", blockIdx.x, blockIdx.y, blockIdx.z);
        std::abort();
      }
    }
  }

  // Called from a fiber: wait at a barrier (block or warp) until the scheduler releases it.
  void wait(Wait what) {
    Fiber& f = fibers_[current_];
    f.wait = what;
    swapcontext(&f.ctx, &main_);
  }

  std::vector<uint64_t> exchange;  // one slot per thread, for the warp collectives

 private:
  static void entry();

  void switch_to(int t) {
    current_ = t;
    threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
    swapcontext(&main_, &fibers_[t].ctx);
  }

  std::vector<Fiber> fibers_;
  ucontext_t main_;
  const std::function<void()>* body_ = nullptr;
  int current_ = 0;

  friend Block*& active();
};

inline Block*& active() {
  static Block* b = nullptr;
  return b;
}

inline void Block::entry() {
  Block& b = *active();
  (*b.body_)();
  b.fibers_[b.current_].wait = Wait::kDone;  // then uc_link returns to the scheduler
}

// Every lane publishes x, the warp meets, each lane reads what it needs, the warp meets again.
template <typename T, typename F>
T warp_exchange(T x, F&& read) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp collectives of at most 64 bits");
  Block& b = *active();
  const int tid = static_cast<int>(threadIdx.x), base = tid & ~31;
  uint64_t slot = 0;
  std::memcpy(&slot, &x, sizeof(T));
  b.exchange[tid] = slot;
  b.wait(Wait::kWarp);
  const T out = read([&](int lane) {
    T y;
    std::memcpy(&y, &b.exchange[base + lane], sizeof(T));
    return y;
  });
  b.wait(Wait::kWarp);
  return out;
}

}  // namespace sim

inline void __syncthreads() { sim::active()->wait(sim::Wait::kBlock); }
// One host thread runs at a time: every write is already visible to every later read.
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* address) { return *address; }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) throw std::logic_error("cuda_host_sim: only full-warp masks");
  sim::warp_exchange(0, [](auto) { return 0; });
}

template <typename T>
T __shfl_sync(unsigned mask, T x, int src_lane) {
  if (mask != 0xffffffffu) throw std::logic_error("cuda_host_sim: only full-warp masks");
  return sim::warp_exchange(x, [&](auto at) { return at(src_lane & 31); });
}

template <typename T>
T __shfl_up_sync(unsigned mask, T x, unsigned delta) {
  if (mask != 0xffffffffu) throw std::logic_error("cuda_host_sim: only full-warp masks");
  const int lane = static_cast<int>(threadIdx.x & 31);
  return sim::warp_exchange(x, [&](auto at) { return lane >= static_cast<int>(delta) ? at(lane - delta) : x; });
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int lane_mask) {
  if (mask != 0xffffffffu) throw std::logic_error("cuda_host_sim: only full-warp masks");
  const int lane = static_cast<int>(threadIdx.x & 31);
  return sim::warp_exchange(x, [&](auto at) { return at((lane ^ lane_mask) & 31); });
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) throw std::logic_error("cuda_host_sim: only full-warp masks");
  return sim::warp_exchange(static_cast<unsigned>(pred != 0), [](auto at) {
    unsigned word = 0;
    for (int lane = 0; lane < 32; ++lane) word |= at(lane) << lane;
    return word;
  });
}

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicOr(T* address, T value) {
  const T old = *address;
  *address = old | value;
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}

namespace sim {

inline cudaError_t last_error = cudaSuccess;

// The rewritten launch: Launch(grid, block, shmem, stream)(kernel, args...).
struct Launch {
  Launch(dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t = nullptr) : grid_(grid), block_(block) {
    if (shmem) throw std::logic_error("cuda_host_sim: no dynamic shared memory");
  }

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    const int threads = static_cast<int>(block_.x * block_.y * block_.z);
    if (block_.y != 1 || block_.z != 1 || threads % 32 || threads < 32 || threads > 1024 || grid_.x == 0 ||
        grid_.y > 65535 || grid_.z > 65535) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const std::tuple<P...> params(std::forward<A>(args)...);  // converted once, as the launch copies them
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    Block block(threads);
    active() = &block;
    blockDim = block_;
    gridDim = grid_;
    for (unsigned z = 0; z < grid_.z; ++z)
      for (unsigned y = 0; y < grid_.y; ++y)
        for (unsigned x = 0; x < grid_.x; ++x) {
          blockIdx = uint3{x, y, z};
          block.run(body);
        }
    active() = nullptr;
  }

 private:
  dim3 grid_, block_;
};

}  // namespace sim

// The runtime calls csrc/ makes, on host memory: defined in the one translation unit that defines
// CUDA_HOST_SIM_RUNTIME.
#ifdef CUDA_HOST_SIM_RUNTIME
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// A small simulated device: 4 SMs (grids sized from it stay small and still split their work).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = 4;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = sim::last_error;
  sim::last_error = cudaSuccess;
  return e;
}
#endif
