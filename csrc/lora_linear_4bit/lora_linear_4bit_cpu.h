// lora_linear_4bit, C++ CPU kernel (torch-free): dequantise a tile of rows of a bitsandbytes 4-bit
// weight into a small buffer that the binding's BLAS GEMM consumes (the full-precision weight is never
// materialised; the binding walks the weight tile by tile).
//
// Format (bitsandbytes.functional.quantize_4bit): the [N, K] weight flattened row-major, element e
// stored as a 4-bit index into code[16] (NF4 / FP4), element 2i in the high nibble of byte i,
// 2i + 1 in the low nibble; value = code[index] * absmax[e / blocksize] (fp32 product, then rounded).
#pragma once
#include <cstdint>
#include "../common/dtypes.h"

namespace fastpeft {

// out[i * K + k] = T(code[nib(e)] * absmax[e >> log2_blocksize]),  e = (row0 + i) * K + k,
// for i < rows, k < K.  blocksize must be a power of two (log2_blocksize its log).  OpenMP over rows.
template <typename T>
void dequant4_rows(const uint8_t* q, const float* absmax, const float* code, int64_t K, int log2_blocksize,
                   int64_t row0, int64_t rows, T* out);

}  // namespace fastpeft
