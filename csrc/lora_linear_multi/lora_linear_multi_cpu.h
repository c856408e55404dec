// lora_linear_multi, C++ CPU kernels (torch-free): the low-rank part of a multi-adapter LoRA
// linear layer (serving: one base weight, each row of the batch with its own adapter).
//
//   lora_multi_segments     stable counting sort of the rows by adapter (bucket 0 = base-only rows)
//   lora_multi_lowrank_rows y[m, :] = bias + s_a · (x[m] A_aᵀ) B_aᵀ for every row m (a = its adapter)
//
// The base GEMM y += x Wᵀ is left to BLAS (the binding calls it with beta = 1 on the rows written
// here), so the low-rank update costs no extra pass over y.
#pragma once
#include <cstdint>

#include "../common/dtypes.h"

namespace fastpeft {

// Rows grouped by bucket b = adapter_index[m] + 1 (bucket 0: adapter -1, base only), in row order
// within a bucket: the rows of bucket b are order[bounds[b] .. bounds[b + 1]), b <= n_adapters.
// bounds has n_adapters + 2 entries, order M.  Returns -1, or the first row m whose index is outside
// [-1, n_adapters) (bounds and order are then unspecified).  I is int32_t or int64_t.
template <typename I>
int64_t lora_multi_segments(const I* adapter_index, int64_t M, int64_t n_adapters, int64_t* bounds,
                            int64_t* order);

// One multi-adapter LoRA problem.  Element strides are in elements; y has unit column stride.
template <typename T>
struct LoraMultiProblem {
  int64_t M, K, N;           // rows, in features, out features
  int64_t n_adapters, r_max;
  const T* x;                // [M, K]              x[m * sx0 + k * sx1]
  int64_t sx0, sx1;
  const T* A;                // [n, r_max, K]       A[a * sa0 + j * sa1 + k * sa2]
  int64_t sa0, sa1, sa2;
  const T* B;                // [n, N, r_max]       B[a * sb0 + n * sb1 + j * sb2]
  int64_t sb0, sb1, sb2;
  const double* scales;      // [n]
  const int64_t* ranks;      // [n], each in [0, r_max]: columns j >= ranks[a] are skipped; nullptr = r_max
  const T* bias;             // [N] (bias[n * sbias]) or nullptr
  int64_t sbias;
  T* y;                      // [M, N]              y[m * sy0 + n]
  int64_t sy0;
};

// For every row m with adapter a (from lora_multi_segments' bounds / order):
//   y[m, n] = bias[n] + s_a · Σ_j (Σ_k x[m, k] A[a, j, k]) B[a, n, j]      (j < rank_a)
// and y[m, n] = bias[n] (0 without bias) for the base-only rows.  Accumulation in float (double
// for double); OpenMP over (adapter segment, block of rows), x read in place (no gathered copy).
template <typename T>
void lora_multi_lowrank_rows(const LoraMultiProblem<T>& p, const int64_t* bounds, const int64_t* order);

}  // namespace fastpeft
