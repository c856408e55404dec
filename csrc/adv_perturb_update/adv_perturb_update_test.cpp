// C++ unit test of the torch-free adv_perturb_update / adv_perturb_init CPU kernels:
//   g++ -std=c++17 -O2 -fopenmp -Icsrc csrc/adv_perturb_update/adv_perturb_update_test.cpp
//       + csrc/adv_perturb_update/adv_perturb_update_cpu.cpp -o /tmp/apu && /tmp/apu
// Checks the three norms against a naive double-precision loop (masks with an all-padding
// example, odd shapes, sizes above the OpenMP threshold), zero gradients (no NaN), the eps-ball,
// bf16, and that the init is deterministic, zero at padding and has the FreeLB scaling.
#include <cmath>
#include <random>
#include <vector>

#include "../common/dtypes.h"
#include "../common/test_util.h"
#include "adv_perturb_update_cpu.h"

using namespace fastpeft;

// Naive reference: returns the updated delta (double).
static std::vector<double> naive(const std::vector<double>& d, const std::vector<double>& g, const float* mask,
                                 int64_t B, int64_t L, int64_t H, int norm, double step, double eps) {
  std::vector<double> out(d.size(), 0.0);
  auto act = [&](int64_t r) { return mask == nullptr || mask[r] != 0.0f; };
  if (norm == kAdvLinf) {
    for (int64_t r = 0; r < B * L; ++r)
      for (int64_t h = 0; h < H; ++h) {
        if (!act(r)) continue;
        const double gv = g[r * H + h];
        double v = d[r * H + h] + (gv > 0 ? step : gv < 0 ? -step : 0.0);
        if (eps > 0) v = std::fmin(std::fmax(v, -eps), eps);
        out[r * H + h] = v;
      }
    return out;
  }
  const int64_t group = norm == kAdvL2Token ? 1 : L;  // rows per normalisation group
  for (int64_t r0 = 0; r0 < B * L; r0 += group) {
    double gg = 0;
    for (int64_t r = r0; r < r0 + group; ++r)
      if (act(r))
        for (int64_t h = 0; h < H; ++h) gg += g[r * H + h] * g[r * H + h];
    const double a = step / std::fmax(std::sqrt(gg), 1e-8);
    double nn = 0;
    for (int64_t r = r0; r < r0 + group; ++r)
      if (act(r))
        for (int64_t h = 0; h < H; ++h) {
          out[r * H + h] = d[r * H + h] + a * g[r * H + h];
          nn += out[r * H + h] * out[r * H + h];
        }
    const double s = (eps > 0 && std::sqrt(nn) > eps) ? eps / std::sqrt(nn) : 1.0;
    for (int64_t r = r0; r < r0 + group; ++r)
      for (int64_t h = 0; h < H; ++h) out[r * H + h] *= s;
  }
  return out;
}

static void check_update(int64_t B, int64_t L, int64_t H, int norm, bool use_mask, bool zero_grad, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n = B * L * H;
  std::vector<float> d(n), g(n), mask(B * L, 1.f);
  for (auto& v : d) v = 0.05f * nd(rng);
  for (auto& v : g) v = zero_grad ? 0.f : nd(rng);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) mask[b * L + l] = (b == 1 || l >= L - b % 3) ? 0.f : 1.f;
  const float* m = use_mask ? mask.data() : nullptr;
  std::vector<double> dd(d.begin(), d.end()), gd(g.begin(), g.end());
  for (int64_t r = 0; r < B * L; ++r)  // the kernels ignore delta at padding rows
    if (m && m[r] == 0.f)
      for (int64_t h = 0; h < H; ++h) dd[r * H + h] = 0.0;
  const double step = 0.3, eps = 0.4;
  const auto ref = naive(dd, gd, m, B, L, H, norm, step, eps);
  std::vector<float> got = d;
  adv_perturb_update_cpu(got.data(), g.data(), m, B, L, H, norm, step, eps);
  std::vector<bf16_t> d16(n), g16(n);
  for (int64_t i = 0; i < n; ++i) { d16[i] = from_float<bf16_t>(d[i]); g16[i] = from_float<bf16_t>(g[i]); }
  std::vector<double> dd16(n), gd16(n);
  for (int64_t i = 0; i < n; ++i) { dd16[i] = to_float(d16[i]); gd16[i] = to_float(g16[i]); }
  for (int64_t r = 0; r < B * L; ++r)
    if (m && m[r] == 0.f)
      for (int64_t h = 0; h < H; ++h) dd16[r * H + h] = 0.0;
  const auto ref16 = naive(dd16, gd16, m, B, L, H, norm, step, eps);
  adv_perturb_update_cpu(d16.data(), g16.data(), m, B, L, H, norm, step, eps);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_TRUE(std::isfinite(got[i]));
    EXPECT_NEAR(got[i], ref[i], 1e-5 + 1e-5 * std::fabs(ref[i]));
    EXPECT_NEAR(to_float(d16[i]), ref16[i], 1e-2 * std::fabs(ref16[i]) + 1e-6);
    if (m && m[i / H] == 0.f) EXPECT_EQ(got[i], 0.f);
    if (norm == kAdvLinf) EXPECT_TRUE(std::fabs(got[i]) <= eps + 1e-7);
  }
}

static void check_init() {
  const int64_t B = 3, L = 5, H = 13;
  std::vector<float> mask(B * L, 1.f);
  for (int64_t l = 2; l < L; ++l) mask[0 * L + l] = 0.f;  // example 0 has 2 real tokens
  std::vector<float> a(B * L * H), b(B * L * H), unit(B * L * H);
  adv_perturb_init_cpu(a.data(), mask.data(), B, L, H, kAdvUniform, kAdvL2Example, 0.5, 42);
  adv_perturb_init_cpu(b.data(), mask.data(), B, L, H, kAdvUniform, kAdvL2Example, 0.5, 42);
  adv_perturb_init_cpu(unit.data(), nullptr, B, L, H, kAdvUniform, kAdvLinf, 1.0, 42);
  for (int64_t i = 0; i < B * L * H; ++i) {
    EXPECT_EQ(a[i], b[i]);
    const int64_t r = i / H, ex = r / L;
    const double n = ex == 0 ? 2.0 : (double)L;
    const double want = mask[r] == 0.f ? 0.0 : unit[i] * 0.5 / std::sqrt(n * H);
    EXPECT_NEAR(a[i], want, 1e-6);
    EXPECT_TRUE(unit[i] >= -1.f && unit[i] < 1.f);
  }
  std::vector<double> z(64 * 64 * 16);
  adv_perturb_init_cpu(z.data(), nullptr, 64, 64, 16, kAdvNormal, kAdvLinf, 1.0, 7);
  double s = 0, s2 = 0;
  for (double v : z) { s += v; s2 += v * v; EXPECT_TRUE(std::isfinite(v)); }
  const double mean = s / z.size(), var = s2 / z.size() - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_NEAR(var, 1.0, 0.03);
}

int main() {
  std::mt19937 rng(0);
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {4, 3, 130}, {5, 17, 1031}, {0, 3, 4}, {2, 0, 4}};
  for (auto& s : shapes)
    for (int norm = 0; norm < 3; ++norm)
      for (int use_mask = 0; use_mask < 2; ++use_mask)
        for (int zero = 0; zero < 2; ++zero) check_update(s[0], s[1], s[2], norm, use_mask, zero, rng);
  check_init();
  TEST_MAIN_END();
}
