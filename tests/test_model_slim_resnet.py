"""``build_slim_resnet_backbone``: Detectron2's basic-block ResNet at any width."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import Boxes, Instances

from ddetr_d2.config import add_deformable_detr_config
from ddetr_d2.modeling.slim_resnet import build_slim_resnet_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(depth=18, width=32, stem=32, freeze_at=1, norm="BN"):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_slim_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = stem
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    return cfg


@pytest.mark.parametrize("depth", [18, 34])
def test_width_64_is_detectron2_resnet(depth):
    """At width 64 it is Detectron2's own R-18 / R-34: same parameter names and shapes."""
    cfg = _cfg(depth=depth, width=64, stem=64)
    ours = build_slim_resnet_backbone(cfg).state_dict()
    ref = build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("width,stem", [(32, 32), (24, 16)])
def test_outputs_follow_width_and_strides(width, stem):
    backbone = build_backbone(_cfg(width=width, stem=stem))
    x = torch.randn(2, 3, 96, 128)
    out = backbone(x)
    spec = backbone.output_shape()
    for i, name in enumerate(["res3", "res4", "res5"]):
        stride = 8 * 2**i
        assert spec[name].channels == width * 2 ** (i + 1) and spec[name].stride == stride
        assert out[name].shape == (2, width * 2 ** (i + 1), 96 // stride, 128 // stride)
    assert backbone.stem.conv1.weight.shape[0] == stem


def test_freeze_at_freezes_stem_only():
    backbone = build_slim_resnet_backbone(_cfg(freeze_at=1))
    frozen = {n.split(".")[0] for n, p in backbone.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert frozen == {"stem"} and trainable == {"res2", "res3", "res4", "res5"}


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH must be one of \\[18, 34\\], got 50"):
        build_slim_resnet_backbone(_cfg(depth=50))
    with pytest.raises(ValueError, match="RES2_OUT_CHANNELS"):
        build_slim_resnet_backbone(_cfg(width=0))


def test_quickstart_config_trains_one_step_on_the_slim_backbone():
    """configs/quickstart.yaml builds with its slim backbone and takes a finite training step."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml"))
    model = build_model(cfg)
    assert model.backbone.stem.conv1.weight.shape[0] == 32
    assert sum(p.numel() for p in model.backbone.parameters()) < 3_000_000
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 20.0, 120.0, 90.0]]))
    inst.gt_classes = torch.tensor([1, 4])
    batch = [{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), "instances": inst}]
    model.train()
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.res2[0].conv1.weight.grad is not None
