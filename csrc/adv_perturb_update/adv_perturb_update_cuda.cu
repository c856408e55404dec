#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/cuda_dtypes.cuh"

#include <cstdint>

#include "../common/philox.h"
#include "adv_perturb_update_cuda.h"

namespace fastpeft {
namespace {

constexpr int kLinf = 0, kL2Token = 1, kL2Example = 2;
constexpr int kUniform = 0;
constexpr uint32_t kInitStream = 2;
constexpr float kNormFloor = 1e-8f;
constexpr int kThreads = 256;


__device__ __forceinline__ bool active(const float* mask, int64_t row) { return mask == nullptr || mask[row] != 0.0f; }

// Sum of three floats over the block (kThreads threads); result valid in every thread.
__device__ __forceinline__ float3 block_sum3(float3 v) {
  __shared__ float3 warp_part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    v.z += __shfl_xor_sync(0xffffffffu, v.z, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  float3 r = make_float3(0.f, 0.f, 0.f);
  for (int w = 0; w < kThreads / 32; ++w) {
    r.x += warp_part[w].x; r.y += warp_part[w].y; r.z += warp_part[w].z;
  }
  __syncthreads();
  return r;
}

// a = step / max(|g|, floor), keeping a NaN norm NaN (the reference's clamp_min does).
__device__ __forceinline__ float step_coef(float gg, float step) {
  const float gn = sqrtf(gg);
  return step / (gn < kNormFloor ? kNormFloor : gn);
}

// eps / |d'| above eps (0 for an infinite norm, as eps / inf), else 1 (also for a NaN norm).
__device__ __forceinline__ float proj_scale(float nsq, float eps) {
  return (eps > 0.f && nsq > eps * eps) ? eps * rsqrtf(nsq) : 1.f;
}

__device__ __forceinline__ bool stats_finite(float gg, float dg, float dd) {
  return isfinite(gg) && isfinite(dg) && isfinite(dd);
}

// (a, s) from finite stats (the one-pass expansion); s is NaN when they are not finite, and the update
// kernel then computes the norm of d + a g directly (the expansion mixes infinities differently).
__device__ __forceinline__ float2 l2_coefs(float gg, float dg, float dd, float step, float eps) {
  const float a = step_coef(gg, step);
  if (!stats_finite(gg, dg, dd)) return make_float2(a, nanf(""));
  const float nsq = fmaxf(dd + 2.f * a * dg + a * a * gg, 0.f);
  return make_float2(a, proj_scale(nsq, eps));
}

// N consecutive elements moved as one 16-byte access when N * sizeof(T) == 16 (N = 1: scalar).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// (|g|^2, <d,g>, |d|^2) of one row by the whole block (H is a multiple of N).
template <typename T, int N>
__device__ __forceinline__ float3 row_stats(const T* __restrict__ d, const T* __restrict__ g, int64_t H) {
  float3 acc = make_float3(0.f, 0.f, 0.f);
  const Pack<T, N>* dp = reinterpret_cast<const Pack<T, N>*>(d);
  const Pack<T, N>* gp = reinterpret_cast<const Pack<T, N>*>(g);
  for (int64_t i = threadIdx.x; i < H / N; i += kThreads) {
    const Pack<T, N> dv = dp[i], gv = gp[i];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float a = ld(gv.v[j]), b = ld(dv.v[j]);
      acc.x += a * a; acc.y += b * a; acc.z += b * b;
    }
  }
  return block_sum3(acc);
}

// |d + a g|^2 over rows [r0, r1) by the whole block (padding rows skipped): the slow path for
// non-finite stats.
template <typename T>
__device__ float direct_nsq(const T* __restrict__ delta, const T* __restrict__ grad, const float* __restrict__ mask,
                            int64_t r0, int64_t r1, int64_t H, float a) {
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    if (!active(mask, r)) continue;
    for (int64_t h = threadIdx.x; h < H; h += kThreads) {
      const float v = ld(delta[r * H + h]) + a * ld(grad[r * H + h]);
      acc += v * v;
    }
  }
  return block_sum3(make_float3(acc, 0.f, 0.f)).x;
}

// One block per row.  linf: sign step + clamp.  l2_token: stats then update of the row (the
// second read hits the cache).  l2_example: coefficients per example from `coef` ([B, 2] = a, s).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) update_rows_kernel(T* __restrict__ delta, const T* __restrict__ grad,
                                                               const float* __restrict__ mask, int64_t L, int64_t H,
                                                               int norm, float step, float eps,
                                                               const float* __restrict__ coef) {
  const int64_t row = blockIdx.x;
  Pack<T, N>* dp = reinterpret_cast<Pack<T, N>*>(delta + row * H);
  const Pack<T, N>* gp = reinterpret_cast<const Pack<T, N>*>(grad + row * H);
  const int64_t n = H / N;
  if (!active(mask, row)) {
    Pack<T, N> z;
#pragma unroll
    for (int j = 0; j < N; ++j) z.v[j] = st<T>(0.f);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) dp[i] = z;
    return;
  }
  if (norm == kLinf) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      Pack<T, N> dv = dp[i];
      const Pack<T, N> gv = gp[i];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float gx = ld(gv.v[j]);
        // sign(g) as torch.sign (sign(NaN) = 0); the clamp keeps NaN like torch.clamp (fminf/fmaxf drop it)
        float v = ld(dv.v[j]) + (gx > 0.f ? step : (gx < 0.f ? -step : 0.f));
        if (eps > 0.f) v = v < -eps ? -eps : (v > eps ? eps : v);
        dv.v[j] = st<T>(v);
      }
      dp[i] = dv;
    }
    return;
  }
  float2 as;
  const int64_t r0 = row, r1 = row + 1;
  if (norm == kL2Token) {
    const float3 s = row_stats<T, N>(delta + row * H, grad + row * H, H);
    as = l2_coefs(s.x, s.y, s.z, step, eps);
  } else {
    const int64_t b = row / L;
    as = make_float2(coef[2 * b], coef[2 * b + 1]);
  }
  // l2_token with non-finite stats (block-uniform branch); l2_example's example_coef_kernel did it already
  if (isnan(as.y)) as.y = proj_scale(direct_nsq<T>(delta, grad, mask, r0, r1, H, as.x), eps);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    Pack<T, N> dv = dp[i];
    const Pack<T, N> gv = gp[i];
#pragma unroll
    for (int j = 0; j < N; ++j) dv.v[j] = st<T>(as.y * (ld(dv.v[j]) + as.x * ld(gv.v[j])));
    dp[i] = dv;
  }
}

// l2_example pass 1: per-row partial stats [rows, 3] (zeros for padding rows).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const T* __restrict__ delta, const T* __restrict__ grad,
                                                             const float* __restrict__ mask, int64_t H,
                                                             float* __restrict__ part) {
  const int64_t row = blockIdx.x;
  float3 s = make_float3(0.f, 0.f, 0.f);
  if (active(mask, row)) s = row_stats<T, N>(delta + row * H, grad + row * H, H);
  if (threadIdx.x == 0) {
    part[3 * row] = s.x; part[3 * row + 1] = s.y; part[3 * row + 2] = s.z;
  }
}

// l2_example pass 2: one block per example reduces its L row partials into (a, s); an example whose stats
// are not finite gets s from the norm of d + a g computed directly (before any row of it is updated).
template <typename T>
__global__ void example_coef_kernel(const float* __restrict__ part, const T* __restrict__ delta,
                                    const T* __restrict__ grad, const float* __restrict__ mask, int64_t L,
                                    int64_t H, float step, float eps, float* __restrict__ coef) {
  const int64_t b = blockIdx.x;
  float3 v = make_float3(0.f, 0.f, 0.f);
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    const float* p = part + 3 * (b * L + l);
    v.x += p[0]; v.y += p[1]; v.z += p[2];
  }
  const float3 s = block_sum3(v);
  float2 as = l2_coefs(s.x, s.y, s.z, step, eps);
  if (isnan(as.y)) as.y = proj_scale(direct_nsq<T>(delta, grad, mask, b * L, (b + 1) * L, H, as.x), eps);
  if (threadIdx.x == 0) {
    coef[2 * b] = as.x; coef[2 * b + 1] = as.y;
  }
}

// Per-example init scale (one block per example).
__global__ void init_scale_kernel(const float* __restrict__ mask, int64_t L, int64_t H, int norm, float scale,
                                  float* __restrict__ sb) {
  const int64_t b = blockIdx.x;
  float n = 0.f;
  if (norm == kL2Example)
    for (int64_t l = threadIdx.x; l < L; l += kThreads) n += active(mask, b * L + l) ? 1.f : 0.f;
  const float total = block_sum3(make_float3(n, 0.f, 0.f)).x;
  if (threadIdx.x == 0) {
    float s = scale;
    if (norm == kL2Example) s = scale * rsqrtf(fmaxf(total * (float)H, 1.f));
    else if (norm == kL2Token) s = scale * rsqrtf((float)H);
    sb[b] = s;
  }
}

// One thread per group of 4 consecutive elements of a row (one Philox call).
template <typename T>
__global__ void init_kernel(T* __restrict__ delta, const float* __restrict__ mask, int64_t rows, int64_t L, int64_t H,
                            int kind, uint64_t seed, const float* __restrict__ sb) {
  const int64_t groups = (H + 3) / 4;
  const int64_t n = rows * groups;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / groups, g0 = (i - row * groups) * 4;
    T* d = delta + row * H;
    if (!active(mask, row)) {
      for (int j = 0; j < 4 && g0 + j < H; ++j) d[g0 + j] = st<T>(0.f);
      continue;
    }
    const Philox4 p = philox4x32(seed, (uint32_t)(g0 >> 2), (uint32_t)row, kInitStream, 0u);
    const float s = sb[row / L];
    float u[4], v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) u[j] = (float)(p.v[j] >> 8) * (1.0f / 16777216.0f);
    if (kind == kUniform) {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = 2.f * u[j] - 1.f;
    } else {
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        const float r = sqrtf(-2.f * logf(1.f - u[j]));
        float sn, cs;
        sincosf(6.283185307179586f * u[j + 1], &sn, &cs);
        v[j] = r * cs;
        v[j + 1] = r * sn;
      }
    }
    for (int j = 0; j < 4 && g0 + j < H; ++j) d[g0 + j] = st<T>(v[j] * s);
  }
}

template <typename T, int N>
void launch_update_n(T* delta, const T* grad, const float* mask, int64_t B, int64_t L, int64_t H, int norm,
                     float step, float eps, float* ws, cudaStream_t s) {
  const int64_t rows = B * L;
  float* coef = nullptr;
  if (norm == kL2Example) {
    float* part = ws;
    coef = ws + 3 * rows;
    row_stats_kernel<T, N><<<(unsigned)rows, kThreads, 0, s>>>(delta, grad, mask, H, part);
    example_coef_kernel<T><<<(unsigned)B, kThreads, 0, s>>>(part, delta, grad, mask, L, H, step, eps, coef);
  }
  update_rows_kernel<T, N><<<(unsigned)rows, kThreads, 0, s>>>(delta, grad, mask, L, H, norm, step, eps, coef);
}

template <typename T>
int launch_update(void* delta_, const void* grad_, const float* mask, int64_t B, int64_t L, int64_t H, int norm,
                  double step, double eps, float* ws, cudaStream_t s) {
  const int64_t rows = B * L;
  if (rows == 0 || H == 0) return 0;
  if (rows > 2147483647LL) return (int)cudaErrorInvalidValue;
  T* delta = static_cast<T*>(delta_);
  const T* grad = static_cast<const T*>(grad_);
  constexpr int N = 16 / sizeof(T);
  const bool vec = H % N == 0 && reinterpret_cast<uintptr_t>(delta) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(grad) % 16 == 0;
  if (vec)
    launch_update_n<T, N>(delta, grad, mask, B, L, H, norm, (float)step, (float)eps, ws, s);
  else
    launch_update_n<T, 1>(delta, grad, mask, B, L, H, norm, (float)step, (float)eps, ws, s);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_init(void* delta, const float* mask, int64_t B, int64_t L, int64_t H, int kind, int norm, double scale,
                uint64_t seed, float* ws, cudaStream_t s) {
  const int64_t rows = B * L;
  if (rows == 0 || H == 0) return 0;
  init_scale_kernel<<<(unsigned)B, kThreads, 0, s>>>(mask, L, H, norm, (float)scale, ws);
  const int64_t n = rows * ((H + 3) / 4);
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  init_kernel<T><<<(unsigned)blocks, kThreads, 0, s>>>(static_cast<T*>(delta), mask, rows, L, H, kind, seed, ws);
  return (int)cudaGetLastError();
}

}  // namespace

int64_t adv_perturb_update_cuda_workspace(int64_t B, int64_t L, int norm) {
  return norm == kL2Example ? 3 * B * L + 2 * B : 0;
}

int adv_perturb_update_cuda(int dtype, void* delta, const void* grad, const float* mask, int64_t B, int64_t L,
                            int64_t H, int norm, double step_size, double epsilon, float* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (norm < kLinf || norm > kL2Example) return (int)cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_update<float>(delta, grad, mask, B, L, H, norm, step_size, epsilon, workspace, s);
    case 1: return launch_update<__half>(delta, grad, mask, B, L, H, norm, step_size, epsilon, workspace, s);
    case 2: return launch_update<__nv_bfloat16>(delta, grad, mask, B, L, H, norm, step_size, epsilon, workspace, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

int adv_perturb_init_cuda(int dtype, void* delta, const float* mask, int64_t B, int64_t L, int64_t H, int kind,
                          int norm, double scale, uint64_t seed, float* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_init<float>(delta, mask, B, L, H, kind, norm, scale, seed, workspace, s);
    case 1: return launch_init<__half>(delta, mask, B, L, H, kind, norm, scale, seed, workspace, s);
    case 2: return launch_init<__nv_bfloat16>(delta, mask, B, L, H, kind, norm, scale, seed, workspace, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace fastpeft
