"""Folding a backbone's batch norms into its convolutions, for inference-only models."""

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.wrappers import Conv2d
from torch import nn

__all__ = ["fuse_batchnorm"]


def _scale_and_shift(norm):
    """Per-channel (scale, shift) with norm(x) = x * scale + shift, or None if ``norm`` is not foldable."""
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    if isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None:
        weight = norm.weight if norm.affine else torch.ones_like(norm.running_var)
        bias = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        scale = weight * (norm.running_var + norm.eps).rsqrt()
        return scale, bias - norm.running_mean * scale
    return None


@torch.no_grad()
def fuse_batchnorm(module):
    """
    In place: every Detectron2 ``Conv2d`` of ``module`` whose ``norm`` is a ``FrozenBatchNorm2d`` (or a
    ``BatchNorm2d`` with running statistics) gets weight * scale (C_out, 1, 1, 1) and bias
    shift (+ bias * scale), and ``norm = None``: the same function up to float rounding, one op less.
    For inference only: it changes the parameters (and the state_dict keys) of the module, so a module
    in training mode is refused (ValueError). Returns the number of fused convolutions.
    """
    if module.training:
        raise ValueError("fuse_batchnorm is for inference only: call module.eval() first")
    fused = 0
    for conv in module.modules():
        if not isinstance(conv, Conv2d) or conv.norm is None:
            continue
        folded = _scale_and_shift(conv.norm)
        if folded is None:
            continue
        scale, shift = folded
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        conv.norm = None
        fused += 1
    return fused
