// Torch binding of linear_cross_entropy (CPU): the schema, and the chunk loop around the torch-free row
// kernel of linear_cross_entropy_cpu.cpp.  Fake (meta) and autograd live in
// fastpeft/ops/linear_cross_entropy/__init__.py.
//
// linear_cross_entropy_fwd(hidden [N, H], weight [V, H], labels [N] int64, bias [V]?, ...) returns
// (loss, dhidden, dweight, dbias): the loss (float32, float64 for float64 hidden; a scalar, [N] for
// reduction "none") and the gradients of that loss (for "none": of Σ_i loss_i), each gradient not
// asked for an empty [0] tensor.  Per chunk of chunk_size tokens:
//
//   logits = h_c @ W.T (+ b)            at::linear, hidden's dtype          [c, V]
//   rows   = lce_rows_cpu(logits in A)  loss per row, logits -> dL/dlogits (in place; bfloat16 logits
//                                       row by row through a float buffer when no dW / db is asked)
//   dh_c   = dlogits @ W                at::mm into dhidden's rows
//   dW    += dlogits.T @ h_c, db += Σ dlogits    (float32 / float64 accumulators, only when asked)
//
// The GEMMs are ATen's (MKL / oneDNN / OpenBLAS, whichever torch was built with): the three chunk
// GEMMs are ~99% of the op's arithmetic (2·N·H·V each, against O(N·V) for the rows), and a hand-written
// torch-free GEMM would be several times slower than the tuned BLAS torch already links, so the
// torch-free kernel is the row pass, which is the part no BLAS has, and the binding drives the GEMMs.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../common/torch_utils.h"
#include "linear_cross_entropy_cpu.h"

namespace fastpeft {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const c10::optional<at::Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double softcap, c10::string_view reduction_sv, int64_t chunk_size,
    bool need_dh, bool need_dw, bool need_db) {
  const std::string reduction(reduction_sv);
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
              "linear_cross_entropy (cpu): hidden, weight and labels must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && weight.size(0) >= 1,
              "linear_cross_entropy: hidden must be [N, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "linear_cross_entropy (cpu): hidden must be float32, float64 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "linear_cross_entropy: weight must have hidden's dtype ", dt, ", got ",
              weight.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N && labels.scalar_type() == at::kLong,
              "linear_cross_entropy: labels must be int64 [", N, "], got ", labels.scalar_type(), " ", labels.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->scalar_type() == dt && bias->device().is_cpu(),
                "linear_cross_entropy: bias must be a CPU [", V, "] tensor of dtype ", dt, ", got ", bias->sizes());
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "linear_cross_entropy: reduction must be mean, sum or none, got ", reduction);
  TORCH_CHECK(!(reduction == "none" && (need_dw || need_db)),
              "linear_cross_entropy (cpu): weight / bias gradients need reduction mean or sum");
  TORCH_CHECK(chunk_size >= 1, "linear_cross_entropy: chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "linear_cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  need_db = need_db && has_bias;

  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lab = labels.contiguous();
  const bool mean = reduction == "mean";
  const int64_t count = mean ? lab.ne(ignore_index).sum().item<int64_t>() : 0;
  const double scale = mean ? (count > 0 ? 1.0 / static_cast<double>(count) : 0.0) : 1.0;
  const bool grad = need_dh || need_dw || need_db;

  at::Tensor rows = at::empty({N}, hidden.options().dtype(acc));
  at::Tensor dh = need_dh ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor dw_acc = need_dw ? at::zeros({V, H}, weight.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = need_db ? at::zeros({V}, weight.options().dtype(acc)) : at::Tensor();

  // bfloat16 without weight / bias gradients: the row pass reads the bfloat16 logits row by row and
  // writes the gradient over them (no float32 copy of the chunk); the weight / bias gradients take the
  // float32 gradient, so they keep the widened chunk
  const bool rows_in_bf16 = dt == at::kBFloat16 && !need_dw && !need_db;
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t c = std::min(chunk_size, N - start);
    const at::Tensor hc = hidden.narrow(0, start, c);
    const at::Tensor logits = at::linear(hc, weight, has_bias ? *bias : at::Tensor()).contiguous();
    at::Tensor x = rows_in_bf16 ? logits : logits.to(acc).contiguous();  // the same tensor for float32 / float64
    const int64_t* lp = lab.data_ptr<int64_t>() + start;
    int64_t bad = -1;
    if (rows_in_bf16) {
      bad = lce_rows_cpu_bf16(reinterpret_cast<bf16_t*>(x.mutable_data_ptr()), V, c, V, lp, ignore_index,
                              label_smoothing, softcap, scale, grad, rows.data_ptr<float>() + start);
    } else {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_cross_entropy", [&] {
        bad = lce_rows_cpu<scalar_t>(x.data_ptr<scalar_t>(), V, c, V, lp, ignore_index, label_smoothing, softcap,
                                     scale, grad, rows.data_ptr<scalar_t>() + start);
      });
    }
    TORCH_CHECK(bad < 0, "linear_cross_entropy: labels[", start + bad, "] = ", lp[bad < 0 ? 0 : bad],
                " is outside [0, ", V, ") (V = weight.shape[0]) and is not ignore_index (", ignore_index, ")");
    if (!grad) continue;
    const at::Tensor g = x.to(dt);  // dL/dlogits in hidden's dtype for the GEMMs (x itself in bfloat16)
    if (need_dh) {
      at::Tensor out = dh.narrow(0, start, c);
      at::mm_out(out, g, weight);
    }
    if (need_dw) dw_acc.addmm_(x.t(), hc.to(acc));
    if (need_db) db_acc.add_(x.sum(0));
  }

  at::Tensor loss;
  if (reduction == "none") {
    loss = rows;
  } else {
    loss = rows.sum();
    if (mean) loss = loss.div(static_cast<double>(count));  // 0 / 0 = NaN with no label, as torch
  }
  at::Tensor dw = need_dw ? dw_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor db = need_db ? db_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {loss, dh, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def(
      "linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, int ignore_index, "
      "float label_smoothing, float softcap, str reduction, int chunk_size, bool need_dh, bool need_dweight, "
      "bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu_impl); }

}  // namespace fastpeft
