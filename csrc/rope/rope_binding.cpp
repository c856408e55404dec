// Torch binding of rope (CPU): schema and the CPU implementation of the torch-free kernel in
// rope_cpu.cpp.  Fake (meta) and autograd registrations live in fastpeft/ops/rope/__init__.py.
//
// rope(q, k, cos, sin, unsqueeze_dim, transpose) -> (q_out, k_out)
//   q [B, Hq, S, D] and k [B, Hk, S, D] (unsqueeze_dim = 1) or [B, S, Hq, D] / [B, S, Hk, D]
//   (unsqueeze_dim = 2), any strides; cos, sin [Bc, S, rd] with Bc in {1, B}, rd even and <= D.
//   Outputs have the shape and memory layout of q / k (empty_like; contiguous when the last dim of
//   that layout would not be) and dtype promote(q.dtype, cos.dtype), as `q * cos` has.
//   transpose = true applies the adjoint rotation (the backward).
#include <torch/library.h>

#include <tuple>

#include "../common/torch_utils.h"
#include "rope_cpu.h"

namespace fastpeft {
namespace {

// Output of the layout of t (see the file comment); the Python fake does the same.
at::Tensor out_like(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor out = at::empty_like(t, t.options().dtype(dtype));
  return out.stride(-1) == 1 ? out : at::empty(t.sizes(), t.options().dtype(dtype));
}

struct Dims {
  int64_t B, S, H, D;
  RopeStrides strides;
};

Dims dims_of(const at::Tensor& t, int64_t unsqueeze_dim) {
  const int64_t hd = unsqueeze_dim, sd = 3 - unsqueeze_dim;  // head and position dims
  return {t.size(0), t.size(sd), t.size(hd), t.size(3), {t.stride(0), t.stride(sd), t.stride(hd)}};
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                int64_t unsqueeze_dim) {
  TORCH_CHECK(unsqueeze_dim == 1 || unsqueeze_dim == 2, "rope: unsqueeze_dim must be 1 or 2, got ", unsqueeze_dim);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rope: q and k must be 4-D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(), "rope: cos and sin must be [B or 1, S, rd] of one shape, got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == sin.scalar_type(),
              "rope: q and k must share a dtype, and cos and sin, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              cos.scalar_type(), ", ", sin.scalar_type());
  for (const at::Tensor* t : {&q, &k, &cos, &sin})
    TORCH_CHECK(t->device().is_cpu(), "rope (cpu): all tensors must be on the CPU, got ", t->device());
  const Dims dq = dims_of(q, unsqueeze_dim), dk = dims_of(k, unsqueeze_dim);
  TORCH_CHECK(dk.B == dq.B && dk.S == dq.S && dk.D == dq.D, "rope: k ", k.sizes(), " does not match q ", q.sizes(),
              " in batch, positions or head dim");
  const int64_t rd = cos.size(2);
  TORCH_CHECK((cos.size(0) == dq.B || cos.size(0) == 1) && cos.size(1) == dq.S && rd % 2 == 0 && rd >= 2 && rd <= dq.D,
              "rope: cos must be [", dq.B, " or 1, ", dq.S, ", rd] with rd even, 2 <= rd <= ", dq.D, ", got ",
              cos.sizes());
}

std::tuple<at::Tensor, at::Tensor> rope_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin, int64_t unsqueeze_dim, bool transpose) {
  check_args(q, k, cos, sin, unsqueeze_dim);
  const auto out = at::promote_types(q.scalar_type(), cos.scalar_type());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor c = cos.to(acc).contiguous(), s = sin.to(acc).contiguous();
  const int64_t csb = c.size(0) == 1 ? 0 : c.size(1) * c.size(2);
  auto run = [&](const at::Tensor& t) {
    const at::Tensor x = t.stride(-1) == 1 ? t : t.contiguous();
    at::Tensor y = out_like(t, out);
    const Dims dx = dims_of(x, unsqueeze_dim), dy = dims_of(y, unsqueeze_dim);
    dispatch_in_out_cpu(x.scalar_type(), out, "rope", [&](auto ti, auto to) {
      using T = decltype(ti);
      using O = decltype(to);
      using A = typename acc<T>::type;
      rope_cpu<T, O>(cpu_ptr<T>(x), dx.strides, cpu_ptr<O>(y), dy.strides, dx.B, dx.S, dx.H, dx.D, cpu_ptr<A>(c),
                     cpu_ptr<A>(s), csb, c.size(2), transpose);
    });
    return y;
  };
  return {run(q), run(k)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, int unsqueeze_dim, bool transpose) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) { m.impl("rope", &rope_cpu_impl); }

}  // namespace fastpeft
