#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/cuda_dtypes.cuh"

#include <cstring>

#include "grad_tail_cuda.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct TensorMeta {
  void* ptr;
  int64_t numel;
  int32_t dtype;  // 0 f32, 1 f16, 2 bf16, 3 f64 (GradTailDtype)
  int32_t pad;
};
struct ChunkMeta {
  int32_t tensor;
  int32_t chunk;  // index of the chunk inside its tensor
};
struct Header {
  unsigned int counter;  // blocks finished; uploaded as 0 every call
  unsigned int pad[3];
};

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) & ~size_t(15); }
__host__ __device__ inline size_t tensors_offset() { return align16(sizeof(Header)); }
__host__ __device__ inline size_t chunks_offset(int64_t n_tensors) { return align16(tensors_offset() + n_tensors * sizeof(TensorMeta)); }


template <typename T>
__device__ __forceinline__ void accumulate(const T* __restrict__ p, int64_t n, float s, float& acc, bool& bad) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int64_t i = threadIdx.x;
  for (; i + 3 * kThreads < n; i += 4 * kThreads) {  // four independent loads in flight per thread
    const float v0 = ld(p[i]), v1 = ld(p[i + kThreads]), v2 = ld(p[i + 2 * kThreads]), v3 = ld(p[i + 3 * kThreads]);
    bad |= !isfinite(v0) | !isfinite(v1) | !isfinite(v2) | !isfinite(v3);
    const float u0 = v0 * s, u1 = v1 * s, u2 = v2 * s, u3 = v3 * s;
    a0 = fmaf(u0, u0, a0);
    a1 = fmaf(u1, u1, a1);
    a2 = fmaf(u2, u2, a2);
    a3 = fmaf(u3, u3, a3);
  }
  for (; i < n; i += kThreads) {
    const float v = ld(p[i]);
    bad |= !isfinite(v);
    const float u = v * s;
    a0 = fmaf(u, u, a0);
  }
  acc += (a0 + a1) + (a2 + a3);
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? shared[threadIdx.x] : A(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) stats_kernel(unsigned char* buf, int64_t n_tensors, int64_t n_chunks,
                                                         const float* __restrict__ inv_scale_p, float max_norm,
                                                         float eps, float* out_mult, float* out_norm,
                                                         float* out_found) {
  __shared__ double sh_d[kWarps];
  __shared__ float sh_f[kWarps];
  __shared__ int sh_last;
  Header* header = reinterpret_cast<Header*>(buf);
  const TensorMeta* tensors = reinterpret_cast<const TensorMeta*>(buf + tensors_offset());
  const ChunkMeta* chunks = reinterpret_cast<const ChunkMeta*>(buf + chunks_offset(n_tensors));
  unsigned char* work = buf + align16(chunks_offset(n_tensors) + n_chunks * sizeof(ChunkMeta));
  double* partial = reinterpret_cast<double*>(work);
  int* bad_flags = reinterpret_cast<int*>(work + align16(sizeof(double) * (n_chunks > 0 ? n_chunks : 1)));

  const float s = *inv_scale_p;
  float acc = 0.f;
  bool bad = false;
  const int64_t b = blockIdx.x;
  if (b < n_chunks) {
    const ChunkMeta c = chunks[b];
    const TensorMeta t = tensors[c.tensor];
    const int64_t start = static_cast<int64_t>(c.chunk) * GRAD_TAIL_CUDA_CHUNK;
    const int64_t len = min(GRAD_TAIL_CUDA_CHUNK, t.numel - start);
    switch (t.dtype) {  // uniform per block: no divergence
      case 0: accumulate(static_cast<const float*>(t.ptr) + start, len, s, acc, bad); break;
      case 1: accumulate(static_cast<const __half*>(t.ptr) + start, len, s, acc, bad); break;
      case 2: accumulate(static_cast<const __nv_bfloat16*>(t.ptr) + start, len, s, acc, bad); break;
      case 3: accumulate(static_cast<const double*>(t.ptr) + start, len, s, acc, bad); break;
      default: bad = true;
    }
  }
  const float block_acc = block_sum<float>(acc, sh_f);
  const int block_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    if (b < n_chunks) {
      partial[b] = static_cast<double>(block_acc);
      bad_flags[b] = block_bad;
    }
    __threadfence();  // partials visible to the last block before it takes its ticket
    const unsigned int ticket = atomicAdd(&header->counter, 1u);
    sh_last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!sh_last) return;

  // Last block: reduce the partials in block order (deterministic), finalise on the device.
  __threadfence();
  const volatile double* vp = partial;
  const volatile int* vb = bad_flags;
  double sum = 0.0;
  int any_bad = 0;
  for (int64_t i = threadIdx.x; i < n_chunks; i += kThreads) {
    sum += vp[i];
    any_bad |= vb[i];
  }
  sum = block_sum<double>(sum, sh_d);
  any_bad = __syncthreads_or(any_bad);
  if (threadIdx.x == 0) {
    const float norm = static_cast<float>(sqrt(sum));
    float clip = 1.f;
    if (max_norm >= 0.f) {
      const float coef = max_norm / (norm + eps);
      clip = coef > 1.f ? 1.f : coef;  // min(coef, 1) keeping a NaN coef NaN, as the reference's clamp
    }
    *out_norm = norm;
    *out_found = any_bad ? 1.f : 0.f;
    *out_mult = any_bad ? 0.f : s * clip;
  }
}

template <typename T>
__device__ __forceinline__ void scale(T* __restrict__ p, int64_t n, float m) {
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n; i += kThreads) p[i] = st<T>(ld(p[i]) * m);
}
template <>
__device__ __forceinline__ void scale<double>(double* __restrict__ p, int64_t n, float m) {
  for (int64_t i = threadIdx.x; i < n; i += kThreads) p[i] *= static_cast<double>(m);
}

__global__ void __launch_bounds__(kThreads) apply_kernel(const unsigned char* buf, int64_t n_tensors,
                                                         const float* __restrict__ mult_p) {
  const float m = *mult_p;
  if (m == 1.f) return;  // g * 1 == g: skip the write pass
  const TensorMeta* tensors = reinterpret_cast<const TensorMeta*>(buf + tensors_offset());
  const ChunkMeta* chunks = reinterpret_cast<const ChunkMeta*>(buf + chunks_offset(n_tensors));
  const ChunkMeta c = chunks[blockIdx.x];
  const TensorMeta t = tensors[c.tensor];
  const int64_t start = static_cast<int64_t>(c.chunk) * GRAD_TAIL_CUDA_CHUNK;
  const int64_t len = min(GRAD_TAIL_CUDA_CHUNK, t.numel - start);
  switch (t.dtype) {
    case 0: scale(static_cast<float*>(t.ptr) + start, len, m); break;
    case 1: scale(static_cast<__half*>(t.ptr) + start, len, m); break;
    case 2: scale(static_cast<__nv_bfloat16*>(t.ptr) + start, len, m); break;
    case 3: scale(static_cast<double*>(t.ptr) + start, len, m); break;
    default: break;
  }
}

}  // namespace

int64_t grad_tail_cuda_num_chunks(int64_t n_tensors, const int64_t* numels) {
  int64_t n = 0;
  for (int64_t t = 0; t < n_tensors; ++t) n += (numels[t] + GRAD_TAIL_CUDA_CHUNK - 1) / GRAD_TAIL_CUDA_CHUNK;
  return n;
}

size_t grad_tail_cuda_meta_bytes(int64_t n_tensors, int64_t n_chunks) {
  return align16(chunks_offset(n_tensors) + n_chunks * sizeof(ChunkMeta));
}

size_t grad_tail_cuda_workspace_bytes(int64_t n_chunks) {
  const int64_t n = n_chunks > 0 ? n_chunks : 1;
  return align16(sizeof(double) * n) + align16(sizeof(int) * n);
}

void grad_tail_cuda_pack_meta(void* host, int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                              const int32_t* dtypes, int64_t n_chunks) {
  unsigned char* h = static_cast<unsigned char*>(host);
  std::memset(h, 0, grad_tail_cuda_meta_bytes(n_tensors, n_chunks));  // zeroes the block counter too
  TensorMeta* tensors = reinterpret_cast<TensorMeta*>(h + tensors_offset());
  ChunkMeta* chunks = reinterpret_cast<ChunkMeta*>(h + chunks_offset(n_tensors));
  int64_t k = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    tensors[t].ptr = ptrs[t];
    tensors[t].numel = numels[t];
    tensors[t].dtype = dtypes[t];
    const int64_t nc = (numels[t] + GRAD_TAIL_CUDA_CHUNK - 1) / GRAD_TAIL_CUDA_CHUNK;
    for (int64_t c = 0; c < nc && k < n_chunks; ++c, ++k) chunks[k] = {static_cast<int32_t>(t), static_cast<int32_t>(c)};
  }
}

int grad_tail_stats_cuda(void* dev_buffer, int64_t n_tensors, int64_t n_chunks, const float* inv_scale,
                         double max_norm, double eps, float* multiplier, float* total_norm, float* found_inf,
                         void* stream) {
  if (n_chunks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  const unsigned int grid = n_chunks > 0 ? static_cast<unsigned int>(n_chunks) : 1u;  // 1 block finalises an empty list
  stats_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<unsigned char*>(dev_buffer), n_tensors, n_chunks, inv_scale, static_cast<float>(max_norm),
      static_cast<float>(eps), multiplier, total_norm, found_inf);
  return static_cast<int>(cudaGetLastError());
}

int grad_tail_apply_cuda(const void* dev_buffer, int64_t n_tensors, int64_t n_chunks, const float* multiplier,
                         void* stream) {
  if (n_chunks == 0) return 0;
  if (n_chunks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  apply_kernel<<<static_cast<unsigned int>(n_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const unsigned char*>(dev_buffer), n_tensors, multiplier);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastpeft
