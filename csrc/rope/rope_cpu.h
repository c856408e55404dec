// rope, C++ CPU kernel (torch-free): rotary position embedding in transformers' rotate-half layout.
//
// x (q or k) is addressed as [B, S, H, D] through element strides of its batch, position and head
// dims (the last dim is contiguous), so [B, H, S, D] tensors, transposed projection outputs and other
// views need no copy; y is written through its own strides.  cos and sin are [Bc, S, rd] in the
// accumulation type A, contiguous, with batch stride csb (0 broadcasts one row of positions over the
// batch).  The first rd (even, <= D) dims are rotated, the rest pass through.  With h = rd / 2 and
// j < h, forward (transformers' `x * cos + rotate_half(x) * sin`):
//   y_j     = x_j c_j     - x_{j+h} s_j
//   y_{j+h} = x_{j+h} c_{j+h} + x_j s_{j+h}
// and transpose (its adjoint, the backward: dx = J^T dy; a rotation by -theta for transformers' cos/sin):
//   y_j     = x_j c_j     + x_{j+h} s_{j+h}
//   y_{j+h} = x_{j+h} c_{j+h} - x_j s_j
// Each product and the sum are rounded to O, where the unfused composition in dtype O rounds, so
// the result equals it bit for bit when x, cos and sin share O.
#pragma once
#include <cstdint>

#include "../common/dtypes.h"

namespace fastpeft {

struct RopeStrides {
  int64_t b, s, h;  // element strides of the batch, position and head dims
};

template <typename T, typename O>
void rope_cpu(const T* x, RopeStrides xs, O* y, RopeStrides ys, int64_t B, int64_t S, int64_t H, int64_t D,
              const typename acc<T>::type* cos, const typename acc<T>::type* sin, int64_t csb, int64_t rd,
              bool transpose);

}  // namespace fastpeft
