"""Deformable DETR model components (importing registers the meta-architecture in META_ARCH_REGISTRY)."""

from .backbone import build_input_proj, multi_scale_features
from .criterion import SetCriterion, sigmoid_focal_loss
from .deformable_transformer import DeformableTransformer
from .matcher import HungarianMatcher
from .meta_arch import MLP, DeformableDETR
from .position_encoding import PositionEmbeddingSine
from .slim_resnet import build_slim_resnet_backbone

__all__ = [
    "DeformableDETR",
    "DeformableTransformer",
    "HungarianMatcher",
    "MLP",
    "PositionEmbeddingSine",
    "SetCriterion",
    "build_input_proj",
    "multi_scale_features",
    "build_slim_resnet_backbone",
    "sigmoid_focal_loss",
]
