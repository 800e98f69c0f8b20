// Test-only helpers of the deformable-attention tests, NOT part of the shipped ddetr_d2._C: the tests build
// this file (with ../ms_deform_attn_checks.cpp) through torch.utils.cpp_extension.load (tests/test_msda_cpu.py).
//
// * Naive per-channel CPU forward / backward built directly on ddetr::bilinear_sample(_backward) (the
//   functions the CUDA kernel uses), single-threaded: they check the shared header on machines without a GPU.
// * parallel_threads_used(n): the number of distinct OS threads at::parallel_for uses for n unit tasks, when
//   compiled with the flags setup.py gives ddetr_d2._C (-fopenmp).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

namespace {

struct MsdaDims {
  int64_t N, S, M, D, L, Q, P;
};

MsdaDims get_dims(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return MsdaDims{value.size(0),        value.size(1),        value.size(2),       value.size(3),
                  sampling_loc.size(3), sampling_loc.size(1), sampling_loc.size(4)};
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn naive: expected CPU tensors, got ", value.device());
}


at::Tensor ms_deform_attn_cpu_forward_naive(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                            const at::Tensor& level_start_index, const at::Tensor& sampling_loc_in,
                                            const at::Tensor& attn_weight_in) {
  ms_deform_attn_check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in, 1);
  check_cpu(value_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = sampling_loc_in.contiguous();
  const at::Tensor attn = attn_weight_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const MsdaDims d = get_dims(value, loc);
  at::Tensor out = at::zeros({d.N, d.Q, d.M * d.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_naive_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* lp = loc.data_ptr<scalar_t>();
    const scalar_t* ap = attn.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* shp = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    for (int64_t n = 0; n < d.N; ++n)
      for (int64_t q = 0; q < d.Q; ++q)
        for (int64_t m = 0; m < d.M; ++m)
          for (int64_t c = 0; c < d.D; ++c) {
            acc_t acc = 0;
            for (int64_t l = 0; l < d.L; ++l) {
              const int H = static_cast<int>(shp[2 * l]), W = static_cast<int>(shp[2 * l + 1]);
              const scalar_t* value_l = v + (n * d.S + st[l]) * d.M * d.D;
              for (int64_t p = 0; p < d.P; ++p) {
                const int64_t i = (((n * d.Q + q) * d.M + m) * d.L + l) * d.P + p;
                const acc_t h_im = static_cast<acc_t>(lp[2 * i + 1]) * H - acc_t(0.5);
                const acc_t w_im = static_cast<acc_t>(lp[2 * i]) * W - acc_t(0.5);
                acc += static_cast<acc_t>(ap[i]) * ddetr::bilinear_sample<scalar_t, acc_t>(
                                                       value_l, H, W, static_cast<int>(d.M),
                                                       static_cast<int>(d.D), static_cast<int>(m),
                                                       static_cast<int>(c), h_im, w_im);
              }
            }
            op[((n * d.Q + q) * d.M + m) * d.D + c] = static_cast<scalar_t>(acc);
          }
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward_naive(const at::Tensor& value_in,
                                                          const at::Tensor& spatial_shapes,
                                                          const at::Tensor& level_start_index,
                                                          const at::Tensor& sampling_loc_in,
                                                          const at::Tensor& attn_weight_in,
                                                          const at::Tensor& grad_output_in) {
  ms_deform_attn_check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in, 1);
  ms_deform_attn_check_grad_output(value_in, sampling_loc_in, grad_output_in);
  check_cpu(value_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = sampling_loc_in.contiguous();
  const at::Tensor attn = attn_weight_in.contiguous();
  const at::Tensor grad_out = grad_output_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const MsdaDims d = get_dims(value, loc);
  // Accumulate in the op-math type (float for half / bfloat16), as the CUDA kernel does.
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros(loc.sizes(), loc.options().dtype(acc_type));
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "msda_naive_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* lp = loc.data_ptr<scalar_t>();
    const scalar_t* ap = attn.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    acc_t* gvp = grad_value.data_ptr<acc_t>();
    acc_t* glp = grad_loc.data_ptr<acc_t>();
    acc_t* gap = grad_attn.data_ptr<acc_t>();
    const int64_t* shp = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    for (int64_t n = 0; n < d.N; ++n)
      for (int64_t q = 0; q < d.Q; ++q)
        for (int64_t m = 0; m < d.M; ++m)
          for (int64_t c = 0; c < d.D; ++c) {
            const acc_t g = static_cast<acc_t>(gp[((n * d.Q + q) * d.M + m) * d.D + c]);
            for (int64_t l = 0; l < d.L; ++l) {
              const int H = static_cast<int>(shp[2 * l]), W = static_cast<int>(shp[2 * l + 1]);
              const int64_t level_offset = (n * d.S + st[l]) * d.M * d.D;
              for (int64_t p = 0; p < d.P; ++p) {
                const int64_t i = (((n * d.Q + q) * d.M + m) * d.L + l) * d.P + p;
                const acc_t a = static_cast<acc_t>(ap[i]);
                const acc_t h_im = static_cast<acc_t>(lp[2 * i + 1]) * H - acc_t(0.5);
                const acc_t w_im = static_cast<acc_t>(lp[2 * i]) * W - acc_t(0.5);
                int64_t corner_offset[4];
                acc_t corner_grad[4], grad_h, grad_w;
                const acc_t val = ddetr::bilinear_sample_backward<scalar_t, acc_t>(
                    v + level_offset, H, W, static_cast<int>(d.M), static_cast<int>(d.D), static_cast<int>(m),
                    static_cast<int>(c), h_im, w_im, g * a, corner_offset, corner_grad, &grad_h, &grad_w);
                gap[i] += g * val;
                glp[2 * i] += grad_w * W;
                glp[2 * i + 1] += grad_h * H;
                for (int k = 0; k < 4; ++k) {
                  if (corner_offset[k] >= 0) gvp[level_offset + corner_offset[k]] += corner_grad[k];
                }
              }
            }
          }
  });
  return {grad_value.to(value.scalar_type()), grad_loc.to(value.scalar_type()),
          grad_attn.to(value.scalar_type())};
}

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
  m.doc() = "test-only helpers of ddetr-d2's deformable attention tests (not shipped)";
  m.def("ms_deform_attn_forward_naive", &ms_deform_attn_cpu_forward_naive,
        "per-channel CPU forward on ddetr::bilinear_sample");
  m.def("ms_deform_attn_backward_naive", &ms_deform_attn_cpu_backward_naive,
        "per-channel CPU backward on ddetr::bilinear_sample_backward");
  m.def("parallel_threads_used", &parallel_threads_used, "threads used by at::parallel_for");
}
