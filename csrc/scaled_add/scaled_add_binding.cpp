// Torch binding of scaled_add: schema, CPU and CUDA implementations.
// Fake (meta) and autograd registrations live in fastpeft/ops/scaled_add/__init__.py.
#include <torch/library.h>
#include "../common/torch_utils.h"
#include "scaled_add_cpu.h"
#ifdef FASTPEFT_WITH_CUDA
#include "scaled_add_cuda.h"
#endif

namespace fastpeft {
namespace {

void check_args(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "scaled_add: b must have the shape of a ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "scaled_add: b must have the dtype of a (", a.scalar_type(),
              "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "scaled_add: b must be on the device of a (", a.device(), "), got ",
              b.device());
}

at::Tensor scaled_add_cpu_impl(const at::Tensor& a, const at::Tensor& b, double alpha) {
  check_args(a, b);
  auto ac = a.contiguous(), bc = b.contiguous();
  auto out = at::empty_like(ac, at::MemoryFormat::Contiguous);
  const int64_t n = ac.numel();
  switch (a.scalar_type()) {
    case at::kFloat:
      scaled_add_cpu(ac.data_ptr<float>(), bc.data_ptr<float>(), alpha, out.data_ptr<float>(), n);
      break;
    case at::kDouble:
      scaled_add_cpu(ac.data_ptr<double>(), bc.data_ptr<double>(), alpha, out.data_ptr<double>(), n);
      break;
    case at::kBFloat16:
      scaled_add_cpu(reinterpret_cast<const bf16_t*>(ac.data_ptr()), reinterpret_cast<const bf16_t*>(bc.data_ptr()),
                     alpha, reinterpret_cast<bf16_t*>(out.data_ptr()), n);
      break;
    default:
      TORCH_CHECK(false, "scaled_add (cpu): a must be float32, float64 or bfloat16, got ", a.scalar_type());
  }
  return out;
}

#ifdef FASTPEFT_WITH_CUDA
at::Tensor scaled_add_cuda_impl(const at::Tensor& a, const at::Tensor& b, double alpha) {
  check_args(a, b);
  const int code = cuda_dtype_code(a.scalar_type(), "scaled_add: a");
  c10::cuda::CUDAGuard guard(a.device());
  auto ac = a.contiguous(), bc = b.contiguous();
  auto out = at::empty_like(ac, at::MemoryFormat::Contiguous);
  FASTPEFT_CHECK_CUDA_LAUNCH(
      scaled_add_cuda(code, ac.data_ptr(), bc.data_ptr(), alpha, out.data_ptr(), ac.numel(), FASTPEFT_CUDA_STREAM()));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("scaled_add(Tensor a, Tensor b, float alpha) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("scaled_add", &scaled_add_cpu_impl); }
#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) { m.impl("scaled_add", &scaled_add_cuda_impl); }
#endif

}  // namespace fastpeft
