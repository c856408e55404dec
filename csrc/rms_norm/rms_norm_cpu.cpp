#include "rms_norm_cpu.h"

#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
#endif

#include "../common/vec_math.h"

namespace fastpeft {
namespace {

// Parallelise only when there is enough work to pay for the threads.
inline bool worth_threads(int64_t elems) { return elems > 32768; }

template <typename T, typename A>
FASTPEFT_SIMD_CLONES A sum_squares(const T* __restrict xr, int64_t H) {
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < H; ++j) {
    const A v = vm::load<A>(xr[j]);
    ss += v * v;
  }
  return ss;
}

template <typename T, typename O, typename A>
FASTPEFT_SIMD_CLONES void fwd_row(const T* __restrict xr, const A* __restrict w, int64_t H, A r,
                                  bool cast_before_weight, O* __restrict yr) {
  if (cast_before_weight) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yr[j] = vm::store<O>(w[j] * vm::round_to<T>(vm::load<A>(xr[j]) * r));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yr[j] = vm::store<O>((vm::load<A>(xr[j]) * r) * w[j]);
  }
}

// (1/H) sum_k dn_k n_k of one row, dn = g * w, n = x * r.
template <typename T, typename O, typename A>
FASTPEFT_SIMD_CLONES A row_dot(const O* __restrict gr, const T* __restrict xr, const A* __restrict w, int64_t H, A r) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < H; ++j) s += (vm::load<A>(gr[j]) * w[j]) * (vm::load<A>(xr[j]) * r);
  return s / static_cast<A>(H);
}

template <typename T, typename O, typename A>
FASTPEFT_SIMD_CLONES void dx_row(const O* __restrict gr, const T* __restrict xr, const A* __restrict w, int64_t H,
                                 A r, A c, T* __restrict dxr) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j)
    dxr[j] = vm::store<T>(r * (vm::load<A>(gr[j]) * w[j] - (vm::load<A>(xr[j]) * r) * c));
}

template <typename T, typename O, typename A>
FASTPEFT_SIMD_CLONES void dw_row(const O* __restrict gr, const T* __restrict xr, int64_t H, A r,
                                 bool cast_before_weight, A* __restrict dw) {
  if (cast_before_weight) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dw[j] += vm::load<A>(gr[j]) * vm::round_to<T>(vm::load<A>(xr[j]) * r);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dw[j] += vm::load<A>(gr[j]) * (vm::load<A>(xr[j]) * r);
  }
}

}  // namespace

template <typename T, typename O>
void rms_norm_fwd_cpu(const T* x, int64_t ldx, const typename acc<T>::type* w, int64_t M, int64_t H, double eps,
                      bool cast_before_weight, O* y, typename acc<T>::type* rstd) {
  using A = typename acc<T>::type;
  const A e = static_cast<A>(eps);
#pragma omp parallel for schedule(static) if (worth_threads(M * H))
  for (int64_t i = 0; i < M; ++i) {
    const T* xr = x + i * ldx;
    const A r = A(1) / std::sqrt(sum_squares<T, A>(xr, H) / static_cast<A>(H) + e);
    rstd[i] = r;
    fwd_row<T, O, A>(xr, w, H, r, cast_before_weight, y + i * H);
  }
}

template <typename T, typename O>
void rms_norm_bwd_cpu(const O* g, int64_t ldg, const T* x, int64_t ldx, const typename acc<T>::type* w,
                      const typename acc<T>::type* rstd, int64_t M, int64_t H, bool cast_before_weight, T* dx,
                      typename acc<T>::type* dw) {
  using A = typename acc<T>::type;
  const bool threads = worth_threads(M * H);
  const int nt = threads ? omp_get_max_threads() : 1;
  // dw: one [H] partial sum per thread, added in thread order (deterministic for a thread count).
  std::vector<A> partial(dw ? static_cast<size_t>(nt) * H : 0, A(0));
#pragma omp parallel num_threads(nt) if (threads)
  {
    A* mine = dw ? partial.data() + static_cast<size_t>(omp_get_thread_num()) * H : nullptr;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const O* gr = g + i * ldg;
      const T* xr = x + i * ldx;
      const A r = rstd[i];
      if (dx) dx_row<T, O, A>(gr, xr, w, H, r, row_dot<T, O, A>(gr, xr, w, H, r), dx + i * H);
      if (mine) dw_row<T, O, A>(gr, xr, H, r, cast_before_weight, mine);
    }
    if (dw) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < H; ++j) {
        A s = 0;
        for (int t = 0; t < nt; ++t) s += partial[static_cast<size_t>(t) * H + j];
        dw[j] = s;
      }
    }
  }
}

#define FASTPEFT_RMS_NORM_INSTANTIATE(T, O)                                                                    \
  template void rms_norm_fwd_cpu<T, O>(const T*, int64_t, const acc<T>::type*, int64_t, int64_t, double, bool, \
                                       O*, acc<T>::type*);                                                     \
  template void rms_norm_bwd_cpu<T, O>(const O*, int64_t, const T*, int64_t, const acc<T>::type*,              \
                                       const acc<T>::type*, int64_t, int64_t, bool, T*, acc<T>::type*);
FASTPEFT_RMS_NORM_INSTANTIATE(float, float)
FASTPEFT_RMS_NORM_INSTANTIATE(double, double)
FASTPEFT_RMS_NORM_INSTANTIATE(bf16_t, bf16_t)
FASTPEFT_RMS_NORM_INSTANTIATE(bf16_t, float)
#undef FASTPEFT_RMS_NORM_INSTANTIATE

}  // namespace fastpeft
