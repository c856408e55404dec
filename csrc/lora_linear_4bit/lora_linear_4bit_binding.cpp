// Torch binding of lora_linear_4bit (CPU): the tiled LoRA layer of ../common/lora_tiled.h with
// dequant4_rows (lora_linear_4bit_cpu.cpp, torch-free) as its decoder, so no full-precision [N, K] copy of
// the 4-bit weight ever exists.  Fake (meta) and autograd registrations live in
// fastpeft/ops/lora_linear_4bit/__init__.py.
//
//   lora_linear_4bit_fwd(x, qweight, absmax, code, N, blocksize, bias, lora_A, lora_B, scale, p, seed)
//       -> (y [..., N], u0 [M, r])
//   lora_linear_4bit_bwd(dy, x, qweight, absmax, code, N, blocksize, lora_A, lora_B, u0, scale, p, seed,
//       needs[4] = x, bias, lora_A, lora_B) -> (dx, db, dA, dB)   (not needed: empty [0])
#include <torch/library.h>

#include "../common/lora_tiled.h"
#include "../common/torch_utils.h"
#include "lora_linear_4bit_cpu.h"

namespace fastpeft {
namespace {

constexpr const char* kOp = "lora_linear_4bit";

// The 4-bit weight's checks; returns the decoder of its row tiles.
auto check_and_decoder(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                       const at::Tensor& code, int64_t N, int64_t blocksize, const lora_tiled::Dims& d) {
  TORCH_CHECK(blocksize >= 2 && (blocksize & (blocksize - 1)) == 0,
              "lora_linear_4bit: blocksize must be a power of two >= 2, got ", blocksize);
  int lb = 0;
  while ((int64_t(1) << lb) < blocksize) ++lb;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "lora_linear_4bit: qweight must be a contiguous uint8 tensor, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.numel() >= (N * d.K + 1) / 2, "lora_linear_4bit: qweight must hold ", (N * d.K + 1) / 2,
              " bytes for a [", N, ", ", d.K, "] weight, got ", qweight.numel());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  absmax.numel() >= (N * d.K + blocksize - 1) / blocksize,
              "lora_linear_4bit: absmax must be contiguous float32 with ", (N * d.K + blocksize - 1) / blocksize,
              " blocks, got ", absmax.scalar_type(), " ", absmax.sizes());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16,
              "lora_linear_4bit: code must be a contiguous float32 [16] table, got ", code.scalar_type(), " ",
              code.sizes());
  for (const at::Tensor* u : {&qweight, &absmax, &code})
    TORCH_CHECK(u->device().is_cpu(), "lora_linear_4bit (cpu): all tensors must be on the CPU, got ", u->device());
  const int64_t K = d.K;
  return [&qweight, &absmax, &code, K, lb](int64_t n0, int64_t rows, at::Tensor& buf) {
    lora_tiled::dispatch(kOp, buf.scalar_type(), [&](auto t, auto) {
      using T = decltype(t);
      dequant4_rows<T>(lora_tiled::cptr<uint8_t>(qweight), lora_tiled::cptr<float>(absmax),
                       lora_tiled::cptr<float>(code), K, lb, n0, rows, lora_tiled::mptr<T>(buf));
    });
  };
}

std::tuple<at::Tensor, at::Tensor> lora_linear_4bit_fwd_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                                            const at::Tensor& absmax, const at::Tensor& code,
                                                            int64_t N, int64_t blocksize,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            double scale, double p, int64_t seed) {
  const lora_tiled::Dims d = lora_tiled::check_lora(kOp, x, N, bias, lora_A, lora_B, p);
  auto decode = check_and_decoder(x, qweight, absmax, code, N, blocksize, d);
  return lora_tiled::forward(kOp, d, decode, x, bias, lora_A, lora_B, scale, p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
    const at::Tensor& code, int64_t N, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& u0, double scale, double p, int64_t seed, std::array<bool, 4> needs) {
  const lora_tiled::Dims d = lora_tiled::check_lora(kOp, x, N, std::nullopt, lora_A, lora_B, p);
  auto decode = check_and_decoder(x, qweight, absmax, code, N, blocksize, d);
  return lora_tiled::backward(kOp, d, decode, dy, x, lora_A, lora_B, u0, scale, p, seed, needs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("lora_linear_4bit_fwd(Tensor x, Tensor qweight, Tensor absmax, Tensor code, int out_features, "
        "int blocksize, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, float dropout_p, int seed) "
        "-> (Tensor, Tensor)");
  m.def("lora_linear_4bit_bwd(Tensor dy, Tensor x, Tensor qweight, Tensor absmax, Tensor code, int out_features, "
        "int blocksize, Tensor lora_A, Tensor lora_B, Tensor u0, float scale, float dropout_p, int seed, "
        "bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear_4bit_fwd", &lora_linear_4bit_fwd_cpu);
  m.impl("lora_linear_4bit_bwd", &lora_linear_4bit_bwd_cpu);
}

}  // namespace fastpeft
