// A LoRA linear layer over a frozen weight that exists only in a compressed form (4-bit, int8), for the
// thin CPU bindings of lora_linear_4bit and lora_linear_8bit.  The frozen GEMMs walk the weight tile by
// tile: the op's decoder writes TN rows of W into a cache-sized buffer [TN, K] in x's dtype and BLAS
// (ATen's mm) consumes it, so no full-precision [N, K] copy of W ever exists.  The dropout around the
// low-rank products is lora_linear's torch-free kernels (same Philox stream 0 and addressing, so the same
// seed drops the same elements as lora_linear on every backend).
//
//   decode(n0, rows, buf): buf[0 : rows] = W[n0 : n0 + rows] in buf's dtype (float, double or bf16)
//
// Forward:  U0 = drop(x) Aᵀ;  y = b + s · U0 Bᵀ;  y[:, tile] += x · tileᵀ for every tile of W.
// Backward (derivation in fastpeft/ops/lora_linear/reference.py, W frozen):
//   G = s dY B,  dB = s dYᵀ U0,  dA = Gᵀ drop(x),  dX = Σ_tiles dY[:, tile] W[tile] + (G A) ∘ keep/(1-p),
//   db = Σ dY.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../lora_linear/lora_linear_cpu.h"
#include "philox.h"

namespace fastpeft {
namespace lora_tiled {

constexpr uint32_t kStream = 0;  // Philox stream of the LoRA dropout mask (as lora_linear)

struct Dims {
  int64_t M, K, N, r;
};

// Checks what every tiled LoRA op takes besides its compressed weight (x [..., K] on the CPU in
// float32 / float64 / bfloat16, lora_A [r, K], lora_B [N, r], bias [N], dropout_p); `op` names the op.
inline Dims check_lora(const char* op, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double p) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got shape ", x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK(N >= 1, op, ": out_features must be >= 1, got ", N);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1, op, ": lora_A must be [r, ", K,
              "] with r >= 1, got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r, op, ": lora_B must be [", N, ", ",
              r, "], got ", lora_B.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, op,
              " (cpu): x must be float32, float64 or bfloat16, got ", t);
  TORCH_CHECK(lora_A.scalar_type() == t || lora_A.scalar_type() == at::kFloat, op,
              ": lora_A must have the dtype of x (", t, ") or float32, got ", lora_A.scalar_type());
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), op, ": lora_B must have the dtype of lora_A");
  for (const at::Tensor* u : {&x, &lora_A, &lora_B})
    TORCH_CHECK(u->device().is_cpu(), op, " (cpu): all tensors must be on the CPU, got ", u->device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == t, op, ": bias must have the dtype of x (", t, "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), op, " (cpu): bias must be on the CPU");
  }
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  const int64_t M = K > 0 ? x.numel() / K : 0;
  return {M, K, N, r};
}

// Rows per chunk of the dropout workspace (as lora_linear): about 512 Ki elements, at least 16 rows.
inline int64_t chunk_rows(int64_t M, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(M, std::max<int64_t>(16, (int64_t(1) << 19) / std::max<int64_t>(K, 1))));
}

// Rows of W per decoded tile: about 64 Ki elements (256 KiB in fp32, an L2-sized buffer), a multiple of
// 16 (at least 16), at most N.
inline int64_t tile_rows(int64_t N, int64_t K) {
  const int64_t t = std::max<int64_t>(16, ((int64_t(1) << 16) / std::max<int64_t>(K, 1)) / 16 * 16);
  return std::min(N, t);
}

// f(T{}, W{}) with T the activation type and W the working (accumulation) type.
template <typename F>
void dispatch(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(bf16_t{}, float{}); break;
    default: TORCH_CHECK(false, op, " (cpu): unsupported dtype ", t);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }
template <typename T>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }

// Calls f(n0, rows, tile) for consecutive tiles of W's rows, tile = W[n0 : n0 + rows] in opts' dtype.
template <typename Decode, typename F>
void for_each_tile(const Dims& d, const at::TensorOptions& opts, Decode&& decode, F&& f) {
  const int64_t TN = tile_rows(d.N, d.K);
  at::Tensor buf = at::empty({TN, d.K}, opts);
  for (int64_t n0 = 0; n0 < d.N; n0 += TN) {
    const int64_t rows = std::min(TN, d.N - n0);
    decode(n0, rows, buf);
    f(n0, rows, buf.narrow(0, 0, rows));
  }
}

template <typename Decode>
std::tuple<at::Tensor, at::Tensor> forward(const char* op, const Dims& d, Decode&& decode, const at::Tensor& x,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scale, double p, int64_t seed) {
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
      dispatch(op, act, [&](auto t, auto) {
        using T = decltype(t);
        lora_dropout_rows<T, T>(cptr<T>(x2), x2.stride(0), x2.stride(1), r0, c, d.K, static_cast<uint64_t>(seed),
                                kStream, thr, inv, mptr<T>(buf), nullptr);
      });
      at::Tensor u0c = u0.narrow(0, r0, c);
      at::mm_out(u0c, buf.narrow(0, 0, c), A.t());
    }
  }
  // y = b + s · U0 Bᵀ, then y[:, tile] += x · tileᵀ for each decoded tile of W (beta = 1).
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d.N;
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor y = out.view({d.M, d.N});
  if (bias.has_value())
    at::addmm_out(y, *bias, u0, B.t(), 1.0, scale);
  else
    at::addmm_out(y, y, u0, B.t(), 0.0, scale);
  if (d.M > 0)
    for_each_tile(d, x.options(), decode, [&](int64_t n0, int64_t rows, const at::Tensor& tile) {
      y.narrow(1, n0, rows).addmm_(x2, tile.t(), 1.0, 1.0);
    });
  return {out, u0};
}

template <typename Decode>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const char* op, const Dims& d, Decode&& decode, const at::Tensor& dy, const at::Tensor& x,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u0, double scale, double p, int64_t seed,
    std::array<bool, 4> needs) {
  TORCH_CHECK(dy.numel() == d.M * d.N && dy.size(-1) == d.N, op, "_bwd: dy must be [..., ", d.N, "] with ", d.M,
              " rows, got ", dy.sizes());
  TORCH_CHECK(u0.dim() == 2 && u0.size(0) == d.M && u0.size(1) == d.r, op, "_bwd: u0 must be [", d.M, ", ", d.r,
              "], got ", u0.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && u0.scalar_type() == x.scalar_type(), op,
              "_bwd: dy and u0 must have the dtype of x");
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
        dispatch(op, act, [&](auto t, auto w) {
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
      for_each_tile(d, x.options(), decode, [&](int64_t n0, int64_t rows, const at::Tensor& tile) {
        dx.addmm_(dy2.narrow(1, n0, rows), tile, 1.0, 1.0);  // dX += dY[:, tile] W[tile]
      });
    dx = dx.view(x.sizes());
  }
  if (need_b) db = dy2.sum(0);
  return {dx, db, dA, dB};
}

}  // namespace lora_tiled
}  // namespace fastpeft
