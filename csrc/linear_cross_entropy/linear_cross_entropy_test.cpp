// Unit test of the torch-free linear_cross_entropy row kernel: the loss against a double formula
// (plain, label smoothing, softcap, ignored rows, threaded sizes), the gradient against central finite
// differences of the double kernel, and bad labels (NaN loss, first bad row returned).
#include <cmath>
#include <vector>

#include "../common/test_util.h"
#include "linear_cross_entropy_cpu.h"

using namespace fastpeft;

namespace {

double val(int64_t i, int64_t j) { return 3.0 * std::sin(0.37 * i + 1.3 * j) + 0.01 * (j % 7); }

double expected_loss(const std::vector<double>& x, int64_t V, int64_t y, double eps, double cap) {
  std::vector<double> z(x);
  if (cap > 0)
    for (auto& v : z) v = cap * std::tanh(v / cap);
  double m = z[0], s = 0, sz = 0;
  for (double v : z) m = v > m ? v : m;
  for (double v : z) s += std::exp(v - m), sz += v;
  const double lse = m + std::log(s);
  return (1 - eps) * (lse - z[y]) + eps * (lse - sz / V);
}

void loss_float(int64_t C, int64_t V, double eps, double cap) {
  const int64_t ld = V + 3;
  std::vector<float> x(C * ld), loss(C);
  std::vector<int64_t> labels(C);
  for (int64_t i = 0; i < C; ++i) {
    labels[i] = i % 5 == 2 ? -100 : (i * 7) % V;
    for (int64_t j = 0; j < ld; ++j) x[i * ld + j] = static_cast<float>(val(i, j));
  }
  EXPECT_EQ(lce_rows_cpu<float>(x.data(), ld, C, V, labels.data(), -100, eps, cap, 1.0, false, loss.data()), -1);
  for (int64_t i = 0; i < C; ++i) {
    if (labels[i] == -100) {
      EXPECT_EQ(loss[i], 0.0f);
      continue;
    }
    std::vector<double> xi(V);
    for (int64_t j = 0; j < V; ++j) xi[j] = static_cast<float>(val(i, j));
    EXPECT_NEAR(loss[i], expected_loss(xi, V, labels[i], eps, cap), 2e-5 * (1 + std::log((double)V)));
  }
}

// L = Σ_i loss_i * scale; the kernel's dL/dx against central differences in double.
void grad_double(int64_t C, int64_t V, double eps, double cap, double scale) {
  std::vector<double> x(C * V), g(C * V), loss(C), tmp(C * V);
  std::vector<int64_t> labels(C);
  for (int64_t i = 0; i < C; ++i) {
    labels[i] = i == 1 ? -7 : (i * 3 + 1) % V;
    for (int64_t j = 0; j < V; ++j) x[i * V + j] = val(i, j);
  }
  g = x;
  lce_rows_cpu<double>(g.data(), V, C, V, labels.data(), -7, eps, cap, scale, true, loss.data());
  auto total = [&](const std::vector<double>& xs) {
    tmp = xs;
    lce_rows_cpu<double>(tmp.data(), V, C, V, labels.data(), -7, eps, cap, scale, false, loss.data());
    double L = 0;
    for (double l : loss) L += l * scale;
    return L;
  };
  const double h = 1e-6;
  for (int64_t k = 0; k < C * V; ++k) {
    std::vector<double> xp(x), xm(x);
    xp[k] += h;
    xm[k] -= h;
    EXPECT_NEAR(g[k], (total(xp) - total(xm)) / (2 * h), 1e-7);
  }
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(g[1 * V + j], 0.0);  // the ignored row
}

void bad_labels() {
  const int64_t C = 4, V = 6;
  std::vector<float> x(C * V, 0.5f), loss(C);
  std::vector<int64_t> labels = {1, -100, 6, -1};
  EXPECT_EQ(lce_rows_cpu<float>(x.data(), V, C, V, labels.data(), -100, 0.0, 0.0, 1.0, true, loss.data()), 2);
  EXPECT_TRUE(std::isnan(loss[2]) && std::isnan(loss[3]));
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(x[2 * V + j], 0.0f);
}

// bfloat16 rows: bit-identical to widening the chunk to float, the float kernel, and rounding the gradient
// back (what the binding did before the bfloat16 row pass), incl. ignored and bad rows.
void bf16_rows(int64_t C, int64_t V, double eps, double cap, bool write_grad) {
  const int64_t ld = V + 5;
  std::vector<bf16_t> x(C * ld);
  std::vector<float> wide(C * ld), loss16(C), loss32(C);
  std::vector<int64_t> labels(C);
  for (int64_t i = 0; i < C; ++i) {
    labels[i] = i % 6 == 3 ? -100 : (i % 11 == 5 ? V : (i * 5) % V);
    for (int64_t j = 0; j < ld; ++j) {
      x[i * ld + j] = from_float<bf16_t>(static_cast<float>(val(i, j)));
      wide[i * ld + j] = to_float(x[i * ld + j]);
    }
  }
  const std::vector<bf16_t> before(x);
  const int64_t bad16 = lce_rows_cpu_bf16(x.data(), ld, C, V, labels.data(), -100, eps, cap, 0.25, write_grad,
                                          loss16.data());
  const int64_t bad32 = lce_rows_cpu<float>(wide.data(), ld, C, V, labels.data(), -100, eps, cap, 0.25, write_grad,
                                            loss32.data());
  EXPECT_EQ(bad16, bad32);
  for (int64_t i = 0; i < C; ++i) {
    EXPECT_TRUE(loss16[i] == loss32[i] || (std::isnan(loss16[i]) && std::isnan(loss32[i])));
    for (int64_t j = 0; j < ld; ++j) {
      const uint16_t want = j >= V || !write_grad ? before[i * ld + j].bits : from_float<bf16_t>(wide[i * ld + j]).bits;
      EXPECT_EQ(x[i * ld + j].bits, want);  // padding past V and, without write_grad, the logits untouched
    }
  }
}

}  // namespace

int main() {
  for (double cap : {0.0, 2.5})
    for (double eps : {0.0, 0.1}) {
      loss_float(7, 37, eps, cap);
      loss_float(300, 257, eps, cap);  // C * V above the OpenMP threshold
      grad_double(3, 11, eps, cap, 0.5);
    }
  loss_float(2, 1, 0.0, 0.0);  // V = 1: loss 0
  bad_labels();
  for (double cap : {0.0, 2.5}) {
    bf16_rows(13, 37, 0.1, cap, true);
    bf16_rows(200, 331, 0.0, cap, true);  // C * V above the OpenMP threshold
    bf16_rows(13, 37, 0.0, cap, false);
  }
  TEST_MAIN_END();
}
