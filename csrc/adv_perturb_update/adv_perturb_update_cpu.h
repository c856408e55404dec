// adv_perturb_update / adv_perturb_init, C++ CPU kernels (torch-free, OpenMP).
//
// delta, grad: [B, L, H] contiguous; mask: [B, L] float (nonzero = real token)
// or nullptr (all real).  Semantics in fastpeft/ops/adv_perturb_update/reference.py:
//   norm 0 = linf:       d' = d + step * sign(g), clamp to [-eps, eps]
//   norm 1 = l2_token:   d' = d + step * g / max(|g_t|, 1e-8), scaled into the per-token eps-ball
//   norm 2 = l2_example: d' = d + step * g / max(|g_b|, 1e-8), scaled into the per-example eps-ball
// eps <= 0: no projection.  Padding rows of delta are written as exact zeros.
// The L2 projections use the analytic norm |d + a g|^2 = |d|^2 + 2a<d,g> + a^2|g|^2, so
// l2_token is one pass over each row and l2_example is a stats pass plus an update pass.
#pragma once
#include <cstdint>
#include "../common/dtypes.h"

namespace fastpeft {

enum AdvNorm : int { kAdvLinf = 0, kAdvL2Token = 1, kAdvL2Example = 2 };
enum AdvInitKind : int { kAdvUniform = 0, kAdvNormal = 1 };

constexpr uint32_t kAdvInitStream = 2;   // Philox stream of the random init
constexpr double kAdvNormFloor = 1e-8;   // FreeLB's clamp(min=1e-8) of gradient norms

template <typename T>
void adv_perturb_update_cpu(T* delta, const T* grad, const float* mask, int64_t B, int64_t L, int64_t H,
                            int norm, double step_size, double epsilon);

// Fills delta with unit random values (kind) times the per-example scale of `norm`
// (linf: scale; l2_token: scale / sqrt(H); l2_example: scale / sqrt(n_b * H), n_b = real
// tokens of example b), zero at padding.  Philox counter (h / 4, b * L + l, 2, 0), key seed.
template <typename T>
void adv_perturb_init_cpu(T* delta, const float* mask, int64_t B, int64_t L, int64_t H, int kind, int norm,
                          double scale, uint64_t seed);

}  // namespace fastpeft
