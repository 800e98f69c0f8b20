// Python bindings of ddetr_d2._C: multi-scale deformable attention, dispatched by device.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace {

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                  const at::Tensor& attn_weight, int64_t im2col_step) {
  TORCH_CHECK(im2col_step >= 1 && im2col_step <= (int64_t(1) << 30),
              "ms_deform_attn: im2col_step must be in [1, 2^30], got ", im2col_step);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                                       static_cast<int>(im2col_step));
#else
    TORCH_CHECK(false, "ms_deform_attn: ddetr_d2._C was built without CUDA support; got CUDA tensors");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_cpu_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                                    static_cast<int>(im2col_step));
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                                const at::Tensor& attn_weight, const at::Tensor& grad_output,
                                                int64_t im2col_step) {
  TORCH_CHECK(im2col_step >= 1 && im2col_step <= (int64_t(1) << 30),
              "ms_deform_attn: im2col_step must be in [1, 2^30], got ", im2col_step);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                                        grad_output, static_cast<int>(im2col_step));
#else
    TORCH_CHECK(false, "ms_deform_attn: ddetr_d2._C was built without CUDA support; got CUDA tensors");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_cpu_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                                     grad_output, static_cast<int>(im2col_step));
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddetr-d2 compiled ops: multi-scale deformable attention (CPU and, if built, CUDA)";
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward,
        "MSDA forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step)");
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward,
        "MSDA backward(..., grad_output, im2col_step) -> [grad_value, grad_sampling_loc, grad_attn_weight]");
  m.def("ms_deform_attn_check_inputs", &ms_deform_attn_check_inputs, "validate MSDA inputs (raises)");
  m.def("has_cuda", &has_cuda, "whether the extension was built with the CUDA kernel");
}
