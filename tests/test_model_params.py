"""Parameter counts of configs/ddetr_r50*.yaml (91 classes) against the official Deformable DETR."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from ddetr_d2.config import add_deformable_detr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Official code, random init, 91 classes: all parameters of the model (torchvision R-50 without fc;
# FrozenBatchNorm2d has buffers only), counting the frozen stem + layer1 as well.
OFFICIAL = {
    "ddetr_r50.yaml": 40_069_665,
    "ddetr_r50_box_refine.yaml": 40_849_660,
    "ddetr_r50_two_stage.yaml": 41_181_529,
}
# conv1 (64*3*7*7) + layer1 of R-50: frozen by FREEZE_AT 2 (official: only layer2..4 train)
FROZEN_STEM_RES2 = 9_408 + 212_992


@pytest.mark.parametrize("config", list(OFFICIAL))
def test_param_count_matches_official(config):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = 91
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    total = sum(p.numel() for p in model.parameters())  # shared heads are counted once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(total - OFFICIAL[config]) <= 0.01 * OFFICIAL[config], total
    assert total == OFFICIAL[config]
    assert trainable == total - FROZEN_STEM_RES2
