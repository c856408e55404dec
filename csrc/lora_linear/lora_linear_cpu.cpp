#include "lora_linear_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTPEFT_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTPEFT_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define FASTPEFT_CLONES
#endif

namespace fastpeft {
namespace {

constexpr int kLanes = 8;  // Philox blocks computed side by side (one AVX2 register of counters)

// Philox-4x32-10 of counters (g0 + i, row, stream, 0), i < kLanes: the arithmetic of
// philox4x32 in philox.h, in structure-of-arrays form.  o[j][i] = word j of block i.
void philox_lanes_scalar(uint64_t seed, uint32_t row, uint32_t stream, uint32_t g0, uint32_t (&o)[4][kLanes]) {
  for (int i = 0; i < kLanes; ++i) {
    const Philox4 r = philox4x32(seed, g0 + static_cast<uint32_t>(i), row, stream, 0u);
    for (int j = 0; j < 4; ++j) o[j][i] = r.v[j];
  }
}

#if defined(FASTPEFT_HAVE_AVX2_PATH)
// The same with AVX2: 32x32->64 products with _mm256_mul_epu32 on even/odd lanes.
__attribute__((target("avx2"))) inline void mul_hi_lo(__m256i a, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, c);                            // lanes 0,2,4,6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(a, _mm256_srli_epi64(c, 32));     // lanes 1,3,5,7 as 64-bit
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void philox_lanes_avx2(uint64_t seed, uint32_t row, uint32_t stream, uint32_t g0,
                                                       uint32_t (&o)[4][kLanes]) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(row));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(stream));
  __m256i c3 = _mm256_setzero_si256();
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hb, lb, ha, la;
    mul_hi_lo(mb, c2, hb, lb);
    mul_hi_lo(ma, c0, ha, la);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lb;
    c3 = la;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[0]), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[1]), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[2]), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o[3]), c3);
}

// keep bytes of 8 Philox blocks (32 columns from 4 * g0): out[4 * i + j] = (word j of block i >> 8) >= thr.
// The 4 x 8 compare masks are transposed with unpack and narrowed with saturating packs.
__attribute__((target("avx2"))) void keep_block_avx2(uint64_t seed, uint32_t row, uint32_t stream, uint32_t g0,
                                                     uint32_t threshold, uint8_t* out) {
  uint32_t o[4][kLanes];
  philox_lanes_avx2(seed, row, stream, g0, o);
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  __m256i m[4];
  for (int j = 0; j < 4; ++j)
    m[j] = _mm256_cmpgt_epi32(_mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(o[j])), 8), thr);
  const __m256i t0 = _mm256_unpacklo_epi32(m[0], m[1]), t1 = _mm256_unpackhi_epi32(m[0], m[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(m[2], m[3]), t3 = _mm256_unpackhi_epi32(m[2], m[3]);
  const __m256i b04 = _mm256_unpacklo_epi64(t0, t2), b15 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i b26 = _mm256_unpacklo_epi64(t1, t3), b37 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(b04, b15), _mm256_packs_epi32(b26, b37));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_and_si256(bytes, _mm256_set1_epi8(1)));
}

// gcc 12's avx512fintrin.h shift intrinsics start from _mm512_undefined_epi32 and warn
// "-Wuninitialized" in their own header (GCC bug 105593); the values are fully written.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 Philox blocks side by side in AVX-512F registers: keep bytes of 64 columns from 4 * g0.
__attribute__((target("avx512f"))) inline void mul_hi_lo512(__m512i a, __m512i c, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, c);
  const __m512i odd = _mm512_mul_epu32(a, _mm512_srli_epi64(c, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) void keep_block_avx512(uint64_t seed, uint32_t row, uint32_t stream, uint32_t g0,
                                                         uint32_t threshold, uint8_t* out) {
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(row));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(stream));
  __m512i c3 = _mm512_setzero_si512();
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hb, lb, ha, la;
    mul_hi_lo512(mb, c2, hb, lb);
    mul_hi_lo512(ma, c0, ha, la);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hb, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(ha, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lb;
    c3 = la;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // column 4 i + j is word j of block i: byte j of the 32-bit lane i
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __mmask16 m0 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c0, 8), thr);
  const __mmask16 m1 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c1, 8), thr);
  const __mmask16 m2 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c2, 8), thr);
  const __mmask16 m3 = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(c3, 8), thr);
  const __m512i bytes = _mm512_or_si512(
      _mm512_or_si512(_mm512_maskz_mov_epi32(m0, _mm512_set1_epi32(1)), _mm512_maskz_mov_epi32(m1, _mm512_set1_epi32(1 << 8))),
      _mm512_or_si512(_mm512_maskz_mov_epi32(m2, _mm512_set1_epi32(1 << 16)),
                      _mm512_maskz_mov_epi32(m3, _mm512_set1_epi32(1 << 24))));
  _mm512_storeu_si512(out, bytes);
}

#pragma GCC diagnostic pop

// The widest path this CPU runs (checked once): 2 AVX-512F, 1 AVX2, 0 scalar.
int cpu_keep_isa() {
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  return isa;
}
#endif


template <typename T> struct work { using type = float; };
template <> struct work<double> { using type = double; };

// Branch-free loads/stores (so the row loops vectorise); bf16 rounds to nearest even, NaN stays NaN.
inline float load_w(float v) { return v; }
inline double load_w(double v) { return v; }
inline float load_w(bf16_t v) { return to_float(v); }
template <typename O> inline O store_w(float v);
template <> inline float store_w<float>(float v) { return v; }
template <> inline bf16_t store_w<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}
template <typename O> inline O store_w(double v);
template <> inline double store_w<double>(double v) { return v; }

// v where keep is 1, +0 where it is 0, by masking v's bits (keep is 0 or 1): the select of the reference
// (torch.where: a dropped inf or NaN gives 0, where a multiply by 0 would give NaN), written as an integer
// AND so that the row loops vectorise (a ?: on the mask byte left them scalar).
inline float keep_or_zero(float v, uint8_t keep) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u &= 0u - static_cast<uint32_t>(keep);
  std::memcpy(&v, &u, sizeof u);
  return v;
}
inline double keep_or_zero(double v, uint8_t keep) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  u &= uint64_t(0) - static_cast<uint64_t>(keep);
  std::memcpy(&v, &u, sizeof u);
  return v;
}

// The dropped elements become +0 (keep_or_zero: not a multiply by 0, 0 * inf would be NaN where the
// reference, torch.where, gives 0), the kept ones are multiplied by 1 / (1 - p).
template <typename T, typename O>
FASTPEFT_CLONES void apply_row(const T* __restrict xr, int64_t sx1, int64_t K, const uint8_t* __restrict keep,
                               typename work<T>::type inv, O* __restrict out) {
  using W = typename work<T>::type;
  if (sx1 == 1) {
    for (int64_t k = 0; k < K; ++k) {
      out[k] = store_w<O>(keep_or_zero(static_cast<W>(load_w(xr[k])) * inv, keep[k]));
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      out[k] = store_w<O>(keep_or_zero(static_cast<W>(load_w(xr[k * sx1])) * inv, keep[k]));
    }
  }
}

template <typename T, typename S>
FASTPEFT_CLONES void accumulate_row(const S* __restrict src, const uint8_t* __restrict keep, int64_t K,
                                    typename work<T>::type inv, T* __restrict dst) {
  using W = typename work<T>::type;
  for (int64_t k = 0; k < K; ++k) {
    dst[k] = store_w<T>(static_cast<W>(load_w(dst[k])) + keep_or_zero(static_cast<W>(load_w(src[k])) * inv, keep[k]));
  }
}

template <typename T, typename S>
FASTPEFT_CLONES void store_row(const S* __restrict src, const uint8_t* __restrict keep, int64_t K,
                               typename work<T>::type inv, T* __restrict dst) {
  using W = typename work<T>::type;
  for (int64_t k = 0; k < K; ++k) {
    dst[k] = store_w<T>(keep_or_zero(static_cast<W>(load_w(src[k])) * inv, keep[k]));
  }
}

}  // namespace

void lora_keep_row_isa(int isa, uint64_t seed, uint32_t stream, int64_t row, int64_t cols, uint32_t threshold,
                       uint8_t* keep) {
  const int64_t groups = (cols + 3) / 4;
  int64_t g0 = 0;
#if defined(FASTPEFT_HAVE_AVX2_PATH)
  isa = std::min(isa, cpu_keep_isa());
  if (isa >= 2)
    for (; (g0 + 2 * kLanes) * 4 <= cols; g0 += 2 * kLanes)
      keep_block_avx512(seed, static_cast<uint32_t>(row), stream, static_cast<uint32_t>(g0), threshold, keep + g0 * 4);
  if (isa >= 1) {
    for (; (g0 + kLanes) * 4 <= cols; g0 += kLanes)
      keep_block_avx2(seed, static_cast<uint32_t>(row), stream, static_cast<uint32_t>(g0), threshold, keep + g0 * 4);
    if (g0 < groups) {
      uint8_t tail[4 * kLanes];
      keep_block_avx2(seed, static_cast<uint32_t>(row), stream, static_cast<uint32_t>(g0), threshold, tail);
      std::memcpy(keep + g0 * 4, tail, static_cast<size_t>(cols - g0 * 4));
    }
    return;
  }
#else
  (void)isa;
#endif
  uint32_t o[4][kLanes];
  for (; g0 < groups; g0 += kLanes) {
    philox_lanes_scalar(seed, static_cast<uint32_t>(row), stream, static_cast<uint32_t>(g0), o);
    for (int64_t c = g0 * 4; c < cols && c < (g0 + kLanes) * 4; ++c) {
      const int64_t i = (c - g0 * 4) >> 2, j = (c - g0 * 4) & 3;
      keep[c] = (o[j][i] >> 8) >= threshold ? 1 : 0;
    }
  }
}

void lora_keep_row(uint64_t seed, uint32_t stream, int64_t row, int64_t cols, uint32_t threshold,
                   uint8_t* keep) {
  lora_keep_row_isa(2, seed, stream, row, cols, threshold, keep);
}

template <typename T, typename O>
void lora_dropout_rows(const T* x, int64_t sx0, int64_t sx1, int64_t row0, int64_t rows, int64_t K,
                       uint64_t seed, uint32_t stream, uint32_t threshold, double inv_keep, O* out,
                       uint8_t* keep_out) {
  using W = typename work<T>::type;
  const W inv = static_cast<W>(inv_keep);
#pragma omp parallel if (rows * K > 16384)
  {
    std::vector<uint8_t> local(keep_out ? 0 : K);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      uint8_t* keep = keep_out ? keep_out + i * K : local.data();
      lora_keep_row(seed, stream, row0 + i, K, threshold, keep);
      apply_row<T, O>(x + (row0 + i) * sx0, sx1, K, keep, inv, out + i * K);
    }
  }
}

template <typename T, typename S>
void lora_masked_accumulate(const S* src, const uint8_t* keep, int64_t rows, int64_t K, double inv_keep,
                            T* dst, int64_t sd0) {
  using W = typename work<T>::type;
  const W inv = static_cast<W>(inv_keep);
#pragma omp parallel for schedule(static) if (rows * K > 16384)
  for (int64_t i = 0; i < rows; ++i) accumulate_row<T, S>(src + i * K, keep + i * K, K, inv, dst + i * sd0);
}

template <typename T, typename S>
void lora_masked_store(const S* src, const uint8_t* keep, int64_t rows, int64_t K, double inv_keep, T* dst,
                       int64_t sd0) {
  using W = typename work<T>::type;
  const W inv = static_cast<W>(inv_keep);
#pragma omp parallel for schedule(static) if (rows * K > 16384)
  for (int64_t i = 0; i < rows; ++i) store_row<T, S>(src + i * K, keep + i * K, K, inv, dst + i * sd0);
}

#define FASTPEFT_INSTANTIATE(T, O)                                                                        \
  template void lora_dropout_rows<T, O>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, uint64_t, \
                                        uint32_t, uint32_t, double, O*, uint8_t*);                        \
  template void lora_masked_accumulate<T, O>(const O*, const uint8_t*, int64_t, int64_t, double, T*, int64_t); \
  template void lora_masked_store<T, O>(const O*, const uint8_t*, int64_t, int64_t, double, T*, int64_t);
FASTPEFT_INSTANTIATE(float, float)
FASTPEFT_INSTANTIATE(double, double)
FASTPEFT_INSTANTIATE(bf16_t, bf16_t)
FASTPEFT_INSTANTIATE(bf16_t, float)
#undef FASTPEFT_INSTANTIATE

}  // namespace fastpeft
