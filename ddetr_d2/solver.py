"""Optimizer for Deformable DETR: official parameter groups, AdamW, full-model grad-norm clipping.

Parameter groups (substring matches on parameter names, as in the official ``main.py``):
  * ``backbone.*``                                   lr x SOLVER.BACKBONE_MULTIPLIER
  * names containing "sampling_offsets" / "reference_points"   lr x SOLVER.LINEAR_PROJ_MULTIPLIER
  * everything else                                  SOLVER.BASE_LR
All groups use SOLVER.WEIGHT_DECAY: the official code applies weight decay to every parameter
(norms and biases included), and so do we.

Clipping: ``CLIP_TYPE: "full_model"`` clips the global L2 norm (``NORM_TYPE``) of all gradients to
``CLIP_VALUE`` before each step (official ``clip_max_norm`` 0.1). detectron2's own
``maybe_add_gradient_clipping`` only clips per parameter; "value"/"norm" are passed to it.
"""

from __future__ import annotations

import itertools
import logging

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

from .errors import ConfigError

__all__ = ["get_param_groups", "build_optimizer", "add_full_model_gradient_clipping"]

logger = logging.getLogger(__name__)

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def get_param_groups(cfg: CfgNode, model: torch.nn.Module) -> list:
    """Three param groups (backbone / linear projections / rest); frozen params are skipped."""
    base_lr = cfg.SOLVER.BASE_LR
    for key in ("BASE_LR", "BACKBONE_MULTIPLIER", "LINEAR_PROJ_MULTIPLIER", "WEIGHT_DECAY"):
        if cfg.SOLVER[key] < 0:
            raise ConfigError(f"SOLVER.{key} must be >= 0, got {cfg.SOLVER[key]}")
    groups = {
        "backbone": {"params": [], "lr": base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER},
        "linear_proj": {"params": [], "lr": base_lr * cfg.SOLVER.LINEAR_PROJ_MULTIPLIER},
        "default": {"params": [], "lr": base_lr},
    }
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # shared heads appear once
            continue
        seen.add(id(p))
        if name.startswith("backbone.") or ".backbone." in name:
            key = "backbone"
        elif any(k in name for k in LINEAR_PROJ_NAMES):
            key = "linear_proj"
        else:
            key = "default"
        groups[key]["params"].append(p)
    out = []
    for key, g in groups.items():
        if g["params"]:
            out.append(
                {"params": g["params"], "lr": g["lr"], "weight_decay": cfg.SOLVER.WEIGHT_DECAY, "name": key}
            )
    return out


def add_full_model_gradient_clipping(optim_cls: type, clip_value: float, norm_type: float = 2.0) -> type:
    """Subclass ``optim_cls`` so ``step()`` first clips the norm of all gradients together."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, clip_value, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optim_cls.__name__ + "WithFullModelGradientClip"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD if ``SOLVER.OPTIMIZER == "SGD"``) over :func:`get_param_groups`, with clipping."""
    params = get_param_groups(cfg, model)
    name = cfg.SOLVER.get("OPTIMIZER", "ADAMW").upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_cls, kwargs = (
            torch.optim.SGD,
            {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV},
        )
    else:
        raise ConfigError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {name!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        if clip.CLIP_VALUE <= 0:
            raise ConfigError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clip.CLIP_VALUE}")
        optim_cls = add_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        optimizer = optim_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
    else:
        optimizer = optim_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)  # per-parameter "value"/"norm", or none
    logger.info(
        "Optimizer %s: %s",
        type(optimizer).__name__,
        ", ".join(f"{g['name']}: {len(g['params'])} tensors lr={g['lr']:.2e}" for g in params),
    )
    return optimizer
