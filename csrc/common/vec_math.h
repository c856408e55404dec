// Torch-free helpers for elementwise CPU kernels whose inner loops the compiler vectorises:
// conversions between the storage type T and the accumulation type A, rounding to a storage
// type (to reproduce where an unfused PyTorch composition rounds), and float32 exp / tanh / erf
// with no libm call (std::exp and friends are scalar calls that stop `#pragma omp simd` loops
// from vectorising).  The float approximations follow PyTorch's vectorised CPU kernels: exp and
// tanh from Cephes (~1-2 ulp), erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the
// polynomial of PyTorch's AVX2/AVX-512 erf).  The double overloads call libm (float64 is the test
// dtype).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dtypes.h"

// Row functions get an AVX2 clone next to the baseline (SSE2) one, picked at load time
// (GCC ifunc). AVX2 without FMA: products and sums stay separately rounded, as in PyTorch's
// unfused kernels, so results do not depend on which clone runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTPEFT_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPEFT_SIMD_CLONES
#endif

namespace fastpeft {
namespace vm {

// Value of a stored element in the accumulation type A.
template <typename A, typename T>
inline A load(T v) { return static_cast<A>(to_float(v)); }

// A value of the accumulation type stored as O (round to nearest even).
template <typename O> inline O store(float v);
template <> inline float store<float>(float v) { return v; }
template <> inline double store<double>(float v) { return v; }
template <> inline bf16_t store<bf16_t>(float v) { return from_float<bf16_t>(v); }
template <typename O> inline O store(double v) { return from_double<O>(v); }

// v rounded to the storage type T and read back (identity for float in float, double in double).
template <typename T> inline float round_to(float v) { return to_float(store<T>(v)); }
template <typename T> inline double round_to(double v) { return static_cast<double>(to_float(store<T>(v))); }
template <> inline double round_to<double>(double v) { return v; }

inline float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// c ? a : b on the bit patterns.  A plain `c ? a : b` on floats is a branch to GCC under its default
// -ftrapping-math (float arithmetic after it may not be speculated), which stops vectorisation.
inline float select(bool c, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof ua);
  std::memcpy(&ub, &b, sizeof ub);
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  const uint32_t r = (ua & m) | (ub & ~m);
  float f;
  std::memcpy(&f, &r, sizeof f);
  return f;
}
inline double select(bool c, double a, double b) {
  uint64_t ua, ub;
  std::memcpy(&ua, &a, sizeof ua);
  std::memcpy(&ub, &b, sizeof ub);
  const uint64_t m = 0ull - static_cast<uint64_t>(c);
  const uint64_t r = (ua & m) | (ub & ~m);
  double f;
  std::memcpy(&f, &r, sizeof f);
  return f;
}

// e^x in float32, branch-free (vectorisable); exp(x > 88.72) = inf, exp(x < -87.33) = 0
// (PyTorch gives a subnormal there: an absolute difference below 1.2e-38), NaN stays NaN.
inline float exp(float x) {
  const float hi = 88.7228394f, lo = -87.3365448f;
  float xc = select(x > hi, hi, x);
  xc = select(xc < lo, lo, xc);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (round to nearest)
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;  // Cody-Waite: ln 2 in two parts
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n split in two factors so that n = 128 (x close to hi) does not overflow the exponent field.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const float s1 = bits_to_float((n1 + 127) << 23), s2 = bits_to_float((ni - n1 + 127) << 23);
  const float out = select(x > hi, std::numeric_limits<float>::infinity(), p * s1 * s2);
  return select(x < lo, 0.0f, out);
}
inline double exp(double x) { return std::exp(x); }

// tanh(x) in float32 (Cephes tanhf, ~2 ulp): an odd polynomial for |x| < 0.625, else
// 1 - 2 / (e^2|x| + 1) with x's sign; both computed and selected (vectorisable).
inline float tanh(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = std::copysign(1.0f - 2.0f / (vm::exp(2.0f * a) + 1.0f), x);
  return select(a < 0.625f, small, large);
}
inline double tanh(double x) { return std::tanh(x); }

// erf(x): Abramowitz & Stegun 7.1.26 in float32 (what PyTorch's AVX2/AVX-512 erf computes).
inline float erf(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float y = 1.0f - r * t * vm::exp(-a * a);
  return std::copysign(y, x);
}
inline double erf(double x) { return std::erf(x); }

}  // namespace vm
}  // namespace fastpeft
