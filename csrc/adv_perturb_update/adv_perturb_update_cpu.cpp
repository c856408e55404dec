#include "adv_perturb_update_cpu.h"

#include <cmath>
#include <vector>

#include "../common/philox.h"

namespace fastpeft {
namespace {

// (|g|^2, <d,g>, |d|^2) of one row, accumulated in double.
template <typename T>
inline void row_stats(const T* d, const T* g, int64_t H, double* gg, double* dg, double* dd) {
  double s_gg = 0.0, s_dg = 0.0, s_dd = 0.0;
#pragma omp simd reduction(+ : s_gg, s_dg, s_dd)
  for (int64_t h = 0; h < H; ++h) {
    const double gv = to_float(g[h]), dv = to_float(d[h]);
    s_gg += gv * gv;
    s_dg += dv * gv;
    s_dd += dv * dv;
  }
  *gg = s_gg; *dg = s_dg; *dd = s_dd;
}

// Step coefficient a = step / max(|g|, floor); a NaN norm stays NaN (the reference's clamp_min keeps NaN).
inline double step_coef(double gg, double step) {
  const double gn = std::sqrt(gg);
  return step / ((std::isnan(gn) || gn > kAdvNormFloor) ? gn : kAdvNormFloor);
}

// Projection scale s from |d + a g|^2: eps / |.| above eps (0 for an infinite norm, as eps / inf in the
// reference), 1 otherwise (also for a NaN norm: NaN > eps is false there too).
inline double proj_scale(double nsq, double eps) {
  return (eps > 0.0 && nsq > eps * eps) ? eps / std::sqrt(nsq) : 1.0;
}

// |d + a g|^2 of rows [r0, r1) computed directly (the slow path for non-finite stats, where the
// expansion dd + 2a dg + a^2 gg would mix infinities differently from the reference's norm of d + a g).
template <typename T>
double direct_nsq(const T* delta, const T* grad, const float* mask, int64_t r0, int64_t r1, int64_t H, double a) {
  using A = typename acc<T>::type;
  double nsq = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    if (mask != nullptr && mask[r] == 0.0f) continue;
    for (int64_t h = 0; h < H; ++h) {
      const double v = static_cast<double>(static_cast<A>(to_float(delta[r * H + h])) +
                                           static_cast<A>(a) * static_cast<A>(to_float(grad[r * H + h])));
      nsq += v * v;
    }
  }
  return nsq;
}

// (a, s) with new = s * (d + a g) for rows [r0, r1) whose stats are (gg, dg, dd): the expansion when the
// stats are finite (one pass), the direct norm otherwise.
template <typename T>
void l2_coefs(double gg, double dg, double dd, double step, double eps, const T* delta, const T* grad,
              const float* mask, int64_t r0, int64_t r1, int64_t H, double* a_out, double* s_out) {
  const double a = step_coef(gg, step);
  double nsq;
  if (std::isfinite(gg) && std::isfinite(dg) && std::isfinite(dd)) {
    nsq = dd + 2.0 * a * dg + a * a * gg;
    if (nsq < 0.0) nsq = 0.0;
  } else {
    nsq = direct_nsq(delta, grad, mask, r0, r1, H, a);
  }
  *a_out = a;
  *s_out = proj_scale(nsq, eps);
}

template <typename T>
inline void row_axpy_scale(T* d, const T* g, int64_t H, double a, double s) {
  using A = typename acc<T>::type;
  const A aa = static_cast<A>(a), ss = static_cast<A>(s);
#pragma omp simd
  for (int64_t h = 0; h < H; ++h)
    d[h] = from_double<T>(static_cast<double>(ss * (static_cast<A>(to_float(d[h])) + aa * static_cast<A>(to_float(g[h])))));
}

template <typename T>
inline void row_zero(T* d, int64_t H) {
  for (int64_t h = 0; h < H; ++h) d[h] = from_double<T>(0.0);
}

inline bool active(const float* mask, int64_t row) { return mask == nullptr || mask[row] != 0.0f; }

}  // namespace

template <typename T>
void adv_perturb_update_cpu(T* delta, const T* grad, const float* mask, int64_t B, int64_t L, int64_t H,
                            int norm, double step_size, double epsilon) {
  const int64_t rows = B * L;
  if (rows == 0 || H == 0) return;
  const bool big = rows * H > 32768;
  if (norm == kAdvLinf) {
    const bool clamp = epsilon > 0.0;
#pragma omp parallel for schedule(static) if (big)
    for (int64_t r = 0; r < rows; ++r) {
      T* d = delta + r * H;
      const T* g = grad + r * H;
      if (!active(mask, r)) { row_zero(d, H); continue; }
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) {
        using A = typename acc<T>::type;
        const A gv = to_float(g[h]), st = step_size, ep = epsilon;
        A v = static_cast<A>(to_float(d[h])) + (gv > 0 ? st : (gv < 0 ? -st : A(0)));  // torch.sign(NaN) = 0
        if (clamp) v = v < -ep ? -ep : (v > ep ? ep : v);
        d[h] = from_double<T>(static_cast<double>(v));
      }
    }
  } else if (norm == kAdvL2Token) {
    // One pass per row: the stats read brings the row into cache, the update re-reads it there.
#pragma omp parallel for schedule(static) if (big)
    for (int64_t r = 0; r < rows; ++r) {
      T* d = delta + r * H;
      const T* g = grad + r * H;
      if (!active(mask, r)) { row_zero(d, H); continue; }
      double gg, dg, dd;
      row_stats(d, g, H, &gg, &dg, &dd);
      double a, s;
      l2_coefs(gg, dg, dd, step_size, epsilon, delta, grad, mask, r, r + 1, H, &a, &s);
      row_axpy_scale(d, g, H, a, s);
    }
  } else {  // kAdvL2Example: per-row stats (parallel over rows), per-example reduce, update.
    std::vector<double> st(static_cast<size_t>(rows) * 3, 0.0);
#pragma omp parallel for schedule(static) if (big)
    for (int64_t r = 0; r < rows; ++r)
      if (active(mask, r)) row_stats(delta + r * H, grad + r * H, H, &st[3 * r], &st[3 * r + 1], &st[3 * r + 2]);
    std::vector<double> a(B), s(B);
    for (int64_t b = 0; b < B; ++b) {
      double gg = 0.0, dg = 0.0, dd = 0.0;
      for (int64_t l = 0; l < L; ++l) {
        const double* p = &st[3 * (b * L + l)];
        gg += p[0]; dg += p[1]; dd += p[2];
      }
      l2_coefs(gg, dg, dd, step_size, epsilon, delta, grad, mask, b * L, (b + 1) * L, H, &a[b], &s[b]);
    }
#pragma omp parallel for schedule(static) if (big)
    for (int64_t r = 0; r < rows; ++r) {
      if (!active(mask, r)) { row_zero(delta + r * H, H); continue; }
      row_axpy_scale(delta + r * H, grad + r * H, H, a[r / L], s[r / L]);
    }
  }
}

template <typename T>
void adv_perturb_init_cpu(T* delta, const float* mask, int64_t B, int64_t L, int64_t H, int kind, int norm,
                          double scale, uint64_t seed) {
  const int64_t rows = B * L;
  if (rows == 0 || H == 0) return;
  std::vector<float> sb(B);
  for (int64_t b = 0; b < B; ++b) {
    double s = scale;
    if (norm == kAdvL2Example) {
      double n = 0.0;
      for (int64_t l = 0; l < L; ++l) n += active(mask, b * L + l) ? 1.0 : 0.0;
      n *= static_cast<double>(H);
      s = scale / std::sqrt(n > 1.0 ? n : 1.0);
    } else if (norm == kAdvL2Token) {
      s = scale / std::sqrt(static_cast<double>(H));
    }
    sb[b] = static_cast<float>(s);
  }
  const float two_pi = 6.283185307179586f, inv24 = 1.0f / 16777216.0f;
#pragma omp parallel for schedule(static) if (rows * H > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    T* d = delta + r * H;
    if (!active(mask, r)) { row_zero(d, H); continue; }
    const float s = sb[r / L];
    for (int64_t g0 = 0; g0 < H; g0 += 4) {
      const Philox4 p = philox4x32(seed, static_cast<uint32_t>(g0 >> 2), static_cast<uint32_t>(r), kAdvInitStream, 0u);
      float u[4], v[4];
      for (int j = 0; j < 4; ++j) u[j] = static_cast<float>(p.v[j] >> 8) * inv24;
      if (kind == kAdvUniform) {
        for (int j = 0; j < 4; ++j) v[j] = 2.0f * u[j] - 1.0f;
      } else {
        for (int j = 0; j < 4; j += 2) {
          const float rad = std::sqrt(-2.0f * std::log(1.0f - u[j]));
          const float t = two_pi * u[j + 1];
          v[j] = rad * std::cos(t);
          v[j + 1] = rad * std::sin(t);
        }
      }
      for (int j = 0; j < 4 && g0 + j < H; ++j) d[g0 + j] = from_double<T>(static_cast<double>(v[j] * s));
    }
  }
}

#define FASTPEFT_ADV_INSTANTIATE(T)                                                                          \
  template void adv_perturb_update_cpu<T>(T*, const T*, const float*, int64_t, int64_t, int64_t, int, double, \
                                          double);                                                           \
  template void adv_perturb_init_cpu<T>(T*, const float*, int64_t, int64_t, int64_t, int, int, double, uint64_t);
FASTPEFT_ADV_INSTANTIATE(float)
FASTPEFT_ADV_INSTANTIATE(double)
FASTPEFT_ADV_INSTANTIATE(bf16_t)
#undef FASTPEFT_ADV_INSTANTIATE

}  // namespace fastpeft
