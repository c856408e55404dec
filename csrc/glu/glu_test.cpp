// Unit test of the torch-free glu kernels: the float exp/erf approximations against libm, the
// activations and their derivatives in double (closed forms, central differences), forward and
// backward of every activation against double formulas (strided rows, threaded sizes, empty), and
// the bf16 rounding points.
#include <cmath>
#include <vector>

#include "../common/test_util.h"
#include "../common/vec_math.h"
#include "glu_cpu.h"

using namespace fastpeft;

namespace {

const GluAct kActs[] = {GluAct::kSilu, GluAct::kGelu, GluAct::kGeluTanh};

void check_vec_math() {
  for (double v = -87.3; v <= 88.7; v += 0.01) {
    const float f = static_cast<float>(v);
    const double want = std::exp(static_cast<double>(f));
    EXPECT_NEAR(vm::exp(f), want, 2e-7 * want);
  }
  EXPECT_TRUE(std::isinf(vm::exp(89.0f)) && vm::exp(-88.0f) == 0.0f && vm::exp(0.0f) == 1.0f);
  EXPECT_TRUE(std::isnan(vm::exp(std::nanf(""))) && std::isnan(vm::erf(std::nanf(""))));
  for (double v = -6.0; v <= 6.0; v += 0.001) {
    const float f = static_cast<float>(v);
    EXPECT_NEAR(vm::erf(f), std::erf(static_cast<double>(f)), 5e-7);  // 1.5e-7 of A&S 7.1.26 + float rounding
    const double t = std::tanh(static_cast<double>(f));
    EXPECT_NEAR(vm::tanh(f), t, 2.5e-7 * std::fabs(t) + 1e-30);  // ~2 ulp, relative, also near 0
  }
  EXPECT_TRUE(vm::tanh(100.0f) == 1.0f && vm::tanh(-100.0f) == -1.0f && std::isnan(vm::tanh(std::nanf(""))));
}

void check_double_acts() {
  for (double g = -8.0; g <= 8.0; g += 0.173) {
    EXPECT_NEAR(glu_act_value(GluAct::kSilu, g), g / (1 + std::exp(-g)), 1e-14);
    EXPECT_NEAR(glu_act_value(GluAct::kGelu, g), 0.5 * g * (1 + std::erf(g / std::sqrt(2.0))), 1e-14);
    EXPECT_NEAR(glu_act_value(GluAct::kGeluTanh, g),
                0.5 * g * (1 + std::tanh(std::sqrt(2 / M_PI) * (g + 0.044715 * g * g * g))), 1e-13);
    for (GluAct a : kActs) {
      const double h = 1e-6;
      const double fd = (glu_act_value(a, g + h) - glu_act_value(a, g - h)) / (2 * h);
      EXPECT_NEAR(glu_act_grad(a, g), fd, 1e-8);
    }
  }
}

template <typename T>
void check_rows(GluAct act, int64_t M, int64_t N, int64_t pad, double tol) {
  const int64_t ld = N + pad;
  std::vector<T> g(M * ld), u(M * ld), y(M * N), dy(M * N), dg(M * N), du(M * N);
  for (int64_t i = 0; i < M * ld; ++i) {
    g[i] = vm::store<T>(static_cast<float>(4 * std::sin(0.61 * i)));
    u[i] = vm::store<T>(static_cast<float>(std::cos(0.23 * i)));
  }
  for (int64_t i = 0; i < M * N; ++i) dy[i] = vm::store<T>(static_cast<float>(std::sin(1.7 * i + 0.5)));
  glu_fwd_cpu<T>(g.data(), ld, u.data(), ld, M, N, act, y.data());
  glu_bwd_cpu<T>(dy.data(), g.data(), ld, u.data(), ld, M, N, act, dg.data(), du.data());
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const double gv = to_float(g[i * ld + j]), uv = to_float(u[i * ld + j]), d = to_float(dy[i * N + j]);
      EXPECT_NEAR(to_float(y[i * N + j]), glu_act_value(act, gv) * uv, tol);
      EXPECT_NEAR(to_float(du[i * N + j]), d * glu_act_value(act, gv), tol);
      EXPECT_NEAR(to_float(dg[i * N + j]), d * uv * glu_act_grad(act, gv), tol);
    }
}

void check_bf16_rounding_points() {
  const int64_t N = 64;
  std::vector<bf16_t> g(N), u(N), y(N), dy(N), dg(N), du(N);
  for (int64_t j = 0; j < N; ++j) {
    g[j] = from_float<bf16_t>(static_cast<float>(0.37 * (j - 32)));
    u[j] = from_float<bf16_t>(static_cast<float>(1.0 + 0.011 * j));
    dy[j] = from_float<bf16_t>(static_cast<float>(0.5 - 0.013 * j));
  }
  auto r = [](double v) { return to_float(from_float<bf16_t>(static_cast<float>(v))); };
  for (GluAct act : kActs) {
    glu_fwd_cpu<bf16_t>(g.data(), N, u.data(), N, 1, N, act, y.data());
    glu_bwd_cpu<bf16_t>(dy.data(), g.data(), N, u.data(), N, 1, N, act, dg.data(), du.data());
    for (int64_t j = 0; j < N; ++j) {
      const double gv = to_float(g[j]), uv = to_float(u[j]), d = to_float(dy[j]);
      const double a = r(glu_act_value(act, gv));  // act rounded to bf16 before the product
      // The float act may land on the other side of a bf16 rounding boundary than the double one (one
      // ulp, 2^-8 relative), or differ by its absolute error (~5e-7) in gelu's tails.
      EXPECT_NEAR(to_float(y[j]), r(a * uv), std::ldexp(std::fabs(a * uv), -7) + 1e-6);
      EXPECT_NEAR(to_float(du[j]), r(d * a), std::ldexp(std::fabs(d * a), -7) + 1e-6);
      EXPECT_NEAR(to_float(dg[j]), r(r(d * uv) * glu_act_grad(act, gv)), std::ldexp(std::fabs(d * uv), -6) + 1e-6);
    }
  }
}

}  // namespace

int main() {
  check_vec_math();
  check_double_acts();
  for (GluAct act : kActs) {
    check_rows<double>(act, 3, 7, 2, 1e-13);
    check_rows<float>(act, 5, 33, 0, 2e-6);
    check_rows<float>(act, 40, 1031, 3, 2e-6);  // above the OpenMP threshold
    check_rows<float>(act, 0, 9, 0, 0);
    check_rows<bf16_t>(act, 4, 17, 1, 8e-2);
  }
  check_bf16_rounding_points();
  TEST_MAIN_END();
}
