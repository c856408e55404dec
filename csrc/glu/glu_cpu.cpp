#include "glu_cpu.h"

#include <cmath>

#include "../common/vec_math.h"

namespace fastpeft {
namespace {

constexpr double kSqrt1_2 = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kKappa = 0.044715;

// u = sqrt(2/pi) (g + 0.044715 g³), the argument of tanh in gelu_tanh (PyTorch's operation order).
template <typename A>
inline A gelu_tanh_inner(A g) {
  return A(kSqrt2OverPi) * (g + A(kKappa) * (g * g * g));
}

template <GluAct ACT, typename A>
inline A act_value(A g) {
  if constexpr (ACT == GluAct::kSilu) return g / (A(1) + vm::exp(-g));
  if constexpr (ACT == GluAct::kGelu) return g * A(0.5) * (A(1) + vm::erf(g * A(kSqrt1_2)));
  return A(0.5) * g * (A(1) + vm::tanh(gelu_tanh_inner(g)));
}

// dy * act'(g) with the operation order of PyTorch's silu/gelu backward kernels (so that rounding
// agrees with the unfused autograd as often as possible).
template <GluAct ACT, typename A>
inline A act_backward(A dy, A g) {
  if constexpr (ACT == GluAct::kSilu) {
    const A sg = A(1) / (A(1) + vm::exp(-g));
    return dy * sg * (A(1) + g * (A(1) - sg));
  }
  if constexpr (ACT == GluAct::kGelu) {
    const A cdf = A(0.5) * (A(1) + vm::erf(g * A(kSqrt1_2)));
    const A pdf = vm::exp(A(-0.5) * g * g) * A(kInvSqrt2Pi);
    return dy * (cdf + g * pdf);
  }
  const A t = vm::tanh(gelu_tanh_inner(g));
  const A dinner = A(kSqrt2OverPi) * (A(1) + A(3 * kKappa) * (g * g));
  return dy * (A(0.5) * (A(1) + t) + (A(0.5) * g) * (A(1) - t * t) * dinner);
}

template <GluAct ACT, typename T>
FASTPEFT_SIMD_CLONES void fwd_row(const T* __restrict g, const T* __restrict u, int64_t N, T* __restrict y) {
  using A = typename acc<T>::type;
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const A a = vm::round_to<T>(act_value<ACT, A>(vm::load<A>(g[j])));
    y[j] = vm::store<T>(a * vm::load<A>(u[j]));
  }
}

template <GluAct ACT, typename T>
FASTPEFT_SIMD_CLONES void bwd_row(const T* __restrict dy, const T* __restrict g, const T* __restrict u, int64_t N,
                                  T* __restrict dg, T* __restrict du) {
  using A = typename acc<T>::type;
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const A gj = vm::load<A>(g[j]), dyj = vm::load<A>(dy[j]);
    const A a = vm::round_to<T>(act_value<ACT, A>(gj));
    du[j] = vm::store<T>(dyj * a);
    dg[j] = vm::store<T>(act_backward<ACT, A>(vm::round_to<T>(dyj * vm::load<A>(u[j])), gj));
  }
}

template <GluAct ACT, typename T>
void fwd_rows(const T* gate, int64_t ldg, const T* up, int64_t ldu, int64_t M, int64_t N, T* y) {
#pragma omp parallel for schedule(static) if (M * N > 16384)
  for (int64_t i = 0; i < M; ++i) fwd_row<ACT, T>(gate + i * ldg, up + i * ldu, N, y + i * N);
}

template <GluAct ACT, typename T>
void bwd_rows(const T* dy, const T* gate, int64_t ldg, const T* up, int64_t ldu, int64_t M, int64_t N, T* dgate,
              T* dup) {
#pragma omp parallel for schedule(static) if (M * N > 16384)
  for (int64_t i = 0; i < M; ++i)
    bwd_row<ACT, T>(dy + i * N, gate + i * ldg, up + i * ldu, N, dgate + i * N, dup + i * N);
}

}  // namespace

double glu_act_value(GluAct act, double g) {
  switch (act) {
    case GluAct::kSilu: return act_value<GluAct::kSilu, double>(g);
    case GluAct::kGelu: return act_value<GluAct::kGelu, double>(g);
    case GluAct::kGeluTanh: return act_value<GluAct::kGeluTanh, double>(g);
  }
  return g;
}

double glu_act_grad(GluAct act, double g) {
  switch (act) {
    case GluAct::kSilu: return act_backward<GluAct::kSilu, double>(1.0, g);
    case GluAct::kGelu: return act_backward<GluAct::kGelu, double>(1.0, g);
    case GluAct::kGeluTanh: return act_backward<GluAct::kGeluTanh, double>(1.0, g);
  }
  return 1.0;
}

template <typename T>
void glu_fwd_cpu(const T* gate, int64_t ldg, const T* up, int64_t ldu, int64_t M, int64_t N, GluAct act, T* y) {
  switch (act) {
    case GluAct::kSilu: return fwd_rows<GluAct::kSilu, T>(gate, ldg, up, ldu, M, N, y);
    case GluAct::kGelu: return fwd_rows<GluAct::kGelu, T>(gate, ldg, up, ldu, M, N, y);
    case GluAct::kGeluTanh: return fwd_rows<GluAct::kGeluTanh, T>(gate, ldg, up, ldu, M, N, y);
  }
}

template <typename T>
void glu_bwd_cpu(const T* dy, const T* gate, int64_t ldg, const T* up, int64_t ldu, int64_t M, int64_t N, GluAct act,
                 T* dgate, T* dup) {
  switch (act) {
    case GluAct::kSilu: return bwd_rows<GluAct::kSilu, T>(dy, gate, ldg, up, ldu, M, N, dgate, dup);
    case GluAct::kGelu: return bwd_rows<GluAct::kGelu, T>(dy, gate, ldg, up, ldu, M, N, dgate, dup);
    case GluAct::kGeluTanh: return bwd_rows<GluAct::kGeluTanh, T>(dy, gate, ldg, up, ldu, M, N, dgate, dup);
  }
}

#define FASTPEFT_GLU_INSTANTIATE(T)                                                                          \
  template void glu_fwd_cpu<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, GluAct, T*);        \
  template void glu_bwd_cpu<T>(const T*, const T*, int64_t, const T*, int64_t, int64_t, int64_t, GluAct, T*, \
                               T*);
FASTPEFT_GLU_INSTANTIATE(float)
FASTPEFT_GLU_INSTANTIATE(double)
FASTPEFT_GLU_INSTANTIATE(bf16_t)
#undef FASTPEFT_GLU_INSTANTIATE

}  // namespace fastpeft
