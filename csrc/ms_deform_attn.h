// Multi-scale deformable attention: declarations of the CPU and CUDA kernels and of the shared input checks.
//
// Shapes (N batch, S = sum_l H_l * W_l, M heads, D head dim, L levels, P points, Q queries):
//   value               (N, S, M, D)        float / double (half / bfloat16: see the kernels)
//   spatial_shapes      (L, 2) int64        (H_l, W_l)
//   level_start_index   (L,) int64          start of each level in S
//   sampling_loc        (N, Q, M, L, P, 2)  normalised (x, y); outside [0, 1] reads zeros
//   attn_weight         (N, Q, M, L, P)
//   output / grad_output (N, Q, M * D)
#pragma once

#include <ATen/ATen.h>

#include <vector>

// Throws c10::Error (RuntimeError in Python) with a message naming the problem when the inputs are
// inconsistent: dims, batch / heads / levels / points disagreement, dtypes, devices, non-positive
// spatial shapes, S != sum(H * W), level_start_index != exclusive cumsum of H * W, im2col_step < 1.
// Value checks on spatial_shapes / level_start_index copy these two tiny tensors to the host (one
// synchronisation for CUDA tensors). Contiguity is NOT required (the kernels call .contiguous()).
void ms_deform_attn_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                 const at::Tensor& attn_weight, int64_t im2col_step);

// Checks grad_output is (N, Q, M * D) with value's dtype and device.
void ms_deform_attn_check_grad_output(const at::Tensor& value, const at::Tensor& sampling_loc,
                                      const at::Tensor& grad_output);

// CPU kernel (csrc/cpu/ms_deform_attn_cpu.cpp). Half / bfloat16 inputs are computed in float32 and the
// results cast back to the input dtype.
at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight, int im2col_step);

// Returns {grad_value, grad_sampling_loc, grad_attn_weight}.
std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                                    const at::Tensor& grad_output, int im2col_step);

#ifdef WITH_CUDA
// CUDA kernel (csrc/cuda/ms_deform_attn_cuda.cu).
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight, int im2col_step);

// Returns {grad_value, grad_sampling_loc, grad_attn_weight}.
std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc,
                                                     const at::Tensor& attn_weight, const at::Tensor& grad_output,
                                                     int im2col_step);
#endif
