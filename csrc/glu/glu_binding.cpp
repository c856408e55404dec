// Torch binding of glu (CPU): schemas and the CPU implementation of the torch-free kernels in
// glu_cpu.cpp, shared by fastpeft.ops.swiglu (activation "silu") and fastpeft.ops.geglu ("gelu",
// "gelu_tanh").  Fake (meta) and autograd registrations live in fastpeft/ops/glu/__init__.py.
//
// glu_fwd(gate, up, activation) -> y: gate and up of one shape [..., N] and dtype, any strides; y
// contiguous.  glu_bwd(grad_y, gate, up, activation) -> (dgate, dup), contiguous.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../common/torch_utils.h"
#include "glu_cpu.h"

namespace fastpeft {
namespace {

GluAct parse_activation(c10::string_view name) {
  if (name == "silu") return GluAct::kSilu;
  if (name == "gelu") return GluAct::kGelu;
  if (name == "gelu_tanh") return GluAct::kGeluTanh;
  TORCH_CHECK(false, "glu: activation must be 'silu', 'gelu' or 'gelu_tanh', got '", std::string(name), "'");
  return GluAct::kSilu;
}

// Checks shapes, dtypes and devices; returns (M, N).
std::tuple<int64_t, int64_t> check_args(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "glu (cpu): gate and up must be CPU tensors, got ",
              gate.device(), " and ", up.device());
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "glu: up must have gate's shape and dtype ", gate.sizes(), " ", gate.scalar_type(), ", got ",
              up.sizes(), " ", up.scalar_type());
  TORCH_CHECK(gate.dim() >= 1, "glu: gate must have at least 1 dim");
  const int64_t N = gate.size(-1);
  return {N == 0 ? 0 : gate.numel() / N, N};
}

template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(bf16_t{});
    default: TORCH_CHECK(false, "glu (cpu): gate must be float32, float64 or bfloat16, got ", dt);
  }
}

at::Tensor glu_fwd_cpu_impl(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  int64_t M, N;
  std::tie(M, N) = check_args(gate, up);
  const GluAct act = parse_activation(activation);
  const at::Tensor g = rows_2d(gate, M, N), u = rows_2d(up, M, N);
  at::Tensor y = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_dtype(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    glu_fwd_cpu<T>(cpu_ptr<T>(g), g.stride(0), cpu_ptr<T>(u), u.stride(0), M, N, act, cpu_ptr<T>(y));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cpu_impl(const at::Tensor& grad_y, const at::Tensor& gate,
                                                    const at::Tensor& up, c10::string_view activation) {
  int64_t M, N;
  std::tie(M, N) = check_args(gate, up);
  TORCH_CHECK(grad_y.sizes() == gate.sizes() && grad_y.scalar_type() == gate.scalar_type(),
              "glu backward: grad_y must have gate's shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  const GluAct act = parse_activation(activation);
  const at::Tensor g = rows_2d(gate, M, N), u = rows_2d(up, M, N), dy = grad_y.contiguous();
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dg = at::empty(gate.sizes(), opts), du = at::empty(gate.sizes(), opts);
  dispatch_dtype(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    glu_bwd_cpu<T>(cpu_ptr<T>(dy), cpu_ptr<T>(g), g.stride(0), cpu_ptr<T>(u), u.stride(0), M, N, act, cpu_ptr<T>(dg),
                   cpu_ptr<T>(du));
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("glu_fwd(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def("glu_bwd(Tensor grad_y, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("glu_fwd", &glu_fwd_cpu_impl);
  m.impl("glu_bwd", &glu_bwd_cpu_impl);
}

}  // namespace fastpeft
