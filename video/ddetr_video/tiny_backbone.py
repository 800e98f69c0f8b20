"""A very small conv backbone for CPU benchmarks/tests (``MODEL.BACKBONE.NAME: build_tiny_conv_backbone``).

Trained from scratch in minutes on flat synthetic shapes, where a random-init ResNet-18 is ~10x slower per
step. Outputs ``res3`` / ``res4`` / ``res5`` at strides 8 / 16 / 32 (the names the Deformable DETR meta-arch
reads from ``MODEL.RESNETS.OUT_FEATURES``) with ``MODEL.TINY_BACKBONE.CHANNELS`` channels.
"""

from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn

from ddetr_d2.errors import ConfigError

__all__ = ["TinyConvBackbone", "build_tiny_conv_backbone", "check_channels"]


def _block(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class TinyConvBackbone(Backbone):
    """stem (stride 4) -> res3 (8) -> res4 (16) -> res5 (32); two 3x3 conv+GN+ReLU per stage."""

    def __init__(self, channels=(16, 32, 64, 128), out_features=("res3", "res4", "res5")):
        super().__init__()
        c0, c3, c4, c5 = channels
        self.stem = nn.Sequential(_block(3, c0, 2), _block(c0, c0, 2))
        self.res3 = nn.Sequential(_block(c0, c3, 2), _block(c3, c3, 1))
        self.res4 = nn.Sequential(_block(c3, c4, 2), _block(c4, c4, 1))
        self.res5 = nn.Sequential(_block(c4, c5, 2), _block(c5, c5, 1))
        self._out_features = list(out_features)
        self._shapes = {
            "res3": ShapeSpec(channels=c3, stride=8),
            "res4": ShapeSpec(channels=c4, stride=16),
            "res5": ShapeSpec(channels=c5, stride=32),
        }
        unknown = [f for f in self._out_features if f not in self._shapes]
        if unknown:
            raise ValueError(f"TinyConvBackbone has no outputs {unknown}; available: {sorted(self._shapes)}")

    def forward(self, x):
        """x: (N, 3, H, W) -> {name: (N, C, H / stride, W / stride)}."""
        out = {}
        x = self.stem(x)
        for name in ("res3", "res4", "res5"):
            x = getattr(self, name)(x)
            if name in self._out_features:
                out[name] = x
        return out

    def output_shape(self):
        return {k: self._shapes[k] for k in self._out_features}


def check_channels(channels):
    """Raise :class:`ConfigError` unless ``MODEL.TINY_BACKBONE.CHANNELS`` is 4 integers >= 1 that its
    GroupNorm (``min(8, c)`` groups) can split: at most 8, or a multiple of 8."""
    channels = tuple(channels)
    ok = len(channels) == 4 and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 1 and (c <= 8 or c % 8 == 0) for c in channels
    )
    if not ok:
        raise ConfigError(
            "MODEL.TINY_BACKBONE.CHANNELS needs 4 integers (stem, res3, res4, res5), each in 1..8 or a "
            f"multiple of 8 (GroupNorm with min(8, c) groups), got {channels}"
        )


@BACKBONE_REGISTRY.register()
def build_tiny_conv_backbone(cfg, input_shape=None):
    channels = tuple(cfg.MODEL.TINY_BACKBONE.CHANNELS) if "TINY_BACKBONE" in cfg.MODEL else (16, 32, 64, 128)
    check_channels(channels)
    return TinyConvBackbone(channels, cfg.MODEL.RESNETS.OUT_FEATURES)
