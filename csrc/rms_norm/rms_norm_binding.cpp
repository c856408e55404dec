// Torch binding of rms_norm (CPU): schemas and the CPU implementation of the torch-free kernels in
// rms_norm_cpu.cpp.  Fake (meta) and autograd registrations live in fastpeft/ops/rms_norm/__init__.py.
//
// rms_norm_fwd returns (y [..., H], rstd [M]): y has x's dtype, or with cast_before_weight the
// promotion of x's and weight's dtypes (what `weight * n.to(x.dtype)` gives); rstd is float32
// (float64 for float64 x), the only thing besides x and weight that backward needs.
// rms_norm_bwd returns (dx like x, dweight like weight); one not asked for is an empty [0] tensor.
#include <torch/library.h>

#include <tuple>

#include "../common/torch_utils.h"
#include "rms_norm_cpu.h"

namespace fastpeft {
namespace {

at::ScalarType acc_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

at::ScalarType out_dtype(const at::Tensor& x, const at::Tensor& weight, bool cast_before_weight) {
  return cast_before_weight ? at::promote_types(x.scalar_type(), weight.scalar_type()) : x.scalar_type();
}

// Checks shapes and devices; returns (M, H).
std::tuple<int64_t, int64_t> check_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm (cpu): x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "rms_norm: x must be [..., H] with H >= 1, got ", x.sizes());
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, "rms_norm: weight must be [H] = [", H, "], got ",
              weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "rms_norm: weight must be floating point, got ",
              weight.scalar_type());
  TORCH_CHECK(eps >= 0.0, "rms_norm: eps must be >= 0, got ", eps);
  return {x.numel() / H, H};
}

// offset + weight in the accumulation type (Gemma's `1.0 + weight.float()`), contiguous [H].
at::Tensor effective_weight(const at::Tensor& weight, at::ScalarType acc, double offset) {
  return weight.to(acc).add(offset).contiguous();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu_impl(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                         double offset, bool cast_before_weight) {
  int64_t M, H;
  std::tie(M, H) = check_args(x, weight, eps);
  const auto acc = acc_dtype(x.scalar_type());
  const auto out = out_dtype(x, weight, cast_before_weight);
  const at::Tensor x2 = rows_2d(x, M, H);
  const at::Tensor w = effective_weight(weight, acc, offset);
  // allocated in x's shape (contiguous), so the op returns a tensor, not a view: in-place ops on it work
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out));
  at::Tensor rstd = at::empty({M}, x.options().dtype(acc));
  dispatch_in_out_cpu(x.scalar_type(), out, "rms_norm", [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    using A = typename acc<T>::type;
    rms_norm_fwd_cpu<T, O>(cpu_ptr<T>(x2), x2.stride(0), cpu_ptr<A>(w), M, H, eps, cast_before_weight,
                           cpu_ptr<O>(y), cpu_ptr<A>(rstd));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         double offset, bool cast_before_weight, bool need_dx,
                                                         bool need_dweight) {
  int64_t M, H;
  std::tie(M, H) = check_args(x, weight, 0.0);
  const auto acc = acc_dtype(x.scalar_type());
  const auto out = out_dtype(x, weight, cast_before_weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == out,
              "rms_norm backward: grad_y must have x's shape ", x.sizes(), " and dtype ", out, ", got ",
              grad_y.sizes(), " ", grad_y.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == M && rstd.scalar_type() == acc,
              "rms_norm backward: rstd must be [", M, "] of dtype ", acc, ", got ", rstd.sizes(), " ",
              rstd.scalar_type());
  const at::Tensor x2 = rows_2d(x, M, H), g2 = rows_2d(grad_y, M, H), r = rstd.contiguous();
  const at::Tensor w = effective_weight(weight, acc, offset);
  // Outputs of an op must not alias each other: distinct empty tensors for gradients not asked for.
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor dw = need_dweight ? at::empty({H}, x.options().dtype(acc)) : at::Tensor();
  dispatch_in_out_cpu(x.scalar_type(), out, "rms_norm", [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    using A = typename acc<T>::type;
    rms_norm_bwd_cpu<T, O>(cpu_ptr<O>(g2), g2.stride(0), cpu_ptr<T>(x2), x2.stride(0), cpu_ptr<A>(w),
                           cpu_ptr<A>(r), M, H, cast_before_weight, need_dx ? cpu_ptr<T>(dx) : nullptr,
                           need_dweight ? cpu_ptr<A>(dw) : nullptr);
  });
  return {dx,
          need_dweight ? dw.to(weight.scalar_type()) : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps, float offset, bool cast_before_weight) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, float offset, bool cast_before_weight, "
      "bool need_dx, bool need_dweight) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu_impl);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu_impl);
}

}  // namespace fastpeft
