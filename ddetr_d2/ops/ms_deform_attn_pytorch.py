"""Pure-PyTorch reference of multi-scale deformable attention (``grid_sample`` based).

This is the slow but obviously-correct path: it is the fallback when the compiled
extension is missing, the path taken by ONNX export, and the oracle of the kernel tests.
"""
import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_pytorch"]


def ms_deform_attn_pytorch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64
):
    """
    Args:
        value: (N, S, n_heads, head_dim), S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level in S (unused here; kept for
            the same signature as the kernel).
        sampling_locations: (N, Len_q, n_heads, L, P, 2), normalised (x, y); samples
            outside [0, 1] read zeros (``grid_sample`` with zero padding, align_corners=False).
        attention_weights: (N, Len_q, n_heads, L, P).
        im2col_step: unused (kernel batching parameter).
    Returns:
        (N, Len_q, n_heads * head_dim)
    """
    del level_start_index, im2col_step
    N, _, n_heads, head_dim = value.shape
    _, Len_q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (H, W) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, n_heads, head_dim) -> (N*n_heads, head_dim, H, W)
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(N * n_heads, head_dim, int(H), int(W))
        # (N, Len_q, n_heads, P, 2) -> (N*n_heads, Len_q, P, 2)
        grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        # (N*n_heads, head_dim, Len_q, P)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Len_q, n_heads, L, P) -> (N*n_heads, 1, Len_q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * n_heads, 1, Len_q, L * P)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(N, n_heads * head_dim, Len_q).transpose(1, 2).contiguous()
