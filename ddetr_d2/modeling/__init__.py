"""Deformable DETR model components (importing registers the meta-architecture in META_ARCH_REGISTRY)."""

from .backbone import build_input_proj, multi_scale_features
from .criterion import SetCriterion, sigmoid_focal_loss
from .deformable_transformer import DeformableTransformer
from .denoising import DenoisingGroups  # registers the "denoising" training query groups
from .matcher import HungarianMatcher
from .meta_arch import MLP, DeformableDETR
from .one_to_many import OneToManyGroup  # registers the "one_to_many" training query group
from .position_encoding import PositionEmbeddingSine
from .query_groups import QueryGroup, assemble_query_groups
from .slim_resnet import build_slim_resnet_backbone

__all__ = [
    "DeformableDETR",
    "DeformableTransformer",
    "DenoisingGroups",
    "HungarianMatcher",
    "MLP",
    "OneToManyGroup",
    "PositionEmbeddingSine",
    "QueryGroup",
    "SetCriterion",
    "assemble_query_groups",
    "build_input_proj",
    "multi_scale_features",
    "build_slim_resnet_backbone",
    "sigmoid_focal_loss",
]
