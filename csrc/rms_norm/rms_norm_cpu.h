// rms_norm, C++ CPU kernels (torch-free).  x is [M, H] with row stride ldx (unit column stride);
// A is the accumulation type (float; double for double); w = offset + weight, given in A.
//
// Forward, per row i:
//   rstd_i = 1 / sqrt(sum_j x_ij² / H + eps)                        (sum in A)
//   n_ij   = x_ij * rstd_i
//   y_ij   = O(n_ij * w_j)              cast_before_weight = false   (Gemma: all in A, one rounding)
//   y_ij   = O(w_j * A(T(n_ij)))        cast_before_weight = true    (Llama: n rounded to x's type first)
//
// Backward (g = dL/dy [M, H], row stride ldg; the rounding T(n) has derivative 1):
//   dn_ij = g_ij * w_j
//   dx_ij = rstd_i * (dn_ij - n_ij * (1/H) sum_k dn_ik n_ik)     (d rstd_i / d x_ij = -x_ij rstd_i³ / H)
//   dw_j  = sum_i g_ij * n'_ij,  n' = A(T(n)) with cast_before_weight, else n
// dx (contiguous [M, H]) and dw ([H], in A) may each be null (not needed).
#pragma once
#include <cstdint>

#include "../common/dtypes.h"

namespace fastpeft {

template <typename T, typename O>
void rms_norm_fwd_cpu(const T* x, int64_t ldx, const typename acc<T>::type* w, int64_t M, int64_t H, double eps,
                      bool cast_before_weight, O* y, typename acc<T>::type* rstd);

template <typename T, typename O>
void rms_norm_bwd_cpu(const O* g, int64_t ldg, const T* x, int64_t ldx, const typename acc<T>::type* w,
                      const typename acc<T>::type* rstd, int64_t M, int64_t H, bool cast_before_weight, T* dx,
                      typename acc<T>::type* dw);

}  // namespace fastpeft
