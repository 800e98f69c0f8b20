// Multi-scale deformable attention: the CUDA kernels and their launchers.
//
// Organisation (the host entry points, input checks and batch chunking are in ms_deform_attn_cuda.cu):
//   * The bilinear maths (corner weights, zero padding, derivatives) lives in ms_deform_attn_bilinear.h and is
//     shared with the CPU kernel, so both devices implement the same formula.
//   * Forward: one thread per output element (b, q, m, c). Consecutive threads are consecutive channels, so
//     the loads of one corner of `value` and the store of the output are coalesced.
//   * Backward: one "group" of `lanes` threads per (b, q, m); lane j handles channels j, j + lanes, ...
//     For each sample (l, p) every lane accumulates its channels' contributions to dL/d(attn) and
//     dL/d(loc); the group reduces them (warp shuffles inside a warp, then shared memory across the warps
//     of a group when lanes > 32) and lane 0 writes the three numbers: no atomics for these two gradients.
//     grad_value is scattered with atomicAdd (several queries sample the same pixel) into an accumulator of
//     the "op math" type (float for half / bfloat16).
//   * Accumulation is in acc_t = at::opmath_type<scalar_t> (float for half / bfloat16, else scalar_t).
//   * All index arithmetic that can exceed int32 (offsets into value / output / gradients) is int64;
//     the kernels use grid-stride loops, so any problem size fits the grid.
//
// Only light headers are included here: nvcc parses this file once per target architecture.
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ms_deform_attn_cuda_kernel.cuh"
#include "ms_deform_attn_bilinear.h"

namespace ddetr {
namespace {

constexpr int kThreadsPerBlock = 256;  // multiple of 32 and of every allowed `lanes`
static_assert(kThreadsPerBlock % kMaxBackwardLanes == 0, "a block must hold whole groups");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `n_items` items, `items_per_block` per block per iteration: enough to
// fill the device many times over, capped so the grid size always fits.
inline unsigned int num_blocks(int64_t n_items, int64_t items_per_block, int num_sms) {
  const int64_t cap = std::max<int64_t>(1, int64_t(num_sms) * 64);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(n_items, items_per_block), cap)));
}

// ---------------------------------------------------------------------------------------------------------
// Forward: output[b, q, m*D + c] = sum_{l, p} attn[b, q, m, l, p] * bilinear(value[b, level l, :, m, c], loc).
template <typename scalar_t, typename acc_t>
__global__ void ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                              const int64_t* __restrict__ spatial_shapes,
                                              const int64_t* __restrict__ level_start_index,
                                              const scalar_t* __restrict__ sampling_loc,
                                              const scalar_t* __restrict__ attn_weight,
                                              scalar_t* __restrict__ output, int64_t n_items, int64_t S, int64_t Q,
                                              int M, int D, int L, int P) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < n_items; index += stride) {
    // index = ((b * Q + q) * M + m) * D + c, which is also the output offset.
    const int c = static_cast<int>(index % D);
    const int64_t bqm = index / D;  // (b * Q + q) * M + m
    const int m = static_cast<int>(bqm % M);
    const int64_t b = bqm / M / Q;
    const scalar_t* value_b = value + b * S * M * D;
    int64_t w_idx = bqm * L * P;  // index into attn_weight; sampling_loc at 2 * w_idx
    acc_t acc = static_cast<acc_t>(0);
    for (int l = 0; l < L; ++l) {
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* value_level = value_b + level_start_index[l] * M * D;
      for (int p = 0; p < P; ++p, ++w_idx) {
        const acc_t loc_x = static_cast<acc_t>(sampling_loc[2 * w_idx]);
        const acc_t loc_y = static_cast<acc_t>(sampling_loc[2 * w_idx + 1]);
        const acc_t a = static_cast<acc_t>(attn_weight[w_idx]);
        const acc_t h_im = loc_y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
        const acc_t w_im = loc_x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
        acc += a * bilinear_sample<scalar_t, acc_t>(value_level, H, W, M, D, m, c, h_im, w_im);
      }
    }
    output[index] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sum of (x, y, z) over the `lanes` consecutive threads of a group (lanes: power of two <= kMaxBackwardLanes,
// dividing blockDim.x). Must be reached by every thread of the block (it may synchronise the block).
// The result is valid in the group's lane 0. `smem` holds 3 * blockDim.x / 32 values.
template <typename acc_t>
__device__ __forceinline__ void group_sum3(acc_t& x, acc_t& y, acc_t& z, int lanes, acc_t* smem) {
  const int width = lanes < 32 ? lanes : 32;
#pragma unroll 1
  for (int offset = width / 2; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset, width);
    y += __shfl_down_sync(0xffffffffu, y, offset, width);
    z += __shfl_down_sync(0xffffffffu, z, offset, width);
  }
  if (lanes > 32) {  // block-uniform: the group spans lanes / 32 warps
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      smem[3 * warp] = x;
      smem[3 * warp + 1] = y;
      smem[3 * warp + 2] = z;
    }
    __syncthreads();
    if (threadIdx.x % lanes == 0) {
      for (int w = 1; w < lanes / 32; ++w) {
        x += smem[3 * (warp + w)];
        y += smem[3 * (warp + w) + 1];
        z += smem[3 * (warp + w) + 2];
      }
    }
    __syncthreads();  // smem is reused by the next sample
  }
}

// Backward. One group of `lanes` threads per (b, q, m); see the file comment.
//   grad_value (N, S, M, D) in acc_t, zero-initialised, accumulated with atomics;
//   grad_loc (N, Q, M, L, P, 2) and grad_attn (N, Q, M, L, P) fully written (no initialisation needed).
template <typename scalar_t, typename acc_t>
__global__ void ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                               const int64_t* __restrict__ spatial_shapes,
                                               const int64_t* __restrict__ level_start_index,
                                               const scalar_t* __restrict__ sampling_loc,
                                               const scalar_t* __restrict__ attn_weight,
                                               const scalar_t* __restrict__ grad_output,
                                               acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                               scalar_t* __restrict__ grad_attn, int64_t n_groups, int64_t S,
                                               int64_t Q, int M, int D, int L, int P, int lanes) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int groups_per_block = blockDim.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int group_in_block = threadIdx.x / lanes;
  const int64_t stride = int64_t(gridDim.x) * groups_per_block;
  // The loop condition depends on the block only, so every thread of a block runs the same number of
  // iterations and reaches every __syncthreads() in group_sum3. Groups past the end are inactive: they
  // take part in the reductions with zeros and touch no memory.
  for (int64_t base = int64_t(blockIdx.x) * groups_per_block; base < n_groups; base += stride) {
    const int64_t group = base + group_in_block;
    const bool active = group < n_groups;
    const int64_t bqm = active ? group : 0;  // (b * Q + q) * M + m
    const int m = static_cast<int>(bqm % M);
    const int64_t b = bqm / M / Q;
    const int64_t value_b_offset = b * S * M * D;
    const scalar_t* grad_out = grad_output + bqm * D;
    int64_t w_idx = bqm * L * P;
    for (int l = 0; l < L; ++l) {
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const int64_t level_offset = value_b_offset + level_start_index[l] * M * D;
      const scalar_t* value_level = value + level_offset;
      acc_t* grad_value_level = grad_value + level_offset;
      for (int p = 0; p < P; ++p, ++w_idx) {
        acc_t g_attn = static_cast<acc_t>(0), g_h = static_cast<acc_t>(0), g_w = static_cast<acc_t>(0);
        if (active) {
          const acc_t loc_x = static_cast<acc_t>(sampling_loc[2 * w_idx]);
          const acc_t loc_y = static_cast<acc_t>(sampling_loc[2 * w_idx + 1]);
          const acc_t a = static_cast<acc_t>(attn_weight[w_idx]);
          const acc_t h_im = loc_y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
          const acc_t w_im = loc_x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
          for (int c = lane; c < D; c += lanes) {
            const acc_t top = static_cast<acc_t>(grad_out[c]);
            int64_t corner_offset[4];
            acc_t corner_grad[4];
            acc_t gh, gw;
            const acc_t v = bilinear_sample_backward<scalar_t, acc_t>(
                value_level, H, W, M, D, m, c, h_im, w_im, top * a, corner_offset, corner_grad, &gh, &gw);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (corner_offset[k] >= 0) {
                gpuAtomicAddNoReturn(grad_value_level + corner_offset[k], corner_grad[k]);
              }
            }
            g_attn += top * v;
            g_h += gh;
            g_w += gw;
          }
        }
        group_sum3(g_attn, g_h, g_w, lanes, smem);
        if (active && lane == 0) {
          grad_attn[w_idx] = static_cast<scalar_t>(g_attn);
          // loc is normalised: d(w_im)/d(loc_x) = W, d(h_im)/d(loc_y) = H.
          grad_loc[2 * w_idx] = static_cast<scalar_t>(g_w * static_cast<acc_t>(W));
          grad_loc[2 * w_idx + 1] = static_cast<scalar_t>(g_h * static_cast<acc_t>(H));
        }
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void ms_deform_attn_cuda_forward_launch(const scalar_t* value, const int64_t* spatial_shapes,
                                        const int64_t* level_start_index, const scalar_t* sampling_loc,
                                        const scalar_t* attn_weight, scalar_t* output,
                                        const MSDeformAttnSizes& sz, int num_sms, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_items = sz.n * sz.Q * sz.M * sz.D;
  if (n_items == 0) return;
  ms_deform_attn_forward_kernel<scalar_t, acc_t>
      <<<num_blocks(n_items, kThreadsPerBlock, num_sms), kThreadsPerBlock, 0, stream>>>(
          value, spatial_shapes, level_start_index, sampling_loc, attn_weight, output, n_items, sz.S, sz.Q,
          sz.M, sz.D, sz.L, sz.P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void ms_deform_attn_cuda_backward_launch(const scalar_t* value, const int64_t* spatial_shapes,
                                         const int64_t* level_start_index, const scalar_t* sampling_loc,
                                         const scalar_t* attn_weight, const scalar_t* grad_output,
                                         acc_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn,
                                         const MSDeformAttnSizes& sz, int lanes, int num_sms,
                                         cudaStream_t stream) {
  static_assert(std::is_same<acc_t, at::opmath_type<scalar_t>>::value, "acc_t must be opmath_type<scalar_t>");
  TORCH_CHECK(lanes >= 1 && lanes <= kMaxBackwardLanes && (lanes & (lanes - 1)) == 0,
              "ms_deform_attn_cuda_backward: lanes must be a power of two in [1, ", kMaxBackwardLanes, "], got ",
              lanes);
  const int64_t n_groups = sz.n * sz.Q * sz.M;
  if (n_groups == 0) return;
  const int groups_per_block = kThreadsPerBlock / lanes;
  const size_t smem_bytes = lanes > 32 ? 3 * (kThreadsPerBlock / 32) * sizeof(acc_t) : 0;
  ms_deform_attn_backward_kernel<scalar_t, acc_t>
      <<<num_blocks(n_groups, groups_per_block, num_sms), kThreadsPerBlock, smem_bytes, stream>>>(
          value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output, grad_value,
          grad_loc, grad_attn, n_groups, sz.S, sz.Q, sz.M, sz.D, sz.L, sz.P, lanes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DDETR_INSTANTIATE_MSDA_LAUNCHERS(scalar_t)                                                              \
  template void ms_deform_attn_cuda_forward_launch<scalar_t>(                                                  \
      const scalar_t*, const int64_t*, const int64_t*, const scalar_t*, const scalar_t*, scalar_t*,           \
      const MSDeformAttnSizes&, int, cudaStream_t);                                                            \
  template void ms_deform_attn_cuda_backward_launch<scalar_t, at::opmath_type<scalar_t>>(                      \
      const scalar_t*, const int64_t*, const int64_t*, const scalar_t*, const scalar_t*, const scalar_t*,     \
      at::opmath_type<scalar_t>*, scalar_t*, scalar_t*, const MSDeformAttnSizes&, int, int, cudaStream_t);

DDETR_INSTANTIATE_MSDA_LAUNCHERS(float)
DDETR_INSTANTIATE_MSDA_LAUNCHERS(double)
DDETR_INSTANTIATE_MSDA_LAUNCHERS(c10::Half)
DDETR_INSTANTIATE_MSDA_LAUNCHERS(c10::BFloat16)
#undef DDETR_INSTANTIATE_MSDA_LAUNCHERS

}  // namespace ddetr
