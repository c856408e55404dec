#include "lora_linear_8bit_cpu.h"

namespace fastpeft {
namespace {

// T(q * s) with the product in float (in double for T = double): the precision of bitsandbytes'
// CB.to(dtype).mul_(scales), which computes in the promoted dtype of the int8 tensor cast to dtype and fp32.
template <typename T> inline T decode(int8_t q, float s) { return from_float<T>(static_cast<float>(q) * s); }
template <> inline double decode<double>(int8_t q, float s) { return static_cast<double>(q) * static_cast<double>(s); }

// fl32(1/127), the factor bitsandbytes multiplies SCB by (SCB.mul(1.0 / 127.0) on an fp32 tensor).
constexpr float kInv127 = static_cast<float>(1.0 / 127.0);

}  // namespace

template <typename T>
void dequant8_rows(const int8_t* q, const float* row_scale, int64_t K, int64_t row0, int64_t rows, T* out) {
#pragma omp parallel for schedule(static) if (rows * K > 32768)
  for (int64_t i = 0; i < rows; ++i) {
    const int8_t* __restrict src = q + (row0 + i) * K;
    T* __restrict dst = out + i * K;
    const float s = row_scale[row0 + i] * kInv127;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) dst[k] = decode<T>(src[k], s);
  }
}

template void dequant8_rows<float>(const int8_t*, const float*, int64_t, int64_t, int64_t, float*);
template void dequant8_rows<double>(const int8_t*, const float*, int64_t, int64_t, int64_t, double*);
template void dequant8_rows<bf16_t>(const int8_t*, const float*, int64_t, int64_t, int64_t, bf16_t*);

}  // namespace fastpeft
