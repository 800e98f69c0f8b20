"""Inference-time identity bookkeeping for query-propagation tracking (MOTR's RuntimeTrackerBase, extended).

The model keeps one decoder query per live track. After each frame this class decides, from the scores and
boxes of the track queries and of the detect queries,

* which tracks survive (a track whose score stays under ``keep_threshold`` for ``max_age`` consecutive frames
  dies at the ``max_age``-th of them, as MOTR's ``miss_tolerance``; its id is never handed out again, i.e. no
  resurrection),
* which tracks are *visible* (reported) this frame (score >= ``keep_threshold`` and not a duplicate: two track
  queries can converge on one object, typically when their object hides behind a look-alike; a track whose box
  overlaps a higher-scoring visible track with IoU > ``track_duplicate_iou`` counts as a miss this frame, but
  is still carried, so it comes back if the two separate again),
* which detect queries give birth to new tracks (score >= ``birth_threshold`` and IoU <= ``duplicate_iou``
  with every live track and with every other newborn of higher score).

It only works on tensors of scores and boxes, so it is unit-testable without a model. Built from a config by
``ddetr_video.tracking.build_tracker`` (``MODEL.TRACKER.ASSOCIATION: "RuntimeTracker"``).
"""

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

__all__ = ["RuntimeTracker", "TrackerUpdate"]


@dataclass
class TrackerUpdate:
    """Result of one :meth:`RuntimeTracker.update`.

    The new slot order is ``[kept tracks (in their old order)] + [births (by decreasing score)]``.

    Attributes:
        keep: (K,) int64 indices into the previous track slots that survive.
        births: (B,) int64 indices into the detect queries that start new tracks.
        ids: (K + B,) int64 track ids in the new slot order.
        visible: (K + B,) bool, True where the track is reported this frame.
        dead_ids: (D,) int64 ids that died this frame.
    """

    keep: torch.Tensor
    births: torch.Tensor
    ids: torch.Tensor
    visible: torch.Tensor
    dead_ids: torch.Tensor


class RuntimeTracker:
    """
    Query-propagation association: the model carries one track query per live track (``QueryTracker``).

    Args:
        birth_threshold: a detect query with score >= this starts a new track.
        keep_threshold: a track with score >= this is visible and its miss counter resets.
        max_age: a track dies after this many consecutive frames with score < ``keep_threshold``
            (``max_age=1``: dies on the first miss).
        duplicate_iou: a candidate birth whose box overlaps a live track (or a higher-scoring birth)
            with IoU > this is suppressed as a duplicate.
        track_duplicate_iou: a track overlapping a higher-scoring visible track with IoU > this is hidden
            and counts as a miss (None: tracks are never compared with each other).
    """

    def __init__(
        self, birth_threshold=0.5, keep_threshold=0.4, max_age=5, duplicate_iou=0.7, track_duplicate_iou=None
    ):
        if not 0.0 <= keep_threshold <= 1.0 or not 0.0 <= birth_threshold <= 1.0:
            raise ValueError(
                f"thresholds must be in [0, 1], got birth={birth_threshold}, keep={keep_threshold}"
            )
        if max_age < 1:
            raise ValueError(f"max_age must be >= 1, got {max_age}")
        self.birth_threshold = float(birth_threshold)
        self.keep_threshold = float(keep_threshold)
        self.max_age = int(max_age)
        self.duplicate_iou = float(duplicate_iou)
        self.track_duplicate_iou = None if track_duplicate_iou is None else float(track_duplicate_iou)
        self.reset()

    #: the model must carry track queries (``QueryTracker``); detections alone are not enough
    uses_track_queries = True

    @classmethod
    def from_config(cls, cfg):
        tc = cfg.MODEL.TRACKER
        return cls(
            birth_threshold=tc.BIRTH_THRESHOLD,
            keep_threshold=tc.KEEP_THRESHOLD,
            max_age=tc.MAX_AGE,
            duplicate_iou=tc.DUPLICATE_IOU,
            track_duplicate_iou=tc.TRACK_DUPLICATE_IOU if tc.TRACK_DUPLICATE_IOU > 0 else None,
        )

    def reset(self):
        """Forget all tracks (start of a new video). Ids restart at 1 (MOTChallenge ids are 1-based)."""
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.misses = torch.zeros(0, dtype=torch.int64)
        self.next_id = 1
        self.dead = set()

    def __len__(self):
        return int(self.ids.numel())

    def update(self, track_scores, track_boxes, det_scores, det_boxes):
        """
        Args:
            track_scores: (T,) scores of the current track slots (T == len(self)).
            track_boxes: (T, 4) their boxes, XYXY (any consistent unit).
            det_scores: (Q,) scores of the detect queries.
            det_boxes: (Q, 4) their boxes, XYXY.
        Returns:
            :class:`TrackerUpdate`; ``self`` now holds the new slot order.
        """
        T = len(self)
        if track_scores.shape != (T,) or track_boxes.shape != (T, 4):
            raise ValueError(
                f"expected track_scores ({T},) and track_boxes ({T}, 4) for {T} live tracks, got "
                f"{tuple(track_scores.shape)} and {tuple(track_boxes.shape)}"
            )
        if det_scores.dim() != 1 or det_boxes.shape != (det_scores.shape[0], 4):
            raise ValueError(
                f"expected det_scores (Q,) and det_boxes (Q, 4), got {tuple(det_scores.shape)} and "
                f"{tuple(det_boxes.shape)}"
            )
        track_scores = track_scores.detach().float().cpu()
        track_boxes = track_boxes.detach().float().cpu()
        det_scores = det_scores.detach().float().cpu()
        det_boxes = det_boxes.detach().float().cpu()

        # 1) tracks: keep / miss / die
        hit = track_scores >= self.keep_threshold
        if self.track_duplicate_iou is not None:
            hit &= ~self._duplicate_tracks(track_scores, track_boxes, hit)
        misses = torch.where(hit, torch.zeros_like(self.misses), self.misses + 1)
        alive = misses < self.max_age
        keep = torch.nonzero(alive).flatten()
        dead_ids = self.ids[~alive]
        self.dead.update(dead_ids.tolist())

        # 2) births: threshold, then suppress overlaps with live tracks and with better births
        cand = torch.nonzero(det_scores >= self.birth_threshold).flatten()
        cand = cand[det_scores[cand].argsort(descending=True)]
        if cand.numel() and keep.numel():
            ov = box_iou(det_boxes[cand], track_boxes[keep]).max(dim=1).values
            cand = cand[ov <= self.duplicate_iou]
        births = []
        for q in cand.tolist():
            if births and box_iou(det_boxes[q : q + 1], det_boxes[births]).max() > self.duplicate_iou:
                continue
            births.append(q)
        births = torch.as_tensor(births, dtype=torch.int64)

        new_ids = torch.arange(self.next_id, self.next_id + births.numel(), dtype=torch.int64)
        self.next_id += births.numel()
        self.ids = torch.cat([self.ids[keep], new_ids])
        self.misses = torch.cat([misses[keep], torch.zeros(births.numel(), dtype=torch.int64)])
        visible = torch.cat([hit[keep], torch.ones(births.numel(), dtype=torch.bool)])
        return TrackerUpdate(
            keep=keep, births=births, ids=self.ids.clone(), visible=visible, dead_ids=dead_ids
        )

    def _duplicate_tracks(self, scores, boxes, hit):
        """(T,) bool: visible tracks overlapping a higher-scoring kept visible track (greedy, as NMS)."""
        dup = torch.zeros_like(hit)
        cand = torch.nonzero(hit).flatten()
        if cand.numel() < 2:
            return dup
        cand = cand[scores[cand].argsort(descending=True, stable=True)]
        iou = box_iou(boxes[cand], boxes[cand])
        kept = []
        for i in range(cand.numel()):
            if kept and iou[i, kept].max() > self.track_duplicate_iou:
                dup[cand[i]] = True
            else:
                kept.append(i)
        return dup
