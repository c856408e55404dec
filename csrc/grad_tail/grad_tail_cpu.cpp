#include "grad_tail_cpu.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "../common/dtypes.h"

namespace fastpeft {

float gt_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24 (exact)
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

uint16_t gt_float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN stays NaN, inf stays inf
  if (x >= 0x477ff000u) return sign | 0x7c00u;                                  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                                         // result is subnormal (or 0)
    float a;
    std::memcpy(&a, &x, sizeof a);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));        // a * 2^24 is exact
  }
  const uint32_t mant = x & 0x7fffffu;
  uint16_t h = static_cast<uint16_t>((((x >> 23) - 112u) << 10) | (mant >> 13));
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry into the exponent is correct
  return sign | h;
}

namespace {

struct half_t {
  uint16_t bits;
};
inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(bf16_t v) { return to_float(v); }
inline float load(half_t v) { return gt_half_to_float(v.bits); }
template <typename T> inline T store(float v);
template <> inline float store<float>(float v) { return v; }
template <> inline bf16_t store<bf16_t>(float v) { return from_float<bf16_t>(v); }
template <> inline half_t store<half_t>(float v) { return half_t{gt_float_to_half(v)}; }

struct Chunk {
  int32_t tensor;
  int64_t start, len;
};

// Below this many elements a pass runs on one thread: an OpenMP fork/join (and, on a busy
// machine, waiting for the team to be scheduled) costs more than the pass itself.
constexpr int64_t kParallelMinElements = int64_t(1) << 18;

std::vector<Chunk> make_chunks(int64_t n_tensors, const int64_t* numels, int64_t* total) {
  std::vector<Chunk> chunks;
  *total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    *total += numels[t];
    for (int64_t s = 0; s < numels[t]; s += GRAD_TAIL_CPU_CHUNK)
      chunks.push_back({static_cast<int32_t>(t), s, std::min(GRAD_TAIL_CPU_CHUNK, numels[t] - s)});
  }
  return chunks;
}

// Sum of (v * s)^2 over one chunk, and whether it holds a non-finite value
// (v - v is NaN exactly for inf and NaN, so `chk` stays 0 otherwise).
template <typename T>
void chunk_stats(const T* p, int64_t n, float s, double* sumsq, unsigned char* bad) {
  using A = typename acc<T>::type;
  A acc = 0, chk = 0;
  const A sa = static_cast<A>(s);
#pragma omp simd reduction(+ : acc, chk)
  for (int64_t i = 0; i < n; ++i) {
    const A v = static_cast<A>(load(p[i]));
    const A u = v * sa;
    acc += u * u;
    chk += v - v;
  }
  *sumsq = static_cast<double>(acc);
  *bad = chk == A(0) ? 0 : 1;
}

template <typename T>
void chunk_scale(T* p, int64_t n, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] = store<T>(load(p[i]) * m);
}
template <>
void chunk_scale<double>(double* p, int64_t n, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] *= static_cast<double>(m);
}

}  // namespace

GradTailResult grad_tail_stats_cpu(int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                                   const int32_t* dtypes, float inv_scale, double max_norm, double eps) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(n_tensors, numels, &total);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<unsigned char> bad(n_chunks, 0);
#pragma omp parallel for schedule(dynamic, 2) if (total >= kParallelMinElements)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& k = chunks[c];
    void* base = ptrs[k.tensor];
    switch (dtypes[k.tensor]) {
      case GT_F32: chunk_stats(static_cast<const float*>(base) + k.start, k.len, inv_scale, &partial[c], &bad[c]); break;
      case GT_F16: chunk_stats(static_cast<const half_t*>(base) + k.start, k.len, inv_scale, &partial[c], &bad[c]); break;
      case GT_BF16: chunk_stats(static_cast<const bf16_t*>(base) + k.start, k.len, inv_scale, &partial[c], &bad[c]); break;
      case GT_F64: chunk_stats(static_cast<const double*>(base) + k.start, k.len, inv_scale, &partial[c], &bad[c]); break;
      default: bad[c] = 2;  // unknown dtype code: the binding never passes one
    }
  }
  double sumsq = 0.0;
  bool found = false;
  for (int64_t c = 0; c < n_chunks; ++c) {  // fixed order: deterministic for any thread count
    sumsq += partial[c];
    found = found || bad[c] != 0;
  }
  const float norm = static_cast<float>(std::sqrt(sumsq));
  float clip = 1.0f;
  if (max_norm >= 0.0) {
    const float coef = static_cast<float>(max_norm) / (norm + static_cast<float>(eps));
    clip = coef > 1.0f ? 1.0f : coef;  // min(coef, 1) keeping a NaN coef NaN, as the reference's clamp
  }
  GradTailResult r;
  r.total_norm = norm;
  r.found_inf = found ? 1.0f : 0.0f;
  r.multiplier = found ? 0.0f : inv_scale * clip;
  return r;
}

void grad_tail_apply_cpu(int64_t n_tensors, void* const* ptrs, const int64_t* numels, const int32_t* dtypes,
                         float multiplier) {
  if (multiplier == 1.0f) return;  // g * 1 == g exactly: no write pass
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(n_tensors, numels, &total);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 2) if (total >= kParallelMinElements)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& k = chunks[c];
    void* base = ptrs[k.tensor];
    switch (dtypes[k.tensor]) {
      case GT_F32: chunk_scale(static_cast<float*>(base) + k.start, k.len, multiplier); break;
      case GT_F16: chunk_scale(static_cast<half_t*>(base) + k.start, k.len, multiplier); break;
      case GT_BF16: chunk_scale(static_cast<bf16_t*>(base) + k.start, k.len, multiplier); break;
      case GT_F64: chunk_scale(static_cast<double*>(base) + k.start, k.len, multiplier); break;
      default: break;
    }
  }
}

}  // namespace fastpeft
