// Helpers for the thin torch bindings (csrc/*/*_binding.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#ifdef FASTPEFT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define FASTPEFT_CUDA_STREAM() static_cast<void*>(at::cuda::getCurrentCUDAStream().stream())
#define FASTPEFT_CHECK_CUDA_LAUNCH(err) \
  TORCH_CHECK((err) == 0, "fastpeft CUDA kernel launch failed with cudaError ", (err))
#endif

namespace fastpeft {

// 0 = float32, 1 = float16, 2 = bfloat16 (the dtype codes of the CUDA launchers).
inline int cuda_dtype_code(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, arg, ": expected float32, float16 or bfloat16 on CUDA, got ", t);
  }
  return -1;
}

}  // namespace fastpeft
