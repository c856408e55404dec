// Unit test of the torch-free lora_linear_multi CPU kernels (no torch needed):
//   g++ -std=c++17 -O2 -fopenmp csrc/lora_linear_multi/lora_linear_multi_test.cpp
//       csrc/lora_linear_multi/lora_linear_multi_cpu.cpp -o /tmp/t && /tmp/t
// Checks the counting sort (stable, bad indices reported) and the low-rank rows against naive
// double loops: float / double / bf16, strided x, transposed A and B, per-adapter ranks, bias or not,
// row counts and widths that are not multiples of the register tiles, empty and all-base batches.
#include <cmath>
#include <cstdio>
#include <vector>

#include "../common/test_util.h"
#include "lora_linear_multi_cpu.h"

using namespace fastpeft;

static void test_segments() {
  const std::vector<int64_t> idx = {2, -1, 0, 2, 2, -1, 1, 0};
  std::vector<int64_t> bounds(5), order(idx.size());
  EXPECT_EQ(lora_multi_segments<int64_t>(idx.data(), 8, 3, bounds.data(), order.data()), -1);
  EXPECT_TRUE((bounds == std::vector<int64_t>{0, 2, 4, 5, 8}));
  EXPECT_TRUE((order == std::vector<int64_t>{1, 5, 2, 7, 6, 0, 3, 4}));  // stable within each bucket
  const std::vector<int32_t> bad = {0, 1, -2, 5};
  EXPECT_EQ(lora_multi_segments<int32_t>(bad.data(), 4, 3, bounds.data(), order.data()), 2);
  const std::vector<int32_t> high = {0, 3};
  EXPECT_EQ(lora_multi_segments<int32_t>(high.data(), 2, 3, bounds.data(), order.data()), 1);
  EXPECT_EQ(lora_multi_segments<int32_t>(high.data(), 0, 3, bounds.data(), order.data()), -1);  // M = 0
  EXPECT_TRUE((bounds == std::vector<int64_t>{0, 0, 0, 0, 0}));
}

static double val(int64_t i, double f) { return std::sin(f * static_cast<double>(i) + 0.3); }

template <typename T>
static T from_d(double v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else return from_float<T>(static_cast<float>(v));
}

// x stored transposed ([K, M] memory), A as [n, K, r] memory (sa1 = 1, sa2 = r), B contiguous [n, N, r].
template <typename T>
static void check_lowrank(int64_t M, int64_t K, int64_t N, int64_t n, int64_t r, bool bias, bool ranks,
                          const std::vector<int64_t>& idx, double tol) {
  std::vector<T> x(M * K), A(n * K * r), B(n * N * r), b(N), y(M * N);
  for (int64_t i = 0; i < M * K; ++i) x[i] = from_d<T>(val(i, 0.37));
  for (int64_t i = 0; i < n * K * r; ++i) A[i] = from_d<T>(val(i, 0.11) / std::sqrt(double(K)));
  for (int64_t i = 0; i < n * N * r; ++i) B[i] = from_d<T>(val(i, 0.23));
  for (int64_t i = 0; i < N; ++i) b[i] = from_d<T>(val(i, 0.7));
  std::vector<double> scales(n);
  std::vector<int64_t> rk(n);
  for (int64_t a = 0; a < n; ++a) {
    scales[a] = 0.5 + 0.25 * static_cast<double>(a);
    rk[a] = ranks ? (a * 3) % (r + 1) : r;  // includes rank 0 and r when ranks are given
  }
  std::vector<int64_t> bounds(n + 2), order(M);
  EXPECT_EQ(lora_multi_segments<int64_t>(idx.data(), M, n, bounds.data(), order.data()), -1);
  LoraMultiProblem<T> p{M, K, N, n, r, x.data(), 1, M, A.data(), K * r, 1, r, B.data(), N * r, r, 1,
                        scales.data(), ranks ? rk.data() : nullptr, bias ? b.data() : nullptr, 1, y.data(), N};
  lora_multi_lowrank_rows<T>(p, bounds.data(), order.data());
  for (int64_t m = 0; m < M; ++m) {
    const int64_t a = idx[m];
    std::vector<double> u(r, 0.0);
    if (a >= 0)
      for (int64_t j = 0; j < rk[a]; ++j)
        for (int64_t k = 0; k < K; ++k) u[j] += to_float(x[k * M + m]) * to_float(A[(a * K + k) * r + j]);
    for (int64_t c = 0; c < N; ++c) {
      double want = bias ? to_float(b[c]) : 0.0;
      if (a >= 0)
        for (int64_t j = 0; j < rk[a]; ++j) want += scales[a] * u[j] * to_float(B[(a * N + c) * r + j]);
      const double got = to_float(y[m * N + c]);
      EXPECT_NEAR(got, want, tol * (1.0 + std::fabs(want)));
    }
  }
}

static std::vector<int64_t> assignment(int64_t M, int64_t n, int64_t seed) {
  std::vector<int64_t> idx(M);
  for (int64_t m = 0; m < M; ++m) idx[m] = ((m * 7 + seed) * 2654435761ll >> 5) % (n + 1) - 1;  // -1 .. n-1
  return idx;
}

int main() {
  test_segments();
  // rows not a multiple of 4, N not a multiple of the column tile, bucket sizes of all kinds
  check_lowrank<float>(37, 29, 41, 4, 5, true, false, assignment(37, 4, 1), 1e-5);
  check_lowrank<float>(37, 29, 41, 4, 5, false, true, assignment(37, 4, 2), 1e-5);
  check_lowrank<double>(23, 17, 19, 3, 6, true, true, assignment(23, 3, 3), 1e-12);
  check_lowrank<bf16_t>(19, 33, 21, 2, 4, true, true, assignment(19, 2, 4), 2e-2);
  // larger than the OpenMP threshold, many row blocks per adapter
  check_lowrank<float>(300, 64, 96, 3, 8, true, false, assignment(300, 3, 5), 1e-5);
  check_lowrank<float>(9, 8, 8, 2, 3, true, false, std::vector<int64_t>(9, 1), 1e-5);   // all on one adapter
  check_lowrank<float>(9, 8, 8, 2, 3, true, false, std::vector<int64_t>(9, -1), 1e-5);  // all on the base
  check_lowrank<float>(0, 8, 8, 2, 3, true, false, {}, 1e-5);                            // no rows
  TEST_MAIN_END();
}
