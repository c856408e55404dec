// lora_linear, C++ CPU kernels (torch-free): the parts of a LoRA layer that
// surround the BLAS GEMMs.  The dropout mask is never stored for more than a
// bounded chunk of rows: it is regenerated from the seed with the shared Philox
// addressing (csrc/common/philox.h: counter = (col >> 2, row, stream, 0)).
//
//   lora_keep_row            keep[k] of one row (bit-identical to dropout_keep_row, vectorised)
//   lora_dropout_rows        out = drop(x)[row0 : row0 + rows]  (+ optional keep bytes)
//   lora_masked_accumulate   dst[i, k] += keep[i, k] ? src[i, k] / (1 - p) : 0
//   lora_masked_store        dst[i, k]  = keep[i, k] ? src[i, k] / (1 - p) : 0
#pragma once
#include <cstdint>
#include "../common/dtypes.h"

namespace fastpeft {

// keep[0..cols) (1 = kept) of mask row `row`; same bits as dropout_keep_row.
void lora_keep_row(uint64_t seed, uint32_t stream, int64_t row, int64_t cols, uint32_t threshold,
                   uint8_t* keep);
// The same with the vector width capped (for the unit test of every path): isa 2 AVX-512F, 1 AVX2,
// 0 scalar; a path this CPU (or compiler) lacks falls to the next narrower one.
void lora_keep_row_isa(int isa, uint64_t seed, uint32_t stream, int64_t row, int64_t cols, uint32_t threshold,
                       uint8_t* keep);

// For i < rows, k < K:  m = row0 + i,
//   out[i * K + k] = keep(m, k) ? x[m * sx0 + k * sx1] * inv_keep : 0   (computed in float/double)
//   keep_out[i * K + k] = keep(m, k)                                     (when keep_out != nullptr)
// x points at element [0, 0] of the logical [M, K] input (any strides).  OpenMP over rows.
template <typename T, typename O>
void lora_dropout_rows(const T* x, int64_t sx0, int64_t sx1, int64_t row0, int64_t rows, int64_t K,
                       uint64_t seed, uint32_t stream, uint32_t threshold, double inv_keep, O* out,
                       uint8_t* keep_out);

// dst[i * sd0 + k] += keep[i * K + k] ? src[i * K + k] * inv_keep : 0, for i < rows, k < K.
template <typename T, typename S>
void lora_masked_accumulate(const S* src, const uint8_t* keep, int64_t rows, int64_t K, double inv_keep,
                            T* dst, int64_t sd0);

// dst[i * sd0 + k] = keep[i * K + k] ? src[i * K + k] * inv_keep : 0, for i < rows, k < K.
template <typename T, typename S>
void lora_masked_store(const S* src, const uint8_t* keep, int64_t rows, int64_t K, double inv_keep, T* dst,
                       int64_t sd0);

}  // namespace fastpeft
