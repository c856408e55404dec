// lora_linear_8bit, C++ CPU kernel (torch-free): dequantise a tile of rows of a bitsandbytes LLM.int8
// weight into a small buffer that the binding's BLAS GEMM consumes (the full-precision weight is never
// materialised; the binding walks the weight tile by tile).
//
// Format (bitsandbytes.functional.int8_vectorwise_quant): the [N, K] weight as int8 CB [N, K] and one fp32
// scale per row, SCB [N]; value = T(CB[n, k] * fl32(SCB[n] * fl32(1/127))), the product in float (in double
// for T = double), as bitsandbytes' CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0)) computes it.
#pragma once
#include <cstdint>
#include "../common/dtypes.h"

namespace fastpeft {

// out[i * K + k] = T(q[(row0 + i) * K + k] * (row_scale[row0 + i] * (1/127))) for i < rows, k < K (module doc).
// OpenMP over rows.
template <typename T>
void dequant8_rows(const int8_t* q, const float* row_scale, int64_t K, int64_t row0, int64_t rows, T* out);

}  // namespace fastpeft
