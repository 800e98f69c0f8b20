// C++ CPU kernel of multi-scale deformable attention.
//
// Forward:  one task per (batch, query); for every head the D channels of the output row are accumulated
//           with an inner loop over contiguous channels (auto-vectorised).
// Backward: one task per (batch, head), split further into groups of levels only when there are fewer
//           than 2 tasks per thread. The grad_value rows a task writes, grad_value[n, levels, m, :], are
//           disjoint from every other task's, and so are its grad_sampling_loc / grad_attn_weight entries
//           [n, :, m, levels, :], so there are no atomics; each element is accumulated in the same order
//           (query, then point) whatever the number of threads or grouping, so the result is deterministic.
//
// Half / bfloat16 inputs are computed in float32 and the results cast back to the input dtype.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

// On x86-64 Linux with GCC, compile the hot loops for AVX-512 / AVX2+FMA as well as the baseline ISA and
// pick one at load time (ifunc). Elsewhere the baseline build is used.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(DDETR_NO_TARGET_CLONES)
#define DDETR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DDETR_CPU_CLONES
#endif

#if defined(__GNUC__)
#define DDETR_ALWAYS_INLINE inline __attribute__((always_inline))
#define DDETR_RESTRICT __restrict__
#else
#define DDETR_ALWAYS_INLINE inline
#define DDETR_RESTRICT
#endif

namespace {

struct MsdaDims {
  int64_t N, S, M, D, L, Q, P;
};

// o[c] += a0 * v0[c] + a1 * v1[c] + a2 * v2[c] + a3 * v3[c]
template <typename scalar_t, int kD>
DDETR_ALWAYS_INLINE void axpy4(int64_t D_, scalar_t* DDETR_RESTRICT o, const scalar_t* DDETR_RESTRICT v0,
                               const scalar_t* DDETR_RESTRICT v1, const scalar_t* DDETR_RESTRICT v2,
                               const scalar_t* DDETR_RESTRICT v3, scalar_t a0, scalar_t a1, scalar_t a2,
                               scalar_t a3) {
  const int64_t D = kD > 0 ? kD : D_;
  for (int64_t c = 0; c < D; ++c) {
    o[c] += a0 * v0[c] + a1 * v1[c] + a2 * v2[c] + a3 * v3[c];
  }
}

// For k in 0..3: dot[k] = sum_c g[c] * v_k[c] and gv_k[c] += a_k * g[c].
// `omp simd reduction` lets the compiler vectorise the dot products (a fixed reassociation, so the result
// is still deterministic for a given build).
template <typename scalar_t, int kD>
DDETR_ALWAYS_INLINE void dot_axpy4(int64_t D_, const scalar_t* DDETR_RESTRICT g, const scalar_t* DDETR_RESTRICT v0,
                                   const scalar_t* DDETR_RESTRICT v1, const scalar_t* DDETR_RESTRICT v2,
                                   const scalar_t* DDETR_RESTRICT v3, scalar_t* DDETR_RESTRICT gv0,
                                   scalar_t* DDETR_RESTRICT gv1, scalar_t* DDETR_RESTRICT gv2,
                                   scalar_t* DDETR_RESTRICT gv3, scalar_t a0, scalar_t a1, scalar_t a2, scalar_t a3,
                                   scalar_t dot[4]) {
  const int64_t D = kD > 0 ? kD : D_;
  scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < D; ++c) {
    const scalar_t gc = g[c];
    s0 += gc * v0[c];
    s1 += gc * v1[c];
    s2 += gc * v2[c];
    s3 += gc * v3[c];
    gv0[c] += a0 * gc;
    gv1[c] += a1 * gc;
    gv2[c] += a2 * gc;
    gv3[c] += a3 * gc;
  }
  dot[0] = s0;
  dot[1] = s1;
  dot[2] = s2;
  dot[3] = s3;
}

// Per-sample constants of one call: sample j of a (query, head) row belongs to level j / P.
struct SampleLevels {
  std::vector<int> H, W;          // (L * P)
  std::vector<int64_t> start_md;  // level start * M * D (element offset of the level in a batch item)
  SampleLevels(const MsdaDims& d, const int64_t* shapes, const int64_t* starts)
      : H(d.L * d.P), W(d.L * d.P), start_md(d.L * d.P) {
    for (int64_t j = 0; j < d.L * d.P; ++j) {
      const int64_t l = j / d.P;
      H[j] = static_cast<int>(shapes[2 * l]);
      W[j] = static_cast<int>(shapes[2 * l + 1]);
      start_md[j] = starts[l] * d.M * d.D;
    }
  }
};

// Forward for the (batch, query) rows [begin, end). kD > 0: head_dim known at compile time (== d.D).
template <typename scalar_t, int kD>
DDETR_ALWAYS_INLINE void forward_rows(const MsdaDims& d, const SampleLevels& lv, const scalar_t* value,
                                      const scalar_t* loc, const scalar_t* attn, const scalar_t* zeros,
                                      scalar_t* out, int64_t begin, int64_t end) {
  const int64_t MD = d.M * d.D, LP = d.L * d.P;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / d.Q;
    for (int64_t m = 0; m < d.M; ++m) {
      scalar_t* o = out + row * MD + m * d.D;
      const int64_t i0 = (row * d.M + m) * LP;  // index of (n, q, m, 0, 0) in attn
      const scalar_t* base = value + n * d.S * MD + m * d.D;
      for (int64_t j = 0; j < LP; ++j) {
        const int H = lv.H[j], W = lv.W[j];
        const scalar_t* l_loc = loc + 2 * (i0 + j);
        const scalar_t h_im = l_loc[1] * static_cast<scalar_t>(H) - static_cast<scalar_t>(0.5);
        const scalar_t w_im = l_loc[0] * static_cast<scalar_t>(W) - static_cast<scalar_t>(0.5);
        int64_t pix[4];
        scalar_t wt[4], dwdh[4], dwdw[4];
        if (!ddetr::bilinear_corners<scalar_t>(H, W, h_im, w_im, pix, wt, dwdh, dwdw)) continue;
        const scalar_t a = attn[i0 + j];
        const scalar_t* level = base + lv.start_md[j];
        const scalar_t* v[4];
        for (int k = 0; k < 4; ++k) v[k] = pix[k] >= 0 ? level + pix[k] * MD : zeros;
        axpy4<scalar_t, kD>(d.D, o, v[0], v[1], v[2], v[3], a * wt[0], a * wt[1], a * wt[2], a * wt[3]);
      }
    }
  }
}

// Backward for the units [begin, end); unit = (batch, head, level group), the L levels being split into
// `groups` contiguous groups. Every grad element is written by exactly one unit, in the same order
// (query, then point) whatever the grouping, so the result does not depend on it either.
template <typename scalar_t, int kD>
DDETR_ALWAYS_INLINE void backward_units(const MsdaDims& d, const SampleLevels& lv, int64_t groups,
                                        const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                                        const scalar_t* grad_out, const scalar_t* zeros, scalar_t* grad_value,
                                        scalar_t* grad_loc, scalar_t* grad_attn, int64_t begin, int64_t end) {
  const int64_t MD = d.M * d.D, LP = d.L * d.P;
  std::vector<scalar_t> scratch(4 * d.D);  // grad sink for corners outside the map
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t grp = unit % groups;
    const int64_t m = (unit / groups) % d.M;
    const int64_t n = unit / (groups * d.M);
    const int64_t j0 = (d.L * grp / groups) * d.P, j1 = (d.L * (grp + 1) / groups) * d.P;
    const scalar_t* value_nm = value + n * d.S * MD + m * d.D;
    scalar_t* grad_value_nm = grad_value + n * d.S * MD + m * d.D;
    for (int64_t q = 0; q < d.Q; ++q) {
      const int64_t row = n * d.Q + q;
      const scalar_t* g = grad_out + row * MD + m * d.D;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = (row * d.M + m) * LP + j;  // index of (n, q, m, l, p) in attn
        const int H = lv.H[j], W = lv.W[j];
        const scalar_t h_im = loc[2 * i + 1] * static_cast<scalar_t>(H) - static_cast<scalar_t>(0.5);
        const scalar_t w_im = loc[2 * i] * static_cast<scalar_t>(W) - static_cast<scalar_t>(0.5);
        int64_t pix[4];
        scalar_t wt[4], dwdh[4], dwdw[4];
        if (!ddetr::bilinear_corners<scalar_t>(H, W, h_im, w_im, pix, wt, dwdh, dwdw)) continue;
        const scalar_t a = attn[i];
        const int64_t level = lv.start_md[j];
        const scalar_t* v[4];
        scalar_t* gv[4];
        for (int k = 0; k < 4; ++k) {
          v[k] = pix[k] >= 0 ? value_nm + level + pix[k] * MD : zeros;
          gv[k] = pix[k] >= 0 ? grad_value_nm + level + pix[k] * MD : scratch.data() + k * d.D;
        }
        scalar_t dot[4];
        dot_axpy4<scalar_t, kD>(d.D, g, v[0], v[1], v[2], v[3], gv[0], gv[1], gv[2], gv[3], a * wt[0], a * wt[1],
                            a * wt[2], a * wt[3], dot);
        scalar_t ga = 0, gh = 0, gw = 0;
        for (int k = 0; k < 4; ++k) {
          ga += wt[k] * dot[k];
          gh += dwdh[k] * dot[k];
          gw += dwdw[k] * dot[k];
        }
        grad_attn[i] = ga;
        grad_loc[2 * i] = a * gw * static_cast<scalar_t>(W);
        grad_loc[2 * i + 1] = a * gh * static_cast<scalar_t>(H);
      }
    }
  }
}

// Non-template entry points so that target_clones can make ISA-specific copies.
DDETR_CPU_CLONES void forward_rows_f32(const MsdaDims& d, const SampleLevels& lv, const float* value,
                                       const float* loc, const float* attn, const float* zeros, float* out,
                                       int64_t begin, int64_t end) {
  if (d.D == 32) {
    forward_rows<float, 32>(d, lv, value, loc, attn, zeros, out, begin, end);
  } else {
    forward_rows<float, 0>(d, lv, value, loc, attn, zeros, out, begin, end);
  }
}
DDETR_CPU_CLONES void forward_rows_f64(const MsdaDims& d, const SampleLevels& lv, const double* value,
                                       const double* loc, const double* attn, const double* zeros, double* out,
                                       int64_t begin, int64_t end) {
  if (d.D == 32) {
    forward_rows<double, 32>(d, lv, value, loc, attn, zeros, out, begin, end);
  } else {
    forward_rows<double, 0>(d, lv, value, loc, attn, zeros, out, begin, end);
  }
}
DDETR_CPU_CLONES void backward_units_f32(const MsdaDims& d, const SampleLevels& lv, int64_t groups,
                                         const float* value, const float* loc, const float* attn,
                                         const float* grad_out, const float* zeros, float* grad_value,
                                         float* grad_loc, float* grad_attn, int64_t begin, int64_t end) {
  if (d.D == 32) {
    backward_units<float, 32>(d, lv, groups, value, loc, attn, grad_out, zeros, grad_value, grad_loc, grad_attn,
                              begin, end);
  } else {
    backward_units<float, 0>(d, lv, groups, value, loc, attn, grad_out, zeros, grad_value, grad_loc, grad_attn,
                             begin, end);
  }
}
DDETR_CPU_CLONES void backward_units_f64(const MsdaDims& d, const SampleLevels& lv, int64_t groups,
                                         const double* value, const double* loc, const double* attn,
                                         const double* grad_out, const double* zeros, double* grad_value,
                                         double* grad_loc, double* grad_attn, int64_t begin, int64_t end) {
  if (d.D == 32) {
    backward_units<double, 32>(d, lv, groups, value, loc, attn, grad_out, zeros, grad_value, grad_loc, grad_attn,
                              begin, end);
  } else {
    backward_units<double, 0>(d, lv, groups, value, loc, attn, grad_out, zeros, grad_value, grad_loc, grad_attn,
                             begin, end);
  }
}

inline void forward_dispatch(const MsdaDims& d, const SampleLevels& lv, const float* value, const float* loc,
                             const float* attn, const float* zeros, float* out, int64_t begin, int64_t end) {
  forward_rows_f32(d, lv, value, loc, attn, zeros, out, begin, end);
}
inline void forward_dispatch(const MsdaDims& d, const SampleLevels& lv, const double* value, const double* loc,
                             const double* attn, const double* zeros, double* out, int64_t begin, int64_t end) {
  forward_rows_f64(d, lv, value, loc, attn, zeros, out, begin, end);
}
inline void backward_dispatch(const MsdaDims& d, const SampleLevels& lv, int64_t groups, const float* value,
                              const float* loc, const float* attn, const float* grad_out, const float* zeros,
                              float* grad_value, float* grad_loc, float* grad_attn, int64_t begin, int64_t end) {
  backward_units_f32(d, lv, groups, value, loc, attn, grad_out, zeros, grad_value, grad_loc, grad_attn, begin,
                     end);
}
inline void backward_dispatch(const MsdaDims& d, const SampleLevels& lv, int64_t groups, const double* value,
                              const double* loc, const double* attn, const double* grad_out, const double* zeros,
                              double* grad_value, double* grad_loc, double* grad_attn, int64_t begin,
                              int64_t end) {
  backward_units_f64(d, lv, groups, value, loc, attn, grad_out, zeros, grad_value, grad_loc, grad_attn, begin,
                     end);
}

MsdaDims get_dims(const at::Tensor& value, const at::Tensor& sampling_loc) {
  return MsdaDims{value.size(0),        value.size(1),        value.size(2),       value.size(3),
                  sampling_loc.size(3), sampling_loc.size(1), sampling_loc.size(4)};
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_cpu: expected CPU tensors, got ", value.device());
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_loc_in,
                                      const at::Tensor& attn_weight_in, int im2col_step) {
  ms_deform_attn_check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in,
                              im2col_step);
  check_cpu(value_in);
  if (is_reduced_float(value_in)) {
    return ms_deform_attn_cpu_forward(value_in.to(at::kFloat), spatial_shapes, level_start_index,
                                      sampling_loc_in.to(at::kFloat), attn_weight_in.to(at::kFloat), im2col_step)
        .to(value_in.scalar_type());
  }
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = sampling_loc_in.contiguous();
  const at::Tensor attn = attn_weight_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const MsdaDims d = get_dims(value, loc);
  at::Tensor out = at::zeros({d.N, d.Q, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    const std::vector<scalar_t> zeros(d.D, scalar_t(0));
    const scalar_t* value_ptr = value.data_ptr<scalar_t>();
    const scalar_t* loc_ptr = loc.data_ptr<scalar_t>();
    const scalar_t* attn_ptr = attn.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t* shp = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    const SampleLevels lv(d, shp, st);
    const int64_t work_per_row = std::max<int64_t>(1, d.M * d.L * d.P * d.D);
    const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
    const int64_t step = std::min<int64_t>(im2col_step, d.N);
    for (int64_t b0 = 0; b0 < d.N; b0 += step) {
      const int64_t b1 = std::min(d.N, b0 + step);
      at::parallel_for(b0 * d.Q, b1 * d.Q, grain, [&](int64_t begin, int64_t end) {
        forward_dispatch(d, lv, value_ptr, loc_ptr, attn_ptr, zeros.data(), out_ptr, begin, end);
      });
    }
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_loc_in,
                                                    const at::Tensor& attn_weight_in,
                                                    const at::Tensor& grad_output_in, int im2col_step) {
  ms_deform_attn_check_inputs(value_in, spatial_shapes, level_start_index, sampling_loc_in, attn_weight_in,
                              im2col_step);
  ms_deform_attn_check_grad_output(value_in, sampling_loc_in, grad_output_in);
  check_cpu(value_in);
  if (is_reduced_float(value_in)) {
    auto grads = ms_deform_attn_cpu_backward(value_in.to(at::kFloat), spatial_shapes, level_start_index,
                                             sampling_loc_in.to(at::kFloat), attn_weight_in.to(at::kFloat),
                                             grad_output_in.to(at::kFloat), im2col_step);
    for (auto& g : grads) g = g.to(value_in.scalar_type());
    return grads;
  }
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = sampling_loc_in.contiguous();
  const at::Tensor attn = attn_weight_in.contiguous();
  const at::Tensor grad_out = grad_output_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const MsdaDims d = get_dims(value, loc);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  if (d.N == 0 || d.Q == 0) return {grad_value, grad_loc, grad_attn};

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    const std::vector<scalar_t> zeros(d.D, scalar_t(0));
    const scalar_t* value_ptr = value.data_ptr<scalar_t>();
    const scalar_t* loc_ptr = loc.data_ptr<scalar_t>();
    const scalar_t* attn_ptr = attn.data_ptr<scalar_t>();
    const scalar_t* grad_out_ptr = grad_out.data_ptr<scalar_t>();
    scalar_t* grad_value_ptr = grad_value.data_ptr<scalar_t>();
    scalar_t* grad_loc_ptr = grad_loc.data_ptr<scalar_t>();
    scalar_t* grad_attn_ptr = grad_attn.data_ptr<scalar_t>();
    const int64_t* shp = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    const SampleLevels lv(d, shp, st);
    const int64_t step = std::min<int64_t>(im2col_step, d.N);
    for (int64_t b0 = 0; b0 < d.N; b0 += step) {
      const int64_t b1 = std::min(d.N, b0 + step);
      // (batch, head) units; split the levels into groups only when that is needed to feed every thread
      // twice (a unit reads the (query, head) rows of loc / attn / grad_output, so fewer, longer units
      // read them more contiguously).
      const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
      const int64_t groups = std::min<int64_t>(d.L, std::max<int64_t>(1, (want + (b1 - b0) * d.M - 1) /
                                                                             ((b1 - b0) * d.M)));
      const int64_t units_per_batch = d.M * groups;
      at::parallel_for(b0 * units_per_batch, b1 * units_per_batch, 1, [&](int64_t begin, int64_t end) {
        backward_dispatch(d, lv, groups, value_ptr, loc_ptr, attn_ptr, grad_out_ptr, zeros.data(), grad_value_ptr,
                          grad_loc_ptr, grad_attn_ptr, begin, end);
      });
    }
  });
  return {grad_value, grad_loc, grad_attn};
}
