// grad_tail, CUDA kernels and launchers (torch-free); see grad_tail_cpu.h for the math.
//
// Multi-tensor layout (apex multi_tensor_apply pattern, but the tensor list lives in
// one device buffer instead of kernel arguments, so any number of tensors takes one
// launch).  The binding packs the metadata on the host (grad_tail_cuda_pack_meta,
// into pinned memory), copies it to the device with ONE async copy, and launches:
//   stats: ONE kernel; one block per chunk of GRAD_TAIL_CUDA_CHUNK elements of one
//          tensor; each block writes its partial sum of squares (fp32 in the block,
//          stored as fp64) and a non-finite flag; the last block to finish (atomic
//          ticket, counter zeroed by the uploaded metadata) reduces the partials in
//          block order (deterministic) and writes multiplier / total_norm / found_inf
//          on the device: no host synchronisation.
//   apply: ONE kernel; every block reads the multiplier from device memory and
//          returns at once when it is exactly 1.
// Device buffer: [meta (meta_bytes, uploaded) | workspace (workspace_bytes, not initialised)].
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastpeft {

constexpr int64_t GRAD_TAIL_CUDA_CHUNK = 1 << 14;  // 32 elements per thread of a 512-thread block

// Number of chunks (blocks of the stats/apply kernels) for this tensor list.
int64_t grad_tail_cuda_num_chunks(int64_t n_tensors, const int64_t* numels);
size_t grad_tail_cuda_meta_bytes(int64_t n_tensors, int64_t n_chunks);
size_t grad_tail_cuda_workspace_bytes(int64_t n_chunks);
// Fill `host` (meta_bytes) with header, tensor table and chunk table.
void grad_tail_cuda_pack_meta(void* host, int64_t n_tensors, void* const* ptrs, const int64_t* numels,
                              const int32_t* dtypes, int64_t n_chunks);

// dev_buffer: device copy of the packed meta followed by the workspace.
// inv_scale: device float*; max_norm < 0: no clipping; outputs are device float scalars.
// Returns a cudaError_t as int.
int grad_tail_stats_cuda(void* dev_buffer, int64_t n_tensors, int64_t n_chunks, const float* inv_scale,
                         double max_norm, double eps, float* multiplier, float* total_norm, float* found_inf,
                         void* stream);
int grad_tail_apply_cuda(const void* dev_buffer, int64_t n_tensors, int64_t n_chunks, const float* multiplier,
                         void* stream);

}  // namespace fastpeft
