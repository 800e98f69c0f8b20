"""Detectron2 mapper that turns one frame dict (the clip's anchor) into a T-frame training clip.

The clip has ``ClipLengthSchedule(INPUT.CLIP_LENGTHS, INPUT.CLIP_LENGTH_STEPS)(iteration)`` frames (the
iteration comes with the sample, see :mod:`ddetr_video.clip_schedule`). Frames after the anchor are drawn
with gaps in ``[1, INPUT.CLIP_MAX_INTERVAL]``: one gap for the whole clip (``INPUT.CLIP_INTERVAL_MODE``
``"per_clip"``, MOTR's ``random_interval``) or one per pair of frames (``"per_gap"``); the clip is shifted
back when it would run past the end of the sequence (and its gaps shrunk when even that is impossible).
The augmentation (flip / resize / crop, the detector's ``build_detr_augmentations``) is sampled once on the
anchor and applied identically to every frame, so boxes of one object move consistently across the clip.

Output: ``{"clip": [frame_0, ..., frame_{T-1}]}``; each frame is ``{"image": (C, H, W) uint8, "height",
"width", "instances": Instances(gt_boxes XYXY abs in the transformed image, gt_classes, gt_track_ids,
gt_visibility), "frame_idx", "sequence", "file_name", "image_id"}``; the clip dict also has the transformed
``height``/``width`` (for aspect-ratio grouping).
"""

import copy
import logging
from collections import defaultdict

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from ddetr_d2.errors import ConfigError

from .clip_schedule import ClipLengthSchedule
from .config import check_clip_config

__all__ = ["ClipDatasetMapper", "index_sequences", "sample_clip_indices", "CLIP_INTERVAL_MODES"]

CLIP_INTERVAL_MODES = ("per_clip", "per_gap")

logger = logging.getLogger(__name__)


def index_sequences(dataset_dicts):
    """{sequence: [frame dicts sorted by frame_idx]}; raises if a dict lacks ``sequence``/``frame_idx``."""
    seqs = defaultdict(list)
    for d in dataset_dicts:
        for key in ("sequence", "frame_idx"):
            if key not in d:
                raise KeyError(f"video dataset dict for '{d.get('file_name')}' has no '{key}' field")
        seqs[d["sequence"]].append(d)
    for v in seqs.values():
        v.sort(key=lambda d: d["frame_idx"])
    return dict(seqs)


def sample_clip_indices(anchor_pos, seq_len, clip_length, max_interval, rng=np.random, mode="per_gap"):
    """Positions (into a sequence of ``seq_len`` frames) of a clip starting near ``anchor_pos``.

    Gaps are uniform in [1, max_interval]: one per pair of frames (``mode="per_gap"``) or one for the whole
    clip (``"per_clip"``, MOTR). If the clip would run past the end, it is shifted back; if even that is
    impossible the gaps shrink (per_gap: to 1; per_clip: to the largest equal gap that fits). Returns a
    strictly increasing list of ``min(clip_length, seq_len)`` positions.
    """
    if mode not in CLIP_INTERVAL_MODES:
        raise ValueError(f"clip interval mode must be one of {CLIP_INTERVAL_MODES}, got {mode!r}")
    n = min(clip_length, seq_len)
    hi = max(max_interval, 1) + 1
    if mode == "per_clip":
        gaps = np.full(max(n - 1, 0), int(rng.randint(1, hi)), dtype=np.int64)
    else:
        gaps = rng.randint(1, hi, size=max(n - 1, 0))
    span = int(gaps.sum())
    if span > seq_len - 1:
        fit = (seq_len - 1) // max(n - 1, 1) if mode == "per_clip" else 1
        gaps = np.full_like(gaps, max(fit, 1))
        span = int(gaps.sum())
    start = min(anchor_pos, seq_len - 1 - span)
    return [int(start)] + [int(start + c) for c in np.cumsum(gaps)]


class ClipDatasetMapper:
    """
    Args:
        cfg: config with ``INPUT.CLIP_LENGTHS`` / ``CLIP_LENGTH_STEPS`` / ``CLIP_MAX_INTERVAL`` /
            ``CLIP_INTERVAL_MODE``.
        dataset_names: the datasets whose frames clips are drawn from (default ``cfg.DATASETS.TRAIN``).
        is_train: sample augmentations (False: test resize only, clip length still applies).
        augmentations: override the augmentation list.
    """

    def __init__(self, cfg, dataset_names=None, is_train=True, augmentations=None):
        from ddetr_d2.data.dataset_mapper import build_detr_augmentations

        check_clip_config(cfg)
        names = list(dataset_names if dataset_names is not None else cfg.DATASETS.TRAIN)
        dicts = [d for n in names for d in DatasetCatalog.get(n)]
        self.sequences = index_sequences(dicts)
        self.pos = {
            (s, d["frame_idx"]): i for s, frames in self.sequences.items() for i, d in enumerate(frames)
        }
        self.clip_length = ClipLengthSchedule.from_config(cfg)
        self.max_interval = int(cfg.INPUT.CLIP_MAX_INTERVAL)
        self.interval_mode = cfg.INPUT.CLIP_INTERVAL_MODE
        if self.interval_mode not in CLIP_INTERVAL_MODES:
            raise ConfigError(
                f"INPUT.CLIP_INTERVAL_MODE must be one of {CLIP_INTERVAL_MODES}, got {self.interval_mode!r}"
            )
        self.image_format = cfg.INPUT.FORMAT
        augs = augmentations if augmentations is not None else build_detr_augmentations(cfg, is_train)
        self.augmentations = T.AugmentationList(augs)
        self.is_train = is_train

    def _frame(self, d, image, transforms):
        h, w = image.shape[:2]
        out = {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "height": d["height"],
            "width": d["width"],
            "frame_idx": d["frame_idx"],
            "sequence": d["sequence"],
            "file_name": d["file_name"],
            "image_id": d.get("image_id"),
        }
        anns = [a for a in d.get("annotations", []) if a.get("iscrowd", 0) == 0]
        if anns:
            boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns])
            boxes = transforms.apply_box(boxes).clip(min=0)
            boxes[:, 0::2] = boxes[:, 0::2].clip(max=w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(max=h)
        else:
            boxes = np.zeros((0, 4), dtype=np.float32)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.as_tensor([a["category_id"] for a in anns], dtype=torch.int64)
        inst.gt_track_ids = torch.as_tensor([a["track_id"] for a in anns], dtype=torch.int64)
        inst.gt_visibility = torch.as_tensor(
            [float(a.get("visibility", 1.0)) for a in anns], dtype=torch.float32
        )
        keep = inst.gt_boxes.nonempty(threshold=1.0)
        out["instances"] = inst[keep]
        return out

    def __call__(self, dataset_dict, iteration=None):
        """A clip anchored at ``dataset_dict``, ``self.clip_length(iteration)`` frames long."""
        seq = dataset_dict["sequence"]
        frames = self.sequences.get(seq)
        if frames is None:
            raise KeyError(
                f"sequence '{seq}' of '{dataset_dict.get('file_name')}' is not in the mapper's index"
            )
        anchor = self.pos[(seq, dataset_dict["frame_idx"])]
        positions = sample_clip_indices(
            anchor, len(frames), self.clip_length(iteration), self.max_interval, mode=self.interval_mode
        )
        clip, transforms = [], None
        for p in positions:
            d = copy.deepcopy(frames[p])
            image = utils.read_image(d["file_name"], format=self.image_format)
            utils.check_image_size(d, image)
            if transforms is None:
                aug_input = T.AugInput(image)
                transforms = self.augmentations(aug_input)
                image = aug_input.image
            else:
                image = transforms.apply_image(image)
            clip.append(self._frame(d, image, transforms))
        # top-level size for detectron2's aspect-ratio grouping
        return {"clip": clip, "height": clip[0]["image"].shape[1], "width": clip[0]["image"].shape[2]}
