// Unit test of the torch-free rms_norm kernels: forward against a double-precision formula (both
// weight orders, strided rows, threaded sizes, empty), the bf16 rounding points, and the backward
// against central finite differences of the double kernel.
#include <cmath>
#include <vector>

#include "../common/test_util.h"
#include "rms_norm_cpu.h"

using namespace fastpeft;

namespace {

double val(int64_t i, int64_t j) { return std::sin(0.37 * i + 1.3 * j) * (1.0 + 0.01 * (j % 17)); }

// y of row i by the definition, in double, no rounding.
double expected_y(const std::vector<double>& x, int64_t ldx, const std::vector<double>& w, int64_t i, int64_t j,
                  int64_t H, double eps) {
  double ss = 0;
  for (int64_t k = 0; k < H; ++k) ss += x[i * ldx + k] * x[i * ldx + k];
  return x[i * ldx + j] / std::sqrt(ss / H + eps) * w[j];
}

void forward_float(int64_t M, int64_t H, int64_t pad, bool cast_before_weight) {
  const int64_t ldx = H + pad;
  const double eps = 1e-5;
  std::vector<double> xd(M * ldx), wd(H);
  std::vector<float> x(M * ldx), w(H), y(M * H), rstd(M);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < ldx; ++j) x[i * ldx + j] = static_cast<float>(xd[i * ldx + j] = val(i, j));
  for (int64_t j = 0; j < H; ++j) w[j] = static_cast<float>(wd[j] = 1.0 + 0.5 * std::cos(0.1 * j));
  rms_norm_fwd_cpu<float, float>(x.data(), ldx, w.data(), M, H, eps, cast_before_weight, y.data(), rstd.data());
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < H; ++j) EXPECT_NEAR(y[i * H + j], expected_y(xd, ldx, wd, i, j, H, eps), 2e-5);
}

void bf16_rounding_points() {
  const int64_t H = 33;
  std::vector<bf16_t> x(H), ybf(H);
  std::vector<float> w(H), yf(H), rstd(1);
  for (int64_t j = 0; j < H; ++j) {
    x[j] = from_float<bf16_t>(static_cast<float>(val(3, j)));
    w[j] = to_float(from_float<bf16_t>(static_cast<float>(0.9 + 0.013 * j)));
  }
  for (bool cast : {false, true}) {
    rms_norm_fwd_cpu<bf16_t, bf16_t>(x.data(), H, w.data(), 1, H, 0.0, cast, ybf.data(), rstd.data());
    float ss = 0;
    for (int64_t j = 0; j < H; ++j) ss += to_float(x[j]) * to_float(x[j]);
    const float r = 1.0f / std::sqrt(ss / H);
    EXPECT_NEAR(rstd[0], r, 1e-6 * r);
    for (int64_t j = 0; j < H; ++j) {
      const float n = to_float(x[j]) * rstd[0];
      const float want = cast ? w[j] * to_float(from_float<bf16_t>(n)) : n * w[j];
      EXPECT_EQ(ybf[j].bits, from_float<bf16_t>(want).bits);
    }
  }
  // bf16 x with a float32 result (float32 weight, cast_before_weight): only n is rounded.
  rms_norm_fwd_cpu<bf16_t, float>(x.data(), H, w.data(), 1, H, 0.0, true, yf.data(), rstd.data());
  for (int64_t j = 0; j < H; ++j) EXPECT_EQ(yf[j], w[j] * to_float(from_float<bf16_t>(to_float(x[j]) * rstd[0])));
}

// L = sum g * y; dL/dx and dL/dw by the kernel against central differences (double).
void backward_double(int64_t M, int64_t H, bool cast_before_weight) {
  const int64_t ldx = H + 3, ldg = H + 1;
  const double eps = 1e-3;
  std::vector<double> x(M * ldx), g(M * ldg), w(H), y(M * H), rstd(M), dx(M * H), dw(H);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < ldx; ++j) x[i * ldx + j] = val(i, j);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < ldg; ++j) g[i * ldg + j] = std::cos(0.7 * i + 0.3 * j);
  for (int64_t j = 0; j < H; ++j) w[j] = 0.5 + 0.1 * j;
  auto loss = [&] {
    rms_norm_fwd_cpu<double, double>(x.data(), ldx, w.data(), M, H, eps, cast_before_weight, y.data(), rstd.data());
    double L = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < H; ++j) L += g[i * ldg + j] * y[i * H + j];
    return L;
  };
  loss();
  rms_norm_bwd_cpu<double, double>(g.data(), ldg, x.data(), ldx, w.data(), rstd.data(), M, H, cast_before_weight,
                                   dx.data(), dw.data());
  const double h = 1e-6;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < H; ++j) {
      double& v = x[i * ldx + j];
      const double v0 = v;
      v = v0 + h;
      const double lp = loss();
      v = v0 - h;
      const double lm = loss();
      v = v0;
      EXPECT_NEAR(dx[i * H + j], (lp - lm) / (2 * h), 1e-6);
    }
  for (int64_t j = 0; j < H; ++j) {
    const double w0 = w[j];
    w[j] = w0 + h;
    const double lp = loss();
    w[j] = w0 - h;
    const double lm = loss();
    w[j] = w0;
    EXPECT_NEAR(dw[j], (lp - lm) / (2 * h), 1e-6);
  }
  // dx only / dw only give the same values.
  std::vector<double> dx2(M * H), dw2(H);
  rms_norm_bwd_cpu<double, double>(g.data(), ldg, x.data(), ldx, w.data(), rstd.data(), M, H, cast_before_weight,
                                   dx2.data(), nullptr);
  rms_norm_bwd_cpu<double, double>(g.data(), ldg, x.data(), ldx, w.data(), rstd.data(), M, H, cast_before_weight,
                                   nullptr, dw2.data());
  for (int64_t k = 0; k < M * H; ++k) EXPECT_EQ(dx2[k], dx[k]);
  for (int64_t j = 0; j < H; ++j) EXPECT_NEAR(dw2[j], dw[j], 1e-12);
}

// Threaded sizes: the float backward's dw (per-thread partial sums) matches a serial double sum.
void backward_float_threaded() {
  const int64_t M = 67, H = 1031;
  std::vector<float> x(M * H), g(M * H), w(H), y(M * H), rstd(M), dx(M * H), dw(H);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < H; ++j) {
      x[i * H + j] = static_cast<float>(val(i, j));
      g[i * H + j] = static_cast<float>(std::cos(0.7 * i + 0.3 * j));
    }
  for (int64_t j = 0; j < H; ++j) w[j] = 1.0f;
  rms_norm_fwd_cpu<float, float>(x.data(), H, w.data(), M, H, 1e-6, false, y.data(), rstd.data());
  rms_norm_bwd_cpu<float, float>(g.data(), H, x.data(), H, w.data(), rstd.data(), M, H, false, dx.data(), dw.data());
  for (int64_t j = 0; j < H; j += 97) {
    double want = 0;
    for (int64_t i = 0; i < M; ++i) want += static_cast<double>(g[i * H + j]) * x[i * H + j] * rstd[i];
    EXPECT_NEAR(dw[j], want, 1e-4);
  }
}

}  // namespace

int main() {
  for (bool cast : {false, true}) {
    forward_float(0, 5, 0, cast);
    forward_float(1, 1, 0, cast);
    forward_float(3, 7, 2, cast);
    forward_float(40, 1031, 5, cast);  // M * H above the OpenMP threshold
    backward_double(3, 5, cast);
    backward_double(2, 1, cast);
  }
  bf16_rounding_points();
  backward_float_threaded();
  TEST_MAIN_END();
}
