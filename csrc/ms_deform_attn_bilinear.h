// Bilinear sampling for multi-scale deformable attention, shared by the CPU and the CUDA kernels.
//
// Conventions (same as F.grid_sample(padding_mode="zeros", align_corners=False)):
//   a normalised location (loc_x, loc_y) in [0, 1] maps to pixel coordinates
//   h_im = loc_y * H - 0.5, w_im = loc_x * W - 0.5; pixel (y, x) has its centre at (y, x).
//   A sample contributes only if -1 < h_im < H and -1 < w_im < W; a corner outside the map reads 0.
//
// Memory layout of one (batch, level) slice of `value`: (H * W, n_heads, head_dim) contiguous, i.e.
//   element (y, x, m, c) is at ((y * W + x) * n_heads + m) * head_dim + c.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DDETR_HOST_DEVICE __host__ __device__
#else
#define DDETR_HOST_DEVICE
#endif

#ifdef __CUDA_ARCH__  // device compilation pass only (host compilers warn about the pragma)
#define DDETR_UNROLL _Pragma("unroll")
#else
#define DDETR_UNROLL
#endif

namespace ddetr {

// floor() for a value known to lie in (-1, INT_MAX): avoids depending on host/device math overloads.
template <typename acc_t>
DDETR_HOST_DEVICE inline int floor_to_int(acc_t v) {
  int i = static_cast<int>(v);  // truncates toward zero
  return (static_cast<acc_t>(i) > v) ? i - 1 : i;
}

// The four corners of a bilinear sample, in the order (y_low, x_low), (y_low, x_high), (y_high, x_low),
// (y_high, x_high). Writes for each corner its pixel index y * W + x (-1 when the corner is outside the
// map), its bilinear weight and the derivatives of that weight w.r.t. h_im and w_im.
// Returns false (all pixels -1, all weights and derivatives 0) when the sample is outside the support
// -1 < h_im < H, -1 < w_im < W (NaN included), in which case the sample is 0 and has zero gradient.
template <typename acc_t>
DDETR_HOST_DEVICE inline bool bilinear_corners(int H, int W, acc_t h_im, acc_t w_im, int64_t pixel[4],
                                               acc_t weight[4], acc_t dweight_dh[4], acc_t dweight_dw[4]) {
  const acc_t zero = static_cast<acc_t>(0);
  const acc_t one = static_cast<acc_t>(1);
  // Written so that NaN locations fail the test.
  if (!(h_im > -one && w_im > -one && h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    for (int k = 0; k < 4; ++k) {
      pixel[k] = -1;
      weight[k] = zero;
      dweight_dh[k] = zero;
      dweight_dw[k] = zero;
    }
    return false;
  }
  const int h_low = floor_to_int(h_im);
  const int w_low = floor_to_int(w_im);
  const int h_high = h_low + 1;
  const int w_high = w_low + 1;
  const acc_t lh = h_im - static_cast<acc_t>(h_low);
  const acc_t lw = w_im - static_cast<acc_t>(w_low);
  const acc_t hh = one - lh;
  const acc_t hw = one - lw;

  const bool y0 = h_low >= 0, y1 = h_high <= H - 1;
  const bool x0 = w_low >= 0, x1 = w_high <= W - 1;
  pixel[0] = (y0 && x0) ? static_cast<int64_t>(h_low) * W + w_low : -1;
  pixel[1] = (y0 && x1) ? static_cast<int64_t>(h_low) * W + w_high : -1;
  pixel[2] = (y1 && x0) ? static_cast<int64_t>(h_high) * W + w_low : -1;
  pixel[3] = (y1 && x1) ? static_cast<int64_t>(h_high) * W + w_high : -1;

  weight[0] = hh * hw;
  weight[1] = hh * lw;
  weight[2] = lh * hw;
  weight[3] = lh * lw;
  // d(lh)/d(h_im) = 1, d(hh)/d(h_im) = -1 (and likewise for w).
  dweight_dh[0] = -hw;
  dweight_dh[1] = -lw;
  dweight_dh[2] = hw;
  dweight_dh[3] = lw;
  dweight_dw[0] = -hh;
  dweight_dw[1] = hh;
  dweight_dw[2] = -lh;
  dweight_dw[3] = lh;
  return true;
}

// Bilinear sample of channel c of head m at (h_im, w_im) in one (batch, level) slice.
template <typename scalar_t, typename acc_t>
DDETR_HOST_DEVICE inline acc_t bilinear_sample(const scalar_t* value_level, int H, int W, int n_heads,
                                               int head_dim, int m, int c, acc_t h_im, acc_t w_im) {
  int64_t pixel[4];
  acc_t weight[4], dwdh[4], dwdw[4];
  if (!bilinear_corners<acc_t>(H, W, h_im, w_im, pixel, weight, dwdh, dwdw)) {
    return static_cast<acc_t>(0);
  }
  acc_t val = static_cast<acc_t>(0);
DDETR_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (pixel[k] >= 0) {
      const int64_t off = (pixel[k] * n_heads + m) * head_dim + c;
      val += weight[k] * static_cast<acc_t>(value_level[off]);
    }
  }
  return val;
}

// Backward of one sample. top_grad = dL/d(output) * attention weight.
// Returns the sampled value (the caller forms grad_attn = dL/dout * value). Writes the flat element
// offsets (into value_level, same layout) of the 4 corners in corner_offset[4] (-1 for a corner outside
// the map) and the gradient to ADD to value at each corner in corner_grad[4] (= top_grad * corner
// weight); writes dL/dh_im, dL/dw_im into *grad_h, *grad_w (the caller multiplies by H and W to get the
// gradient w.r.t. the normalised location).
template <typename scalar_t, typename acc_t>
DDETR_HOST_DEVICE inline acc_t bilinear_sample_backward(const scalar_t* value_level, int H, int W,
                                                        int n_heads, int head_dim, int m, int c, acc_t h_im,
                                                        acc_t w_im, acc_t top_grad, int64_t corner_offset[4],
                                                        acc_t corner_grad[4], acc_t* grad_h, acc_t* grad_w) {
  int64_t pixel[4];
  acc_t weight[4], dwdh[4], dwdw[4];
  const bool inside = bilinear_corners<acc_t>(H, W, h_im, w_im, pixel, weight, dwdh, dwdw);
  acc_t val = static_cast<acc_t>(0);
  acc_t gh = static_cast<acc_t>(0);
  acc_t gw = static_cast<acc_t>(0);
DDETR_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (inside && pixel[k] >= 0) {
      const int64_t off = (pixel[k] * n_heads + m) * head_dim + c;
      const acc_t v = static_cast<acc_t>(value_level[off]);
      corner_offset[k] = off;
      corner_grad[k] = top_grad * weight[k];
      val += weight[k] * v;
      gh += dwdh[k] * v;
      gw += dwdw[k] * v;
    } else {
      corner_offset[k] = -1;
      corner_grad[k] = static_cast<acc_t>(0);
    }
  }
  *grad_h = top_grad * gh;
  *grad_w = top_grad * gw;
  return val;
}

}  // namespace ddetr
