// glu, C++ CPU kernels (torch-free): the gated MLP activation y = act(gate) * up of SwiGLU / GeGLU.
//
// gate, up and the outputs are [M, N] with unit column stride; gate and up have their own row
// strides (ldg, ldu: slices of a fused gate_up projection need no copy); outputs are contiguous.
// act is computed in the accumulation type A and rounded to T before the product, where the unfused
// `act_fn(gate) * up` in dtype T rounds:
//   y = T(T(act(g)) * u)
// Backward (dy [M, N] contiguous), the same rounding points as PyTorch's autograd of that composition:
//   du = T(dy * T(act(g)))
//   dg = T(T(dy * u) * act'(g))
// act: silu(g) = g / (1 + e^-g);  gelu(g) = g/2 (1 + erf(g / sqrt 2));
//      gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g³)))  (PyTorch's formulas; derivatives in glu_cpu.cpp)
#pragma once
#include <cstdint>

#include "../common/dtypes.h"

namespace fastpeft {

enum class GluAct { kSilu, kGelu, kGeluTanh };

template <typename T>
void glu_fwd_cpu(const T* gate, int64_t ldg, const T* up, int64_t ldu, int64_t M, int64_t N, GluAct act, T* y);

template <typename T>
void glu_bwd_cpu(const T* dy, const T* gate, int64_t ldg, const T* up, int64_t ldu, int64_t M, int64_t N, GluAct act,
                 T* dgate, T* dup);

// act and act' in double (for tests).
double glu_act_value(GluAct act, double g);
double glu_act_grad(GluAct act, double g);

}  // namespace fastpeft
