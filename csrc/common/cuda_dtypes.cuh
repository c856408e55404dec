// Device-side load/store conversions shared by the CUDA kernels (torch-free):
// ld(v) widens float / double / __half / __nv_bfloat16 to float; st<T>(f) rounds back.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastpeft {

__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T st(float v);
template <> __device__ __forceinline__ float st<float>(float v) { return v; }
template <> __device__ __forceinline__ __half st<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace fastpeft
