// scaled_add, C++ CPU kernel (torch-free): out[i] = a[i] + alpha * b[i].
#pragma once
#include <cstdint>
#include "../common/dtypes.h"

namespace fastpeft {

template <typename T>
void scaled_add_cpu(const T* a, const T* b, double alpha, T* out, int64_t n);

}  // namespace fastpeft
