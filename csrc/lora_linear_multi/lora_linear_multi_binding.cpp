// Torch binding of lora_linear_multi (CPU, inference only): the torch-free kernels of
// lora_linear_multi_cpu.cpp sort the rows by adapter and write y = bias + s_a · (x A_aᵀ) B_aᵀ row by
// row; the base GEMM is then accumulated into the same y by BLAS (addmm_ with beta = 1), so the
// whole layer is one pass of the low-rank kernel plus one GEMM.  Fake (meta) registration in
// fastpeft/ops/lora_linear_multi/__init__.py; there is no autograd (the Python wrapper refuses
// inputs that require grad).
//
//   lora_linear_multi(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks) -> y [..., N]
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/torch_utils.h"
#include "lora_linear_multi_cpu.h"

namespace fastpeft {
namespace {

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
                const at::Tensor& adapter_index) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "lora_linear_multi: x must be [..., K] with K >= 1, got ",
                    x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == K, "lora_linear_multi: weight must be [N, ", K, "], got ",
                    weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1 && lora_A.size(2) == K,
                    "lora_linear_multi: lora_A must be [n_adapters, r_max, ", K, "] with n_adapters, r_max >= 1, got ",
                    lora_A.sizes());
  const int64_t n = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == n && lora_B.size(1) == N && lora_B.size(2) == r,
                    "lora_linear_multi: lora_B must be [", n, ", ", N, ", ", r, "], got ", lora_B.sizes());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == n, "lora_linear_multi: scales must be [", n, "], got ",
                    scales.sizes());
  TORCH_CHECK_VALUE(adapter_index.dim() == 1 && adapter_index.size(0) * K == x.numel(),
                    "lora_linear_multi: adapter_index must be [M] (M = ", x.numel() / K, " rows), got ",
                    adapter_index.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                   "lora_linear_multi (cpu): x must be float32, float64 or bfloat16, got ", t);
  for (const at::Tensor* u : {&weight, &lora_A, &lora_B})
    TORCH_CHECK_TYPE(u->scalar_type() == t, "lora_linear_multi: weight, lora_A and lora_B must have the dtype of x (",
                     t, "), got ", u->scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(scales.scalar_type()), "lora_linear_multi: scales must be floating point, got ",
                   scales.scalar_type());
  TORCH_CHECK_TYPE(adapter_index.scalar_type() == at::kInt || adapter_index.scalar_type() == at::kLong,
                   "lora_linear_multi: adapter_index must be int32 or int64, got ", adapter_index.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "lora_linear_multi: bias must be [", N, "], got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == t, "lora_linear_multi: bias must have the dtype of x (", t, "), got ",
                     bias->scalar_type());
  }
  for (const at::Tensor* u : {&x, &weight, &lora_A, &lora_B, &scales, &adapter_index})
    TORCH_CHECK(u->device().is_cpu(), "lora_linear_multi (cpu): all tensors must be on the CPU, got ", u->device());
  TORCH_CHECK(!bias.has_value() || bias->device().is_cpu(), "lora_linear_multi (cpu): bias must be on the CPU");
}

template <typename T>
void lowrank(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& bias,
             const std::vector<double>& scales, const std::vector<int64_t>* ranks, at::Tensor& y,
             const std::vector<int64_t>& bounds, const std::vector<int64_t>& order) {
  LoraMultiProblem<T> p{x2.size(0), x2.size(1), y.size(1), A.size(0), A.size(1),
                        cptr<T>(x2), x2.stride(0), x2.stride(1),
                        cptr<T>(A), A.stride(0), A.stride(1), A.stride(2),
                        cptr<T>(B), B.stride(0), B.stride(1), B.stride(2),
                        scales.data(), ranks ? ranks->data() : nullptr,
                        bias.has_value() ? cptr<T>(*bias) : nullptr, bias.has_value() ? bias->stride(0) : 0,
                        reinterpret_cast<T*>(y.mutable_data_ptr()), y.stride(0)};
  lora_multi_lowrank_rows<T>(p, bounds.data(), order.data());
}

at::Tensor lora_linear_multi_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scales,
                                 const at::Tensor& adapter_index, at::OptionalIntArrayRef ranks) {
  check_args(x, weight, bias, lora_A, lora_B, scales, adapter_index);
  const int64_t K = x.size(-1), N = weight.size(0), n = lora_A.size(0), r = lora_A.size(1);
  const int64_t M = x.numel() / K;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.view(out_shape);

  // rows grouped by adapter (a stable counting sort), every index checked on the way
  std::vector<int64_t> bounds(n + 2), order(M);
  const at::Tensor idx = adapter_index.contiguous();
  const int64_t bad = idx.scalar_type() == at::kInt
                          ? lora_multi_segments<int32_t>(cptr<int32_t>(idx), M, n, bounds.data(), order.data())
                          : lora_multi_segments<int64_t>(cptr<int64_t>(idx), M, n, bounds.data(), order.data());
  TORCH_CHECK_VALUE(bad < 0, "adapter_index: expected values in [-1, ", n, ") (-1 = base only; n_adapters = ", n,
                    "), got ", bad >= 0 ? idx[bad].item<int64_t>() : 0, " at adapter_index[", bad, "]");
  std::vector<double> s(n);
  const at::Tensor sd = scales.to(at::kDouble).contiguous();
  for (int64_t a = 0; a < n; ++a) s[a] = cptr<double>(sd)[a];
  std::vector<int64_t> rk;
  if (ranks.has_value()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(ranks->size()) == n, "ranks: expected ", n,
                      " entries (one per adapter), got ", ranks->size());
    for (int64_t v : *ranks) TORCH_CHECK_VALUE(v >= 0 && v <= r, "ranks: expected values in [0, ", r, "], got ", v);
    rk.assign(ranks->begin(), ranks->end());
  }

  const at::Tensor x2 = x.reshape({M, K});
  const std::vector<int64_t>* rkp = ranks.has_value() ? &rk : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: lowrank<float>(x2, lora_A, lora_B, bias, s, rkp, y, bounds, order); break;
    case at::kDouble: lowrank<double>(x2, lora_A, lora_B, bias, s, rkp, y, bounds, order); break;
    default: lowrank<bf16_t>(x2, lora_A, lora_B, bias, s, rkp, y, bounds, order); break;
  }
  y.addmm_(x2, weight.t(), 1.0, 1.0);  // y += x Wᵀ  (BLAS, beta = 1 keeps the low-rank rows)
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("lora_linear_multi(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scales, "
        "Tensor adapter_index, int[]? ranks) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("lora_linear_multi", &lora_linear_multi_cpu); }

}  // namespace fastpeft
