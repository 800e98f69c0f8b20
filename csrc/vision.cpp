// Python bindings of ddetr_d2._C: multi-scale deformable attention, dispatched by device.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <mutex>
#include <set>
#include <thread>

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

// Number of distinct OS threads at::parallel_for uses for `n` unit tasks (a check that the extension
// was compiled with OpenMP and really runs in parallel).
int64_t parallel_threads_used(int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // Busy-wait a little so one thread cannot take every chunk before the others start.
    volatile double x = 0;
    for (int64_t i = begin; i < end; ++i)
      for (int j = 0; j < 2000000; ++j) x = x + 1.0;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
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
  m.def("_ms_deform_attn_forward_naive", &ms_deform_attn_cpu_forward_naive,
        "per-channel CPU forward on ddetr::bilinear_sample (tests only)");
  m.def("_ms_deform_attn_backward_naive", &ms_deform_attn_cpu_backward_naive,
        "per-channel CPU backward on ddetr::bilinear_sample_backward (tests only)");
  m.def("_parallel_threads_used", &parallel_threads_used, "threads used by at::parallel_for (tests only)");
}
