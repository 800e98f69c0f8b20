"""Shared helpers of the model tests: the tiny test config and the three paper variants."""

import os

from detectron2.config import get_cfg

from ddetr_d2.config import add_deformable_detr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "plain": {},
    "refine": {"WITH_BOX_REFINE": True},
    "two_stage": {"WITH_BOX_REFINE": True, "TWO_STAGE": True},
}


def tiny_cfg(**overrides):
    """``configs/tiny_test.yaml`` with ``MODEL.DEFORMABLE_DETR.<KEY> = value`` overrides."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "tiny_test.yaml"))
    for k, v in overrides.items():
        setattr(cfg.MODEL.DEFORMABLE_DETR, k, v)
    return cfg


def demo_model_with_random_weights(cfg, folder):
    """``build_demo_model(cfg)`` with ``MODEL.WEIGHTS`` set to a checkpoint of a freshly built model (seed 0)
    saved in ``folder``: the inference-only model as the demo and predictors build it."""
    import torch
    from detectron2.modeling import build_model

    from ddetr_d2.demo.predictor import build_demo_model

    torch.manual_seed(0)
    weights = os.path.join(str(folder), "w.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = weights
    return build_demo_model(cfg)
