// Torch binding of lora_linear_4bit (CPU).  The frozen GEMMs walk the 4-bit weight tile by tile:
// dequant4_rows (lora_linear_4bit_cpu.cpp, torch-free) decodes TN rows of W into a cache-sized buffer
// [TN, K] and BLAS (ATen's mm) consumes it, so no full-precision [N, K] copy of W ever exists.  The
// dropout around the low-rank products reuses lora_linear's torch-free kernels (same Philox stream 0
// and addressing, so the same seed drops the same elements as lora_linear on every backend).
// Fake (meta) and autograd registrations live in fastpeft/ops/lora_linear_4bit/__init__.py.
//
//   lora_linear_4bit_fwd(x, qweight, absmax, code, N, blocksize, bias, lora_A, lora_B, scale, p, seed)
//       -> (y [..., N], u0 [M, r])
//   lora_linear_4bit_bwd(dy, x, qweight, absmax, code, N, blocksize, lora_A, lora_B, u0, scale, p, seed,
//       needs[4] = x, bias, lora_A, lora_B) -> (dx, db, dA, dB)   (not needed: empty [0])
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "../common/philox.h"
#include "../common/torch_utils.h"
#include "../lora_linear/lora_linear_cpu.h"
#include "lora_linear_4bit_cpu.h"

namespace fastpeft {
namespace {

constexpr uint32_t kStream = 0;  // Philox stream of the LoRA dropout mask (as lora_linear)

struct Dims {
  int64_t M, K, N, r;
  int log2_bs;
};

Dims check_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                int64_t N, int64_t blocksize, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                const at::Tensor& lora_B, double p) {
  TORCH_CHECK(x.dim() >= 1, "lora_linear_4bit: x must be [..., K], got shape ", x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK(N >= 1, "lora_linear_4bit: out_features must be >= 1, got ", N);
  TORCH_CHECK(blocksize >= 2 && (blocksize & (blocksize - 1)) == 0,
              "lora_linear_4bit: blocksize must be a power of two >= 2, got ", blocksize);
  int lb = 0;
  while ((int64_t(1) << lb) < blocksize) ++lb;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "lora_linear_4bit: qweight must be a contiguous uint8 tensor, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.numel() >= (N * K + 1) / 2, "lora_linear_4bit: qweight must hold ", (N * K + 1) / 2,
              " bytes for a [", N, ", ", K, "] weight, got ", qweight.numel());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  absmax.numel() >= (N * K + blocksize - 1) / blocksize,
              "lora_linear_4bit: absmax must be contiguous float32 with ", (N * K + blocksize - 1) / blocksize,
              " blocks, got ", absmax.scalar_type(), " ", absmax.sizes());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16,
              "lora_linear_4bit: code must be a contiguous float32 [16] table, got ", code.scalar_type(), " ",
              code.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1,
              "lora_linear_4bit: lora_A must be [r, ", K, "] with r >= 1, got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r, "lora_linear_4bit: lora_B must be [",
              N, ", ", r, "], got ", lora_B.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "lora_linear_4bit (cpu): x must be float32, float64 or bfloat16, got ", t);
  TORCH_CHECK(lora_A.scalar_type() == t || lora_A.scalar_type() == at::kFloat,
              "lora_linear_4bit: lora_A must have the dtype of x (", t, ") or float32, got ", lora_A.scalar_type());
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), "lora_linear_4bit: lora_B must have the dtype of lora_A");
  for (const at::Tensor* u : {&x, &qweight, &absmax, &code, &lora_A, &lora_B})
    TORCH_CHECK(u->device().is_cpu(), "lora_linear_4bit (cpu): all tensors must be on the CPU, got ", u->device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lora_linear_4bit: bias must be [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == t, "lora_linear_4bit: bias must have the dtype of x (", t, "), got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), "lora_linear_4bit (cpu): bias must be on the CPU");
  }
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_linear_4bit: dropout_p must be in [0, 1), got ", p);
  const int64_t M = K > 0 ? x.numel() / K : 0;
  return {M, K, N, r, lb};
}

// Rows per chunk of the dropout workspace (as lora_linear): about 512 Ki elements, at least 16 rows.
int64_t chunk_rows(int64_t M, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(16, (int64_t(1) << 19) / std::max<int64_t>(K, 1))));
}

// Rows of W per dequantised tile: about 64 Ki elements (256 KiB in fp32, an L2-sized buffer), a multiple
// of 16 (at least 16), at most N.
int64_t tile_rows(int64_t N, int64_t K) {
  const int64_t t = std::max<int64_t>(16, ((int64_t(1) << 16) / std::max<int64_t>(K, 1)) / 16 * 16);
  return std::min(N, t);
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(bf16_t{}, float{}); break;
    default: TORCH_CHECK(false, "lora_linear_4bit (cpu): unsupported dtype ", t);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }
template <typename T>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }

// Calls f(n0, rows, tile) for consecutive tiles of W's rows, tile = dequant(W)[n0 : n0 + rows] in x's dtype.
template <typename F>
void for_each_tile(const Dims& d, const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                   const at::TensorOptions& opts, F&& f) {
  const int64_t TN = tile_rows(d.N, d.K);
  at::Tensor buf = at::empty({TN, d.K}, opts);
  for (int64_t n0 = 0; n0 < d.N; n0 += TN) {
    const int64_t rows = std::min(TN, d.N - n0);
    dispatch(opts.dtype().toScalarType(), [&](auto t, auto) {
      using T = decltype(t);
      dequant4_rows<T>(cptr<uint8_t>(qweight), cptr<float>(absmax), cptr<float>(code), d.K, d.log2_bs, n0, rows,
                       mptr<T>(buf));
    });
    f(n0, rows, buf.narrow(0, 0, rows));
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear_4bit_fwd_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                                            const at::Tensor& absmax, const at::Tensor& code,
                                                            int64_t N, int64_t blocksize,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                            double scale, double p, int64_t seed) {
  const Dims d = check_args(x, qweight, absmax, code, N, blocksize, bias, lora_A, lora_B, p);
  const auto act = x.scalar_type();
  const at::Tensor x2 = x.reshape({d.M, d.K});
  const at::Tensor A = lora_A.to(act), B = lora_B.to(act);
  at::Tensor u0;  // U0 = drop(x) Aᵀ, drop(x) chunk by chunk
  if (p == 0.0) {
    u0 = at::mm(x2, A.t());
  } else {
    u0 = at::empty({d.M, d.r}, x.options());
    const int64_t C = chunk_rows(d.M, d.K);
    at::Tensor buf = at::empty({C, d.K}, x.options());
    const uint32_t thr = dropout_threshold(p);
    const double inv = 1.0 / (1.0 - p);
    for (int64_t r0 = 0; r0 < d.M; r0 += C) {
      const int64_t c = std::min(C, d.M - r0);
      dispatch(act, [&](auto t, auto) {
        using T = decltype(t);
        lora_dropout_rows<T, T>(cptr<T>(x2), x2.stride(0), x2.stride(1), r0, c, d.K, static_cast<uint64_t>(seed),
                                kStream, thr, inv, mptr<T>(buf), nullptr);
      });
      at::Tensor u0c = u0.narrow(0, r0, c);
      at::mm_out(u0c, buf.narrow(0, 0, c), A.t());
    }
  }
  // y = b + s · U0 Bᵀ, then y[:, tile] += x · tileᵀ for each dequantised tile of W (beta = 1).
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d.N;
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor y = out.view({d.M, d.N});
  if (bias.has_value())
    at::addmm_out(y, *bias, u0, B.t(), 1.0, scale);
  else
    at::addmm_out(y, y, u0, B.t(), 0.0, scale);
  if (d.M > 0)
    for_each_tile(d, qweight, absmax, code, x.options(), [&](int64_t n0, int64_t rows, const at::Tensor& tile) {
      y.narrow(1, n0, rows).addmm_(x2, tile.t(), 1.0, 1.0);
    });
  return {out, u0};
}

// Backward (derivation in fastpeft/ops/lora_linear/reference.py, W = dequant(qweight) frozen):
//   G = s dY B,  dB = s dYᵀ U0,  dA = Gᵀ drop(x),  dX = Σ_tiles dY[:, tile] W[tile] + (G A) ∘ keep/(1-p),
//   db = Σ dY.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
    const at::Tensor& code, int64_t N, int64_t blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& u0, double scale, double p, int64_t seed, std::array<bool, 4> needs) {
  const Dims d = check_args(x, qweight, absmax, code, N, blocksize, std::nullopt, lora_A, lora_B, p);
  TORCH_CHECK(dy.numel() == d.M * d.N && dy.size(-1) == d.N, "lora_linear_4bit_bwd: dy must be [..., ", d.N,
              "] with ", d.M, " rows, got ", dy.sizes());
  TORCH_CHECK(u0.dim() == 2 && u0.size(0) == d.M && u0.size(1) == d.r, "lora_linear_4bit_bwd: u0 must be [", d.M,
              ", ", d.r, "], got ", u0.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && u0.scalar_type() == x.scalar_type(),
              "lora_linear_4bit_bwd: dy and u0 must have the dtype of x");
  const bool need_x = needs[0], need_b = needs[1], need_A = needs[2], need_B = needs[3];
  const auto act = x.scalar_type();
  const auto work = act == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x2 = x.reshape({d.M, d.K});
  const at::Tensor dy2 = dy.reshape({d.M, d.N});
  const at::Tensor B = lora_B.to(act);
  auto none = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor dx = none(x), db = none(x), dA = none(lora_A), dB = none(lora_B);

  at::Tensor g;  // G = s dY B  [M, r]
  if (need_x || need_A) g = at::mm(dy2, B).mul_(scale);
  if (need_B) dB = at::mm(u0.t(), dy2).mul_(scale).t().contiguous().to(lora_B.scalar_type());
  if (need_x || need_A) {
    if (p == 0.0) {
      if (need_A) dA = at::mm(g.t(), x2).to(lora_A.scalar_type());
      if (need_x) dx = at::mm(g, lora_A.to(act));
    } else {
      if (need_x) dx = at::empty({d.M, d.K}, x.options());
      const at::Tensor gw = g.to(work), Aw = lora_A.to(work);
      at::Tensor dA_acc = need_A ? at::zeros({d.r, d.K}, x.options().dtype(work)) : at::Tensor();
      const int64_t C = chunk_rows(d.M, d.K);
      at::Tensor buf = at::empty({C, d.K}, x.options().dtype(work));
      at::Tensor keep = at::empty({C, d.K}, x.options().dtype(at::kByte));
      const uint32_t thr = dropout_threshold(p);
      const double inv = 1.0 / (1.0 - p);
      for (int64_t r0 = 0; r0 < d.M; r0 += C) {
        const int64_t c = std::min(C, d.M - r0);
        at::Tensor bufc = buf.narrow(0, 0, c);
        const at::Tensor gc = gw.narrow(0, r0, c);
        dispatch(act, [&](auto t, auto w) {
          using T = decltype(t);
          using W = decltype(w);
          lora_dropout_rows<T, W>(cptr<T>(x2), x2.stride(0), x2.stride(1), r0, c, d.K, static_cast<uint64_t>(seed),
                                  kStream, thr, inv, mptr<W>(buf), mptr<uint8_t>(keep));
          if (need_A) dA_acc.addmm_(gc.t(), bufc);
          if (need_x) {
            at::mm_out(bufc, gc, Aw);
            lora_masked_store<T, W>(cptr<W>(buf), cptr<uint8_t>(keep), c, d.K, inv, mptr<T>(dx) + r0 * d.K, d.K);
          }
        });
      }
      if (need_A) dA = dA_acc.to(lora_A.scalar_type());
    }
  }
  if (need_x) {
    if (d.M > 0)
      for_each_tile(d, qweight, absmax, code, x.options(), [&](int64_t n0, int64_t rows, const at::Tensor& tile) {
        dx.addmm_(dy2.narrow(1, n0, rows), tile, 1.0, 1.0);  // dX += dY[:, tile] W[tile]
      });
    dx = dx.view(x.sizes());
  }
  if (need_b) db = dy2.sum(0);
  return {dx, db, dA, dB};
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
