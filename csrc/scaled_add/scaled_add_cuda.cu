#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/cuda_dtypes.cuh"
#include "scaled_add_cuda.h"

namespace fastpeft {
namespace {


template <typename T>
__global__ void scaled_add_kernel(const T* __restrict__ a, const T* __restrict__ b, float alpha,
                                  T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    out[i] = st<T>(ld(a[i]) + alpha * ld(b[i]));
}

template <typename T>
int launch(const void* a, const void* b, double alpha, void* out, int64_t n, cudaStream_t s) {
  if (n == 0) return 0;
  const int threads = 256;
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  scaled_add_kernel<T><<<(unsigned)blocks, threads, 0, s>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), (float)alpha, static_cast<T*>(out), n);
  return (int)cudaGetLastError();
}

}  // namespace

int scaled_add_cuda(int dtype, const void* a, const void* b, double alpha, void* out, int64_t n,
                    void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch<float>(a, b, alpha, out, n, s);
    case 1: return launch<__half>(a, b, alpha, out, n, s);
    case 2: return launch<__nv_bfloat16>(a, b, alpha, out, n, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace fastpeft
