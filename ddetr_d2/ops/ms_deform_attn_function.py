"""Dispatching entry point of multi-scale deformable attention.

PLACEHOLDER (owned by the kernel work): for now always calls the pure-PyTorch reference.
"""
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn"]


def ms_deform_attn(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
    )
