"""IoU baseline tracker: per-frame detections -> track ids (Hungarian on 1 - IoU, no appearance, no motion).

Per frame (:meth:`IoUTracker.update`):

1. detections with ``score >= match_score`` are candidates; the others get id -1;
2. Hungarian assignment (``scipy.optimize.linear_sum_assignment``) between live tracks and candidates on the
   cost ``1 - IoU(track's last box, detection)``; pairs with IoU < ``iou_threshold`` (or, with
   ``class_aware``, of different classes) get a prohibitive cost and are rejected if still assigned;
3. a matched track takes the detection's box and resets its age; an unmatched candidate with
   ``score >= birth_score`` starts a new track (ids 1, 2, 3, ... never reused); other unmatched candidates
   get -1;
4. an unmatched track ages by one frame and is deleted at its ``max_age``-th consecutive frame without a
   match (MOTR's ``miss_tolerance``, the same meaning as :class:`RuntimeTracker`'s; ``max_age=1``: deleted at
   the first miss). While it waits, its last box can still be matched.

``nms_iou`` is not used by :meth:`IoUTracker.update`; it is the class-agnostic NMS that
``ddetr_video.tracking.associate_detections`` applies to a frame's detections before calling it.

``assign_track_ids(instances, tracker)`` adds the ``track_ids`` field that :class:`MOTEvaluator` expects to a
Detectron2 ``Instances`` of one frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["Track", "IoUTracker", "box_iou_xyxy", "assign_track_ids", "iou_matches"]


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between (N, 4) and (M, 4) XYXY boxes -> (N, M) float64 (0 for empty unions)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def iou_matches(iou: np.ndarray, threshold: float):
    """Hungarian assignment on ``1 - iou`` ((N, M) float64), pairs with ``iou < threshold`` rejected.

    Invalid pairs get a prohibitive cost, so the assignment first maximises the number of valid matches.
    Returns the valid (row, column) pairs, by row.
    """
    ok = iou >= threshold
    rows, cols = linear_sum_assignment(np.where(ok, 1.0 - iou, 1e6))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if ok[r, c]]


@dataclass
class Track:
    track_id: int
    box: np.ndarray  # (4,) XYXY, last matched detection
    cls: int
    score: float
    age: int = 0  # frames since the last match
    hits: int = 1  # frames matched so far


class IoUTracker:
    """Greedy-free (Hungarian) IoU association with a birth threshold and a ``max_age`` grace period.

    Args:
        iou_threshold: minimum IoU for a track-detection match.
        birth_score: minimum score for an unmatched detection to start a track.
        match_score: minimum score for a detection to continue a track (<= birth_score).
        max_age: a track dies at its ``max_age``-th consecutive frame without a match (>= 1).
        class_aware: only match tracks and detections of the same class.
        nms_iou: class-agnostic NMS IoU applied to the detections before association (None: no NMS).
    """

    def __init__(
        self,
        iou_threshold: float = 0.3,
        birth_score: float = 0.5,
        match_score: float | None = None,
        max_age: int = 5,
        class_aware: bool = True,
        nms_iou: float | None = None,
    ):
        match_score = birth_score if match_score is None else match_score
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if match_score > birth_score:
            raise ValueError(f"match_score ({match_score}) must be <= birth_score ({birth_score})")
        if max_age < 1:
            raise ValueError(f"max_age must be >= 1, got {max_age}")
        self.iou_threshold = float(iou_threshold)
        self.birth_score = float(birth_score)
        self.match_score = float(match_score)
        self.max_age = int(max_age)
        self.class_aware = bool(class_aware)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.reset()

    #: associates per-frame detections; the model needs no track queries
    uses_track_queries = False

    @classmethod
    def from_config(cls, cfg):
        tc = cfg.MODEL.TRACKER
        return cls(
            iou_threshold=tc.IOU_MATCH_THRESHOLD,
            birth_score=tc.BIRTH_THRESHOLD,
            match_score=tc.KEEP_THRESHOLD,
            max_age=tc.MAX_AGE,
            class_aware=tc.IOU_CLASS_AWARE,
            nms_iou=tc.DUPLICATE_IOU,
        )

    def reset(self) -> None:
        """Forget all tracks; ids restart at 1 (call between sequences)."""
        self.tracks: List[Track] = []
        self._next_id = 1
        self.frame_count = 0

    @property
    def active_tracks(self) -> List[Track]:
        """Tracks matched in the current frame."""
        return [t for t in self.tracks if t.age == 0]

    def update(self, boxes, scores, classes=None) -> np.ndarray:
        """Associate one frame.

        boxes (N, 4) XYXY, scores (N,), classes (N,) int or None -> (N,) int64 track ids (-1 = none).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        n = len(boxes)
        classes = (
            np.zeros(n, np.int64) if classes is None else np.asarray(classes).astype(np.int64).reshape(-1)
        )
        if len(scores) != n or len(classes) != n:
            raise ValueError(
                f"boxes ({n}), scores ({len(scores)}) and classes ({len(classes)}) must have equal length"
            )
        if n and not np.isfinite(boxes).all():
            raise ValueError("boxes contain NaN/inf")
        self.frame_count += 1
        ids = np.full(n, -1, dtype=np.int64)
        cand = np.nonzero(scores >= self.match_score)[0]
        matched_tracks = set()
        if len(self.tracks) and len(cand):
            tboxes = np.stack([t.box for t in self.tracks])
            iou = box_iou_xyxy(tboxes, boxes[cand])
            if self.class_aware:
                tcls = np.array([t.cls for t in self.tracks])
                iou = np.where(tcls[:, None] == classes[cand][None, :], iou, 0.0)
            for r, c in iou_matches(iou, self.iou_threshold):
                t, d = self.tracks[r], cand[c]
                t.box, t.score, t.cls, t.age = boxes[d].copy(), float(scores[d]), int(classes[d]), 0
                t.hits += 1
                ids[d] = t.track_id
                matched_tracks.add(r)
        survivors = []
        for i, t in enumerate(self.tracks):
            if i not in matched_tracks:
                t.age += 1
                if t.age >= self.max_age:
                    continue
            survivors.append(t)
        for d in cand:
            if ids[d] < 0 and scores[d] >= self.birth_score:
                survivors.append(Track(self._next_id, boxes[d].copy(), int(classes[d]), float(scores[d])))
                ids[d] = self._next_id
                self._next_id += 1
        self.tracks = survivors
        return ids


def assign_track_ids(instances, tracker: IoUTracker):
    """Run ``tracker`` on one frame's Detectron2 ``Instances`` (pred_boxes, scores, pred_classes) and set
    ``instances.track_ids`` (int64 tensor, -1 = untracked). Returns the same Instances."""
    import torch

    boxes = instances.pred_boxes.tensor.detach().cpu().numpy()
    scores = instances.scores.detach().cpu().numpy()
    classes = instances.pred_classes.detach().cpu().numpy() if instances.has("pred_classes") else None
    ids = tracker.update(boxes, scores, classes)
    instances.track_ids = torch.as_tensor(ids, dtype=torch.int64, device=instances.pred_boxes.tensor.device)
    return instances
