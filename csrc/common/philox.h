// Counter-based Philox-4x32-10 RNG, identical to Triton's `tl.philox` with
// 32-bit counters and to fastpeft/kernels/philox.py (the PyTorch reference).
// Torch-free: usable from host C++ and CUDA device code.
//
// Dropout masks in fastpeft are addressed by (row, col) of the logical
// [rows, cols] tensor the mask covers:
//   counter = (c0 = col >> 2, c1 = row, c2 = stream, c3 = 0), key = seed
//   bits    = philox(...)[col & 3]
//   keep    = (bits >> 8) >= threshold,  threshold = ceil(p * 2^24)
// so the same seed gives the same mask on every backend.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {

struct Philox4 {
  uint32_t v[4];
};

FASTPEFT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// 10 rounds of Philox-4x32 on counter (c0..c3) with key (seed_lo, seed_hi).
FASTPEFT_HD Philox4 philox4x32(uint64_t seed, uint32_t c0, uint32_t c1,
                               uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint32_t a = 0xD2511F53u, b = 0xCD9E8D57u;
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(b, p2) ^ c1 ^ k0;
    c2 = mulhi32(a, p0) ^ c3 ^ k1;
    c1 = b * p2;
    c3 = a * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 r;
  r.v[0] = c0; r.v[1] = c1; r.v[2] = c2; r.v[3] = c3;
  return r;
}

// keep iff (bits >> 8) >= threshold; threshold = ceil(p * 2^24) in [0, 2^24].
inline uint32_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0u;
  if (p >= 1.0) return 1u << 24;
  return static_cast<uint32_t>(std::ceil(p * 16777216.0));
}

// Fill keep[0..cols) (1 = kept, 0 = dropped) for one row of a mask.
inline void dropout_keep_row(uint64_t seed, uint32_t stream, int64_t row,
                             int64_t cols, uint32_t threshold, uint8_t* keep) {
  for (int64_t g = 0; g * 4 < cols; ++g) {
    Philox4 r = philox4x32(seed, static_cast<uint32_t>(g),
                           static_cast<uint32_t>(row), stream, 0u);
    const int64_t base = g * 4;
    for (int j = 0; j < 4 && base + j < cols; ++j)
      keep[base + j] = (r.v[j] >> 8) >= threshold ? 1 : 0;
  }
}

}  // namespace fastpeft
