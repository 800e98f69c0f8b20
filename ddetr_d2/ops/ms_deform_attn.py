"""The multi-scale deformable attention module (Zhu et al., "Deformable DETR", ICLR 2021)."""
import math
import warnings

import torch
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from .ms_deform_attn_function import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """
    Each query attends to ``n_points`` learned sampling points per head and per level around
    its reference point, with softmax weights over the ``n_levels * n_points`` samples.

    Parameter names follow the official implementation (``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``) so official checkpoints load as is.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, im2col_step=64):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f"MSDeformAttn: head dim {head_dim} is not a power of 2; the CUDA kernel is most "
                "efficient with a power of 2.",
                stacklevel=2,
            )
        self.im2col_step = im2col_step
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start on a ring of n_heads directions (normalised to the unit square),
        # the i-th point of each head (i+1) pixels away; the weights start at zero.
        constant_(self.sampling_offsets.weight.data, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(self.n_heads, 1, 1, 2)
            .repeat(1, self.n_levels, self.n_points, 1)
        )
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        Args:
            query: (N, Len_q, C)
            reference_points: (N, Len_q, n_levels, 2) normalised (x, y) in [0, 1] (top-left
                (0, 0), bottom-right (1, 1), padded area included), or (N, Len_q, n_levels, 4)
                boxes (cx, cy, w, h).
            input_flatten: (N, S, C), S = sum_l H_l * W_l.
            input_spatial_shapes: (n_levels, 2) int64, (H_l, W_l).
            input_level_start_index: (n_levels,) int64.
            input_padding_mask: (N, S) bool, True at padded positions, or None.
        Returns:
            (N, Len_q, C)
        """
        N, Len_q, _ = query.shape
        N_in, Len_in, _ = input_flatten.shape
        if N_in != N:
            raise ValueError(f"query batch {N} != input_flatten batch {N_in}")
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"input_spatial_shapes must be ({self.n_levels}, 2), got {tuple(input_spatial_shapes.shape)}"
            )
        if int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum()) != Len_in:
            raise ValueError(
                f"input_flatten length {Len_in} != sum of H*W over input_spatial_shapes "
                f"{input_spatial_shapes.tolist()}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            N, Len_q, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = attention_weights.softmax(-1).view(
            N, Len_q, self.n_heads, self.n_levels, self.n_points
        )
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W, H), x first.
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points last dim must be 2 or 4, got shape {tuple(reference_points.shape)}"
            )
        output = ms_deform_attn(
            value,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations,
            attention_weights,
            self.im2col_step,
        )
        return self.output_proj(output)
