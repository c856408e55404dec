// grad_tail, C++ CPU kernels (torch-free): the fused mixed-precision gradient tail.
//
// A tensor list is described by plain arrays (pointer, numel, dtype code per
// tensor).  Work is split into fixed chunks of GRAD_TAIL_CPU_CHUNK elements of one
// tensor; OpenMP runs over chunks.  The reduction is deterministic: every chunk
// writes its own partial sum and the partials are added in chunk order, so the
// result does not depend on the number of threads.
//
//   stats:  sumsq  = sum_i (g_i * inv_scale)^2          (fp32 inside a chunk, fp64 across chunks)
//           found  = any(!isfinite(g_i))
//           norm   = sqrt(sumsq)
//           mult   = found ? 0 : inv_scale * (max_norm < 0 ? 1 : min(1, max_norm / (norm + eps)))
//   apply:  g_i   *= mult   (skipped entirely when mult == 1)
#pragma once
#include <cstdint>

namespace fastpeft {

// dtype codes of the tensor list (shared with the CUDA launcher).
enum GradTailDtype : int32_t { GT_F32 = 0, GT_F16 = 1, GT_BF16 = 2, GT_F64 = 3 };

constexpr int64_t GRAD_TAIL_CPU_CHUNK = 1 << 15;

struct GradTailResult {
  float multiplier;
  float total_norm;
  float found_inf;  // 1.0f or 0.0f
};

// max_norm < 0 means "no clipping".
GradTailResult grad_tail_stats_cpu(int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                                   const int32_t* dtypes, float inv_scale, double max_norm, double eps);

void grad_tail_apply_cpu(int64_t n_tensors, void* const* ptrs, const int64_t* numels, const int32_t* dtypes,
                         float multiplier);

// Half <-> float (IEEE binary16, round to nearest even), exposed for the C++ test.
float gt_half_to_float(uint16_t h);
uint16_t gt_float_to_half(float f);

}  // namespace fastpeft
