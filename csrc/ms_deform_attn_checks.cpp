// Input validation shared by the CPU and CUDA entry points of multi-scale deformable attention.
#include "ms_deform_attn.h"

namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& value, const char* name) {
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(),
              " but value is on ", value.device(), "; all inputs must be on the same device");
}

}  // namespace

void ms_deform_attn_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                 const at::Tensor& attn_weight, int64_t im2col_step) {
  TORCH_CHECK(im2col_step >= 1, "ms_deform_attn: im2col_step must be >= 1, got ", im2col_step);

  // Dimensions.
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be 4-D (N, S, n_heads, head_dim), got shape ",
              value.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be 6-D (N, Len_q, n_heads, n_levels, n_points, 2), "
              "got shape ",
              sampling_loc.sizes());
  TORCH_CHECK(attn_weight.dim() == 5,
              "ms_deform_attn: attention_weights must be 5-D (N, Len_q, n_heads, n_levels, n_points), got shape ",
              attn_weight.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (n_levels, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1,
              "ms_deform_attn: level_start_index must be 1-D (n_levels,), got shape ", level_start_index.sizes());

  // Devices.
  check_same_device(spatial_shapes, value, "spatial_shapes");
  check_same_device(level_start_index, value, "level_start_index");
  check_same_device(sampling_loc, value, "sampling_locations");
  check_same_device(attn_weight, value, "attention_weights");

  // Dtypes.
  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_attn: value must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK(sampling_loc.scalar_type() == value.scalar_type(), "ms_deform_attn: sampling_locations dtype ",
              sampling_loc.scalar_type(), " != value dtype ", value.scalar_type());
  TORCH_CHECK(attn_weight.scalar_type() == value.scalar_type(), "ms_deform_attn: attention_weights dtype ",
              attn_weight.scalar_type(), " != value dtype ", value.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ", level_start_index.scalar_type());

  // Sizes that must agree across tensors.
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2);
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(L >= 1, "ms_deform_attn: spatial_shapes must have at least one level");
  TORCH_CHECK(value.size(3) >= 1, "ms_deform_attn: head_dim (value.size(3)) must be >= 1");
  TORCH_CHECK(M >= 1, "ms_deform_attn: n_heads (value.size(2)) must be >= 1");
  TORCH_CHECK(level_start_index.size(0) == L, "ms_deform_attn: level_start_index has ", level_start_index.size(0),
              " entries but spatial_shapes has ", L, " levels");
  TORCH_CHECK(sampling_loc.size(0) == N, "ms_deform_attn: batch mismatch: value has N=", N,
              ", sampling_locations has ", sampling_loc.size(0));
  TORCH_CHECK(sampling_loc.size(2) == M, "ms_deform_attn: n_heads mismatch: value has ", M,
              ", sampling_locations has ", sampling_loc.size(2));
  TORCH_CHECK(sampling_loc.size(3) == L, "ms_deform_attn: n_levels mismatch: spatial_shapes has ", L,
              ", sampling_locations has ", sampling_loc.size(3));
  const int64_t Q = sampling_loc.size(1), P = sampling_loc.size(4);
  TORCH_CHECK(attn_weight.size(0) == N && attn_weight.size(1) == Q && attn_weight.size(2) == M &&
                  attn_weight.size(3) == L && attn_weight.size(4) == P,
              "ms_deform_attn: attention_weights shape ", attn_weight.sizes(),
              " does not match sampling_locations shape ", sampling_loc.sizes(),
              " (expected (N, Len_q, n_heads, n_levels, n_points) = (", N, ", ", Q, ", ", M, ", ", L, ", ", P, "))");

  // Values of spatial_shapes / level_start_index (tiny; copied to the host for CUDA tensors).
  const at::Tensor shapes_cpu = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor start_cpu = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shp = shapes_cpu.data_ptr<int64_t>();
  const int64_t* start = start_cpu.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shp[2 * l], W = shp[2 * l + 1];
    TORCH_CHECK(H >= 1 && W >= 1, "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W,
                ") must be positive");
    TORCH_CHECK(H <= (int64_t(1) << 30) && W <= (int64_t(1) << 30) && H * W < (int64_t(1) << 31),
                "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W, ") is too large (H*W must be < 2^31)");
    TORCH_CHECK(start[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", start[l],
                " but the levels before it hold sum(H*W) = ", total,
                " (level_start_index must be the exclusive cumulative sum of H*W)");
    total += H * W;
  }
  TORCH_CHECK(total == S, "ms_deform_attn: value has S=", S, " positions but spatial_shapes sums to ", total,
              " (sum of H*W over levels)");
}

void ms_deform_attn_check_grad_output(const at::Tensor& value, const at::Tensor& sampling_loc,
                                      const at::Tensor& grad_output) {
  check_same_device(grad_output, value, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output dtype ",
              grad_output.scalar_type(), " != value dtype ", value.scalar_type());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == value.size(0) &&
                  grad_output.size(1) == sampling_loc.size(1) &&
                  grad_output.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn: grad_output must have shape (N, Len_q, n_heads*head_dim) = (", value.size(0), ", ",
              sampling_loc.size(1), ", ", value.size(2) * value.size(3), "), got ", grad_output.sizes());
}
