// Torch binding of bottleneck_adapter (CPU): schemas and the CPU implementation.
// The GEMMs go to BLAS through ATen; the fused elementwise work (bias + activation
// + dropout with an on-the-fly Philox mask, residual + bias, and the backward's
// mask-regenerating activation derivative) runs in the torch-free kernels of
// bottleneck_adapter_cpu.cpp.  Fake (meta) and autograd registrations live in
// fastpeft/ops/bottleneck_adapter/__init__.py.
//
// Forward returns (y [..., H] like x, h [M, Bn] = x W_downᵀ + b_down): h is the
// only thing besides x that backward needs.  Backward returns
// (dx, dW_down, db_down, dW_up, db_up), each parameter gradient in that
// parameter's dtype; a gradient that is not needed (or of an absent bias) is an
// empty [0] tensor.
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../common/torch_utils.h"
#include "bottleneck_adapter_cpu.h"

namespace fastpeft {
namespace {

AdapterAct parse_activation(c10::string_view name) {
  if (name == "relu") return AdapterAct::kRelu;
  if (name == "gelu") return AdapterAct::kGelu;
  if (name == "gelu_tanh") return AdapterAct::kGeluTanh;
  if (name == "silu") return AdapterAct::kSilu;
  TORCH_CHECK(false, "bottleneck_adapter: activation must be 'relu', 'gelu', 'gelu_tanh' or 'silu', got '",
              std::string(name), "'");
  return AdapterAct::kRelu;
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "bottleneck_adapter (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "bottleneck_adapter: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// Shapes/devices/dtypes; returns (M, H, Bn).
std::tuple<int64_t, int64_t, int64_t> check_args(const at::Tensor& x, const at::Tensor& W_down,
                                                 const std::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                                                 const std::optional<at::Tensor>& b_up, double p, int64_t seed) {
  check_float_cpu(x, "x");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "bottleneck_adapter (cpu): x must be float32, float64 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "bottleneck_adapter: x must be [..., H] with H >= 1, got ",
              x.sizes());
  const int64_t H = x.size(-1);
  const int64_t M = x.numel() / H;
  check_float_cpu(W_down, "W_down");
  TORCH_CHECK(W_down.dim() == 2 && W_down.size(1) == H && W_down.size(0) >= 1,
              "bottleneck_adapter: W_down must be [Bn, H] with H = ", H, ", got ", W_down.sizes());
  const int64_t Bn = W_down.size(0);
  check_float_cpu(W_up, "W_up");
  TORCH_CHECK(W_up.dim() == 2 && W_up.size(0) == H && W_up.size(1) == Bn,
              "bottleneck_adapter: W_up must be [H, Bn] = [", H, ", ", Bn, "], got ", W_up.sizes());
  if (b_down) {
    check_float_cpu(*b_down, "b_down");
    TORCH_CHECK(b_down->dim() == 1 && b_down->size(0) == Bn, "bottleneck_adapter: b_down must be [", Bn,
                "], got ", b_down->sizes());
  }
  if (b_up) {
    check_float_cpu(*b_up, "b_up");
    TORCH_CHECK(b_up->dim() == 1 && b_up->size(0) == H, "bottleneck_adapter: b_up must be [", H, "], got ",
                b_up->sizes());
  }
  TORCH_CHECK(p >= 0.0 && p < 1.0, "bottleneck_adapter: dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "bottleneck_adapter: seed must be >= 0, got ", seed);
  return {M, H, Bn};
}

// x as [M, H] with unit column stride (a view when possible).
at::Tensor rows_view(const at::Tensor& x, int64_t M, int64_t H) {
  at::Tensor x2 = x.reshape({M, H});
  if (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < H)) x2 = x2.contiguous();
  return x2;
}

// Bias gradients are reduced in fp32 (fp64 for fp64 inputs).
at::ScalarType sum_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(bf16_t{}); break;
    default: TORCH_CHECK(false, "bottleneck_adapter (cpu): unsupported dtype ", dt);
  }
}

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_fwd_cpu(const at::Tensor& x, const at::Tensor& W_down,
                                                              const std::optional<at::Tensor>& b_down,
                                                              const at::Tensor& W_up,
                                                              const std::optional<at::Tensor>& b_up,
                                                              c10::string_view activation, double p, int64_t seed,
                                                              bool residual) {
  int64_t M, H, Bn;  // not a structured binding: lambdas below capture them (C++17)
  std::tie(M, H, Bn) = check_args(x, W_down, b_down, W_up, b_up, p, seed);
  const AdapterAct act = parse_activation(activation);
  const auto dt = x.scalar_type();
  const at::Tensor x2 = rows_view(x, M, H);
  const at::Tensor Wd = as_compute(W_down, dt), Wu = as_compute(W_up, dt);
  const at::Tensor bd = b_down ? as_compute(*b_down, dt) : at::Tensor();
  const at::Tensor bu = b_up ? as_compute(*b_up, dt) : at::Tensor();

  at::Tensor h = at::mm(x2, Wd.t());  // [M, Bn] contiguous, BLAS
  at::Tensor d = at::empty_like(h);
  // y is a 2-D view of the returned tensor (the op's output must not be a view: in-place ops on it)
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor y = out.view({M, H});
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    adapter_bias_act_dropout_fwd<T>(ptr<T>(h), bd.defined() ? ptr<T>(bd) : nullptr, ptr<T>(d), M, Bn, act, p,
                                    static_cast<uint64_t>(seed));
    if (residual || bu.defined())
      adapter_residual_bias_init<T>(residual ? ptr<T>(x2) : nullptr, residual ? x2.stride(0) : 0,
                                    bu.defined() ? ptr<T>(bu) : nullptr, ptr<T>(y), M, H, residual);
  });
  if (residual || bu.defined())
    y.addmm_(d, Wu.t());  // y = (x + b_up) + d W_upᵀ, accumulated in place by BLAS (beta = 1)
  else
    at::mm_out(y, d, Wu.t());
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h, const at::Tensor& x, const at::Tensor& h,
    const at::Tensor& W_down, const std::optional<at::Tensor>& b_down, const at::Tensor& W_up,
    const std::optional<at::Tensor>& b_up, c10::string_view activation, double p, int64_t seed, bool residual,
    bool need_dx, bool need_down, bool need_up) {
  int64_t M, H, Bn;  // not a structured binding: lambdas below capture them (C++17)
  std::tie(M, H, Bn) = check_args(x, W_down, b_down, W_up, b_up, p, seed);
  const AdapterAct act = parse_activation(activation);
  const auto dt = x.scalar_type();
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == dt && grad_y.device() == x.device(),
              "bottleneck_adapter backward: grad_y must match x (", x.sizes(), ", ", dt, "), got ", grad_y.sizes(),
              ", ", grad_y.scalar_type());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == M && h.size(1) == Bn && h.scalar_type() == dt,
              "bottleneck_adapter backward: h must be [", M, ", ", Bn, "] of dtype ", dt, ", got ", h.sizes(), ", ",
              h.scalar_type());
  at::Tensor ghc;
  if (grad_h) {
    TORCH_CHECK(grad_h->sizes() == h.sizes() && grad_h->scalar_type() == dt,
                "bottleneck_adapter backward: grad_h must match h");
    ghc = grad_h->contiguous();
  }
  const at::Tensor hc = h.contiguous();
  const at::Tensor g2 = rows_view(grad_y, M, H);
  const at::Tensor Wu = as_compute(W_up, dt);

  // dd = dY W_up [M, Bn] (BLAS), then in place dh = dd * keep * s * act'(h) (+ grad_h); d recomputed for dW_up.
  at::Tensor dh = at::mm(g2, Wu);
  at::Tensor d = need_up ? at::empty_like(dh) : at::Tensor();
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    adapter_act_dropout_bwd<T>(ptr<T>(hc), ptr<T>(dh), ghc.defined() ? ptr<T>(ghc) : nullptr,
                               d.defined() ? ptr<T>(d) : nullptr, M, Bn, act, p, static_cast<uint64_t>(seed));
  });

  // Gradients not asked for are distinct empty tensors (outputs of an op must not alias each other).
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = none(), dWd = none(), dbd = none(), dWu = none(), dbu = none();
  if (need_dx) {
    const at::Tensor Wd = as_compute(W_down, dt);
    dx = (residual ? at::addmm(g2, dh, Wd) : at::mm(dh, Wd)).view(x.sizes());  // dX = r dY + dh W_down
  }
  if (need_down) {
    dWd = at::mm(dh.t(), rows_view(x, M, H)).to(W_down.scalar_type());  // dW_down = dhᵀ x
    if (b_down) dbd = dh.sum(0, false, sum_dtype(dt)).to(b_down->scalar_type());
  }
  if (need_up) {
    dWu = at::mm(g2.t(), d).to(W_up.scalar_type());  // dW_up = dYᵀ d
    if (b_up) dbu = g2.sum(0, false, sum_dtype(dt)).to(b_up->scalar_type());
  }
  return {dx, dWd, dbd, dWu, dbu};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def(
      "bottleneck_adapter_fwd(Tensor x, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, "
      "str activation, float dropout_p, int seed, bool residual) -> (Tensor, Tensor)");
  m.def(
      "bottleneck_adapter_bwd(Tensor grad_y, Tensor? grad_h, Tensor x, Tensor h, Tensor W_down, Tensor? b_down, "
      "Tensor W_up, Tensor? b_up, str activation, float dropout_p, int seed, bool residual, bool need_dx, "
      "bool need_down, bool need_up) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("bottleneck_adapter_fwd", &bottleneck_adapter_fwd_cpu);
  m.impl("bottleneck_adapter_bwd", &bottleneck_adapter_bwd_cpu);
}

}  // namespace fastpeft
