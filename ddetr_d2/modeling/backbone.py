"""
Multi-scale input of the Deformable DETR transformer from a Detectron2 backbone.

The official model projects C3, C4, C5 (strides 8/16/32) with 1x1 conv + GroupNorm(32) to the
transformer width and adds levels by 3x3 stride-2 conv + GroupNorm on C5 (first extra level) or
on the previous extra level. The projection modules live in the meta-architecture under the
official name ``input_proj``; this file only builds them and runs them.
"""

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_input_proj", "multi_scale_features", "interpolate_mask", "image_padding_mask"]


def build_input_proj(in_channels, hidden_dim, num_feature_levels):
    """
    Args:
        in_channels (list[int]): channels of the backbone features used, fine to coarse.
        hidden_dim (int): transformer width (must be divisible by 32 for GroupNorm(32)).
        num_feature_levels (int): total number of levels (>= len(in_channels)).
    Returns:
        nn.ModuleList of ``num_feature_levels`` ``Sequential(Conv2d, GroupNorm)``, official init
        (conv xavier-uniform gain 1, bias 0).
    """
    if hidden_dim % 32 != 0:
        raise ValueError(f"HIDDEN_DIM must be divisible by 32 (GroupNorm(32)), got {hidden_dim}")
    if num_feature_levels < len(in_channels):
        raise ValueError(
            f"num_feature_levels {num_feature_levels} < number of backbone features {len(in_channels)}"
        )
    projs = [
        nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
        for c in in_channels
    ]
    c = in_channels[-1]
    for _ in range(num_feature_levels - len(in_channels)):
        projs.append(
            nn.Sequential(
                nn.Conv2d(c, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim)
            )
        )
        c = hidden_dim
    for proj in projs:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projs)


def image_padding_mask(image_sizes, padded_hw, device):
    """(N, H, W) bool mask, True at the padded pixels of each image of an ImageList."""
    mask = torch.ones((len(image_sizes), *padded_hw), dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :h, :w] = False
    return mask


def interpolate_mask(mask, size):
    """Nearest-neighbour resize of an (N, H, W) bool mask to ``size`` (official per-level masks)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def _project(backbone, input_proj, in_features, x):
    """Backbone + input projections of a batch tensor (N, 3, H, W) -> list of (N, C, H_l, W_l)."""
    features = backbone(x)
    feats = [features[f] for f in in_features]
    srcs = [proj(f) for proj, f in zip(input_proj, feats)]
    for lvl in range(len(feats), len(input_proj)):
        srcs.append(input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1]))
    return srcs


def multi_scale_features(backbone, input_proj, in_features, images, per_image=True):
    """
    Args:
        backbone: Detectron2 backbone returning a dict with ``in_features``.
        input_proj: ModuleList from :func:`build_input_proj`.
        in_features (list[str]): backbone outputs used, fine to coarse (e.g. res3, res4, res5).
        images (ImageList): normalised images, zero-padded to a common size.
        per_image (bool): if True, images of different sizes go through the backbone and the
            projections separately (grouped by size), so that nothing of the padding (conv receptive
            fields, GroupNorm statistics) reaches the features of an image: its outputs do not depend
            on the rest of the batch. Features are then zero-padded to the largest map of each level
            and the masks mark exactly the computed extent. If False, the padded batch goes through
            once and per-level masks are the nearest-resized image mask (the official behaviour).
            The two are identical for a batch of one image.
    Returns:
        srcs: list of (N, C, H_l, W_l) projected features.
        masks: list of (N, H_l, W_l) bool, True at padded positions.
    """
    x = images.tensor
    sizes = [tuple(int(v) for v in s) for s in images.image_sizes]
    if not per_image or len(set(sizes)) == 1:
        srcs = _project(backbone, input_proj, in_features, x)
        mask = image_padding_mask(sizes, x.shape[-2:], x.device)
        masks = [interpolate_mask(mask, s.shape[-2:]) for s in srcs]
        return srcs, masks

    groups = defaultdict(list)
    for i, s in enumerate(sizes):
        groups[s].append(i)
    per_group = {}
    for (h, w), idx in groups.items():
        per_group[(h, w)] = _project(backbone, input_proj, in_features, x[idx, :, :h, :w])
    srcs, masks = [], []
    for lvl in range(len(input_proj)):
        shapes = [g[lvl].shape[-2:] for g in per_group.values()]
        H, W = max(s[0] for s in shapes), max(s[1] for s in shapes)
        ref = next(iter(per_group.values()))[lvl]
        src = ref.new_zeros((len(sizes), ref.shape[1], H, W))
        mask = torch.ones((len(sizes), H, W), dtype=torch.bool, device=x.device)
        for size, idx in groups.items():
            g = per_group[size][lvl]
            h, w = g.shape[-2:]
            src[idx, :, :h, :w] = g
            mask[idx, :h, :w] = False
        srcs.append(src)
        masks.append(mask)
    return srcs, masks
