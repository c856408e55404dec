// linear_cross_entropy, C++ CPU row kernel (torch-free); see linear_cross_entropy_cpu.h for the math.
#include "linear_cross_entropy_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/dtypes.h"
#include "../common/vec_math.h"

namespace fastpeft {
namespace {

// One row: returns its loss; with write_grad overwrites x with dL/dx.  Three passes without softcap
// (max and Σz; exp(z - m) stored in place and summed; gradient), four with (the capped z is kept in x
// for the tanh derivative, so the exponentials are recomputed in the gradient pass).
template <typename A>
FASTPEFT_SIMD_CLONES A row(A* __restrict x, int64_t V, int64_t y, A eps, A cap, A scale, bool write_grad) {
  const bool capped = cap > A(0);
  if (capped) {
    const A inv = A(1) / cap;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) x[j] = cap * vm::tanh(x[j] * inv);
  }
  // max and Σz over kLanes independent partials (the vector lanes), combined at the end: one running
  // max / sum is a serial dependency chain, and std::max is a branch to GCC (-ftrapping-math), which
  // kept this pass scalar at a third of the row's time.  NaN is never the max (as with std::max); a NaN
  // logit still makes the loss NaN through Σ exp.
  constexpr int kLanes = 16;
  A mv[kLanes], sv[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    mv[l] = -std::numeric_limits<A>::infinity();
    sv[l] = A(0);
  }
  int64_t j0 = 0;
  for (; j0 + kLanes <= V; j0 += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const A v = x[j0 + l];
      mv[l] = vm::select(v > mv[l], v, mv[l]);
      sv[l] += v;
    }
  }
  for (int l = 0; j0 + l < V; ++l) {
    const A v = x[j0 + l];
    mv[l] = vm::select(v > mv[l], v, mv[l]);
    sv[l] += v;
  }
  A m = mv[0], sum_z = sv[0];
  for (int l = 1; l < kLanes; ++l) {
    m = std::max(m, mv[l]);
    sum_z += sv[l];
  }
  // float partial sums in the vector lanes (omp simd reductions): exp(z - m) <= 1, so Σ <= V; the double
  // kernel sums in double
  const A zy = x[y];
  A s = A(0);
  if (capped) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) s += vm::exp(x[j] - m);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) {
      x[j] = vm::exp(x[j] - m);
      s += x[j];
    }
  }
  const double lse = static_cast<double>(m) + std::log(static_cast<double>(s));
  const double loss = (1.0 - eps) * (lse - static_cast<double>(zy)) +
                      eps * (lse - static_cast<double>(sum_z) / static_cast<double>(V));
  if (write_grad) {
    const A off = scale * eps / static_cast<A>(V);
    if (capped) {
      const A inv = A(1) / cap, lse_a = static_cast<A>(lse);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const A t = x[j] * inv;
        x[j] = (scale * vm::exp(x[j] - lse_a) - off) * (A(1) - t * t);
      }
      x[y] -= scale * (A(1) - eps) * (A(1) - (zy * inv) * (zy * inv));
    } else {
      const A p_scale = static_cast<A>(static_cast<double>(scale) / static_cast<double>(s));
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) x[j] = p_scale * x[j] - off;
      x[y] -= scale * (A(1) - eps);
    }
  }
  return static_cast<A>(loss);
}

// Rows of storage type T, the row pass in A: in place when T is A; for bfloat16 each row is widened into
// a float buffer, and its gradient rounded back once (what widening the whole chunk and narrowing the
// gradient would give, without the two chunk-sized copies).
template <typename T, typename A>
int64_t rows_impl(T* x, int64_t ld, int64_t C, int64_t V, const int64_t* labels, int64_t ignore_index,
                  double label_smoothing, double softcap, double scale, bool write_grad, A* loss) {
  constexpr bool widen = !std::is_same<T, A>::value;
#pragma omp parallel if (C * V > 32768)
  {
    std::vector<A> buf(widen ? V : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < C; ++i) {
      T* xi = x + i * ld;
      const int64_t y = labels[i];
      const bool ignored = y == ignore_index, bad = !ignored && (y < 0 || y >= V);
      if (ignored || bad) {
        loss[i] = bad ? std::numeric_limits<A>::quiet_NaN() : A(0);
        if (write_grad)
          for (int64_t j = 0; j < V; ++j) xi[j] = T{};  // +0 (bf16_t{} is +0 too)
        continue;
      }
      A* r = nullptr;
      if constexpr (widen) {
        r = buf.data();
        for (int64_t j = 0; j < V; ++j) r[j] = to_float(xi[j]);
      } else {
        r = xi;
      }
      loss[i] = row<A>(r, V, y, static_cast<A>(label_smoothing), static_cast<A>(softcap), static_cast<A>(scale),
                       write_grad);
      if constexpr (widen) {
        if (write_grad)
          for (int64_t j = 0; j < V; ++j) xi[j] = from_float<T>(r[j]);
      }
    }
  }
  for (int64_t i = 0; i < C; ++i) {
    const int64_t y = labels[i];
    if (y != ignore_index && (y < 0 || y >= V)) return i;
  }
  return -1;
}

}  // namespace

template <typename A>
int64_t lce_rows_cpu(A* x, int64_t ld, int64_t C, int64_t V, const int64_t* labels, int64_t ignore_index,
                     double label_smoothing, double softcap, double scale, bool write_grad, A* loss) {
  return rows_impl<A, A>(x, ld, C, V, labels, ignore_index, label_smoothing, softcap, scale, write_grad, loss);
}

int64_t lce_rows_cpu_bf16(bf16_t* x, int64_t ld, int64_t C, int64_t V, const int64_t* labels, int64_t ignore_index,
                          double label_smoothing, double softcap, double scale, bool write_grad, float* loss) {
  return rows_impl<bf16_t, float>(x, ld, C, V, labels, ignore_index, label_smoothing, softcap, scale, write_grad,
                                  loss);
}

template int64_t lce_rows_cpu<float>(float*, int64_t, int64_t, int64_t, const int64_t*, int64_t, double, double,
                                     double, bool, float*);
template int64_t lce_rows_cpu<double>(double*, int64_t, int64_t, int64_t, const int64_t*, int64_t, double, double,
                                      double, bool, double*);

}  // namespace fastpeft
