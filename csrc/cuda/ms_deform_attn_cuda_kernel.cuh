// Launchers of the multi-scale deformable attention CUDA kernels (defined in ms_deform_attn_cuda_kernel.cu).
//
// Kept free of torch/extension.h so that the kernel translation unit, which nvcc compiles once per GPU
// architecture, stays cheap to compile. All pointers are device pointers to contiguous tensors of ONE batch
// chunk of `n` samples (the caller offsets them); shapes as in csrc/ms_deform_attn.h:
//   value (n, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
//   sampling_loc (n, Q, M, L, P, 2), attn_weight (n, Q, M, L, P), output / grad_output (n, Q, M * D).
// scalar_t is float, double, c10::Half or c10::BFloat16; acc_t is at::opmath_type<scalar_t>.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ddetr {

// Largest number of threads per (b, q, m) group of the backward kernel (a power of two).
constexpr int kMaxBackwardLanes = 256;

struct MSDeformAttnSizes {
  int64_t n;  // batch samples in this chunk
  int64_t S;  // sum of H_l * W_l
  int64_t Q;  // queries
  int M;      // heads
  int D;      // head_dim
  int L;      // levels
  int P;      // points per level
};

// output = sum_{l,p} attn * bilinear(value, loc). `num_sms`: multiprocessor count of the current device.
template <typename scalar_t>
void ms_deform_attn_cuda_forward_launch(const scalar_t* value, const int64_t* spatial_shapes,
                                        const int64_t* level_start_index, const scalar_t* sampling_loc,
                                        const scalar_t* attn_weight, scalar_t* output,
                                        const MSDeformAttnSizes& sizes, int num_sms, cudaStream_t stream);

// Adds the value gradient into grad_value (n, S, M, D) (zero it first) with atomics, and WRITES
// grad_loc (n, Q, M, L, P, 2) and grad_attn (n, Q, M, L, P). `lanes`: threads per (b, q, m) group, a power
// of two in [1, kMaxBackwardLanes].
template <typename scalar_t, typename acc_t>
void ms_deform_attn_cuda_backward_launch(const scalar_t* value, const int64_t* spatial_shapes,
                                         const int64_t* level_start_index, const scalar_t* sampling_loc,
                                         const scalar_t* attn_weight, const scalar_t* grad_output,
                                         acc_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn,
                                         const MSDeformAttnSizes& sizes, int lanes, int num_sms,
                                         cudaStream_t stream);

}  // namespace ddetr
