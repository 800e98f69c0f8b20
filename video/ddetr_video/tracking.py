"""Runtime association: the one way to build it (``build_tracker``) and the pieces both kinds share.

``MODEL.TRACKER.ASSOCIATION`` names a class of :data:`TRACKER_REGISTRY` (Detectron2's registry convention, as
``MODEL.META_ARCHITECTURE``); ``build_tracker(cfg)`` returns ``cls.from_config(cfg)``. Registered:

* ``"RuntimeTracker"`` (:mod:`ddetr_video.runtime_tracker`): query propagation. The model (``QueryTracker``)
  carries one decoder query per track; the tracker decides births, misses and deaths from the scores and boxes
  of the track and detect queries (``uses_track_queries = True``).
* ``"QueryIoUTracker"`` (:mod:`ddetr_video.query_iou_tracker`): track queries carried as above, but the
  per-frame detector's detections (detect queries blind to the tracks) are reported, matched to the track
  queries' boxes by IoU (TransTrack-style).
* ``"IoUTracker"`` (:mod:`ddetr_video.iou_tracker`): the baseline. Per-frame detections, class-agnostic NMS,
  Hungarian on ``1 - IoU`` with the previous boxes (``uses_track_queries = False``); any detector works.

A new association rule is a class with ``from_config(cfg)``, ``reset()``, ``uses_track_queries`` and the
``update`` of its kind, registered here with ``TRACKER_REGISTRY.register()``.

Scoring rule (both kinds, and ``QueryTracker.detect``): :func:`query_instances` gives **one box per query,
scored by its best class** (max over the K sigmoid scores). A track is one query, so it must have one box
and one score per frame; the detector's inference instead keeps the top-k (query, class) pairs, which can
report one query (one box) several times with different classes: an association step would then see
duplicate boxes and a track could not be tied to a single query.
"""

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.registry import Registry
from torchvision.ops import box_convert, nms

from .config import check_tracker_config
from .iou_tracker import IoUTracker, assign_track_ids
from .query_iou_tracker import QueryIoUTracker
from .runtime_tracker import RuntimeTracker

__all__ = ["TRACKER_REGISTRY", "build_tracker", "query_instances", "associate_detections"]

TRACKER_REGISTRY = Registry("TRACKER")
TRACKER_REGISTRY.__doc__ = """
Runtime association classes, selected by ``cfg.MODEL.TRACKER.ASSOCIATION``; ``cls.from_config(cfg)``
builds one.
"""
TRACKER_REGISTRY.register(RuntimeTracker)
TRACKER_REGISTRY.register(IoUTracker)
TRACKER_REGISTRY.register(QueryIoUTracker)


def build_tracker(cfg):
    """The runtime association named by ``cfg.MODEL.TRACKER.ASSOCIATION``, built from its keys (checked
    first by :func:`~ddetr_video.config.check_tracker_config`: a bad value is a ``ConfigError`` naming it)."""
    check_tracker_config(cfg)
    return TRACKER_REGISTRY.get(cfg.MODEL.TRACKER.ASSOCIATION).from_config(cfg)


def query_instances(pred_logits, pred_boxes, image_size):
    """
    One detection per query, scored by its best class (see the module docstring for why).

    Args:
        pred_logits: (Q, K) class logits; pred_boxes: (Q, 4) cxcywh in [0, 1] of the unpadded image;
        image_size: (h, w) of the (resized, unpadded) network input.
    Returns:
        Instances of length Q (query order) with ``pred_boxes`` (XYXY in that image), ``scores``,
        ``pred_classes``; ``detector_postprocess`` maps them to the original image.
    """
    h, w = image_size
    scores, classes = pred_logits.sigmoid().max(-1)
    boxes = box_convert(pred_boxes, "cxcywh", "xyxy")
    boxes = boxes * torch.as_tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = scores
    inst.pred_classes = classes
    return inst


def associate_detections(instances, tracker):
    """
    The baseline's association step on one frame.

    ``instances`` (pred_boxes, scores, pred_classes) with ``scores >= tracker.match_score`` go through
    class-agnostic NMS at ``tracker.nms_iou`` (if set) and :class:`IoUTracker`; returns those that got a
    track id, with a ``track_ids`` field (int64).
    """
    inst = instances[instances.scores >= tracker.match_score]
    if tracker.nms_iou is not None and len(inst):
        inst = inst[nms(inst.pred_boxes.tensor, inst.scores, tracker.nms_iou)]
    inst = assign_track_ids(inst, tracker)
    return inst[inst.track_ids >= 0]
