// Torch-free scalar helpers shared by the C++ kernels.
// bf16_t has the bit layout of at::BFloat16 / __nv_bfloat16 (upper 16 bits of
// an IEEE float32); conversion rounds to nearest even, NaN stays NaN.
#pragma once
#include <cstdint>
#include <cstring>

namespace fastpeft {

struct bf16_t {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
// Branch-free (a select, no early return) so that loops calling it vectorise.
template <> inline bf16_t from_float<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}
template <typename T> inline T from_double(double v) { return from_float<T>(static_cast<float>(v)); }
template <> inline double from_double<double>(double v) { return v; }

// Accumulation type: double for double, float otherwise.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };

}  // namespace fastpeft
