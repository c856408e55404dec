// Torch binding of adv_perturb_update / adv_perturb_init: schemas, CPU and CUDA implementations.
// Both ops mutate `delta` in place and return nothing; fake kernels live in
// fastpeft/ops/adv_perturb_update/__init__.py.  They are not differentiable (used under no_grad).
#include <torch/library.h>
#include "../common/torch_utils.h"
#include "adv_perturb_update_cpu.h"
#ifdef FASTPEFT_WITH_CUDA
#include "adv_perturb_update_cuda.h"
#endif

namespace fastpeft {
namespace {

int norm_code(c10::string_view norm) {
  if (norm == "linf") return kAdvLinf;
  if (norm == "l2_token") return kAdvL2Token;
  if (norm == "l2_example") return kAdvL2Example;
  TORCH_CHECK(false, "adv_perturb: norm must be 'linf', 'l2_token' or 'l2_example', got '", std::string(norm), "'");
  return -1;
}

int kind_code(c10::string_view kind) {
  if (kind == "uniform") return kAdvUniform;
  if (kind == "normal") return kAdvNormal;
  TORCH_CHECK(false, "adv_perturb_init: kind must be 'uniform' or 'normal', got '", std::string(kind), "'");
  return -1;
}

// Float [B, L] contiguous copy of the mask (nonzero = real token), or an undefined tensor.
at::Tensor prepare_mask(const at::Tensor& delta, const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const auto& m = *mask;
  TORCH_CHECK(m.dim() == 2 && m.size(0) == delta.size(0) && m.size(1) == delta.size(1),
              "adv_perturb: mask must have shape [B, L] = [", delta.size(0), ", ", delta.size(1), "], got ",
              m.sizes());
  TORCH_CHECK(m.device() == delta.device(), "adv_perturb: mask must be on the device of delta (", delta.device(),
              "), got ", m.device());
  return m.to(at::kFloat).contiguous();
}

void check_delta(const at::Tensor& delta) {
  TORCH_CHECK(delta.dim() == 3, "adv_perturb: delta must be [B, L, H], got shape ", delta.sizes());
}

void check_update_args(const at::Tensor& delta, const at::Tensor& grad) {
  check_delta(delta);
  TORCH_CHECK(grad.sizes() == delta.sizes(), "adv_perturb_update: grad must have the shape of delta ", delta.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == delta.scalar_type(), "adv_perturb_update: grad must have the dtype of delta (",
              delta.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == delta.device(), "adv_perturb_update: grad must be on the device of delta (",
              delta.device(), "), got ", grad.device());
}

// Runs fn on a contiguous version of delta and writes it back when delta was strided.
template <typename F>
void on_contiguous(const at::Tensor& delta, F fn) {
  if (delta.is_contiguous()) {
    fn(delta);
  } else {
    auto dc = delta.contiguous();
    fn(dc);
    delta.copy_(dc);
  }
}

const float* mask_ptr(const at::Tensor& m) { return m.defined() ? m.data_ptr<float>() : nullptr; }

void adv_perturb_update_cpu_impl(const at::Tensor& delta, const at::Tensor& grad, const c10::optional<at::Tensor>& mask,
                                 c10::string_view norm, double step_size, double epsilon) {
  check_update_args(delta, grad);
  const int nc = norm_code(norm);
  auto m = prepare_mask(delta, mask);
  auto gc = grad.contiguous();
  const int64_t B = delta.size(0), L = delta.size(1), H = delta.size(2);
  on_contiguous(delta, [&](const at::Tensor& d) {
    switch (d.scalar_type()) {
      case at::kFloat:
        adv_perturb_update_cpu(d.data_ptr<float>(), gc.data_ptr<float>(), mask_ptr(m), B, L, H, nc, step_size, epsilon);
        break;
      case at::kDouble:
        adv_perturb_update_cpu(d.data_ptr<double>(), gc.data_ptr<double>(), mask_ptr(m), B, L, H, nc, step_size,
                               epsilon);
        break;
      case at::kBFloat16:
        adv_perturb_update_cpu(reinterpret_cast<bf16_t*>(d.data_ptr()), reinterpret_cast<const bf16_t*>(gc.data_ptr()),
                               mask_ptr(m), B, L, H, nc, step_size, epsilon);
        break;
      default:
        TORCH_CHECK(false, "adv_perturb_update (cpu): delta must be float32, float64 or bfloat16, got ",
                    d.scalar_type());
    }
  });
}

void adv_perturb_init_cpu_impl(const at::Tensor& delta, const c10::optional<at::Tensor>& mask, c10::string_view kind,
                               c10::string_view norm, double scale, int64_t seed) {
  check_delta(delta);
  const int kc = kind_code(kind), nc = norm_code(norm);
  TORCH_CHECK(seed >= 0, "adv_perturb_init: seed must be >= 0, got ", seed);
  auto m = prepare_mask(delta, mask);
  const int64_t B = delta.size(0), L = delta.size(1), H = delta.size(2);
  const uint64_t s = static_cast<uint64_t>(seed);
  on_contiguous(delta, [&](const at::Tensor& d) {
    switch (d.scalar_type()) {
      case at::kFloat:
        adv_perturb_init_cpu(d.data_ptr<float>(), mask_ptr(m), B, L, H, kc, nc, scale, s);
        break;
      case at::kDouble:
        adv_perturb_init_cpu(d.data_ptr<double>(), mask_ptr(m), B, L, H, kc, nc, scale, s);
        break;
      case at::kBFloat16:
        adv_perturb_init_cpu(reinterpret_cast<bf16_t*>(d.data_ptr()), mask_ptr(m), B, L, H, kc, nc, scale, s);
        break;
      default:
        TORCH_CHECK(false, "adv_perturb_init (cpu): delta must be float32, float64 or bfloat16, got ",
                    d.scalar_type());
    }
  });
}

#ifdef FASTPEFT_WITH_CUDA
void adv_perturb_update_cuda_impl(const at::Tensor& delta, const at::Tensor& grad,
                                  const c10::optional<at::Tensor>& mask, c10::string_view norm, double step_size,
                                  double epsilon) {
  check_update_args(delta, grad);
  const int nc = norm_code(norm);
  const int code = cuda_dtype_code(delta.scalar_type(), "adv_perturb_update: delta");
  c10::cuda::CUDAGuard guard(delta.device());
  auto m = prepare_mask(delta, mask);
  auto gc = grad.contiguous();
  const int64_t B = delta.size(0), L = delta.size(1), H = delta.size(2);
  auto ws = at::empty({adv_perturb_update_cuda_workspace(B, L, nc)}, delta.options().dtype(at::kFloat));
  on_contiguous(delta, [&](const at::Tensor& d) {
    FASTPEFT_CHECK_CUDA_LAUNCH(adv_perturb_update_cuda(code, d.data_ptr(), gc.data_ptr(), mask_ptr(m), B, L, H, nc,
                                                       step_size, epsilon, ws.data_ptr<float>(),
                                                       FASTPEFT_CUDA_STREAM()));
  });
}

void adv_perturb_init_cuda_impl(const at::Tensor& delta, const c10::optional<at::Tensor>& mask, c10::string_view kind,
                                c10::string_view norm, double scale, int64_t seed) {
  check_delta(delta);
  const int kc = kind_code(kind), nc = norm_code(norm);
  TORCH_CHECK(seed >= 0, "adv_perturb_init: seed must be >= 0, got ", seed);
  const int code = cuda_dtype_code(delta.scalar_type(), "adv_perturb_init: delta");
  c10::cuda::CUDAGuard guard(delta.device());
  auto m = prepare_mask(delta, mask);
  const int64_t B = delta.size(0), L = delta.size(1), H = delta.size(2);
  auto ws = at::empty({B > 0 ? B : 1}, delta.options().dtype(at::kFloat));
  on_contiguous(delta, [&](const at::Tensor& d) {
    FASTPEFT_CHECK_CUDA_LAUNCH(adv_perturb_init_cuda(code, d.data_ptr(), mask_ptr(m), B, L, H, kc, nc, scale,
                                                     static_cast<uint64_t>(seed), ws.data_ptr<float>(),
                                                     FASTPEFT_CUDA_STREAM()));
  });
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("adv_perturb_update(Tensor(a!) delta, Tensor grad, Tensor? mask, str norm, float step_size, "
        "float epsilon) -> ()");
  m.def("adv_perturb_init(Tensor(a!) delta, Tensor? mask, str kind, str norm, float scale, int seed) -> ()");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("adv_perturb_update", &adv_perturb_update_cpu_impl);
  m.impl("adv_perturb_init", &adv_perturb_init_cpu_impl);
}
#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("adv_perturb_update", &adv_perturb_update_cuda_impl);
  m.impl("adv_perturb_init", &adv_perturb_init_cuda_impl);
}
#endif

}  // namespace fastpeft
