"""
``build_slim_resnet_backbone``: Detectron2's basic-block ResNet (R-18 / R-34) at any width.

Detectron2's ``build_resnet_backbone`` insists on 64 channels for R-18/R-34. For CPU runs that train a
backbone from scratch (the quickstart), a narrower net is the cheapest way to more iterations per
minute: at width 32 (stages 32 / 64 / 128 / 256 channels, 2.8 M parameters) a forward + backward pass
costs ~0.3x of R-18 (measured in ``docs/benchmarks.md``). Same module names as Detectron2's ResNet
(``stem``, ``res2`` ... ``res5``), same keys:

* ``MODEL.RESNETS.DEPTH`` 18 or 34, ``MODEL.RESNETS.NORM``, ``MODEL.RESNETS.OUT_FEATURES``,
  ``MODEL.BACKBONE.FREEZE_AT``;
* ``MODEL.RESNETS.STEM_OUT_CHANNELS`` (stem) and ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (res2; each later
  stage doubles it).
"""

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_slim_resnet_backbone"]

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg, input_shape=None):
    """A Detectron2 ``ResNet`` of basic blocks whose width comes from the config (see module docstring)."""
    rc = cfg.MODEL.RESNETS
    if rc.DEPTH not in BLOCKS_PER_STAGE:
        raise ValueError(
            f"build_slim_resnet_backbone builds basic-block ResNets: MODEL.RESNETS.DEPTH must be one of "
            f"{sorted(BLOCKS_PER_STAGE)}, got {rc.DEPTH}"
        )
    if rc.STEM_OUT_CHANNELS < 1 or rc.RES2_OUT_CHANNELS < 1:
        raise ValueError(
            f"MODEL.RESNETS.STEM_OUT_CHANNELS ({rc.STEM_OUT_CHANNELS}) and RES2_OUT_CHANNELS "
            f"({rc.RES2_OUT_CHANNELS}) must be positive"
        )
    if any(rc.DEFORM_ON_PER_STAGE):
        raise ValueError("build_slim_resnet_backbone has no deformable convolutions (DEFORM_ON_PER_STAGE)")
    in_channels = 3 if input_shape is None else input_shape.channels
    stem = BasicStem(in_channels, rc.STEM_OUT_CHANNELS, norm=rc.NORM)
    stages, cin, width = [], rc.STEM_OUT_CHANNELS, rc.RES2_OUT_CHANNELS
    for idx, n in enumerate(BLOCKS_PER_STAGE[rc.DEPTH]):
        cout = width * 2**idx
        first_stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                n,
                in_channels=cin,
                out_channels=cout,
                stride_per_block=[first_stride] + [1] * (n - 1),
                norm=rc.NORM,
            )
        )
        cin = cout
    return ResNet(stem, stages, out_features=rc.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)

