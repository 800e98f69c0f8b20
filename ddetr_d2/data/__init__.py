"""Datasets (synthetic shapes, user COCO folders) and the DETR dataset mapper.

Importing this package registers ``synthetic_shapes_train`` / ``synthetic_shapes_val``
(generated lazily on first use); detectron2 itself registers ``coco_2017_*``.
"""

from .dataset_mapper import DetrDatasetMapper, add_dataset_mapper_config, build_detr_augmentations
from .datasets import (
    load_checked_coco_json,
    parse_dataset_spec,
    register_coco_folder,
    register_synthetic_shapes,
    synthetic_root,
)
from .synthetic import SHAPE_CLASSES, make_synthetic_coco

register_synthetic_shapes()

__all__ = [
    "DetrDatasetMapper",
    "add_dataset_mapper_config",
    "build_detr_augmentations",
    "load_checked_coco_json",
    "parse_dataset_spec",
    "register_coco_folder",
    "register_synthetic_shapes",
    "synthetic_root",
    "SHAPE_CLASSES",
    "make_synthetic_coco",
]
