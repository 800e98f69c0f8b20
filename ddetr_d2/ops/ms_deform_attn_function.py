"""Dispatching entry point of multi-scale deformable attention.

``ms_deform_attn`` runs the CUDA kernel for CUDA tensors and the C++ CPU kernel for CPU tensors
(both in ``ddetr_d2._C``), and falls back to the pure-PyTorch reference ``ms_deform_attn_pytorch``
(with a one-time warning naming the reason) when the extension is missing or lacks the device,
and while tracing / exporting (then the formulation chosen with ``msda_export_formulation``: the
``grid_sample`` reference by default, or the gather-based ``ms_deform_attn_gather``).

Dtypes: float32 and float64 on every device; float16 / bfloat16 natively on CUDA; on CPU
half-precision inputs are computed in float32 and the result cast back to the input dtype.
Inputs of mixed floating dtypes (e.g. half values with float32 locations under autocast) are all
promoted to their common dtype first.
"""

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from . import _extension, ms_deform_attn_export
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "MSDeformAttnFunction"]


class MSDeformAttnFunction(Function):
    """Autograd wrapper of the compiled kernels (first-order gradients only)."""

    @staticmethod
    def forward(ctx, value, shapes, start_index, locations, weights, im2col_step):
        ext = _extension.get_extension()
        ctx.im2col_step = im2col_step
        output = ext.ms_deform_attn_forward(value, shapes, start_index, locations, weights, im2col_step)
        ctx.save_for_backward(value, shapes, start_index, locations, weights)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_sampling_loc, grad_attn_weight = _extension.get_extension().ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
            ctx.im2col_step,
        )
        return grad_value, None, None, grad_sampling_loc, grad_attn_weight, None


def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step):
    """Cheap shape checks (no device sync); the C++ side checks the values of spatial_shapes too."""
    for name, t in (
        ("value", value),
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, n_heads, head_dim), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Len_q, n_heads, n_levels, n_points, 2), "
            f"got {tuple(sampling_locations.shape)}"
        )
    N, _, M, _ = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} in batch (dim 0) or n_heads (dim 2)"
        )
    if tuple(attention_weights.shape) != (N, Q, M, L, P):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Len_q, n_heads, n_levels, n_points) = "
            f"{(N, Q, M, L, P)}, got {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (L, 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (n_levels, 2) = ({L}, 2), "
            f"got {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (n_levels,) = ({L},), "
            f"got {tuple(level_start_index.shape)}"
        )
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"ms_deform_attn: im2col_step must be an int >= 1, got {step!r}")


def _fallback_reason(value):
    ext = _extension.get_extension()
    if ext is None:
        return "ext", f"the extension ddetr_d2._C could not be loaded ({_extension.extension_error()})"
    if value.is_cuda and not ext.has_cuda():
        return "cuda", "ddetr_d2._C was built without CUDA support"
    if value.device.type not in ("cpu", "cuda"):
        return f"device-{value.device.type}", f"the extension has no kernel for device '{value.device.type}'"
    return None, None


def ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """
    Multi-scale deformable attention.

    Args:
        value: (N, S, n_heads, head_dim), S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, start of each level in S.
        sampling_locations: (N, Len_q, n_heads, L, P, 2) normalised (x, y); samples outside
            [0, 1] read zeros (like ``grid_sample(padding_mode="zeros", align_corners=False)``).
        attention_weights: (N, Len_q, n_heads, L, P).
        im2col_step: batch chunk of the kernels (any value >= 1; need not divide N).
    Returns:
        (N, Len_q, n_heads * head_dim), differentiable w.r.t. value, sampling_locations and
        attention_weights.
    """
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_shapes(*args, im2col_step)
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        if ms_deform_attn_export.get_export_formulation() == "gather":
            fn = ms_deform_attn_export.ms_deform_attn_gather
        else:
            fn = ms_deform_attn_pytorch
        return fn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
        )
    key, reason = _fallback_reason(value)
    if key is not None:
        _extension.warn_fallback(key, reason)
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
        )
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    dtype = torch.promote_types(dtype, attention_weights.dtype)
    if not dtype.is_floating_point:
        raise TypeError(
            f"ms_deform_attn: value, sampling_locations and attention_weights must be floating point, got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights)
    )
    return MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
