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
