// C++ unit test of the torch-free grad_tail CPU kernels (no torch, no Python):
//   g++ -std=c++17 -O2 -fopenmp csrc/grad_tail/grad_tail_test.cpp csrc/grad_tail/grad_tail_cpu.cpp -o /tmp/gt && /tmp/gt
// Checks stats and apply against a double-precision loop on mixed f32/f16/bf16/f64
// lists (chunk-crossing sizes, empty tensors), overflow flags, zero grads and the
// half conversions.  Exit code 0 = pass.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include <omp.h>

#include "../common/dtypes.h"
#include "grad_tail_cpu.h"

using namespace fastpeft;

static int failures = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      std::fprintf(stderr, "FAIL line %d: ", __LINE__);   \
      std::fprintf(stderr, __VA_ARGS__);                  \
      std::fprintf(stderr, "\n");                         \
      ++failures;                                         \
    }                                                     \
  } while (0)

struct List {
  std::vector<std::vector<unsigned char>> storage;
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<int32_t> dtypes;
  std::vector<std::vector<double>> values;  // exactly representable values of each tensor

  void add(int32_t dtype, int64_t n, std::mt19937& rng, double scale) {
    std::normal_distribution<float> nd(0.f, 1.f);
    const size_t es = dtype == GT_F32 ? 4 : dtype == GT_F64 ? 8 : 2;
    storage.emplace_back(static_cast<size_t>(n) * es + 8);
    values.emplace_back(n);
    unsigned char* p = storage.back().data();
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(nd(rng) * scale);
      double stored;
      if (dtype == GT_F32) { reinterpret_cast<float*>(p)[i] = v; stored = v; }
      else if (dtype == GT_F64) { reinterpret_cast<double*>(p)[i] = v; stored = v; }
      else if (dtype == GT_F16) { uint16_t h = gt_float_to_half(v); reinterpret_cast<uint16_t*>(p)[i] = h; stored = gt_half_to_float(h); }
      else { bf16_t b = from_float<bf16_t>(v); reinterpret_cast<bf16_t*>(p)[i] = b; stored = to_float(b); }
      values.back()[i] = stored;
    }
    ptrs.push_back(p);
    numels.push_back(n);
    dtypes.push_back(dtype);
  }
  double get(size_t t, int64_t i) const {
    const unsigned char* p = static_cast<const unsigned char*>(ptrs[t]);
    switch (dtypes[t]) {
      case GT_F32: return reinterpret_cast<const float*>(p)[i];
      case GT_F64: return reinterpret_cast<const double*>(p)[i];
      case GT_F16: return gt_half_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
      default: return to_float(reinterpret_cast<const bf16_t*>(p)[i]);
    }
  }
  void set(size_t t, int64_t i, float v) {
    unsigned char* p = static_cast<unsigned char*>(ptrs[t]);
    switch (dtypes[t]) {
      case GT_F32: reinterpret_cast<float*>(p)[i] = v; break;
      case GT_F64: reinterpret_cast<double*>(p)[i] = v; break;
      case GT_F16: reinterpret_cast<uint16_t*>(p)[i] = gt_float_to_half(v); break;
      default: reinterpret_cast<bf16_t*>(p)[i] = from_float<bf16_t>(v);
    }
  }
};

static void test_half_conversions() {
  const float cases[] = {0.f, -0.f, 1.f, -2.5f, 65504.f, 65519.f, 6.1035156e-05f, 5.9604645e-08f, 1e-9f, 3.14159f};
  for (float f : cases) {
    const float back = gt_half_to_float(gt_float_to_half(f));
    CHECK(std::fabs(back - f) <= std::fabs(f) * 1e-3f + 6e-8f, "half round trip %g -> %g", f, back);
  }
  CHECK(std::isinf(gt_half_to_float(gt_float_to_half(65520.f))), "65520 must round to inf in fp16");
  CHECK(std::isnan(gt_half_to_float(gt_float_to_half(std::nanf("")))), "NaN must stay NaN");
  for (uint32_t h = 0; h < 0x7c00u; ++h)  // every finite positive half round-trips exactly
    if (gt_float_to_half(gt_half_to_float(static_cast<uint16_t>(h))) != h) { CHECK(false, "half %u", h); break; }
}

static void test_stats_and_apply() {
  std::mt19937 rng(1234);
  const double scale = 512.0, inv = 1.0 / scale;
  List l;
  const int64_t sizes[] = {1, 0, 7, 32768, 32769, 100003, 0, 13, 65536, 3};
  int k = 0;
  for (int64_t n : sizes) l.add(k++ % 4, n, rng, scale);
  for (int i = 0; i < 300; ++i) l.add(i % 4, static_cast<int64_t>(rng() % 50), rng, scale);
  double sq = 0;
  for (auto& v : l.values)
    for (double x : v) sq += (x * inv) * (x * inv);
  const double norm = std::sqrt(sq), max_norm = 0.25;
  const double mult = inv * std::min(1.0, max_norm / (norm + 1e-6));
  const int64_t n = static_cast<int64_t>(l.ptrs.size());
  GradTailResult r = grad_tail_stats_cpu(n, l.ptrs.data(), l.numels.data(), l.dtypes.data(), (float)inv, max_norm, 1e-6);
  CHECK(r.found_inf == 0.f, "found_inf on finite data");
  CHECK(std::fabs(r.total_norm - norm) <= 1e-5 * norm, "norm %g vs %g", r.total_norm, norm);
  CHECK(std::fabs(r.multiplier - mult) <= 1e-5 * mult, "multiplier %g vs %g", r.multiplier, mult);
  GradTailResult noclip = grad_tail_stats_cpu(n, l.ptrs.data(), l.numels.data(), l.dtypes.data(), (float)inv, -1.0, 1e-6);
  CHECK(noclip.multiplier == (float)inv, "no clip: multiplier must be inv_scale");

  grad_tail_apply_cpu(n, l.ptrs.data(), l.numels.data(), l.dtypes.data(), r.multiplier);
  for (size_t t = 0; t < l.ptrs.size(); ++t) {
    const double rtol = l.dtypes[t] == GT_F16 ? 1e-3 : l.dtypes[t] == GT_BF16 ? 8e-3 : 1e-6;
    for (int64_t i = 0; i < l.numels[t]; ++i) {
      const double want = l.values[t][i] * r.multiplier, got = l.get(t, i);
      if (std::fabs(got - want) > rtol * std::fabs(want) + 1e-7) {
        CHECK(false, "apply tensor %zu elem %lld: %g vs %g", t, (long long)i, got, want);
        return;
      }
    }
  }
  // Non-finite anywhere (last element of a chunk, in each dtype) -> flagged, multiplier 0.
  for (size_t t : {size_t(3), size_t(4), size_t(5), size_t(8)}) {
    const float saved = static_cast<float>(l.get(t, 32767));
    l.set(t, 32767, t % 2 ? std::numeric_limits<float>::infinity() : std::nanf(""));
    GradTailResult b = grad_tail_stats_cpu(n, l.ptrs.data(), l.numels.data(), l.dtypes.data(), 1.f, 1.0, 1e-6);
    CHECK(b.found_inf == 1.f && b.multiplier == 0.f, "non-finite in tensor %zu not flagged", t);
    l.set(t, 32767, saved);
  }
  // Zero gradients: norm 0, multiplier = inv_scale, no NaN.
  std::vector<float> z(1000, 0.f);
  void* zp = z.data();
  const int64_t zn = 1000;
  const int32_t zd = GT_F32;
  GradTailResult zr = grad_tail_stats_cpu(1, &zp, &zn, &zd, 0.5f, 1.0, 1e-6);
  CHECK(zr.total_norm == 0.f && zr.multiplier == 0.5f && zr.found_inf == 0.f, "zero grads");
  GradTailResult er = grad_tail_stats_cpu(0, nullptr, nullptr, nullptr, 0.5f, 1.0, 1e-6);
  CHECK(er.total_norm == 0.f && er.multiplier == 0.5f && er.found_inf == 0.f, "empty list");
}

// The reduction order is fixed by the chunking, not by the threads: bitwise equal results.
static void test_deterministic_across_thread_counts() {
  std::mt19937 rng(7);
  List l;
  for (int i = 0; i < 40; ++i) l.add(i % 4, 20000 + static_cast<int64_t>(rng() % 30000), rng, 3.0);
  const int64_t n = static_cast<int64_t>(l.ptrs.size());
  GradTailResult ref{};
  for (int threads : {1, 2, 3, 8}) {
    omp_set_num_threads(threads);
    GradTailResult r = grad_tail_stats_cpu(n, l.ptrs.data(), l.numels.data(), l.dtypes.data(), 0.7f, 1.0, 1e-6);
    if (threads == 1) ref = r;
    CHECK(r.total_norm == ref.total_norm && r.multiplier == ref.multiplier,
          "%d threads: norm %.9g vs %.9g", threads, r.total_norm, ref.total_norm);
  }
}

int main() {
  test_half_conversions();
  test_stats_and_apply();
  test_deterministic_across_thread_counts();
  if (failures) {
    std::fprintf(stderr, "grad_tail_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("grad_tail_test: all passed\n");
  return 0;
}
