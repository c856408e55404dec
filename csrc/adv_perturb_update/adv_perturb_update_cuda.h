// adv_perturb_update / adv_perturb_init, CUDA kernels and launchers (torch-free).
// dtype: 0 = float32, 1 = float16, 2 = bfloat16; norm/kind codes and semantics as in
// adv_perturb_update_cpu.h.  `mask` is a float [B, L] device array or nullptr.
// `workspace` is a float device buffer of at least adv_perturb_update_cuda_workspace(...)
// elements (init: max(B, 1) elements).  Returns a cudaError_t as int.
//
// Traffic: linf and l2_token read delta and grad once and write delta once (l2_token: one
// block per row, the second read of the row hits L1/L2); l2_example adds one stats read of
// delta and grad (per-row partials -> per-example coefficients -> update), 3 launches.
#pragma once
#include <cstdint>

namespace fastpeft {

int64_t adv_perturb_update_cuda_workspace(int64_t B, int64_t L, int norm);

int adv_perturb_update_cuda(int dtype, void* delta, const void* grad, const float* mask, int64_t B, int64_t L,
                            int64_t H, int norm, double step_size, double epsilon, float* workspace, void* stream);

int adv_perturb_init_cuda(int dtype, void* delta, const float* mask, int64_t B, int64_t L, int64_t H, int kind,
                          int norm, double scale, uint64_t seed, float* workspace, void* stream);

}  // namespace fastpeft
