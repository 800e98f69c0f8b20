"""DETR-style dataset mapper (official Deformable-DETR augmentations with detectron2 transforms).

Training, following ``make_coco_transforms`` of the official code:
    RandomFlip, then with probability 0.5 either
      (a) ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, "choice"), or
      (b) ResizeShortestEdge(DETR_CROP_RESIZE) -> RandomCrop(CROP.TYPE, CROP.SIZE) -> (a).
    (b) is only used when ``INPUT.CROP.ENABLED``.
Test: ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST).
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image

__all__ = ["DetrDatasetMapper", "add_dataset_mapper_config", "build_detr_augmentations"]

logger = logging.getLogger(__name__)


def add_dataset_mapper_config(cfg: CfgNode) -> None:
    """Add the mapper's keys if absent (idempotent).

    ``INPUT.DETR_CROP_RESIZE``: shortest-edge sizes before the random crop. Empty means
    "official (400, 500, 600) scaled by max(MIN_SIZE_TRAIN) / 800", which is exactly the
    official setting at COCO resolution and stays sensible for small quick-start images.
    """
    if "DETR_CROP_RESIZE" not in cfg.INPUT:
        cfg.INPUT.DETR_CROP_RESIZE = ()


def _crop_resize_sizes(cfg: CfgNode) -> tuple:
    sizes = tuple(cfg.INPUT.get("DETR_CROP_RESIZE", ()) or ())
    if sizes:
        return sizes
    scale = max(cfg.INPUT.MIN_SIZE_TRAIN) / 800.0
    return tuple(int(round(s * scale)) for s in (400, 500, 600))


class _RandomChoice(T.Augmentation):
    """With probability ``prob`` apply ``aug_b`` (a list) else ``aug_a`` (a list)."""

    def __init__(self, aug_a, aug_b, prob=0.5):
        super().__init__()
        self.aug_a = T.AugmentationList(aug_a)
        self.aug_b = T.AugmentationList(aug_b)
        self.prob = prob

    def __call__(self, aug_input):
        aug = self.aug_b if np.random.rand() < self.prob else self.aug_a
        return aug(aug_input)

    def __repr__(self):
        return f"RandomChoice(p={self.prob}: {self.aug_b} else {self.aug_a})"


def build_detr_augmentations(cfg: CfgNode, is_train: bool) -> list:
    """The list of detectron2 augmentations described in the module docstring."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    resize = T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical"
            )
        )
    if cfg.INPUT.CROP.ENABLED:
        crop_branch = [
            T.ResizeShortestEdge(_crop_resize_sizes(cfg), sample_style="choice"),
            T.RandomCrop(cfg.INPUT.CROP.TYPE, tuple(cfg.INPUT.CROP.SIZE)),
            resize,
        ]
        augs.append(_RandomChoice([resize], crop_branch, prob=0.5))
    else:
        augs.append(resize)
    return augs


class DetrDatasetMapper:
    """Map a detectron2 dataset dict to the DeformableDETR input format.

    Output dict: ``image`` (C, H, W) uint8 tensor in ``cfg.INPUT.FORMAT``, ``height``/``width``
    (original size, from the dataset dict), and in training ``instances`` with ``gt_boxes``
    (absolute XYXY in the transformed image) and ``gt_classes`` (contiguous ids). Crowd boxes are
    dropped; boxes that become empty after clipping/cropping are removed.
    """

    def __init__(self, cfg: CfgNode, is_train: bool = True, augmentations: list | None = None):
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(
            augmentations if augmentations is not None else build_detr_augmentations(cfg, is_train)
        )
        self.num_removed = 0  # boxes dropped as empty after transforms (logged periodically)
        self.num_seen = 0
        self._last_log = None
        logger.info(
            f"[DetrDatasetMapper] {'train' if is_train else 'test'} augmentations: {self.augmentations}"
        )

    def _read_image(self, dataset_dict: dict) -> np.ndarray:
        file_name = dataset_dict.get("file_name")
        try:
            image = read_image(file_name, format=self.image_format)  # 16-bit images scaled to 8 bits
        except Exception as e:
            raise OSError(f"Cannot read image '{file_name}': {type(e).__name__}: {e}") from e
        try:
            utils.check_image_size(dataset_dict, image)
        except Exception as e:
            raise ValueError(f"Image '{file_name}': {e}") from e
        return image

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annos = dataset_dict.pop("annotations", None)
        if not self.is_train:
            return dataset_dict
        annos = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in (annos or [])
            if obj.get("iscrowd", 0) == 0
        ]
        for obj in annos:  # detection only
            obj.pop("segmentation", None)
            obj.pop("keypoints", None)
        instances = utils.annotations_to_instances(annos, image_shape)
        keep = instances.gt_boxes.nonempty(threshold=1e-5)
        self.num_seen += len(instances)
        removed = int((~keep).sum())
        if removed:
            self.num_removed += removed
            now = time.monotonic()
            if self._last_log is None or now - self._last_log > 60:  # first time, then at most once a minute
                self._last_log = now
                logger.info(
                    f"[DetrDatasetMapper] dropped {self.num_removed} of {self.num_seen} boxes so far "
                    f"(zero area after clipping/cropping; latest: {dataset_dict.get('file_name')})"
                )
        dataset_dict["instances"] = instances[keep]
        return dataset_dict
