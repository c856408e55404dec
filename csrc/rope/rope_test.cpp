// Unit test of the torch-free rope kernel: forward against the rotate-half formula in double, both
// head layouts through strides, partial rotary, a broadcast batch of cos/sin; transpose is the
// adjoint (<R x, v> = <x, Rᵀ v>) and, with cos² + sin² = 1, the inverse; bf16 rounding points.
#include <cmath>
#include <vector>

#include "../common/test_util.h"
#include "rope_cpu.h"

using namespace fastpeft;

namespace {

struct Case {
  int64_t B, S, H, D, rd;
  bool heads_first;  // [B, H, S, D] memory layout, else [B, S, H, D]
  bool batch_cos;    // cos/sin per batch row, else one row broadcast over the batch
};

RopeStrides strides_of(const Case& c) {
  return c.heads_first ? RopeStrides{c.H * c.S * c.D, c.D, c.S * c.D} : RopeStrides{c.S * c.H * c.D, c.H * c.D, c.D};
}

// cos/sin as transformers builds them: [.., S, rd] with the rd/2 frequencies repeated.
void tables(const Case& c, std::vector<double>& cs, std::vector<double>& sn) {
  const int64_t Bc = c.batch_cos ? c.B : 1, h = c.rd / 2;
  cs.assign(Bc * c.S * c.rd, 0);
  sn.assign(Bc * c.S * c.rd, 0);
  for (int64_t b = 0; b < Bc; ++b)
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t j = 0; j < c.rd; ++j) {
        const double th = (s + 3 * b) * std::pow(10000.0, -2.0 * (j % h) / c.rd);
        cs[(b * c.S + s) * c.rd + j] = std::cos(th);
        sn[(b * c.S + s) * c.rd + j] = std::sin(th);
      }
}

void check_double(const Case& c) {
  const int64_t n = c.B * c.S * c.H * c.D, h = c.rd / 2;
  std::vector<double> cs, sn, x(n), y(n), v(n), rtv(n), back(n);
  tables(c, cs, sn);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::sin(0.3 * i + 0.1);
    v[i] = std::cos(0.7 * i);
  }
  const RopeStrides st = strides_of(c);
  const int64_t csb = c.batch_cos ? c.S * c.rd : 0;
  rope_cpu<double, double>(x.data(), st, y.data(), st, c.B, c.S, c.H, c.D, cs.data(), sn.data(), csb, c.rd, false);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t hh = 0; hh < c.H; ++hh) {
        const int64_t base = b * st.b + s * st.s + hh * st.h;
        const double* cr = cs.data() + b * csb + s * c.rd;
        const double* sr = sn.data() + b * csb + s * c.rd;
        for (int64_t j = 0; j < c.D; ++j) {
          double want = x[base + j];
          if (j < c.rd) {
            const double rot = j < h ? -x[base + j + h] : x[base + j - h];  // rotate_half
            want = x[base + j] * cr[j] + rot * sr[j];
          }
          EXPECT_NEAR(y[base + j], want, 1e-14);
        }
      }
  rope_cpu<double, double>(v.data(), st, rtv.data(), st, c.B, c.S, c.H, c.D, cs.data(), sn.data(), csb, c.rd, true);
  double lhs = 0, rhs = 0;
  for (int64_t i = 0; i < n; ++i) {
    lhs += y[i] * v[i];
    rhs += x[i] * rtv[i];
  }
  EXPECT_NEAR(lhs, rhs, 1e-10 * (1 + std::fabs(lhs)));
  rope_cpu<double, double>(y.data(), st, back.data(), st, c.B, c.S, c.H, c.D, cs.data(), sn.data(), csb, c.rd, true);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(back[i], x[i], 1e-12);
}

// Input in [B, S, H, D] order, output written [B, H, S, D]: strides are independent.
void check_layout_change() {
  const Case c{2, 5, 3, 8, 8, false, true};
  const int64_t n = c.B * c.S * c.H * c.D;
  std::vector<double> cs, sn, x(n), y1(n), y2(n);
  tables(c, cs, sn);
  for (int64_t i = 0; i < n; ++i) x[i] = std::sin(1.1 * i);
  Case hf = c;
  hf.heads_first = true;
  rope_cpu<double, double>(x.data(), strides_of(c), y1.data(), strides_of(c), c.B, c.S, c.H, c.D, cs.data(), sn.data(),
                           c.S * c.rd, c.rd, false);
  rope_cpu<double, double>(x.data(), strides_of(c), y2.data(), strides_of(hf), c.B, c.S, c.H, c.D, cs.data(),
                           sn.data(), c.S * c.rd, c.rd, false);
  const RopeStrides a = strides_of(c), b = strides_of(hf);
  for (int64_t bb = 0; bb < c.B; ++bb)
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t j = 0; j < c.D; ++j)
          EXPECT_EQ(y1[bb * a.b + s * a.s + h * a.h + j], y2[bb * b.b + s * b.s + h * b.h + j]);
}

// bf16: each product and the sum rounded to bf16 (the unfused composition's rounding points).
void check_bf16_rounding() {
  const int64_t D = 12, rd = 8, h = rd / 2;
  std::vector<bf16_t> x(D), y(D);
  std::vector<float> cs(rd), sn(rd);
  for (int64_t j = 0; j < D; ++j) x[j] = from_float<bf16_t>(static_cast<float>(std::sin(2.3 * j + 0.4) * 3));
  for (int64_t j = 0; j < rd; ++j) {
    cs[j] = to_float(from_float<bf16_t>(static_cast<float>(std::cos(0.9 * (j % h) + 0.2))));
    sn[j] = to_float(from_float<bf16_t>(static_cast<float>(std::sin(0.9 * (j % h) + 0.2))));
  }
  auto r = [](float v) { return to_float(from_float<bf16_t>(v)); };
  const RopeStrides st{D, D, D};
  rope_cpu<bf16_t, bf16_t>(x.data(), st, y.data(), st, 1, 1, 1, D, cs.data(), sn.data(), 0, rd, false);
  for (int64_t j = 0; j < D; ++j) {
    const float xj = to_float(x[j]);
    float want = xj;
    if (j < h) want = r(r(xj * cs[j]) + r(-to_float(x[j + h]) * sn[j]));
    else if (j < rd) want = r(r(xj * cs[j]) + r(to_float(x[j - h]) * sn[j]));
    EXPECT_EQ(to_float(y[j]), want);
  }
}

}  // namespace

int main() {
  for (bool hf : {false, true})
    for (bool bc : {false, true}) {
      check_double({2, 3, 4, 8, 8, hf, bc});
      check_double({1, 5, 2, 10, 4, hf, bc});   // partial rotary: dims 4..9 pass through
      check_double({3, 7, 5, 64, 64, hf, bc});  // above the OpenMP threshold
      check_double({2, 0, 3, 6, 6, hf, bc});    // no positions
    }
  check_layout_change();
  check_bf16_rounding();
  TEST_MAIN_END();
}
