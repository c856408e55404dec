// scaled_add, CUDA kernel launcher (torch-free): out[i] = a[i] + alpha * b[i].
// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Returns a cudaError_t as int.
#pragma once
#include <cstdint>

namespace fastpeft {

int scaled_add_cuda(int dtype, const void* a, const void* b, double alpha, void* out,
                    int64_t n, void* stream);

}  // namespace fastpeft
