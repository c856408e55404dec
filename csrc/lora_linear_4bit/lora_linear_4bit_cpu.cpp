#include "lora_linear_4bit_cpu.h"

namespace fastpeft {
namespace {

template <typename T> inline T store(float v) { return from_float<T>(v); }
template <> inline double store<double>(float v) { return static_cast<double>(v); }

// One row: elements e0 .. e0 + K of the flattened weight.  The loop runs byte by byte (two elements)
// where the row is byte-aligned, with a scalar element at either end otherwise.
template <typename T>
void dequant_row(const uint8_t* __restrict q, const float* __restrict absmax, const float* __restrict code,
                 int64_t e0, int64_t K, int lb, T* __restrict out) {
  int64_t k = 0;
  if (e0 & 1) {  // first element sits in a low nibble
    out[0] = store<T>(code[q[e0 >> 1] & 15] * absmax[e0 >> lb]);
    k = 1;
  }
  for (; k + 1 < K; k += 2) {
    const int64_t e = e0 + k;  // even
    const uint8_t b = q[e >> 1];
    const float a = absmax[e >> lb];  // e and e + 1 share a block (blocksize is even)
    out[k] = store<T>(code[b >> 4] * a);
    out[k + 1] = store<T>(code[b & 15] * a);
  }
  if (k < K) {  // last element in a high nibble
    const int64_t e = e0 + k;
    out[k] = store<T>(code[q[e >> 1] >> 4] * absmax[e >> lb]);
  }
}

}  // namespace

template <typename T>
void dequant4_rows(const uint8_t* q, const float* absmax, const float* code, int64_t K, int log2_blocksize,
                   int64_t row0, int64_t rows, T* out) {
#pragma omp parallel for schedule(static) if (rows * K > 32768)
  for (int64_t i = 0; i < rows; ++i) dequant_row<T>(q, absmax, code, (row0 + i) * K, K, log2_blocksize, out + i * K);
}

template void dequant4_rows<float>(const uint8_t*, const float*, const float*, int64_t, int, int64_t, int64_t, float*);
template void dequant4_rows<double>(const uint8_t*, const float*, const float*, int64_t, int, int64_t, int64_t,
                                    double*);
template void dequant4_rows<bf16_t>(const uint8_t*, const float*, const float*, int64_t, int, int64_t, int64_t,
                                    bf16_t*);

}  // namespace fastpeft
