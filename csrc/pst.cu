// PST selection and mask passes (see pst.cuh for the contract).
//
// Global selection, all on the device (no host synchronisation):
//   3 histogram passes over the unsigned keys, digits of 11, 11 and 10 bits from the top. Pass p
//   recomputes every score, keeps the entries whose higher digits equal the prefix chosen so far,
//   counts their digit in a shared-memory histogram and adds it to a global one; the last block to
//   finish (an arrival counter after a memory fence) then finds the bucket holding the need-th smallest
//   candidate and narrows the prefix ("pick": no launch of its own).
//   After the last pass the prefix is the threshold key T, need = how many entries equal to T must be
//   pruned, count = how many there are. If need < count the ties are split in row-major order: a
//   pass counts the ties of every row, and its last block scans the row counts and then the one row
//   where the cumulative count reaches need, giving the flat index F of the need-th tie ("cut").
//   Mask pass: keep iff key > T, or key == T and flat index > F (F = n k - 1 when every tie goes).
// Candidate list: pass 1 knows how many entries match the first digit (pass 0's bucket). When they fit
//   in W''s buffer (8 bytes each: a quarter of a 16-bit W's entries, half of a float32 one's; the buffer
//   is free until the mask pass), pass 1 also lists them (key and row; every warp stages its own in
//   shared memory and copies them out with one atomic per copy), and pass 2 and the tie count read the
//   list instead of recomputing every score: three score passes over W instead of four (five with split
//   ties). A bucket too large to list (many equal scores), or a list not holding the whole bucket, leaves
//   those passes recomputing the scores.
// Scores in tiles (the histogram, tie-count and mask passes): a block of 256 threads walks tiles of
//   16 rows x 256 * 32 / R columns, R = the rank rounded up to 8, 16 or 32. A thread keeps V and B of
//   its 32 / R columns in registers, reloaded only when the tile's columns change, and reads the rows'
//   U and A from shared memory (broadcasts): per entry the rank loops are R + R FMAs and no loads.
//   Both factor runs are padded with zeros in front (fma(0, 0, +0) = +0: the sums are unchanged, bit
//   for bit). Ranks above 32 evaluate every entry from global memory instead (R = 0 below).
// Large matrices start with the sampled bracket (bracket_passes): a sample of the scores brackets the threshold, and
//   one pass over W decides every entry outside the bracket and lists those inside, whose exact selection is then
//   small; the passes above run only when it misses.
// Workspace (carve): a State, histograms of 2048 64-bit counters (3 for the passes above, 4 for the sample's, 3 for
//   the bracket's list), n 64-bit row counters, the bracket's list ((n + k) * 16 keys and flat indices; pass 1's
//   list is in W').
#include "pst.cuh"

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kPasses = 3;
constexpr int kMaxBins = 2048;
constexpr int kThreads = 256;

__host__ __device__ constexpr int digit_bits(int pass) { return pass == 2 ? 10 : 11; }
__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }

// One radix selection in progress: the need-th smallest of the keys matching prefix's chosen digits.
struct Sel {
  unsigned long long prefix;  // key bits chosen so far (the selected key after the last pass)
  long long need;             // rank still needed among the keys matching the prefix (1-based)
  long long count;            // keys in the chosen bucket
};

// The sampled bracket's launches that pick or decide in their last block (State::arrived_b).
enum { kArriveSample0, kArriveSample1, kArriveBracket, kArriveList0, kArriveList1, kArriveList2, kArriveListTies,
       kBracketArrivals };
enum { kClassic = 0, kBracketOk = 1, kBracketMissed = 2 };  // State::mode

struct State {
  Sel sel;                    // the main selection: the threshold T after the last pass
  long long f_excl;           // ties with flat index < f_excl are pruned
  unsigned int arrived[kPasses + 1];  // blocks done with each histogram pass, then with the tie count
  unsigned long long listed;  // entries pass 1 listed (0: no list)
  long long count0;           // entries in pass 0's bucket: pass 1's candidates
  // the sampled bracket (bracket_passes); zero otherwise
  Sel sample[2];              // the sample's keys at the bracket's two ranks (22-bit prefixes)
  unsigned int arrived_b[kBracketArrivals];
  int mode;                   // kClassic until the bracket pass decides kBracketOk or kBracketMissed
  unsigned long long blisted;  // entries inside the bracket (all of them, also those past the list's cap)
  unsigned long long below;   // entries below the bracket
};

// A list of keys and tags: pass 1's candidates in W''s buffer (tags: rows; State::listed of them), or the
// bracket's entries in the workspace (tags: flat indices; State::blisted).
struct Candidates {
  uint32_t* keys;
  uint32_t* tags;
  unsigned long long cap;  // entries that fit (0: never list)
};

// The later passes read the list only if it holds every candidate (else they recompute the scores).
__host__ __device__ inline bool list_complete(const State* st, const Candidates& cand) {
  return st->listed != 0 && st->listed <= cand.cap && st->listed == static_cast<unsigned long long>(st->count0);
}

size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

// ---- exact float32 arithmetic, immune to --use_fast_math (only the written FMAs, no flush-to-zero) ----
// (The host branches serve the tests, which run these kernels on the CPU: tests/cuda_host_sim.h.)
__device__ __forceinline__ float add_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  float z;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(z) : "f"(x), "f"(y));
  return z;
#else
  return x + y;
#endif
}
__device__ __forceinline__ float mul_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  float z;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(z) : "f"(x), "f"(y));
  return z;
#else
  return x * y;
#endif
}
__device__ __forceinline__ float fma_rn(float x, float y, float z) {
#ifdef __CUDA_ARCH__
  float w;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(w) : "f"(x), "f"(y), "f"(z));
  return w;
#else
  return std::fma(x, y, z);
#endif
}
__device__ __forceinline__ float abs_bits(float x) { return __uint_as_float(__float_as_uint(x) & 0x7fffffffu); }

// W0's element types, to and from float32 (bf16/fp16: round to nearest even, as torch).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// W0[f] and W'[f] = x: T is W0's element type (a template parameter of the tile passes: no per-entry dtype
// branches); the untyped versions serve the per-entry paths (ranks above 32, N:M, the tie cut).
template <class T>
__device__ __forceinline__ float load_w0_as(const AptPstProblem& p, int64_t f) {
  return to_f32(static_cast<const T*>(p.w0)[f]);
}
template <class T>
__device__ __forceinline__ void store_as(void* out, int64_t f, float x) {
  static_cast<T*>(out)[f] = from_f32<T>(x);
}

__device__ __forceinline__ float load_w0(const AptPstProblem& p, int64_t f) {
  switch (p.w0_dtype) {
    case APT_PST_F16: return load_w0_as<__half>(p, f);
    case APT_PST_BF16: return load_w0_as<__nv_bfloat16>(p, f);
    default: return load_w0_as<float>(p, f);
  }
}

__device__ __forceinline__ void store_out(const AptPstProblem& p, void* out, int64_t f, float x) {
  switch (p.w0_dtype) {
    case APT_PST_F16: store_as<__half>(out, f, x); break;
    case APT_PST_BF16: store_as<__nv_bfloat16>(out, f, x); break;
    default: store_as<float>(out, f, x);
  }
}

// The documented order (reference.fused_order_scores): fused multiply-adds over the rank in order.
__device__ __forceinline__ float weight_at(const AptPstProblem& p, int64_t i, int64_t c) {
  float uv = 0.0f;
  for (int j = 0; j < p.rw; ++j) uv = fma_rn(p.u[i * p.rw + j], p.v[j * p.k + c], uv);
  return fma_rn(p.beta, uv, load_w0(p, i * p.k + c));
}

__device__ __forceinline__ float score_at(const AptPstProblem& p, int64_t i, int64_t c, float w) {
  float ab = 0.0f;
  for (int j = 0; j < p.rs; ++j) ab = fma_rn(p.a[i * p.rs + j], p.b[j * p.k + c], ab);
  return fma_rn(p.alpha2, add_rn(p.r[i], p.c[c]), fma_rn(p.alpha1, ab, abs_bits(w)));
}

// Unsigned order-preserving key (integer tests only: fast-math cannot touch them).
__device__ __forceinline__ unsigned int ukey(float s) {
  unsigned int bits = __float_as_uint(s);
  const unsigned int mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u) bits = 0x7fc00000u;  // NaN: the key of +NaN, above +inf
  else if (mag == 0u) bits = 0u;              // -0 -> +0
  const unsigned int key = (bits & 0x80000000u) ? (bits ^ 0x7fffffffu) : bits;  // signed order
  return key ^ 0x80000000u;                                                      // unsigned order
}

__device__ __forceinline__ unsigned int key_at(const AptPstProblem& p, int64_t i, int64_t c, float* w_out) {
  const float w = weight_at(p, i, c);
  if (w_out) *w_out = w;
  return ukey(score_at(p, i, c, w));
}

// Inclusive scan over a block (blockDim.x <= 1024, a multiple of 32); returns this thread's value,
// *total gets the block sum. Every thread must call it.
__device__ long long block_inclusive_scan(long long x, long long* total) {
  __shared__ long long warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 1; off < 32; off <<= 1) {
    const long long y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    long long s = lane < nwarps ? warp_sums[lane] : 0;
    for (int off = 1; off < 32; off <<= 1) {
      const long long y = __shfl_up_sync(0xffffffffu, s, off);
      if (lane >= off) s += y;
    }
    warp_sums[lane] = s;
  }
  __syncthreads();
  if (warp > 0) x += warp_sums[warp - 1];
  *total = warp_sums[nwarps - 1];
  __syncthreads();
  return x;
}

// ---- score tiles ---------------------------------------------------------------------------------

constexpr int kTileRows = 16;  // rows of a score tile, at most
constexpr int kMaxTileBlocks = 1024;
constexpr int64_t kTargetTiles = 256;  // tiles (blocks) wanted at least: about two blocks on each of 132 SMs
// W0 entries a thread loads before computing them (whole rows of its columns; for_each_score's Ahead): 32 in the
// mask and tie passes (one block per SM either way: at rank 8 about 208 and 172 registers; 16 took 182 and 148, for
// half the bytes in flight), 8 in the histogram passes, whose two blocks per SM leave 128 registers (16 would
// spill 60 bytes at rank 8; at 8 the listing pass spills 8, and rank 16's over 90).
constexpr int kAheadWide = 32, kAheadNarrow = 8;

// Columns per thread of a tile: the V and B runs of a thread's columns fill 64 registers.
__host__ __device__ constexpr int cols_per_thread(int R) { return R ? 32 / R : 1; }
__host__ __device__ constexpr int64_t tile_cols(int R) { return static_cast<int64_t>(kThreads) * cols_per_thread(R); }

__host__ __device__ constexpr int64_t score_col_tiles(int64_t k, int R) { return (k + tile_cols(R) - 1) / tile_cols(R); }

// log2 of the rows of the score tiles of an n x k matrix in bucket R: kTileRows, fewer (a power of two) where
// that would give fewer than kTargetTiles tiles (at 16 rows 768 x 768 has 48 tiles: 48 blocks on 132 SMs, each
// with a chain of 16 rows' dependent loads; the first H200 run took 17-26 us a pass there). A function of the
// shape only, so the grid (host) and the tiles (device) agree.
__host__ __device__ constexpr int tile_rows_log2(int64_t n, int64_t k, int R) {
  const int64_t want = n * score_col_tiles(k, R) / kTargetTiles;  // rows for kTargetTiles tiles
  int lg = 0;
  while ((int64_t{2} << lg) <= want && (2 << lg) <= kTileRows) ++lg;
  return lg;
}

// Row tiles of n rows in tiles of 1 << lg (a matrix's score tiles: score_row_tiles x score_col_tiles, rows fastest).
__host__ __device__ constexpr int64_t score_row_tiles(int64_t n, int lg) { return (n + (int64_t{1} << lg) - 1) >> lg; }

// W of one entry in the documented order, from a row's U and a column's V held in registers (RR values each,
// zero-padded in front): the score tiles and the backward share it, so the backward's W is the forward's.
template <int RR>
__device__ __forceinline__ float weight_of(const float (&u)[RR], const float (&v)[RR], float beta, float w0) {
  float uv = 0.0f;
#pragma unroll
  for (int j = 0; j < RR; ++j) uv = fma_rn(u[j], v[j], uv);
  return fma_rn(beta, uv, w0);
}

// kCpt consecutive entries of type T, aligned to their size: one load or store instruction of 4, 8 or 16 bytes.
// They move as 32-bit words in a vector type (a store built from the entries' bits and written in PTX: a struct
// copied as a whole, or even a uint4, is split by the compiler into one store per entry or word).
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T x[N];
};
__device__ __forceinline__ unsigned int bits_of(float x) { return __float_as_uint(x); }
__device__ __forceinline__ unsigned int bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned int bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* at) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  Pack<T, N> out;
  if constexpr (kBytes == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(at);
    *reinterpret_cast<uint4*>(&out) = v;
  } else if constexpr (kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(at);
    *reinterpret_cast<uint2*>(&out) = v;
  } else if constexpr (kBytes == 4 && N == 2) {
    const unsigned int v = *reinterpret_cast<const unsigned int*>(at);
    *reinterpret_cast<unsigned int*>(&out) = v;
  } else {
#pragma unroll
    for (int q = 0; q < N; ++q) out.x[q] = at[q];
  }
  return out;
}

template <class T, int N>
__device__ __forceinline__ void store_pack(T* at, const Pack<T, N>& x) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  if constexpr (kBytes == 4 && N == 2) {
    *reinterpret_cast<unsigned int*>(at) = bits_of(x.x[0]) | (bits_of(x.x[1]) << 16);
  } else if constexpr (kBytes < 8) {
#pragma unroll
    for (int q = 0; q < N; ++q) at[q] = x.x[q];
  } else {
    unsigned int w[kBytes / 4];
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i)
      w[i] = sizeof(T) == 4 ? bits_of(x.x[i]) : (bits_of(x.x[2 * i]) | (bits_of(x.x[(2 * i + 1) % N]) << 16));
#ifdef __CUDA_ARCH__  // written out: through a uint4 pointer NVVM still emits one store per word
    if constexpr (kBytes == 16)
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(at), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]));
    else
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(at), "r"(w[0]), "r"(w[1]));
#else
    if constexpr (kBytes == 16) *reinterpret_cast<uint4*>(at) = make_uint4(w[0], w[1], w[2], w[3]);
    else *reinterpret_cast<uint2*>(at) = make_uint2(w[0], w[1]);
#endif
  }
}

// A hint that the line holding `at` will be read soon: fetched from DRAM into L2 while the thread goes on (no register
// waits for it; no effect on any result). The passes ask for their W0 (and G) entries kPrefetchRows rows ahead, so
// that DRAM works on more requests than the loads in flight alone would give it.
__device__ __forceinline__ void prefetch_l2(const void* at) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
#else
  (void)at;
#endif
}
constexpr int kPrefetchRows = 16;

// Whether ptr + f .. f + N - 1 (f a multiple of N) can move as one Pack: every row of an n x k matrix starts on
// a multiple of N entries (k % N == 0) and so does the matrix (a view into a larger tensor may not).
template <class T, int N>
__host__ __device__ inline bool packs_fit(const void* ptr, int64_t k) {
  return N > 1 && k % N == 0 && reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * N) == 0;
}

// Row i's entries in columns c0 .. c0 + N - 1 of an n x k matrix at ptr (f0 = i k + c0; columns past k left unset):
// one Pack load where `packed` (packs_fit), else entry by entry. The same run kPrefetchRows rows further down is
// prefetched into L2.
template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_run(const T* ptr, int64_t f0, int64_t i, int64_t c0, int64_t n, int64_t k,
                                               bool packed) {
  if (i + kPrefetchRows < n) prefetch_l2(ptr + f0 + kPrefetchRows * k);
  Pack<T, N> out;
  if (packed) {
    out = load_pack<T, N>(ptr + f0);
  } else {
#pragma unroll
    for (int q = 0; q < N; ++q)
      if (c0 + q < k) out.x[q] = ptr[f0 + q];
  }
  return out;
}

// visit(q, i, c, f, valid, w, key) for every (row, column) slot of the tiles this block owns (q: the
// thread's column slot, 0 .. kCpt - 1 with kCpt = cols_per_thread(R), visited in order in a row), by every
// thread of the block at every step (visit may use warp collectives). Lane l of a warp holds kCpt consecutive
// columns of a row, c = c_w + l kCpt + q, with the warp's first column c_w a multiple of 32 kCpt, so that a
// thread's W0 entries of a row are one load (a Pack) wherever packs_fit. valid: the slot is an entry of W
// (then w is its weight and key its ordered score key; both 0 otherwise). Blocks own contiguous runs
// of tiles, rows fastest, so that the column factors are reloaded only when a run crosses columns.
template <int R, class T, int Ahead = kAheadWide, class Visit>
__device__ __forceinline__ void for_each_score(const AptPstProblem& p, Visit&& visit) {
  constexpr int kCpt = cols_per_thread(R), RR = R ? R : 1;
  constexpr int kGroup = R && Ahead > kCpt ? Ahead / kCpt : 1;  // rows loaded ahead: Ahead entries per thread
  __shared__ __align__(16) float su[kTileRows][RR];
  __shared__ __align__(16) float sa[kTileRows][RR];
  __shared__ float sr[kTileRows];
  float v[kCpt][RR], b[kCpt][RR], cc[kCpt];
  const int lg = tile_rows_log2(p.n, p.k, R);  // tiles of 1 << lg rows (the row factors of kTileRows are loaded)
  const int64_t rtiles = score_row_tiles(p.n, lg), tiles = rtiles * score_col_tiles(p.k, R);
  const int64_t per = (tiles + gridDim.x - 1) / gridDim.x;
  const int64_t t_end = (blockIdx.x + 1) * per < tiles ? (blockIdx.x + 1) * per : tiles;
  const bool packed = R && packs_fit<T, kCpt>(p.w0, p.k);
  int64_t loaded = -1;
  for (int64_t t = blockIdx.x * per; t < t_end; ++t) {
    const int64_t ct = t / rtiles, i0 = (t - ct * rtiles) << lg;
    const int64_t c0 = ct * tile_cols(R) + static_cast<int64_t>(threadIdx.x) * kCpt;  // the thread's first column
    if (ct != loaded) {  // block-uniform
      loaded = ct;
#pragma unroll
      for (int q = 0; q < kCpt; ++q) {
        const int64_t c = c0 + q;
        cc[q] = c < p.k ? p.c[c] : 0.0f;
#pragma unroll
        for (int j = 0; j < RR; ++j) {
          const int jw = j - (RR - p.rw), js = j - (RR - p.rs);
          v[q][j] = R && c < p.k && jw >= 0 ? p.v[jw * p.k + c] : 0.0f;
          b[q][j] = R && c < p.k && js >= 0 ? p.b[js * p.k + c] : 0.0f;
        }
      }
    }
    __syncthreads();  // the previous tile's reads of su, sa, sr are done
    for (int e = threadIdx.x; e < kTileRows * RR; e += kThreads) {
      const int row = e / RR, j = e - row * RR, jw = j - (RR - p.rw), js = j - (RR - p.rs);
      const int64_t i = i0 + row;
      su[row][j] = R && i < p.n && jw >= 0 ? p.u[i * p.rw + jw] : 0.0f;
      sa[row][j] = R && i < p.n && js >= 0 ? p.a[i * p.rs + js] : 0.0f;
    }
    if (threadIdx.x < kTileRows) sr[threadIdx.x] = i0 + threadIdx.x < p.n ? p.r[i0 + threadIdx.x] : 0.0f;
    __syncthreads();
    const int rows = p.n - i0 < (1 << lg) ? static_cast<int>(p.n - i0) : 1 << lg;
    for (int row0 = 0; row0 < rows; row0 += kGroup) {
      // The W0 entries of kGroup rows, all loaded before any of them is visited: a visit may store (W' in the
      // mask pass), and the compiler, which cannot tell W' from W0, would otherwise issue each load only after
      // the previous entry's store, one load in flight per thread (the first H200 run: mask pass 724 us at
      // 4096 x 11008, 7x its instruction count).
      Pack<T, kCpt> w0g[kGroup];  // (packed: kept as loaded, e.g. four bf16 in two registers)
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        // load_run's work written out: through it ptxas spills 106 bytes in the rank-8 listing pass (128 registers)
        const int64_t f0 = (i0 + row0 + g) * p.k + c0;
        if (!R || row0 + g >= rows || c0 >= p.k) continue;
        if (i0 + row0 + g + kPrefetchRows < p.n) prefetch_l2(static_cast<const T*>(p.w0) + f0 + kPrefetchRows * p.k);
        if (packed) {  // the kCpt entries at once (all in the matrix: k % kCpt == 0)
          w0g[g] = load_pack<T, kCpt>(static_cast<const T*>(p.w0) + f0);
        } else {
#pragma unroll
          for (int q = 0; q < kCpt; ++q)
            if (c0 + q < p.k) w0g[g].x[q] = static_cast<const T*>(p.w0)[f0 + q];
        }
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const int row = row0 + g;
        if (row >= rows) break;  // block-uniform: the visits' warp collectives see every lane
        const int64_t i = i0 + row;
        float ur[RR], ar[RR];  // the row's factors, read once for all of the thread's columns
#pragma unroll
        for (int j = 0; j < RR; ++j) {
          ur[j] = su[row][j];
          ar[j] = sa[row][j];
        }
        const float rr = sr[row];
#pragma unroll
        for (int q = 0; q < kCpt; ++q) {
          const int64_t c = c0 + q, f = i * p.k + c;
          const bool valid = c < p.k;
          float w = 0.0f;
          unsigned int key = 0u;
          if (valid) {
            if (R) {  // the documented order, from registers and shared memory
              w = weight_of(ur, v[q], p.beta, to_f32(w0g[g].x[q]));
              float ab = 0.0f;
#pragma unroll
              for (int j = 0; j < RR; ++j) ab = fma_rn(ar[j], b[q][j], ab);
              key = ukey(fma_rn(p.alpha2, add_rn(rr, cc[q]), fma_rn(p.alpha1, ab, abs_bits(w))));
            } else {
              key = key_at(p, i, c, &w);
            }
          }
          visit(q, i, c, f, valid, w, key);
        }
      }
    }
  }
}

// 8, 16 or 32: the rank bucket of the tiles; 0: ranks above 32 (scores from global memory).
int rank_bucket(int rw, int rs) {
  const int r = rw > rs ? rw : rs;
  return r <= 8 ? 8 : (r <= 16 ? 16 : (r <= 32 ? 32 : 0));
}

unsigned int tile_grid(const AptPstProblem& p, int R) {
  const int64_t tiles = score_row_tiles(p.n, tile_rows_log2(p.n, p.k, R)) * score_col_tiles(p.k, R);
  return static_cast<unsigned int>(tiles < 1 ? 1 : (tiles > kMaxTileBlocks ? kMaxTileBlocks : tiles));
}

// ---- kernels ------------------------------------------------------------------------------------

// Called by every thread of every block at the end of a pass: true (block-uniform) in the one block that
// finishes last, once every block's global writes of the pass are visible to it (the threadFenceReduction
// pattern of the CUDA samples: fence, barrier, one arrival per block on a zeroed counter).
__device__ bool finished_last(unsigned int* arrived) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(arrived, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// By one whole block of kThreads: choose the bucket of this pass's (complete) histogram that holds the
// need-th candidate of selection s (need0 >= 0: that rank, at the first pass; else s->need). The histogram was
// added to by other blocks: read at L2 (__ldcg), not through L1. s->prefix is zero before the first pass.
__device__ void pick(int pass, const unsigned long long* hist, Sel* s, long long need0) {
  const int bits = digit_bits(pass), shift = digit_shift(pass), nbins = 1 << bits;
  const long long need = need0 >= 0 ? need0 : s->need;
  const unsigned long long prefix = s->prefix;
  const int per = nbins / kThreads, b0 = threadIdx.x * per;
  long long local = 0;
  for (int t = 0; t < per; ++t) local += static_cast<long long>(__ldcg(&hist[b0 + t]));
  long long total;
  const long long incl = block_inclusive_scan(local, &total);
  const long long before = incl - local;
  if (before < need && need <= incl) {  // exactly one thread
    long long run = before;
    for (int t = 0; t < per; ++t) {
      const long long h = static_cast<long long>(__ldcg(&hist[b0 + t]));
      if (run + h >= need) {
        s->prefix = prefix | (static_cast<unsigned long long>(b0 + t) << shift);
        s->need = need - run;
        s->count = h;
        break;
      }
      run += h;
    }
  }
  __syncthreads();  // s is written before the block reads it (or picks again)
}

// A list of (key, tag) records (pass 1's candidates, tagged with their rows; the bracket's, with their flat
// indices), staged in shared memory: every warp appends to a region of its own (a count in a register, the
// same in every lane; no atomics, no branches) and copies it to the global list (one atomic on the list's
// length per copy) whenever another slot of 32 entries might not fit, and at the end. The length counts every
// record; those past the list's cap are dropped.
constexpr int kWarpStage = 512;

struct Stage {
  uint32_t* keys;  // this warp's region: kWarpStage each
  uint32_t* tags;
  unsigned int n;  // records staged (warp-uniform)

  __device__ __forceinline__ void add(bool in, unsigned int key, uint32_t tag) {
    const unsigned int m = __ballot_sync(0xffffffffu, in);
    const unsigned int at = n + static_cast<unsigned int>(__popc(m & ((1u << (threadIdx.x & 31)) - 1u)));
#ifndef __CUDA_ARCH__
    if (in && at >= kWarpStage) std::abort();  // the host simulator's tests: an overflow fails loudly
#endif
    if (in) {
      keys[at] = key;
      tags[at] = tag;
    }
    n += static_cast<unsigned int>(__popc(m));
  }

  // By every lane of the warp: the staged records go to the global list if more than `room` are staged.
  __device__ __forceinline__ void flush_if_over(unsigned int room, unsigned long long* length, const Candidates& cand) {
    if (n <= room) return;  // warp-uniform
    unsigned long long base = 0;
    if ((threadIdx.x & 31) == 0) base = atomicAdd(length, static_cast<unsigned long long>(n));
    base = __shfl_sync(0xffffffffu, base, 0);
    __syncwarp();  // the lanes' appends are visible to the whole warp
    for (unsigned int e = threadIdx.x & 31; e < n; e += 32)
      if (base + e < cand.cap) {  // (pass 1 lists only when the whole bucket fits)
        cand.keys[base + e] = keys[e];
        cand.tags[base + e] = tags[e];
      }
    __syncwarp();  // the region is read before it is refilled
    n = 0;
  }
};

// LIST: pass 1, which lists its candidates when they fit (a variant of its own: the stage costs registers
// and shared memory the other passes should not pay for); two blocks per SM up to rank 16 (rank 32 would spill).
template <int R, bool LIST, class T>
__global__ void __launch_bounds__(kThreads, R && R <= 16 ? 2 : 1) hist_kernel(AptPstProblem p, int pass, State* st,
                                                           unsigned long long* hist, long long n_pruned,
                                                           Candidates cand, bool bracketed) {
  if (bracketed && st->mode == kBracketOk) return;  // the sampled bracket found the threshold
  __shared__ unsigned int sh[kMaxBins];
  constexpr int kStage = LIST ? kThreads / 32 * kWarpStage : 1;
  __shared__ uint32_t s_keys[kStage], s_rows[kStage];
  const int bits = digit_bits(pass), shift = digit_shift(pass), nbins = 1 << bits;
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const unsigned int prefix = pass ? static_cast<unsigned int>(st->sel.prefix) : 0u;
  const int hi = shift + bits;  // < 32 whenever pass > 0
  if (pass == kPasses - 1 && list_complete(st, cand)) {  // pass 1 listed every candidate: read them
    const unsigned long long len = st->listed, step = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    for (unsigned long long e = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < len;
         e += step) {
      const unsigned int key = cand.keys[e];
      if ((key >> hi) == (prefix >> hi)) atomicAdd(&sh[(key >> shift) & (nbins - 1)], 1u);
    }
  } else {
    const bool listing = LIST && p.n <= 0xffffffffll && static_cast<unsigned long long>(st->count0) <= cand.cap;
    const int warp_at = LIST ? (threadIdx.x >> 5) * kWarpStage : 0;
    Stage stage{s_keys + warp_at, s_rows + warp_at, 0u};
    for_each_score<R, T, kAheadNarrow>(p, [&](int, int64_t i, int64_t, int64_t, bool valid, float, unsigned int key) {
      const bool in = valid && (pass == 0 || (key >> hi) == (prefix >> hi));
      if (in) atomicAdd(&sh[(key >> shift) & (nbins - 1)], 1u);
      if (listing) {
        stage.add(in, key, static_cast<uint32_t>(i));
        stage.flush_if_over(kWarpStage - 32, &st->listed, cand);
      }
    });
    if (listing) stage.flush_if_over(0u, &st->listed, cand);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(sh[b]));
  if (finished_last(&st->arrived[pass])) {
    pick(pass, hist, &st->sel, pass == 0 ? n_pruned : -1);
    if (pass == 0 && threadIdx.x == 0) st->count0 = st->sel.count;
  }
}

// By one whole block, once every row count is in (need < count): the flat index bound of the pruned ties.
// Scans the row counts for the row where the cumulative count reaches need, then that row's ties.
__device__ void cut(const AptPstProblem& p, State* st, const unsigned long long* rowcnt) {
  __shared__ long long s_row, s_before, s_col;
  const long long need = st->sel.need;
  const unsigned int thr = static_cast<unsigned int>(st->sel.prefix);
  if (threadIdx.x == 0) s_row = s_before = s_col = 0;
  __syncthreads();
  long long base = 0;
  for (int64_t start = 0; start < p.n && base < need; start += blockDim.x) {  // base is block-uniform
    const int64_t i = start + threadIdx.x;
    const long long x = i < p.n ? static_cast<long long>(__ldcg(&rowcnt[i])) : 0;
    long long total;
    const long long incl = block_inclusive_scan(x, &total) + base;
    if (i < p.n && incl >= need && incl - x < need) {
      s_row = i;
      s_before = incl - x;
    }
    base += total;
  }
  __syncthreads();
  const int64_t row = s_row;
  const long long m = need - s_before;  // prune the first m ties of this row
  base = 0;
  for (int64_t start = 0; start < p.k && base < m; start += blockDim.x) {
    const int64_t c = start + threadIdx.x;
    const long long t = (c < p.k && key_at(p, row, c, nullptr) == thr) ? 1 : 0;
    long long total;
    const long long incl = block_inclusive_scan(t, &total) + base;
    if (t && incl == m) s_col = c;
    base += total;
  }
  __syncthreads();
  if (threadIdx.x == 0) st->f_excl = row * p.k + s_col + 1;
}

// The row counts of a list's ties (keys equal to thr): a record's row is its tag / per_row (pass 1's list tags
// rows: 1; the bracket's tags flat indices: k). Grid-stride over the len records.
__device__ __forceinline__ void add_listed_ties(const Candidates& list, unsigned long long len, unsigned int thr,
                                                int64_t per_row, unsigned long long* rowcnt) {
  const unsigned long long step = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long e = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < len; e += step)
    if (list.keys[e] == thr) atomicAdd(&rowcnt[static_cast<int64_t>(list.tags[e]) / per_row], 1ull);
}

// Only when the ties are split (need < count): the number of entries of every row whose key is T, added
// into the zeroed rowcnt (a ballot per warp); the last block to finish then cuts (as the histogram passes
// pick).
template <int R, class T>
__global__ void __launch_bounds__(kThreads) tie_rows_kernel(AptPstProblem p, State* st, unsigned long long* rowcnt,
                                                            Candidates cand, bool bracketed) {
  if (bracketed && st->mode == kBracketOk) return;
  if (st->sel.need == st->sel.count) return;  // every tie is pruned: no split, no counts needed
  const unsigned int thr = static_cast<unsigned int>(st->sel.prefix);
  if (list_complete(st, cand)) {  // every tie is in pass 1's list
    add_listed_ties(cand, st->listed, thr, 1, rowcnt);
  } else {
    for_each_score<R, T>(p, [&](int, int64_t i, int64_t, int64_t, bool valid, float, unsigned int key) {
      const unsigned int ties = __ballot_sync(0xffffffffu, valid && key == thr);
      if ((threadIdx.x & 31) == 0 && ties) atomicAdd(&rowcnt[i], static_cast<unsigned long long>(__popc(ties)));
    });
  }
  if (finished_last(&st->arrived[kPasses])) cut(p, st, rowcnt);
}

// The sampled bracket (BRACKET mask passes and bracket_passes): keys in [lo, hi] are listed, the rest decided at once.
struct Bracket {
  Candidates list;     // the bracket's entries (tags: flat indices), in the workspace
  long long n_pruned;  // entries to prune
  bool lo_open, hi_open;  // the bracket starts at the smallest key / ends at the largest (sample ranks past its ends)
  bool on;             // the bracket passes ran before the classic ones (which then return if it found the threshold)
};

// The bracket's bounds from the sample's two 22-bit prefixes: every key of the lower prefix's bucket and up to
// every key of the upper one's.
__device__ __forceinline__ unsigned int bracket_lo(const State* st, const Bracket& br) {
  return br.lo_open ? 0u : static_cast<unsigned int>(st->sample[0].prefix);
}
__device__ __forceinline__ unsigned int bracket_hi(const State* st, const Bracket& br) {
  return br.hi_open ? 0xffffffffu : static_cast<unsigned int>(st->sample[1].prefix) | 0x3ffu;
}

// W' and the bitmask. A lane's kCpt keep bits of a row are a run of one 32-bit word (whose first column is a
// multiple of 32); the 32 / kCpt lanes sharing that word OR their runs together (shuffles; a ballot when
// kCpt == 1) and the first of them writes it: stored when k % 32 == 0, else its parts ORed into two zeroed
// words. W' is written a Pack at a time where packs_fit (else entry by entry).
// BRACKET: the sampled bracket's pass, before the threshold is known. Keys above the bracket are kept, the others
// pruned for now; the bracket's entries are listed (for fixup_kernel to keep those above the threshold) and the
// entries below it counted. Its last block decides whether the bracket holds the threshold (State::mode).
// Otherwise, with br.on, the pass returns at once when the bracket found the threshold.
template <int R, class T, bool BRACKET>
__global__ void __launch_bounds__(kThreads) mask_kernel(AptPstProblem p, State* st, bool any_pruned, void* out,
                                                        uint32_t* words, Bracket br) {
  if (!BRACKET && br.on && st->mode == kBracketOk) return;
  constexpr int kCpt = cols_per_thread(R), kLanesPerWord = 32 / kCpt;
  constexpr int kStage = BRACKET ? kThreads / 32 * kWarpStage : 1;
  __shared__ uint32_t s_keys[kStage], s_tags[kStage];
  const unsigned int lo = BRACKET ? bracket_lo(st, br) : 0u;
  const unsigned int thr = BRACKET ? bracket_hi(st, br) : (any_pruned ? static_cast<unsigned int>(st->sel.prefix) : 0u);
  // ties with a flat index below f_excl are pruned: all of them unless they are split (need < count); in the
  // bracket pass every key up to hi
  const long long f_excl =
      BRACKET ? p.n * p.k : (!any_pruned ? 0 : (st->sel.need == st->sel.count ? p.n * p.k : st->f_excl));
  const bool aligned = p.k % 32 == 0, packed = packs_fit<T, kCpt>(out, p.k);
  const int lane = threadIdx.x & 31;
  const int warp_at = BRACKET ? (threadIdx.x >> 5) * kWarpStage : 0;
  Stage stage{s_keys + warp_at, s_tags + warp_at, 0u};
  long long below = 0;
  Pack<T, kCpt> vals;  // the row's kCpt entries of W', stored together after the last
  unsigned int run = 0u;  // their keep bits, bit q for column slot q
  for_each_score<R, T>(p, [&](int q, int64_t, int64_t c, int64_t f, bool valid, float w, unsigned int key) {
    const bool keep = valid & ((key > thr) | ((key == thr) & (f >= f_excl)));  // no branches
    if constexpr (BRACKET) {
      below += valid & (key < lo);
      stage.add(valid & (key >= lo) & (key <= thr), key, static_cast<uint32_t>(f));
      stage.flush_if_over(kWarpStage - 32, &st->blisted, br.list);
    }
    const T x = from_f32<T>(mul_rn(w, keep ? 1.0f : 0.0f));
    if (packed) vals.x[q] = x;
    else if (valid) static_cast<T*>(out)[f] = x;
    run |= static_cast<unsigned int>(keep) << q;
    if (q != kCpt - 1) return;  // warp-uniform
    const int64_t c0 = c - q, f0 = f - q;  // the thread's first column and its flat index
    if (packed && c0 < p.k) store_pack(static_cast<T*>(out) + f0, vals);
    unsigned int word;
    if constexpr (kCpt == 1) {
      word = __ballot_sync(0xffffffffu, keep);
    } else {
      word = run << ((lane % kLanesPerWord) * kCpt);
#pragma unroll
      for (int s = 1; s < kLanesPerWord; s <<= 1) word |= __shfl_xor_sync(0xffffffffu, word, s);
    }
    run = 0u;
    if (lane % kLanesPerWord == 0 && c0 < p.k) {  // the word's first column is in the matrix
      if (aligned) {
        words[f0 >> 5] = word;
      } else {
        const int sh = static_cast<int>(f0 & 31);
        if (word << sh) atomicOr(&words[f0 >> 5], word << sh);
        if (sh && (word >> (32 - sh))) atomicOr(&words[(f0 >> 5) + 1], word >> (32 - sh));
      }
    }
  });
  if constexpr (BRACKET) {
    stage.flush_if_over(0u, &st->blisted, br.list);
    long long block_below;
    block_inclusive_scan(below, &block_below);
    if (threadIdx.x == 0 && block_below) atomicAdd(&st->below, static_cast<unsigned long long>(block_below));
    if (finished_last(&st->arrived_b[kArriveBracket]) && threadIdx.x == 0) {
      const long long nb = static_cast<long long>(__ldcg(&st->below));
      const unsigned long long listed = __ldcg(&st->blisted);
      const bool ok = listed <= br.list.cap && nb < br.n_pruned && br.n_pruned <= nb + static_cast<long long>(listed);
      if (ok) st->sel.need = br.n_pruned - nb;  // the rank of the threshold in the list (prefix and count: 0)
      st->mode = ok ? kBracketOk : kBracketMissed;
    }
  }
}

// ---- the sampled bracket -------------------------------------------------------------------------
//
// For large matrices (bracket_passes), before the classic passes, which then return at once when it succeeds:
//   1. sample_kernel: the scores of kSampleRun / kSampleEvery (1 / 16) of the entries (runs of 32 consecutive
//      entries at stratified positions);
//   2. two keys_hist_kernel passes over the sample: its keys at two ranks around the threshold's expected rank
//      (kBracketSigmas binomial standard deviations either side), to 22 bits: the bracket [lo, hi];
//   3. the BRACKET mask pass: W' and the bits of every key outside the bracket (kept above it), the entries below
//      it counted and those inside it listed in the workspace (with their flat indices); its last block checks
//      that the bracket holds the threshold (below < n_pruned <= below + listed) and its list every entry inside;
//   4. three keys_hist_kernel passes over the list: the threshold T and its tie rank, exactly;
//   5. list_ties_kernel: when the ties are split, their row counts (from the list) and the cut, as the classic
//      tie count;
//   6. fixup_kernel: the listed entries above the threshold kept (W' and their bit).
// One pass over W instead of three or four; when the bracket misses (a sample unlike the matrix, or more entries
// inside than the list holds, as with many equal scores) the classic passes run after it and write everything.

// apt_kernels/pst/bracket.py holds the same constants and host arithmetic (the Triton backend samples the same runs).
constexpr int kSampleRun = 32;         // a sample run: 32 consecutive entries (row-major), one per lane of a warp
constexpr int64_t kSampleEvery = 512;  // entries of W per sample run (the sample: 1 / 16 of the scores)
constexpr double kBracketSigmas = 4.0;
constexpr int64_t kListPerLine = 16;   // the bracket's list holds (n + k) * kListPerLine entries

__host__ __device__ inline int64_t sample_runs(int64_t numel) { return (numel + kSampleEvery - 1) / kSampleEvery; }
__host__ __device__ inline unsigned long long bracket_cap(int64_t n, int64_t k) {
  return static_cast<unsigned long long>(n + k) * kListPerLine;
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Run s of `runs` (numel < 2^32): a position in the s-th of `runs` equal strata of the flat index, and the 32
// entries from there on in row-major order (wrapping to the matrix's start), keys[32 s + lane].
__global__ void __launch_bounds__(kThreads) sample_kernel(AptPstProblem p, long long runs, uint32_t* keys) {
  const long long numel = p.n * p.k;
  const int lane = threadIdx.x & 31;
  const long long warps = static_cast<long long>(gridDim.x) * (kThreads / 32);
  for (long long s = static_cast<long long>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); s < runs; s += warps) {
    const long long f0 = s * numel / runs, f1 = (s + 1) * numel / runs;
    const long long f = f0 + static_cast<long long>(mix64(static_cast<unsigned long long>(s)) %
                                                    static_cast<unsigned long long>(f1 - f0));
    const long long g = (f + lane) % numel, i = g / p.k;
    keys[s * kSampleRun + lane] = key_at(p, i, g - i * p.k, nullptr);
  }
}

// One radix pass (digits as the classic passes) over an array of keys for NSEL selections at once: keys matching
// a selection's prefix add their digit to its histogram; the last block picks every selection's bucket. The
// length is `len`, or *len_at when given (the bracket's list, read on the device). need0: the first pass's ranks.
// gated: the list's passes, which return at once unless the bracket holds the threshold.
template <int NSEL>
__global__ void __launch_bounds__(kThreads) keys_hist_kernel(const uint32_t* keys, unsigned long long len,
                                                             const unsigned long long* len_at, int pass, Sel* sels,
                                                             long long need0_a, long long need0_b,
                                                             unsigned long long* hist, unsigned int* arrived,
                                                             const State* gated) {
  if (gated && gated->mode != kBracketOk) return;
  __shared__ unsigned int sh[NSEL * kMaxBins];  // selection j's histogram at j * kMaxBins, as in hist
  const int bits = digit_bits(pass), shift = digit_shift(pass), nbins = 1 << bits, hi = shift + bits;
  for (int b = threadIdx.x; b < NSEL * kMaxBins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  unsigned int prefix[NSEL];
#pragma unroll
  for (int j = 0; j < NSEL; ++j) prefix[j] = pass ? static_cast<unsigned int>(sels[j].prefix) : 0u;
  const unsigned long long n = len_at ? *len_at : len, step = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long e = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += step) {
    const unsigned int key = keys[e];
#pragma unroll
    for (int j = 0; j < NSEL; ++j)
      if (pass == 0 || (key >> hi) == (prefix[j] >> hi)) atomicAdd(&sh[j * kMaxBins + ((key >> shift) & (nbins - 1))], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < NSEL * kMaxBins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(sh[b]));
  if (finished_last(arrived)) {
#pragma unroll
    for (int j = 0; j < NSEL; ++j) pick(pass, hist + j * kMaxBins, &sels[j], pass ? -1 : (j ? need0_b : need0_a));
  }
}

// When the bracket holds the threshold and its ties are split: the row counts of the listed ties, then the cut by
// the last block (as tie_rows_kernel).
__global__ void __launch_bounds__(kThreads) list_ties_kernel(AptPstProblem p, State* st, unsigned long long* rowcnt,
                                                             Candidates list) {
  if (st->mode != kBracketOk || st->sel.need == st->sel.count) return;
  add_listed_ties(list, st->blisted, static_cast<unsigned int>(st->sel.prefix), p.k, rowcnt);
  if (finished_last(&st->arrived_b[kArriveListTies])) cut(p, st, rowcnt);
}

// The listed entries the threshold keeps: W' = W (the BRACKET pass wrote W * 0) and their bit (atomicOr).
template <class T>
__global__ void __launch_bounds__(kThreads) fixup_kernel(AptPstProblem p, const State* st, Candidates list, void* out,
                                                         uint32_t* words) {
  if (st->mode != kBracketOk) return;
  const unsigned int thr = static_cast<unsigned int>(st->sel.prefix);
  const long long f_excl = st->sel.need == st->sel.count ? p.n * p.k : st->f_excl;
  const unsigned long long len = st->blisted, step = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long e = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < len; e += step) {
    const unsigned int key = list.keys[e];
    const int64_t f = list.tags[e];
    if (key > thr || (key == thr && f >= f_excl)) {
      const int64_t i = f / p.k;
      store_as<T>(out, f, mul_rn(weight_at(p, i, f - i * p.k), 1.0f));
      atomicOr(&words[f >> 5], 1u << (f & 31));
    }
  }
}

// When the bracket missed and k % 32 != 0: its bits are cleared for the classic mask pass, which ORs into zeroed words.
__global__ void __launch_bounds__(kThreads) clear_words_kernel(const State* st, uint32_t* words, int64_t nwords) {
  if (st->mode != kBracketMissed) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < nwords; w += step) words[w] = 0u;
}

// N:M: one thread per group of m consecutive entries of a row (k % m == 0, m <= 32).
__global__ void nm_kernel(AptPstProblem p, int keep_n, int m, void* out, uint32_t* words) {
  const int64_t groups = p.n * p.k / m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t f0 = g * m, i = f0 / p.k, c0 = f0 - i * p.k;
    unsigned int keys[32];
    float ws[32];
    for (int t = 0; t < m; ++t) keys[t] = key_at(p, i, c0 + t, &ws[t]);
    unsigned long long bitsv = 0;
    for (int t = 0; t < m; ++t) {
      int rank = 0;  // entries before t in (key, index) order
      for (int q = 0; q < m; ++q) rank += keys[q] < keys[t] || (keys[q] == keys[t] && q < t);
      const bool keep = rank >= m - keep_n;
      store_out(p, out, f0 + t, mul_rn(ws[t], keep ? 1.0f : 0.0f));
      bitsv |= static_cast<unsigned long long>(keep) << t;
    }
    bitsv <<= (f0 & 31);
    const int64_t w = f0 >> 5;
    if (static_cast<unsigned int>(bitsv)) atomicOr(&words[w], static_cast<unsigned int>(bitsv));
    if (bitsv >> 32) atomicOr(&words[w + 1], static_cast<unsigned int>(bitsv >> 32));
  }
}

// ---- backward ------------------------------------------------------------------------------------
//
// A block owns one column tile (kThreads threads x Q consecutive columns each) and a run of rows. A thread keeps,
// for each of its columns, V and B (read once) and the sums dV, dB, dC over the run's rows in registers:
// those need no reduction inside the block and reach the outputs with one atomic per value per block.
// dU, dA and dR of a row are sums over the row's columns, i.e. over the threads: a thread first sums its
// Q columns, then a warp reduce-scatter leaves each value summed over the warp in one lane, the warps'
// sums meet in shared memory, and every kBwdRows rows are added to the outputs (one atomic per row and
// value per block). W is recomputed in the forward's order (factor runs padded with zeros in front).

constexpr int kBwdRows = 16;
// Rows whose W0, G and keep bits a thread loads before using any of them: 4 would cost the two-column variant its
// second block per SM (169 registers); at 2 it keeps 128, with a 4-byte spill.
constexpr int kBwdAhead = 2;
constexpr int kWarps = kThreads / 32;

// Columns per thread of the backward: registers hold V, B, dV and dB of each (4 R Q floats). The default
// keeps rank 8 at 128 registers (two blocks per SM); "wide" doubles it up to rank 16 (about 240 registers,
// one block per SM; fewer reduction instructions per entry). Which is faster is for the GPU to say.
__host__ __device__ constexpr int bwd_cols(int R, bool wide) { return (R <= 8 ? 2 : 1) * (wide && R <= 16 ? 2 : 1); }

// Butterfly reduce-scatter over the warp: x (Len values, a power of two) summed over the 32 lanes. At lane
// bit S a lane keeps half of its vector, sends the other half to its partner (lane ^ S) and adds what it
// receives: about one shuffle per value. Afterwards x[0 .. max(Len / 32, 1)) holds the sums of values
// idx, idx + 1, ..; when Len < 32 the last steps add whole sums, and the lanes differing only in the bits
// of dup hold the same values.
template <int Len, int S, int N>
__device__ __forceinline__ void reduce_scatter(float (&x)[N], int lane, int& idx, int& dup) {
  if constexpr (S >= 1) {
    if constexpr (Len > 1) {
      constexpr int half = Len / 2;
      const bool upper = (lane & S) != 0;
#pragma unroll
      for (int t = 0; t < half; ++t) {
        const float send = upper ? x[t] : x[t + half];
        const float keep = upper ? x[t + half] : x[t];
        x[t] = keep + __shfl_xor_sync(0xffffffffu, send, S);
      }
      if (upper) idx += half;
      reduce_scatter<half, S / 2>(x, lane, idx, dup);
    } else {
      x[0] += __shfl_xor_sync(0xffffffffu, x[0], S);
      dup |= S;
      reduce_scatter<1, S / 2>(x, lane, idx, dup);
    }
  }
}

// T: W0's element type (also G's and dW0's); Q: columns per thread (bwd_cols).
template <int R, int Q, class T>
__global__ void __launch_bounds__(kThreads, R * Q <= 16 ? 2 : 1)
    bwd_kernel(AptPstProblem p, const T* grad, const uint32_t* words, int64_t rows_per_block, AptPstGrads g) {
  const T* w0 = static_cast<const T*>(p.w0);
  T* dw0 = static_cast<T*>(g.dw0);
  constexpr int NV = 2 * R;  // per row: R partial sums for dU, R for dA (and dR apart)
  __shared__ __align__(16) float su[kBwdRows][R];
  __shared__ __align__(16) float sa[kBwdRows][R];
  __shared__ float red[kWarps][kBwdRows][NV + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tc = static_cast<int64_t>(kThreads) * Q;
  const int64_t col_tiles = (p.k + tc - 1) / tc;
  const int64_t i_begin = blockIdx.x / col_tiles * rows_per_block;
  const int64_t i_end = i_begin + rows_per_block < p.n ? i_begin + rows_per_block : p.n;
  if (i_begin >= i_end) return;  // block-uniform
  const int64_t c0 = blockIdx.x % col_tiles * tc + static_cast<int64_t>(threadIdx.x) * Q;  // Q consecutive columns
  const int pw = R - p.rw, ps = R - p.rs;  // zero padding in front of each factor run
  // a row's Q entries of W0 and G as one load each, dW0's as one store (and the Q keep bits in one word)
  const bool packed = packs_fit<T, Q>(w0, p.k) && packs_fit<T, Q>(grad, p.k) && (!dw0 || packs_fit<T, Q>(dw0, p.k));
  float v[Q][R], b[Q][R], gv[Q][R], gb[Q][R], gc[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int64_t c = c0 + q;
    gc[q] = 0.0f;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      v[q][j] = c < p.k && j >= pw ? p.v[(j - pw) * p.k + c] : 0.0f;
      b[q][j] = c < p.k && j >= ps ? p.b[(j - ps) * p.k + c] : 0.0f;
      gv[q][j] = gb[q][j] = 0.0f;
    }
  }
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kBwdRows) {
    const int rows = i_end - i0 < kBwdRows ? static_cast<int>(i_end - i0) : kBwdRows;
    __syncthreads();  // the previous tile's reads of su, sa and red are done
    for (int e = threadIdx.x; e < kBwdRows * R; e += kThreads) {
      const int row = e / R, j = e - row * R;
      const int64_t i = i0 + row;
      su[row][j] = row < rows && j >= pw ? p.u[i * p.rw + j - pw] : 0.0f;
      sa[row][j] = row < rows && j >= ps ? p.a[i * p.rs + j - ps] : 0.0f;
    }
    __syncthreads();
    for (int row0 = 0; row0 < rows; row0 += kBwdAhead) {
      // W0, G and the keep bits of kBwdAhead rows, all loaded before any is used (loads in flight)
      Pack<T, Q> wl[kBwdAhead], gl[kBwdAhead];
      uint32_t ml[kBwdAhead];
#pragma unroll
      for (int a = 0; a < kBwdAhead; ++a) {
        const int64_t i = i0 + row0 + a, f0 = i * p.k + c0;
        if (row0 + a >= rows || c0 >= p.k) continue;
        wl[a] = load_run<T, Q>(w0, f0, i, c0, p.n, p.k, packed);
        gl[a] = load_run<T, Q>(grad, f0, i, c0, p.n, p.k, packed);
        if (packed) {  // all Q entries in the matrix: their bits in one word
          ml[a] = words[f0 >> 5] >> (f0 & 31);
        } else {
          ml[a] = 0u;
#pragma unroll
          for (int q = 0; q < Q; ++q)
            if (c0 + q < p.k) ml[a] |= ((words[(f0 + q) >> 5] >> ((f0 + q) & 31)) & 1u) << q;
        }
      }
#pragma unroll
      for (int a = 0; a < kBwdAhead; ++a) {
        const int row = row0 + a;
        if (row >= rows) break;  // block-uniform: the reductions below see every lane
        const int64_t i = i0 + row, f0 = i * p.k + c0;
        float ur[R], ar[R], x[NV], xr = 0.0f;  // the row's factors, read once for all of the thread's columns
#pragma unroll
        for (int j = 0; j < R; ++j) {
          ur[j] = su[row][j];
          ar[j] = sa[row][j];
          x[j] = x[R + j] = 0.0f;
        }
        Pack<T, Q> dwl;
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          if (c0 + q < p.k) {
            const float w = weight_of(ur, v[q], p.beta, to_f32(wl[a].x[q]));
            const float gr = to_f32(gl[a].x[q]);
            const float m = (ml[a] >> q) & 1u ? 1.0f : 0.0f;
            const float ds = gr * w, dw = (m + abs_bits(w)) * gr;
            dwl.x[q] = from_f32<T>(dw);
            if (dw0 && !packed) dw0[f0 + q] = dwl.x[q];
#pragma unroll
            for (int j = 0; j < R; ++j) {
              gv[q][j] += ur[j] * dw;
              gb[q][j] += ar[j] * ds;
              x[j] += dw * v[q][j];
              x[R + j] += ds * b[q][j];
            }
            gc[q] += ds;
            xr += ds;
          }
        }
        if (dw0 && packed && c0 < p.k) store_pack(dw0 + f0, dwl);
        int idx = 0, dup = 0;
        reduce_scatter<NV, 16>(x, lane, idx, dup);
#pragma unroll
        for (int s = 16; s >= 1; s >>= 1) xr += __shfl_xor_sync(0xffffffffu, xr, s);
        if ((lane & dup) == 0) {
#pragma unroll
          for (int t = 0; t < (NV > 32 ? NV / 32 : 1); ++t) red[warp][row][idx + t] = x[t];
        }
        if (lane == 0) red[warp][row][NV] = xr;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * (NV + 1); e += kThreads) {
      const int row = e / (NV + 1), j = e - row * (NV + 1);
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w][row][j];
      const int64_t i = i0 + row;
      if (j < R) {
        if (j >= pw) atomicAdd(&g.du[i * p.rw + j - pw], p.beta * sum);
      } else if (j < NV) {
        if (j - R >= ps) atomicAdd(&g.da[i * p.rs + j - R - ps], p.alpha1 * sum);
      } else {
        atomicAdd(&g.dr[i], p.alpha2 * sum);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int64_t c = c0 + q;
    if (c >= p.k) continue;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (j >= pw) atomicAdd(&g.dv[(j - pw) * p.k + c], p.beta * gv[q][j]);
      if (j >= ps) atomicAdd(&g.db[(j - ps) * p.k + c], p.alpha1 * gb[q][j]);
    }
    atomicAdd(&g.dc[c], p.alpha2 * gc[q]);
  }
}

template <int R, int Q, class T>
cudaError_t backward_launch(const AptPstProblem& p, const void* grad, const uint32_t* words, const AptPstGrads& g,
                            cudaStream_t stream) {
  // Rows split so that the grid is about two blocks per SM (each block adds its column sums once).
  int device = 0, sms = 0;
  cudaError_t err;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  const int64_t tc = static_cast<int64_t>(kThreads) * Q;
  const int64_t col_tiles = (p.k + tc - 1) / tc, row_tiles = (p.n + kBwdRows - 1) / kBwdRows;
  int64_t splits = (2 * static_cast<int64_t>(sms) + col_tiles - 1) / col_tiles;
  splits = splits < 1 ? 1 : (splits > row_tiles ? row_tiles : splits);
  const int64_t rows_per_block = (row_tiles + splits - 1) / splits * kBwdRows;
  const int64_t blocks = col_tiles * ((p.n + rows_per_block - 1) / rows_per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  bwd_kernel<R, Q, T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p, static_cast<const T*>(grad), words,
                                                                                rows_per_block, g);
  return cudaGetLastError();
}

template <class T>
cudaError_t backward_ranks(const AptPstProblem& p, const void* grad, const uint32_t* words, const AptPstGrads& g,
                           bool wide, cudaStream_t stream) {
  switch (rank_bucket(p.rw, p.rs)) {
    case 8:
      return wide ? backward_launch<8, bwd_cols(8, true), T>(p, grad, words, g, stream)
                  : backward_launch<8, bwd_cols(8, false), T>(p, grad, words, g, stream);
    case 16:
      return wide ? backward_launch<16, bwd_cols(16, true), T>(p, grad, words, g, stream)
                  : backward_launch<16, bwd_cols(16, false), T>(p, grad, words, g, stream);
    default: return backward_launch<32, bwd_cols(32, false), T>(p, grad, words, g, stream);
  }
}

unsigned int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// The workspace: State, the classic passes' histograms, the row counters, the bracket's histograms (sample: two
// passes of two selections; list: three passes) and its list (keys, then flat indices). The counters (everything
// before the list) are zeroed when n_pruned > 0.
struct Workspace {
  State* st;
  unsigned long long *hist, *rowcnt, *sample_hist, *list_hist;
  Candidates list;
  size_t classic_bytes;   // bytes to zero for the classic passes
  size_t counters_bytes;  // and for the bracket's too
  size_t total_bytes;
};

Workspace carve(void* base, int64_t n, int64_t k) {
  char* ws = static_cast<char*>(base);
  Workspace w{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    char* ptr = ws ? ws + at : nullptr;
    at += align256(bytes);
    return ptr;
  };
  using Counter = unsigned long long;
  w.st = reinterpret_cast<State*>(take(sizeof(State)));
  w.hist = reinterpret_cast<Counter*>(take(sizeof(Counter) * kPasses * kMaxBins));
  w.rowcnt = reinterpret_cast<Counter*>(take(sizeof(Counter) * static_cast<size_t>(n > 0 ? n : 1)));
  w.classic_bytes = at;
  w.sample_hist = reinterpret_cast<Counter*>(take(sizeof(Counter) * 2 * 2 * kMaxBins));
  w.list_hist = reinterpret_cast<Counter*>(take(sizeof(Counter) * kPasses * kMaxBins));
  w.counters_bytes = at;
  w.list.cap = bracket_cap(n, k);
  w.list.keys = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * w.list.cap));
  w.list.tags = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * w.list.cap));
  w.total_bytes = at;
  return w;
}

size_t workspace_bytes(int64_t n, int64_t k) { return carve(nullptr, n, k).total_bytes; }

// Whether the sampled bracket runs first: n_pruned > 0, at least bracket_min entries (bracket_min < 0: never) and
// kMinBracketEntries (the sample, numel / 16 keys and a run, then fits in W''s buffer), flat indices in 32 bits.
constexpr int64_t kMinBracketEntries = 1024;
bool use_bracket(const AptPstProblem& p, int64_t n_pruned, int64_t bracket_min) {
  const int64_t numel = p.n * p.k;
  return n_pruned > 0 && bracket_min >= 0 && numel >= bracket_min && numel >= kMinBracketEntries &&
         numel <= 0xffffffffll;
}

// The sampled bracket's launches (steps 1-6 above), before the classic ones.
template <int R, class T>
cudaError_t bracket_passes(const AptPstProblem& p, int64_t n_pruned, const Workspace& w, void* w_out, uint32_t* words,
                           Bracket& br, cudaStream_t stream) {
  const int64_t numel = p.n * p.k, runs = sample_runs(numel), S = runs * kSampleRun;
  // the sample's ranks (1-based) around the threshold's expected one
  const double q = static_cast<double>(n_pruned) / static_cast<double>(numel), mid = q * static_cast<double>(S);
  const double margin = kBracketSigmas * std::sqrt(static_cast<double>(S) * q * (1.0 - q)) + 1.0;
  const int64_t r_lo = static_cast<int64_t>(std::floor(mid - margin)), r_hi = static_cast<int64_t>(std::ceil(mid + margin));
  br.lo_open = r_lo < 1;
  br.hi_open = r_hi > S;
  br.list = w.list;
  br.n_pruned = n_pruned;
  br.on = true;
  uint32_t* sample = static_cast<uint32_t*>(w_out);  // in W''s buffer, free until the BRACKET pass (S < numel / 8)
  sample_kernel<<<grid_for(runs * 32, kThreads), kThreads, 0, stream>>>(p, runs, sample);
  const unsigned int sgrid = grid_for(S, kThreads * 16);
  for (int pass = 0; pass < 2; ++pass)
    keys_hist_kernel<2><<<sgrid, kThreads, 0, stream>>>(sample, static_cast<unsigned long long>(S), nullptr, pass,
                                                        w.st->sample, br.lo_open ? 1 : r_lo, br.hi_open ? S : r_hi,
                                                        w.sample_hist + pass * 2 * kMaxBins,
                                                        &w.st->arrived_b[kArriveSample0 + pass], nullptr);
  mask_kernel<R, T, true><<<tile_grid(p, R), kThreads, 0, stream>>>(p, w.st, true, w_out, words, br);
  const unsigned int lgrid = grid_for(static_cast<int64_t>(w.list.cap), kThreads * 8);
  for (int pass = 0; pass < kPasses; ++pass)
    keys_hist_kernel<1><<<lgrid, kThreads, 0, stream>>>(w.list.keys, 0, &w.st->blisted, pass, &w.st->sel, -1, -1,
                                                        w.list_hist + pass * kMaxBins,
                                                        &w.st->arrived_b[kArriveList0 + pass], w.st);
  list_ties_kernel<<<lgrid, kThreads, 0, stream>>>(p, w.st, w.rowcnt, w.list);
  fixup_kernel<T><<<lgrid, kThreads, 0, stream>>>(p, w.st, w.list, w_out, words);
  if (p.k % 32) clear_words_kernel<<<grid_for((numel + 31) / 32, kThreads * 4), kThreads, 0, stream>>>(w.st, words, (numel + 31) / 32);
  return cudaGetLastError();
}

// The selection passes (when n_pruned > 0; the workspace's counters zeroed) and the mask pass, tiles of bucket R,
// W0 of element type T; the sampled bracket first where use_bracket.
template <int R, class T>
cudaError_t select_and_mask(const AptPstProblem& p, int64_t n_pruned, bool bracket, const Workspace& w,
                            void* w_out, uint32_t* words, cudaStream_t stream) {
  const unsigned int grid = tile_grid(p, R);
  Bracket br{};
  cudaError_t err;
  if (bracket && (err = bracket_passes<R, T>(p, n_pruned, w, w_out, words, br, stream)) != cudaSuccess)
    return err;
  if (n_pruned > 0) {
    // the candidate list: keys, then rows, in W''s buffer (n k elements of 2 or 4 bytes)
    const unsigned long long cap =
        static_cast<unsigned long long>(p.n * p.k) * sizeof(T) / 8u;
    const Candidates cand{static_cast<uint32_t*>(w_out), static_cast<uint32_t*>(w_out) + cap, cap};
    for (int pass = 0; pass < kPasses; ++pass) {
      if (pass == 1)
        hist_kernel<R, true, T><<<grid, kThreads, 0, stream>>>(p, pass, w.st, w.hist + pass * kMaxBins, n_pruned, cand,
                                                               br.on);
      else
        hist_kernel<R, false, T><<<grid, kThreads, 0, stream>>>(p, pass, w.st, w.hist + pass * kMaxBins, n_pruned,
                                                                cand, br.on);
    }
    tie_rows_kernel<R, T><<<grid, kThreads, 0, stream>>>(p, w.st, w.rowcnt, cand, br.on);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  mask_kernel<R, T, false><<<grid, kThreads, 0, stream>>>(p, w.st, n_pruned > 0, w_out, words, br);
  return cudaGetLastError();
}

template <class T>
cudaError_t select_and_mask_ranks(const AptPstProblem& p, int64_t n_pruned, bool bracket, const Workspace& w,
                                  void* w_out, uint32_t* words, cudaStream_t stream) {
  switch (rank_bucket(p.rw, p.rs)) {
    case 8: return select_and_mask<8, T>(p, n_pruned, bracket, w, w_out, words, stream);
    case 16: return select_and_mask<16, T>(p, n_pruned, bracket, w, w_out, words, stream);
    case 32: return select_and_mask<32, T>(p, n_pruned, bracket, w, w_out, words, stream);
    default: return select_and_mask<0, T>(p, n_pruned, bracket, w, w_out, words, stream);
  }
}

}  // namespace

extern "C" size_t apt_pst_workspace_bytes(int64_t n, int64_t k) { return workspace_bytes(n, k); }

extern "C" cudaError_t apt_pst_forward(const AptPstProblem* problem, int64_t n_pruned, int nm_n, int nm_m,
                                       int64_t bracket_min, void* w_out, uint32_t* words, void* workspace,
                                       size_t workspace_bytes_given, cudaStream_t stream) {
  if (!problem) return cudaErrorInvalidValue;
  const AptPstProblem p = *problem;
  if (p.n < 0 || p.k < 0 || p.rw < 0 || p.rs < 0) return cudaErrorInvalidValue;
  const int64_t numel = p.n * p.k;
  if (numel == 0) return cudaSuccess;
  const size_t nwords = static_cast<size_t>((numel + 31) / 32);
  cudaError_t err;
  if (nm_m > 0) {
    if (nm_m > 32 || nm_n < 0 || nm_n > nm_m || p.k % nm_m) return cudaErrorInvalidValue;
    if ((err = cudaMemsetAsync(words, 0, nwords * sizeof(uint32_t), stream)) != cudaSuccess) return err;
    nm_kernel<<<grid_for(numel / nm_m, kThreads), kThreads, 0, stream>>>(p, nm_n, nm_m, w_out, words);
    return cudaGetLastError();
  }
  if (n_pruned < 0 || n_pruned >= numel) return cudaErrorInvalidValue;
  if (workspace_bytes_given < workspace_bytes(p.n, p.k)) return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, p.n, p.k);
  const bool bracket = use_bracket(p, n_pruned, bracket_min);
  if (n_pruned > 0) {
    const size_t zeroed = bracket ? w.counters_bytes : w.classic_bytes;
    if ((err = cudaMemsetAsync(workspace, 0, zeroed, stream)) != cudaSuccess) return err;
  }
  if (p.k % 32 && (err = cudaMemsetAsync(words, 0, nwords * sizeof(uint32_t), stream)) != cudaSuccess) return err;
  switch (p.w0_dtype) {
    case APT_PST_F16: return select_and_mask_ranks<__half>(p, n_pruned, bracket, w, w_out, words, stream);
    case APT_PST_BF16: return select_and_mask_ranks<__nv_bfloat16>(p, n_pruned, bracket, w, w_out, words, stream);
    case APT_PST_F32: return select_and_mask_ranks<float>(p, n_pruned, bracket, w, w_out, words, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t apt_pst_backward(const AptPstProblem* problem, const void* grad, const uint32_t* words,
                                        const AptPstGrads* grads, int wide, cudaStream_t stream) {
  if (!problem || !grads) return cudaErrorInvalidValue;
  const AptPstProblem p = *problem;
  if (p.n < 0 || p.k < 0 || p.rw < 0 || p.rs < 0 || p.rw > APT_PST_BACKWARD_MAX_RANK ||
      p.rs > APT_PST_BACKWARD_MAX_RANK)
    return cudaErrorInvalidValue;
  if (p.n * p.k == 0) return cudaSuccess;
  switch (p.w0_dtype) {
    case APT_PST_F16: return backward_ranks<__half>(p, grad, words, *grads, wide != 0, stream);
    case APT_PST_BF16: return backward_ranks<__nv_bfloat16>(p, grad, words, *grads, wide != 0, stream);
    case APT_PST_F32: return backward_ranks<float>(p, grad, words, *grads, wide != 0, stream);
    default: return cudaErrorInvalidValue;
  }
}
