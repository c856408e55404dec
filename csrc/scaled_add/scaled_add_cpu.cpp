#include "scaled_add_cpu.h"

namespace fastpeft {

template <typename T>
void scaled_add_cpu(const T* a, const T* b, double alpha, T* out, int64_t n) {
  using A = typename acc<T>::type;
  const A s = static_cast<A>(alpha);
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i)
    out[i] = from_double<T>(static_cast<double>(static_cast<A>(to_float(a[i])) + s * static_cast<A>(to_float(b[i]))));
}

template void scaled_add_cpu<float>(const float*, const float*, double, float*, int64_t);
template void scaled_add_cpu<double>(const double*, const double*, double, double*, int64_t);
template void scaled_add_cpu<bf16_t>(const bf16_t*, const bf16_t*, double, bf16_t*, int64_t);

}  // namespace fastpeft
