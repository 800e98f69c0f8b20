"""Sine position embedding of Deformable DETR (normalised, with the -0.5 pixel-centre offset)."""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """
    2-d sine/cosine embedding computed from a padding mask, as in the official Deformable DETR:
    coordinates are cumulative counts of valid pixels, shifted by -0.5 (pixel centres), divided
    by the valid extent of each image and scaled to [0, 2*pi]; ``num_pos_feats`` channels per
    axis, y first then x (output has ``2 * num_pos_feats`` channels).
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale given but normalize is False")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask):
        """
        Args:
            mask: (N, H, W) bool, True at padded positions.
        Returns:
            (N, 2 * num_pos_feats, H, W) float32.
        """
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a (N, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
