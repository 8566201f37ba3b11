// PST selection and mask passes: fused low-rank scores, exact radix select of the n_pruned-th
// smallest score, W' = M * W and a packed keep bitmask. Plain CUDA: no torch headers.
//
// Scores, per entry (i, c), in this order, every step one IEEE float32 fused multiply-add rounded once
// to nearest or one float32 addition (inline PTX, so that compiler flags such as --use_fast_math cannot
// change them or flush to zero; apt_kernels.pst.reference.fused_order_scores is the same order):
//   uv = 0; for j < rw: uv = fma(U[i, j], V[j, c], uv)        ab likewise with A, B and rs
//   W  = fma(beta, uv, W0[i, c])
//   S  = fma(alpha2, R[i] + C[c], fma(alpha1, ab, |W|))
// Ordered keys: the float bits with negative values flipped, -0 -> +0, every NaN above +inf, as
// apt_kernels.pst.reference.ordered_key (here as unsigned: key ^ 0x80000000).
// Mask: exactly n_pruned entries with the smallest keys are pruned; among equal keys the smaller
// row-major index first. N:M mode (nm_m > 0): in every group of nm_m consecutive entries of a row the
// nm_n largest (key, then larger index) are kept.
// Bitmask: bit j of word w is entry 32 * w + j (row-major), 1 = kept; ceil(n * k / 32) words.
//
// Backward (straight-through, from G = dL/dW'; apt_kernels.pst.reference.ste_backward):
//   W = W0 + beta U V (the forward's order), dS = G * W, dW = (M + |W|) * G,
//   dU = beta dW V^T, dV = beta U^T dW, dA = alpha1 dS B^T, dB = alpha1 A^T dS,
//   dR = alpha2 dS.sum(1), dC = alpha2 dS.sum(0), and dW0 = dW when asked for.
// Sums in float32, added into the outputs with float atomics: the last bits depend on scheduling.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

extern "C" {

// Element type of W0 and of W'.
enum AptPstDtype { APT_PST_F32 = 0, APT_PST_F16 = 1, APT_PST_BF16 = 2 };

typedef struct AptPstProblem {
  const void* w0;   // (n, k) row-major, w0_dtype
  int w0_dtype;     // AptPstDtype
  const float* u;   // (n, rw) row-major
  const float* v;   // (rw, k)
  const float* a;   // (n, rs)
  const float* b;   // (rs, k)
  const float* r;   // (n,)
  const float* c;   // (k,)
  int64_t n, k;
  int rw, rs;
  float beta, alpha1, alpha2;
} AptPstProblem;

// Bytes of device workspace apt_pst_forward needs for an (n, k) weight (it zeroes what it uses).
size_t apt_pst_workspace_bytes(int64_t n, int64_t k);

// w_out: n * k elements of w0_dtype; words: ceil(n * k / 32) uint32. n_pruned in [0, n * k) for the
// global selection (nm_m == 0); with nm_m in [1, 32], k % nm_m == 0 and 0 <= nm_n <= nm_m, the N:M
// mode (n_pruned ignored). bracket_min: the global selection of a matrix of at least this many entries (and
// at least 1024, fewer than 2^32) starts with the sampled bracket (one pass over W when it holds the threshold;
// same results either way); negative: never. Returns the first launch error (cudaErrorInvalidValue for bad
// arguments).
cudaError_t apt_pst_forward(const AptPstProblem* problem, int64_t n_pruned, int nm_n, int nm_m, int64_t bracket_min,
                            void* w_out, uint32_t* words, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The backward's outputs: float32 accumulators, zeroed by the caller (du (n, rw), dv (rw, k), da (n, rs),
// db (rs, k), dr (n,), dc (k,), row-major), and dw0 (n * k of w0_dtype, written; null: not wanted).
typedef struct AptPstGrads {
  float* du;
  float* dv;
  float* da;
  float* db;
  float* dr;
  float* dc;
  void* dw0;
} AptPstGrads;

// Ranks (rw and rs) of at most this many.
#define APT_PST_BACKWARD_MAX_RANK 32

// grad: n * k elements of w0_dtype (row-major); words: the forward's bitmask. problem->r and ->c are
// not read. wide: a tuning variant, twice the columns per thread up to rank 16 (same results up to the
// float atomics' order). Returns the first launch error (cudaErrorInvalidValue for bad arguments).
cudaError_t apt_pst_backward(const AptPstProblem* problem, const void* grad, const uint32_t* words,
                             const AptPstGrads* grads, int wide, cudaStream_t stream);
}
