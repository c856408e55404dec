#include "rope_cpu.h"

#include "../common/vec_math.h"

namespace fastpeft {
namespace {

template <typename T, typename O, typename A>
FASTPEFT_SIMD_CLONES void rotate_row(const T* __restrict x, O* __restrict y, const A* __restrict c,
                                     const A* __restrict s, int64_t D, int64_t rd, bool transpose) {
  const int64_t h = rd / 2;
  // p(v): the product v rounded to O, as the unfused `x * cos` / `rotate_half(x) * sin` store it.
  auto p = [](A v) { return vm::round_to<O>(v); };
  if (!transpose) {
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const A lo = vm::load<A>(x[j]), hi = vm::load<A>(x[j + h]);
      y[j] = vm::store<O>(p(lo * c[j]) - p(hi * s[j]));
      y[j + h] = vm::store<O>(p(hi * c[j + h]) + p(lo * s[j + h]));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const A lo = vm::load<A>(x[j]), hi = vm::load<A>(x[j + h]);
      y[j] = vm::store<O>(p(lo * c[j]) + p(hi * s[j + h]));
      y[j + h] = vm::store<O>(p(hi * c[j + h]) - p(lo * s[j]));
    }
  }
#pragma omp simd
  for (int64_t j = rd; j < D; ++j) y[j] = vm::store<O>(vm::load<A>(x[j]));
}

}  // namespace

template <typename T, typename O>
void rope_cpu(const T* x, RopeStrides xs, O* y, RopeStrides ys, int64_t B, int64_t S, int64_t H, int64_t D,
              const typename acc<T>::type* cos, const typename acc<T>::type* sin, int64_t csb, int64_t rd,
              bool transpose) {
  using A = typename acc<T>::type;
#pragma omp parallel for collapse(3) schedule(static) if (B * S * H * D > 32768)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h) {
        const A* cr = cos + b * csb + s * rd;
        const A* sr = sin + b * csb + s * rd;
        rotate_row<T, O, A>(x + b * xs.b + s * xs.s + h * xs.h, y + b * ys.b + s * ys.s + h * ys.h, cr, sr, D, rd,
                            transpose);
      }
}

#define FASTPEFT_ROPE_INSTANTIATE(T, O)                                                                       \
  template void rope_cpu<T, O>(const T*, RopeStrides, O*, RopeStrides, int64_t, int64_t, int64_t, int64_t, \
                               const acc<T>::type*, const acc<T>::type*, int64_t, int64_t, bool);
FASTPEFT_ROPE_INSTANTIATE(float, float)
FASTPEFT_ROPE_INSTANTIATE(double, double)
FASTPEFT_ROPE_INSTANTIATE(bf16_t, bf16_t)
FASTPEFT_ROPE_INSTANTIATE(bf16_t, float)
#undef FASTPEFT_ROPE_INSTANTIATE

}  // namespace fastpeft
