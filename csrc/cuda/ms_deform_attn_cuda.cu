// Multi-scale deformable attention: CUDA host entry points (declared in csrc/ms_deform_attn.h).
//
// Validates the inputs (shared checks + CUDA-specific ones), makes them contiguous, selects the device and
// stream, dispatches on the dtype (float, double, half, bfloat16) and runs the kernels of
// ms_deform_attn_cuda_kernel.cu over the batch in chunks of min(N, im2col_step) (the last chunk may be
// smaller; the kernels need no column buffer, so the chunking only bounds the size of one launch).
//
// This translation unit contains no device code. Its whole body is skipped in nvcc's device passes
// (__CUDA_ARCH__ defined), so the heavy torch/extension.h pulled in by ms_deform_attn.h is parsed once for
// the host instead of once more per target architecture.
#if !defined(__CUDA_ARCH__)

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "ms_deform_attn_cuda_kernel.cuh"
#include "ms_deform_attn.h"

namespace {

void check_cuda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                       const at::Tensor& attn_weight, int64_t im2col_step) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_cuda: value must be a CUDA tensor, got device ", value.device());
  // Same device for every input, dtypes, shapes, values of spatial_shapes / level_start_index.
  ms_deform_attn_check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  const int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(value.size(2) <= int_max && value.size(3) <= int_max && sampling_loc.size(3) <= int_max &&
                  sampling_loc.size(4) <= int_max,
              "ms_deform_attn_cuda: n_heads, head_dim, n_levels and n_points must fit in int32");
}

ddetr::MSDeformAttnSizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_loc) {
  ddetr::MSDeformAttnSizes sz;
  sz.n = value.size(0);
  sz.S = value.size(1);
  sz.M = static_cast<int>(value.size(2));
  sz.D = static_cast<int>(value.size(3));
  sz.Q = sampling_loc.size(1);
  sz.L = static_cast<int>(sampling_loc.size(3));
  sz.P = static_cast<int>(sampling_loc.size(4));
  return sz;
}

// Threads per (b, q, m) group of the backward kernel, a power of two. Default: min(next_pow2(D), 32), i.e.
// at most one warp per group, reduced with warp shuffles only; if D > 32 and that would not fill the device
// with threads (few groups), it doubles up to next_pow2(D) <= kMaxBackwardLanes, adding the shared-memory
// stage of the reduction. DDETR_MSDA_CUDA_LANES=<power of two in [1, 256]> overrides it (the tests use it to
// cover every reduction path).
int backward_lanes(int64_t n_groups, int64_t D) {
  if (const char* env = std::getenv("DDETR_MSDA_CUDA_LANES")) {
    const std::string s(env);
    int lanes = 0;
    try {
      lanes = std::stoi(s);
    } catch (...) {
      lanes = 0;
    }
    TORCH_CHECK(lanes >= 1 && lanes <= ddetr::kMaxBackwardLanes && (lanes & (lanes - 1)) == 0,
                "ms_deform_attn_cuda: DDETR_MSDA_CUDA_LANES must be a power of two in [1, ",
                ddetr::kMaxBackwardLanes, "], got '", s, "'");
    return lanes;
  }
  int full = 1;
  while (full < D && full < ddetr::kMaxBackwardLanes) full *= 2;
  int lanes = std::min(full, 32);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = int64_t(prop->multiProcessorCount) * prop->maxThreadsPerMultiProcessor;
  while (lanes < full && n_groups * lanes < resident) lanes *= 2;
  return lanes;
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight, int im2col_step) {
  check_cuda_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  const c10::cuda::CUDAGuard device_guard(value.device());

  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor start_c = level_start_index.contiguous();
  const at::Tensor loc_c = sampling_loc.contiguous();
  const at::Tensor attn_c = attn_weight.contiguous();
  const ddetr::MSDeformAttnSizes full = sizes_of(value_c, loc_c);
  const int64_t N = full.n, S = full.S, Q = full.Q, M = full.M, D = full.D, L = full.L, P = full.P;

  at::Tensor output = at::empty({N, Q, M * D}, value_c.options());
  if (output.numel() == 0) return output;

  const int64_t step = std::min<int64_t>(N, im2col_step);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value_c.scalar_type(),
                                  "ms_deform_attn_cuda_forward", [&] {
    for (int64_t b0 = 0; b0 < N; b0 += step) {
      ddetr::MSDeformAttnSizes sz = full;
      sz.n = std::min(step, N - b0);
      ddetr::ms_deform_attn_cuda_forward_launch<scalar_t>(
          value_c.data_ptr<scalar_t>() + b0 * S * M * D, shapes_c.data_ptr<int64_t>(),
          start_c.data_ptr<int64_t>(), loc_c.data_ptr<scalar_t>() + b0 * Q * M * L * P * 2,
          attn_c.data_ptr<scalar_t>() + b0 * Q * M * L * P, output.data_ptr<scalar_t>() + b0 * Q * M * D, sz,
          num_sms, stream);
    }
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_loc,
                                                     const at::Tensor& attn_weight, const at::Tensor& grad_output,
                                                     int im2col_step) {
  check_cuda_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step);
  ms_deform_attn_check_grad_output(value, sampling_loc, grad_output);
  const c10::cuda::CUDAGuard device_guard(value.device());

  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor start_c = level_start_index.contiguous();
  const at::Tensor loc_c = sampling_loc.contiguous();
  const at::Tensor attn_c = attn_weight.contiguous();
  const at::Tensor grad_out_c = grad_output.contiguous();
  const ddetr::MSDeformAttnSizes full = sizes_of(value_c, loc_c);
  const int64_t N = full.n, S = full.S, Q = full.Q, M = full.M, D = full.D, L = full.L, P = full.P;

  // grad_value is accumulated with atomics in the op-math dtype (float for half / bfloat16): half-precision
  // atomics would round after every one of the many additions into a pixel.
  const at::ScalarType acc_type = at::toOpMathType(value_c.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value_c.sizes(), value_c.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(loc_c.sizes(), loc_c.options());
  at::Tensor grad_attn = at::empty(attn_c.sizes(), attn_c.options());

  if (grad_loc.numel() > 0) {
    const int64_t step = std::min<int64_t>(N, im2col_step);
    const int lanes = backward_lanes(step * Q * M, D);
    const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value_c.scalar_type(),
                                    "ms_deform_attn_cuda_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (int64_t b0 = 0; b0 < N; b0 += step) {
        ddetr::MSDeformAttnSizes sz = full;
        sz.n = std::min(step, N - b0);
        ddetr::ms_deform_attn_cuda_backward_launch<scalar_t, acc_t>(
            value_c.data_ptr<scalar_t>() + b0 * S * M * D, shapes_c.data_ptr<int64_t>(),
            start_c.data_ptr<int64_t>(), loc_c.data_ptr<scalar_t>() + b0 * Q * M * L * P * 2,
            attn_c.data_ptr<scalar_t>() + b0 * Q * M * L * P, grad_out_c.data_ptr<scalar_t>() + b0 * Q * M * D,
            grad_value_acc.data_ptr<acc_t>() + b0 * S * M * D, grad_loc.data_ptr<scalar_t>() + b0 * Q * M * L * P * 2,
            grad_attn.data_ptr<scalar_t>() + b0 * Q * M * L * P, sz, lanes, num_sms, stream);
      }
    });
  }
  at::Tensor grad_value =
      acc_type == value_c.scalar_type() ? grad_value_acc : grad_value_acc.to(value_c.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

#endif  // !defined(__CUDA_ARCH__)
