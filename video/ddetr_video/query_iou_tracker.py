"""Track queries matched to per-frame detections by IoU (TransTrack-style association on a MOTR model).

The model still carries one decoder query per live track (``QueryTracker``: the query is updated by the QIM
and predicts where its object is in the next frame), but what is *reported* each frame are the detections of
the detect queries, computed as the detector alone would (``detect_sees_tracks = False``: the model blocks
the detect queries' self-attention to the track queries, so their outputs are the per-frame detector's).
Per frame (:meth:`QueryIoUTracker.update`):

1. detections: detect queries with score >= ``keep_threshold``, class-agnostic greedy NMS at
   ``duplicate_iou`` (as the IoU baseline's ``associate_detections``);
2. Hungarian assignment (``scipy.optimize.linear_sum_assignment``) between the live tracks and the
   detections on ``1 - IoU(track query's box this frame, detection)``, pairs under ``iou_threshold``
   rejected. With ``match_cascade`` (DeepSORT's matching cascade) the tracks are matched in rounds by
   their consecutive misses before this frame (0 first, i.e. the tracks matched last frame), each round on
   the detections the earlier rounds left; without it, one assignment over all tracks. The cascade keeps a
   track that lost its object (its query drifting onto a neighbour, or two queries on one object) from
   taking a detection that a track matched last frame explains;
3. a matched track is reported with the detection's box and score, keeps its id and carries **its own**
   query on (identity stays with the track query); its miss counter resets;
4. an unmatched track misses the frame (not reported, still carried) and dies at its ``max_age``-th
   consecutive miss; ids are never reused;
5. an unmatched detection with score >= ``birth_threshold`` starts a track from its detect query.

Against :class:`~ddetr_video.iou_tracker.IoUTracker` (the baseline: the same detections matched to each
track's *last* box) the difference is the box a track is matched with: the track query's prediction for
the current frame (a learned motion model that also follows the object while it is not detected). Against
:class:`~ddetr_video.runtime_tracker.RuntimeTracker` (MOTR's rule: the track queries' own scores decide)
the difference is what is reported: the detector's detections, so detection quality (MOTA) is the
detector's.
"""

import numpy as np
import torch

from .iou_tracker import iou_matches
from .runtime_tracker import TrackSlots, _f32, _greedy_nms, pairwise_iou

__all__ = ["QueryIoUTracker"]


class QueryIoUTracker(TrackSlots):
    """
    Args:
        birth_threshold: an unmatched detection with score >= this starts a track.
        keep_threshold: detect queries with score >= this are detections (can continue a track).
        max_age: a track dies at its ``max_age``-th consecutive frame without a matched detection.
        duplicate_iou: class-agnostic NMS IoU among the detections.
        iou_threshold: minimum IoU of a track-detection match.
        match_cascade: match the tracks in rounds by consecutive misses (0 first), not in one assignment.
    """

    #: the model carries track queries (``TrackSlots``), but the detect queries must not see them (their
    #: outputs are the per-frame detector's)
    detect_sees_tracks = False

    def __init__(
        self,
        birth_threshold=0.5,
        keep_threshold=0.4,
        max_age=5,
        duplicate_iou=0.7,
        iou_threshold=0.3,
        match_cascade=False,
    ):
        if not 0.0 <= keep_threshold <= birth_threshold <= 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 <= keep <= birth <= 1, got birth={birth_threshold}, "
                f"keep={keep_threshold}"
            )
        if max_age < 1:
            raise ValueError(f"max_age must be >= 1, got {max_age}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.birth_threshold = float(birth_threshold)
        self.keep_threshold = float(keep_threshold)
        self.max_age = int(max_age)
        self.duplicate_iou = float(duplicate_iou)
        self.iou_threshold = float(iou_threshold)
        self.match_cascade = bool(match_cascade)
        self.reset()

    @classmethod
    def from_config(cls, cfg):
        tc = cfg.MODEL.TRACKER
        return cls(
            birth_threshold=tc.BIRTH_THRESHOLD,
            keep_threshold=tc.KEEP_THRESHOLD,
            max_age=tc.MAX_AGE,
            duplicate_iou=tc.DUPLICATE_IOU,
            iou_threshold=tc.IOU_MATCH_THRESHOLD,
            match_cascade=tc.MATCH_CASCADE,
        )

    def update(self, track_scores, track_boxes, det_scores, det_boxes):
        """
        Args:
            track_scores: (T,) scores of the track queries (T == len(self)); not used for the decision
                (the detections decide), checked for shape only.
            track_boxes: (T, 4) the track queries' boxes this frame, XYXY.
            det_scores: (Q,) scores of the detect queries; det_boxes: (Q, 4) their boxes, XYXY.
        Returns:
            :class:`~ddetr_video.runtime_tracker.TrackerUpdate`: ``reported`` holds each kept track's
            matched detection (-1: not matched, not visible); ``rebound`` is all -1 (a track carries its own
            query).
        """
        T = self._check_frame(track_scores, track_boxes, det_scores, det_boxes)
        boxes = torch.cat([track_boxes.detach().float().cpu(), det_boxes.detach().float().cpu()]).numpy()
        iou = pairwise_iou(boxes)
        d_scores = det_scores.detach().float().cpu().tolist()

        # 1) detections: score >= keep, greedy NMS (best first)
        keep_thr = _f32(self.keep_threshold)
        order = sorted(
            (q for q in range(len(d_scores)) if d_scores[q] >= keep_thr), key=lambda q: -d_scores[q]
        )
        dets = _greedy_nms(order, iou[T:, T:][np.ix_(order, order)].tolist(), self.duplicate_iou)

        # 2) Hungarian on 1 - IoU(track box, detection); pairs under the IoU threshold rejected
        match = {}  # track slot -> detect query
        if T and dets:
            pair_iou = np.nan_to_num(iou[:T, T:][:, dets].astype(np.float64), nan=0.0)
            prior = self.misses.numpy()  # consecutive misses before this frame
            rounds = (
                [np.flatnonzero(prior == m) for m in np.unique(prior)]
                if self.match_cascade
                else [np.arange(T)]
            )
            free = np.arange(len(dets))  # columns of pair_iou not taken by an earlier round
            iou_thr = _f32(self.iou_threshold)
            for rows in rounds:
                if free.size == 0:
                    break
                pairs = iou_matches(pair_iou[np.ix_(rows, free)], iou_thr)
                match.update({int(rows[r]): dets[free[c]] for r, c in pairs})
                free = np.delete(free, [c for _, c in pairs])

        # 3) tracks: matched -> shown, others miss; death at the max_age-th consecutive miss
        misses = [0 if i in match else m + 1 for i, m in enumerate(self.misses.tolist())]
        keep = self._survivors(misses)

        # 4) births: unmatched detections over the birth threshold, best first
        birth_thr = _f32(self.birth_threshold)
        taken = set(match.values())
        births = [q for q in dets if q not in taken and d_scores[q] >= birth_thr]

        return self._commit(keep, misses, births, [i in match for i in keep], reported=match)
