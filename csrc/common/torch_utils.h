// Helpers for the thin torch bindings (csrc/*/*_binding.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "dtypes.h"

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

// t as [M, H] with unit column stride, any row stride (a view when possible, else a contiguous copy).
inline at::Tensor rows_2d(const at::Tensor& t, int64_t M, int64_t H) {
  at::Tensor t2 = t.reshape({M, H});
  return (H > 1 && t2.stride(1) != 1) ? t2.contiguous() : t2;
}

// Storage pointer of a CPU tensor as the kernels' type (float, double, bf16_t).
template <typename T>
inline T* cpu_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Calls f(T{}, O{}) for the (input, output) dtype pairs that CPU kernels reading T and writing O are
// instantiated for: float/float, double/double, bf16/bf16 and bf16/float (bf16 activations with an
// fp32 result, as type promotion gives for a bf16 tensor times an fp32 one).
template <typename F>
void dispatch_in_out_cpu(at::ScalarType in, at::ScalarType out, const char* what, F&& f) {
  if (in == at::kFloat && out == at::kFloat) return f(float{}, float{});
  if (in == at::kDouble && out == at::kDouble) return f(double{}, double{});
  if (in == at::kBFloat16 && out == at::kBFloat16) return f(bf16_t{}, bf16_t{});
  if (in == at::kBFloat16 && out == at::kFloat) return f(bf16_t{}, float{});
  TORCH_CHECK(false, what, " (cpu): unsupported dtypes: input ", in, ", output ", out,
              " (supported: float32, float64, bfloat16, and bfloat16 input with float32 output)");
}

}  // namespace fastpeft
