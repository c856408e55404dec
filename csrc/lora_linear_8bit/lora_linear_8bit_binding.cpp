// Torch binding of lora_linear_8bit (CPU): the tiled LoRA layer of ../common/lora_tiled.h with
// dequant8_rows (lora_linear_8bit_cpu.cpp, torch-free) as its decoder, so no full-precision [N, K] copy of
// the int8 weight ever exists.  Fake (meta) and autograd registrations live in
// fastpeft/ops/lora_linear_8bit/__init__.py.
//
//   lora_linear_8bit_fwd(x, weight, row_scale, bias, lora_A, lora_B, scale, p, seed) -> (y [..., N], u0 [M, r])
//   lora_linear_8bit_bwd(dy, x, weight, row_scale, lora_A, lora_B, u0, scale, p, seed,
//       needs[4] = x, bias, lora_A, lora_B) -> (dx, db, dA, dB)   (not needed: empty [0])
#include <torch/library.h>

#include "../common/lora_tiled.h"
#include "../common/torch_utils.h"
#include "lora_linear_8bit_cpu.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "lora_linear_8bit";

// The int8 weight's checks (N = weight.size(0)); returns the dims and the decoder of its row tiles.
auto check_and_decoder(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                       double p) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "lora_linear_8bit: weight must be a contiguous int8 [N, K] tensor, got ", weight.scalar_type(), " ",
              weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && weight.size(1) == x.size(-1), "lora_linear_8bit: weight must be [N, ", x.size(-1),
              "] (K = x.size(-1)), got ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == N && row_scale.scalar_type() == at::kFloat &&
                  row_scale.is_contiguous(),
              "lora_linear_8bit: row_scale must be contiguous float32 [", N, "], got ", row_scale.scalar_type(), " ",
              row_scale.sizes());
  for (const at::Tensor* u : {&weight, &row_scale})
    TORCH_CHECK(u->device().is_cpu(), "lora_linear_8bit (cpu): all tensors must be on the CPU, got ", u->device());
  const lora_tiled::Dims d = lora_tiled::check_lora(kOp, x, N, bias, lora_A, lora_B, p);
  const int64_t K = d.K;
  auto decode = [&weight, &row_scale, K](int64_t n0, int64_t rows, at::Tensor& buf) {
    lora_tiled::dispatch(kOp, buf.scalar_type(), [&](auto t, auto) {
      using T = decltype(t);
      dequant8_rows<T>(lora_tiled::cptr<int8_t>(weight), lora_tiled::cptr<float>(row_scale), K, n0, rows,
                       lora_tiled::mptr<T>(buf));
    });
  };
  return std::make_pair(d, decode);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_8bit_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& row_scale,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            double scale, double p, int64_t seed) {
  auto [d, decode] = check_and_decoder(x, weight, row_scale, bias, lora_A, lora_B, p);
  return lora_tiled::forward(kOp, d, decode, x, bias, lora_A, lora_B, scale, p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_8bit_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_scale,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u0, double scale, double p, int64_t seed,
    std::array<bool, 4> needs) {
  auto [d, decode] = check_and_decoder(x, weight, row_scale, std::nullopt, lora_A, lora_B, p);
  return lora_tiled::backward(kOp, d, decode, dy, x, lora_A, lora_B, u0, scale, p, seed, needs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("lora_linear_8bit_fwd(Tensor x, Tensor weight, Tensor row_scale, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_linear_8bit_bwd(Tensor dy, Tensor x, Tensor weight, Tensor row_scale, Tensor lora_A, Tensor lora_B, "
        "Tensor u0, float scale, float dropout_p, int seed, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear_8bit_fwd", &lora_linear_8bit_fwd_cpu);
  m.impl("lora_linear_8bit_bwd", &lora_linear_8bit_bwd_cpu);
}

}  // namespace fastpeft
