// Torch binding of grad_tail: schemas, CPU and CUDA implementations.
// Fake (meta) registrations live in fastpeft/ops/grad_tail/__init__.py.
//
//   grad_tail_stats(Tensor[] grads, Tensor inv_scale, float? max_norm, float eps)
//       -> (Tensor multiplier, Tensor total_norm, Tensor found_inf)     all float32, shape (), on inv_scale's device
//   grad_tail_apply_(Tensor(a!)[] grads, Tensor multiplier) -> ()       grads *= multiplier, in place
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/torch_utils.h"
#include "grad_tail_cpu.h"
#ifdef FASTPEFT_WITH_CUDA
#include "grad_tail_cuda.h"
#endif

namespace fastpeft {
namespace {

int32_t dtype_code(at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kFloat: return GT_F32;
    case at::kHalf: return GT_F16;
    case at::kBFloat16: return GT_BF16;
    case at::kDouble: return GT_F64;
    default: TORCH_CHECK(false, "grad_tail: grads[", i, "] must be float32, float16, bfloat16 or float64, got ", t);
  }
  return -1;
}

void check_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, "grad_tail: ", name,
              " must be a float32 tensor with one element, got ", t.scalar_type(), " of shape ", t.sizes());
}

// Raw views of a tensor list; non-contiguous tensors are read through contiguous copies
// (kept alive in `keep`), which is only valid for reading.
struct RawList {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<int32_t> dtypes;
  std::vector<at::Tensor> keep;
};

RawList raw_list(at::TensorList grads, const at::Device& device, bool for_writing) {
  RawList r;
  const int64_t n = static_cast<int64_t>(grads.size());
  r.ptrs.reserve(n);
  r.numels.reserve(n);
  r.dtypes.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.device() == device, "grad_tail: grads[", i, "] is on ", g.device(), ", expected ", device,
                " (the device of the scale tensor)");
    const int32_t code = dtype_code(g.scalar_type(), i);
    if (g.numel() == 0) continue;
    if (!g.is_contiguous()) {
      TORCH_CHECK(!for_writing, "grad_tail: internal error, non-contiguous tensor on the fused write path");
      r.keep.push_back(g.contiguous());
      r.ptrs.push_back(r.keep.back().data_ptr());
    } else {
      r.ptrs.push_back(g.data_ptr());
    }
    r.numels.push_back(g.numel());
    r.dtypes.push_back(code);
  }
  return r;
}

// Contiguous grads go to the fused kernel; the (rare) non-contiguous ones are scaled one by one.
std::vector<at::Tensor> contiguous_only(at::TensorList grads, const at::Tensor& multiplier) {
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (const at::Tensor& g : grads) {
    if (g.is_contiguous())
      out.push_back(g);
    else
      g.mul_(multiplier);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_cpu(at::TensorList grads, const at::Tensor& inv_scale,
                                                         std::optional<double> max_norm, double eps) {
  check_scalar(inv_scale, "inv_scale");
  RawList r = raw_list(grads, inv_scale.device(), false);
  const float s = inv_scale.item<float>();
  const GradTailResult res = grad_tail_stats_cpu(static_cast<int64_t>(r.ptrs.size()), r.ptrs.data(), r.numels.data(),
                                                 r.dtypes.data(), s, max_norm.has_value() ? *max_norm : -1.0, eps);
  auto opts = inv_scale.options().dtype(at::kFloat);
  return {at::full({}, res.multiplier, opts), at::full({}, res.total_norm, opts), at::full({}, res.found_inf, opts)};
}

void apply_cpu(at::TensorList grads, const at::Tensor& multiplier) {
  check_scalar(multiplier, "multiplier");
  const std::vector<at::Tensor> cont = contiguous_only(grads, multiplier);
  RawList r = raw_list(cont, multiplier.device(), true);
  grad_tail_apply_cpu(static_cast<int64_t>(r.ptrs.size()), r.ptrs.data(), r.numels.data(), r.dtypes.data(),
                      multiplier.item<float>());
}

#ifdef FASTPEFT_WITH_CUDA
// Packs the metadata into pinned memory and uploads it with one async copy.
at::Tensor upload_meta(const RawList& r, int64_t n_chunks, size_t extra_bytes, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(r.ptrs.size());
  const size_t meta = grad_tail_cuda_meta_bytes(n, n_chunks);
  auto host = at::empty({static_cast<int64_t>(meta)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  grad_tail_cuda_pack_meta(host.data_ptr(), n, r.ptrs.data(), r.numels.data(), r.dtypes.data(), n_chunks);
  auto dev = at::empty({static_cast<int64_t>(meta + extra_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.narrow(0, 0, static_cast<int64_t>(meta)).copy_(host, /*non_blocking=*/true);
  return dev;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_cuda(at::TensorList grads, const at::Tensor& inv_scale,
                                                          std::optional<double> max_norm, double eps) {
  check_scalar(inv_scale, "inv_scale");
  c10::cuda::CUDAGuard guard(inv_scale.device());
  RawList r = raw_list(grads, inv_scale.device(), false);
  const int64_t n = static_cast<int64_t>(r.ptrs.size());
  const int64_t n_chunks = grad_tail_cuda_num_chunks(n, r.numels.data());
  at::Tensor buf = upload_meta(r, n_chunks, grad_tail_cuda_workspace_bytes(n_chunks), inv_scale.device());
  auto opts = inv_scale.options().dtype(at::kFloat);
  at::Tensor mult = at::empty({}, opts), norm = at::empty({}, opts), found = at::empty({}, opts);
  const at::Tensor s = inv_scale.contiguous();
  FASTPEFT_CHECK_CUDA_LAUNCH(grad_tail_stats_cuda(buf.data_ptr(), n, n_chunks, s.data_ptr<float>(),
                                                  max_norm.has_value() ? *max_norm : -1.0, eps, mult.data_ptr<float>(),
                                                  norm.data_ptr<float>(), found.data_ptr<float>(),
                                                  FASTPEFT_CUDA_STREAM()));
  return {mult, norm, found};
}

void apply_cuda(at::TensorList grads, const at::Tensor& multiplier) {
  check_scalar(multiplier, "multiplier");
  c10::cuda::CUDAGuard guard(multiplier.device());
  const std::vector<at::Tensor> cont = contiguous_only(grads, multiplier);
  RawList r = raw_list(cont, multiplier.device(), true);
  const int64_t n = static_cast<int64_t>(r.ptrs.size());
  const int64_t n_chunks = grad_tail_cuda_num_chunks(n, r.numels.data());
  if (n_chunks == 0) return;
  at::Tensor buf = upload_meta(r, n_chunks, 0, multiplier.device());
  const at::Tensor m = multiplier.contiguous();
  FASTPEFT_CHECK_CUDA_LAUNCH(grad_tail_apply_cuda(buf.data_ptr(), n, n_chunks, m.data_ptr<float>(),
                                                  FASTPEFT_CUDA_STREAM()));
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("grad_tail_stats(Tensor[] grads, Tensor inv_scale, float? max_norm, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("grad_tail_apply_(Tensor(a!)[] grads, Tensor multiplier) -> ()");
}
TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("grad_tail_stats", &stats_cpu);
  m.impl("grad_tail_apply_", &apply_cpu);
}
#ifdef FASTPEFT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("grad_tail_stats", &stats_cuda);
  m.impl("grad_tail_apply_", &apply_cuda);
}
#endif

}  // namespace fastpeft
