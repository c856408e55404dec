// linear_cross_entropy, C++ CPU row kernel (torch-free): the cross-entropy part of one chunk of tokens.
// The chunk's logits x [C, V] (row stride ld, unit column stride; the LM head's output, bias added) are
// given in the accumulation type A (float; double for double).  Per row i with label y_i:
//
//   z_j   = x_j                                   softcap <= 0
//   z_j   = softcap * tanh(x_j / softcap)          softcap > 0 (Gemma-2)
//   lse   = m + log Σ_j exp(z_j - m),  m = max_j z_j
//   loss_i = (1 - ε) (lse - z_y) + ε (lse - (1/V) Σ_j z_j)                   ε = label_smoothing
//   dL/dx_j = scale * (p_j - (1 - ε) [j = y] - ε / V) * dz_j/dx_j,  p_j = exp(z_j - lse),
//   dz_j/dx_j = 1, or 1 - (z_j / softcap)² with softcap                      (scale: 1/count for mean)
//
// y_i == ignore_index: loss 0, gradient row 0.  A label outside [0, V) (not ignore_index): loss NaN,
// gradient row 0; the function returns the first such row (or -1 when every label is valid), so the
// binding can raise.  With write_grad the logits are overwritten by dL/dx (in place: the chunk's
// gradient for the next GEMMs); without, they are left changed (softcapped / exponentiated).
// lce_rows_cpu_bf16: the same on bfloat16 logits, each row computed in float (widened into a buffer) and,
// with write_grad, its gradient rounded to bfloat16 in place.
// Rows run in parallel (OpenMP) when C * V is large; the row loops are vectorised (vec_math.h exp/tanh).
#pragma once
#include <cstdint>

#include "../common/dtypes.h"

namespace fastpeft {

template <typename A>
int64_t lce_rows_cpu(A* x, int64_t ld, int64_t C, int64_t V, const int64_t* labels, int64_t ignore_index,
                     double label_smoothing, double softcap, double scale, bool write_grad, A* loss);

int64_t lce_rows_cpu_bf16(bf16_t* x, int64_t ld, int64_t C, int64_t V, const int64_t* labels, int64_t ignore_index,
                          double label_smoothing, double softcap, double scale, bool write_grad, float* loss);

}  // namespace fastpeft
