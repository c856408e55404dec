// bottleneck_adapter, C++ CPU kernels (torch-free): the elementwise work that
// surrounds the adapter's two GEMMs (the GEMMs themselves go to BLAS through
// ATen in bottleneck_adapter_binding.cpp).  All buffers are row-major [rows, cols]
// with the given leading dimension; OpenMP over rows.
//
//   forward :  h = h + b_down                      (in place, h = x W_downᵀ from BLAS)
//              d = act(h) * keep * s               (s = 1/(1-p), keep from Philox stream 1)
//              y = (x if residual) + b_up          (then BLAS accumulates y += d W_upᵀ)
//   backward:  d  = act(h) * keep * s              (mask regenerated from the seed)
//              dh = dd * keep * s * act'(h) + gh   (in place over dd = dY W_up; gh optional)
#pragma once
#include <cstdint>
#include "../common/dtypes.h"

namespace fastpeft {

// Activation codes shared with the binding (and the Python names).
enum class AdapterAct : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// Philox stream of the adapter dropout mask (LoRA uses 0).
constexpr uint32_t kAdapterDropoutStream = 1;

// h[M, Bn] (+)= b_down (b_down may be null); d[M, Bn] = act(h) * keep * s.
// p in [0, 1); keep(i, j) = Philox(seed, stream 1) at (row i, col j).
template <typename T>
void adapter_bias_act_dropout_fwd(T* h, const T* b_down, T* d, int64_t M, int64_t Bn, AdapterAct act,
                                  double p, uint64_t seed);

// y[M, H] = (residual ? x : 0) + (b_up ? b_up : 0); x has row stride ldx (unit column stride).
template <typename T>
void adapter_residual_bias_init(const T* x, int64_t ldx, const T* b_up, T* y, int64_t M, int64_t H,
                                bool residual);

// In place over dd[M, Bn]: dh = dd * keep * s * act'(h) (+ gh[M, Bn] if not null);
// if d is not null also writes d[M, Bn] = act(h) * keep * s (the forward's dropped activation).
template <typename T>
void adapter_act_dropout_bwd(const T* h, T* dd, const T* gh, T* d, int64_t M, int64_t Bn, AdapterAct act,
                             double p, uint64_t seed);

// Scalar activation and derivative in double (exposed for the C++ unit test).
double adapter_act_value(AdapterAct act, double h);
double adapter_act_grad(AdapterAct act, double h);

}  // namespace fastpeft
