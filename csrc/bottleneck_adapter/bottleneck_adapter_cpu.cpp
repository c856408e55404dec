#include "bottleneck_adapter_cpu.h"

#include <cmath>
#include <vector>

#include "../common/philox.h"

namespace fastpeft {
namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluTanhC = 0.044715;

// Activation value and derivative in the accumulation type A (float or double).
template <typename A>
inline A act_value(AdapterAct act, A h) {
  switch (act) {
    case AdapterAct::kRelu: return (h > A(0) || h != h) ? h : A(0);  // relu(NaN) = NaN, as torch.relu
    case AdapterAct::kGelu: return A(0.5) * h * (A(1) + std::erf(h * A(kInvSqrt2)));
    case AdapterAct::kGeluTanh: {
      const A t = std::tanh(A(kSqrt2OverPi) * (h + A(kGeluTanhC) * h * h * h));
      return A(0.5) * h * (A(1) + t);
    }
    case AdapterAct::kSilu: return h / (A(1) + std::exp(-h));
  }
  return h;
}

// d act / d h.  relu'(0) = 0, like PyTorch's relu backward.
template <typename A>
inline A act_grad(AdapterAct act, A h) {
  switch (act) {
    case AdapterAct::kRelu: return h > A(0) ? A(1) : A(0);
    case AdapterAct::kGelu:
      return A(0.5) * (A(1) + std::erf(h * A(kInvSqrt2))) + h * A(kInvSqrt2Pi) * std::exp(A(-0.5) * h * h);
    case AdapterAct::kGeluTanh: {
      const A u = A(kSqrt2OverPi) * (h + A(kGeluTanhC) * h * h * h);
      const A t = std::tanh(u);
      const A du = A(kSqrt2OverPi) * (A(1) + A(3 * kGeluTanhC) * h * h);
      return A(0.5) * (A(1) + t) + A(0.5) * h * (A(1) - t * t) * du;
    }
    case AdapterAct::kSilu: {
      const A sg = A(1) / (A(1) + std::exp(-h));
      return sg * (A(1) + h * (A(1) - sg));
    }
  }
  return A(1);
}

// Parallelise only when there is enough work to pay for the threads.
inline bool worth_threads(int64_t elems) { return elems > 32768; }

}  // namespace

double adapter_act_value(AdapterAct act, double h) { return act_value<double>(act, h); }
double adapter_act_grad(AdapterAct act, double h) { return act_grad<double>(act, h); }

template <typename T>
void adapter_bias_act_dropout_fwd(T* h, const T* b_down, T* d, int64_t M, int64_t Bn, AdapterAct act,
                                  double p, uint64_t seed) {
  using A = typename acc<T>::type;
  const bool dropout = p > 0.0;
  const uint32_t threshold = dropout_threshold(p);
  const A scale = dropout ? static_cast<A>(1.0 / (1.0 - p)) : A(1);
#pragma omp parallel if (worth_threads(M * Bn))
  {
    std::vector<uint8_t> keep(dropout ? Bn : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      T* hr = h + i * Bn;
      T* dr = d + i * Bn;
      if (dropout) dropout_keep_row(seed, kAdapterDropoutStream, i, Bn, threshold, keep.data());
      for (int64_t j = 0; j < Bn; ++j) {
        A v = static_cast<A>(to_float(hr[j]));
        if (b_down) {
          v += static_cast<A>(to_float(b_down[j]));
          hr[j] = from_double<T>(static_cast<double>(v));
          v = static_cast<A>(to_float(hr[j]));  // act sees the stored (rounded) h, as backward will
        }
        // dropped: times 0, not replaced by 0 (the reference multiplies by the mask: inf / NaN stay NaN)
        const A a = act_value<A>(act, v) * ((dropout && !keep[j]) ? A(0) : scale);
        dr[j] = from_double<T>(static_cast<double>(a));
      }
    }
  }
}

template <typename T>
void adapter_residual_bias_init(const T* x, int64_t ldx, const T* b_up, T* y, int64_t M, int64_t H,
                                bool residual) {
  using A = typename acc<T>::type;
#pragma omp parallel for schedule(static) if (worth_threads(M * H))
  for (int64_t i = 0; i < M; ++i) {
    T* yr = y + i * H;
    const T* xr = x + i * ldx;
    if (residual && b_up) {
      for (int64_t j = 0; j < H; ++j)
        yr[j] = from_double<T>(static_cast<double>(static_cast<A>(to_float(xr[j])) +
                                                   static_cast<A>(to_float(b_up[j]))));
    } else if (residual) {
      for (int64_t j = 0; j < H; ++j) yr[j] = xr[j];
    } else if (b_up) {
      for (int64_t j = 0; j < H; ++j) yr[j] = b_up[j];
    } else {
      for (int64_t j = 0; j < H; ++j) yr[j] = from_double<T>(0.0);
    }
  }
}

template <typename T>
void adapter_act_dropout_bwd(const T* h, T* dd, const T* gh, T* d, int64_t M, int64_t Bn, AdapterAct act,
                             double p, uint64_t seed) {
  using A = typename acc<T>::type;
  const bool dropout = p > 0.0;
  const uint32_t threshold = dropout_threshold(p);
  const A scale = dropout ? static_cast<A>(1.0 / (1.0 - p)) : A(1);
#pragma omp parallel if (worth_threads(M * Bn))
  {
    std::vector<uint8_t> keep(dropout ? Bn : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const T* hr = h + i * Bn;
      T* ddr = dd + i * Bn;
      if (dropout) dropout_keep_row(seed, kAdapterDropoutStream, i, Bn, threshold, keep.data());
      for (int64_t j = 0; j < Bn; ++j) {
        const A v = static_cast<A>(to_float(hr[j]));
        const A m = (!dropout || keep[j]) ? scale : A(0);  // mask times 1/(1-p), multiplied as in the reference
        A dh = static_cast<A>(to_float(ddr[j])) * m * act_grad<A>(act, v);
        if (gh) dh += static_cast<A>(to_float(gh[i * Bn + j]));
        ddr[j] = from_double<T>(static_cast<double>(dh));
        if (d) d[i * Bn + j] = from_double<T>(static_cast<double>(act_value<A>(act, v) * m));
      }
    }
  }
}

#define FASTPEFT_ADAPTER_INSTANTIATE(T)                                                                     \
  template void adapter_bias_act_dropout_fwd<T>(T*, const T*, T*, int64_t, int64_t, AdapterAct, double,  \
                                                uint64_t);                                                  \
  template void adapter_residual_bias_init<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, bool);   \
  template void adapter_act_dropout_bwd<T>(const T*, T*, const T*, T*, int64_t, int64_t, AdapterAct,      \
                                           double, uint64_t);

FASTPEFT_ADAPTER_INSTANTIATE(float)
FASTPEFT_ADAPTER_INSTANTIATE(double)
FASTPEFT_ADAPTER_INSTANTIATE(bf16_t)
#undef FASTPEFT_ADAPTER_INSTANTIATE

}  // namespace fastpeft
