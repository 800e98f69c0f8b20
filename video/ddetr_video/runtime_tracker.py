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
  with every live track and with every other newborn of higher score),
* optionally (``rebind_missed``, not in MOTR), which missed tracks are *re-bound*: a detect query that would
  be born but overlaps a track missed this frame (IoU > ``duplicate_iou``, and no visible track) replaces that
  track's query; the track keeps its id, is visible with the detect query's box and score, and its miss
  counter resets. Without it such a detection is suppressed as a duplicate and the object goes unreported
  until the track recovers or dies (then it is born again under a new id).

With ``detect_sees`` other than "all" (not in MOTR), it also tells the model which track queries the detect
queries may not attend to this frame (:meth:`hidden_from_detect`).

It only works on tensors of scores and boxes, so it is unit-testable without a model. Built from a config by
``ddetr_video.tracking.build_tracker`` (``MODEL.TRACKER.ASSOCIATION: "RuntimeTracker"``).
"""

from dataclasses import dataclass

import numpy as np
import torch

from ddetr_d2.errors import ConfigError

__all__ = ["DETECT_SEES", "RuntimeTracker", "TrackSlots", "TrackerUpdate", "pairwise_iou"]

#: values of ``MODEL.TRACKER.DETECT_SEES_TRACKS`` (see :meth:`RuntimeTracker.hidden_from_detect`)
DETECT_SEES = ("all", "shown", "none")


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
        rebound: (K,) int64, for each kept track the detect query that replaced its query this frame
            (``rebind_missed``), -1 where none.
        reported: (K,) int64, for each kept track the detect query whose box and score are reported for it
            this frame, -1 where its own query's are (``RuntimeTracker``: the re-bound one).
    """

    keep: torch.Tensor
    births: torch.Tensor
    ids: torch.Tensor
    visible: torch.Tensor
    dead_ids: torch.Tensor
    rebound: torch.Tensor
    reported: torch.Tensor

    def sources(self, num_tracks):
        """(K + B,) int64: for each new slot, its query's index in ``[track queries] + [detect queries]``
        of this frame (``num_tracks`` track queries first): a kept track's own, a re-bound track's detect
        query, a newborn's detect query."""
        kept = torch.where(self.rebound >= 0, self.rebound + num_tracks, self.keep)
        return torch.cat([kept, self.births + num_tracks])

    def report_sources(self, num_tracks):
        """(K + B,) int64: for each new slot, the index (as in :meth:`sources`) of the query whose box and
        score are reported for it this frame."""
        kept = torch.where(self.reported >= 0, self.reported + num_tracks, self.keep)
        return torch.cat([kept, self.births + num_tracks])


class TrackSlots:
    """Ids and miss counters of the live track slots (one per track query the model carries), shared by the
    associations that carry track queries (:class:`RuntimeTracker`, ``QueryIoUTracker``). Subclasses set
    ``max_age`` and decide per frame which slots are matched / kept and which detect queries are born."""

    #: the model must carry track queries (``QueryTracker``); detections alone are not enough
    uses_track_queries = True

    def reset(self):
        """Forget all tracks (start of a new video). Ids restart at 1 (MOTChallenge ids are 1-based)."""
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.misses = torch.zeros(0, dtype=torch.int64)
        self.next_id = 1
        self.dead = set()

    def __len__(self):
        return int(self.ids.numel())

    def _check_frame(self, track_scores, track_boxes, det_scores, det_boxes):
        """Raise ValueError unless the shapes fit ``len(self)`` track slots; returns that number."""
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
        return T

    def _survivors(self, misses):
        """Slots whose consecutive misses (this frame included) stay under ``max_age``."""
        return [i for i, m in enumerate(misses) if m < self.max_age]

    def _commit(self, keep, misses, births, visible, rebound=None, reported=None):
        """Apply one frame's decisions and return its :class:`TrackerUpdate`: ``keep`` (slots, in order),
        ``misses`` (per old slot, this frame included), ``births`` (detect queries, in order), ``visible``
        (per kept slot), ``rebound`` / ``reported`` ({kept slot: detect query}); the other slots die."""
        ids = self.ids.tolist()
        kept = set(keep)
        dead_ids = [ids[i] for i in range(len(ids)) if i not in kept]
        self.dead.update(dead_ids)
        new_ids = list(range(self.next_id, self.next_id + len(births)))
        self.next_id += len(births)
        self.ids = torch.tensor([ids[i] for i in keep] + new_ids, dtype=torch.int64)
        self.misses = torch.tensor([misses[i] for i in keep] + [0] * len(births), dtype=torch.int64)
        rebound, reported = rebound or {}, reported or {}
        return TrackerUpdate(
            keep=torch.tensor(keep, dtype=torch.int64),
            births=torch.tensor(births, dtype=torch.int64),
            ids=self.ids.clone(),
            visible=torch.tensor(list(visible) + [True] * len(births), dtype=torch.bool),
            dead_ids=torch.tensor(dead_ids, dtype=torch.int64),
            rebound=torch.tensor([rebound.get(i, -1) for i in keep], dtype=torch.int64),
            reported=torch.tensor([reported.get(i, -1) for i in keep], dtype=torch.int64),
        )


class RuntimeTracker(TrackSlots):
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
        rebind_missed: a would-be birth overlapping a track missed this frame (IoU > ``duplicate_iou``) and
            no visible track takes over that track (same id) instead of being suppressed.
        detect_sees: which track queries the detect queries attend to (:meth:`hidden_from_detect`): "all"
            (MOTR), "shown" (not those of tracks missed in the previous frame) or "none".
        unseen_track_iou: the IoU that stands in for ``duplicate_iou`` between a detection and a track whose
            query the detect queries did not see this frame (nothing told them the object is tracked, so a
            detection on it overlaps the track's box less than a duplicate of a seen track does).
    """

    def __init__(
        self,
        birth_threshold=0.5,
        keep_threshold=0.4,
        max_age=5,
        duplicate_iou=0.7,
        track_duplicate_iou=None,
        rebind_missed=False,
        detect_sees="all",
        unseen_track_iou=0.1,
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
        self.rebind_missed = bool(rebind_missed)
        if detect_sees not in DETECT_SEES:
            raise ValueError(f"detect_sees must be one of {DETECT_SEES}, got {detect_sees!r}")
        self.detect_sees = detect_sees
        self.unseen_track_iou = float(unseen_track_iou)
        self.reset()

    @classmethod
    def from_config(cls, cfg):
        tc = cfg.MODEL.TRACKER
        if tc.DETECT_SEES_TRACKS not in DETECT_SEES:
            raise ConfigError(
                f"MODEL.TRACKER.DETECT_SEES_TRACKS: expected one of {DETECT_SEES}, "
                f"got {tc.DETECT_SEES_TRACKS!r}"
            )
        return cls(
            birth_threshold=tc.BIRTH_THRESHOLD,
            keep_threshold=tc.KEEP_THRESHOLD,
            max_age=tc.MAX_AGE,
            duplicate_iou=tc.DUPLICATE_IOU,
            track_duplicate_iou=tc.TRACK_DUPLICATE_IOU if tc.TRACK_DUPLICATE_IOU > 0 else None,
            rebind_missed=tc.REBIND_MISSED_TRACKS,
            detect_sees=tc.DETECT_SEES_TRACKS,
            unseen_track_iou=tc.UNSEEN_TRACK_IOU,
        )

    def hidden_from_detect(self):
        """(T,) bool over the current track slots: True where the detect queries may not attend to that
        track's query this frame ("shown": the track was missed in the previous frame; "none": every track);
        None when no track is hidden."""
        if self.detect_sees == "all" or len(self) == 0:
            return None
        if self.detect_sees == "none":
            return torch.ones(len(self), dtype=torch.bool)
        missed = self.misses > 0
        return missed if bool(missed.any()) else None

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
        T = self._check_frame(track_scores, track_boxes, det_scores, det_boxes)
        unseen = self.hidden_from_detect()  # the tracks the detect queries did not see this frame
        unseen = [False] * T if unseen is None else unseen.tolist()
        track_boxes = track_boxes.detach().float().cpu()
        det_boxes = det_boxes.detach().float().cpu()
        # A frame has tens of boxes: the bookkeeping runs on Python lists (a tensor op per box costs more
        # than the arithmetic), on one (T + Q, T + Q) IoU matrix, with the thresholds rounded to float32 so
        # that every comparison decides as the float32 tensor comparison would.
        iou = pairwise_iou(torch.cat([track_boxes, det_boxes]).numpy()).tolist()
        t_scores = track_scores.detach().float().cpu().tolist()
        d_scores = det_scores.detach().float().cpu().tolist()
        keep_thr, birth_thr = _f32(self.keep_threshold), _f32(self.birth_threshold)

        # 1) tracks: keep / miss / die
        hit = [sc >= keep_thr for sc in t_scores]
        if self.track_duplicate_iou is not None:
            visible = sorted(
                (i for i in range(T) if hit[i]), key=lambda i: -t_scores[i]
            )  # stable: ties by slot
            kept = set(
                _greedy_nms(
                    visible, [[iou[i][j] for j in visible] for i in visible], self.track_duplicate_iou
                )
            )
            hit = [h and i in kept for i, h in enumerate(hit)]
        misses = [0 if h else m + 1 for h, m in zip(hit, self.misses.tolist())]
        dup_thr = _f32(self.duplicate_iou)
        # a detection is "on" track i if their IoU exceeds this (births vs births: dup_thr)
        on_thr = [_f32(self.unseen_track_iou) if u else dup_thr for u in unseen]
        cand = sorted(
            (q for q in range(len(d_scores)) if d_scores[q] >= birth_thr), key=lambda q: -d_scores[q]
        )

        # 2) optional re-binding: the best candidate overlapping a missed track (and no visible track, no
        # detection re-bound before it) takes that track
        rebound = {}  # track slot -> detect query
        if self.rebind_missed:
            shown = [i for i in range(T) if hit[i]]
            for q in cand:
                row = iou[T + q]
                if any(row[k] > on_thr[k] for k in shown):
                    continue
                if any(row[T + r] > dup_thr for r in rebound.values()):
                    continue
                free = [i for i in range(T) if not hit[i] and i not in rebound and row[i] > on_thr[i]]
                if free:
                    rebound[max(free, key=lambda i: row[i])] = q  # ties: the first slot
            for i in rebound:
                hit[i], misses[i] = True, 0

        keep = self._survivors(misses)

        # 3) births: threshold, then suppress overlaps with live tracks (a re-bound track: its old box and
        # its detection's) and with better births
        taken = set(rebound.values())
        blockers = [(k, on_thr[k]) for k in keep] + [(T + q, dup_thr) for q in taken]
        cand = [q for q in cand if q not in taken and not any(iou[T + q][k] > thr for k, thr in blockers)]
        births = _greedy_nms(cand, [[iou[T + q][T + r] for r in cand] for q in cand], self.duplicate_iou)

        return self._commit(keep, misses, births, [hit[i] for i in keep], rebound, rebound)


def pairwise_iou(boxes):
    """(N, 4) XYXY float32 array -> (N, N) IoU, ``torchvision.ops.box_iou(b, b)``'s arithmetic in NumPy.

    For the tens of boxes of one frame, torchvision's op costs ~0.2 ms of per-op overhead (a tenth of the
    tracker's whole cost per frame over detection); NumPy does the same float32 arithmetic in ~20 us.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 of degenerate boxes: NaN, as torchvision
        return inter / (area[:, None] + area[None, :] - inter)


def _f32(x):
    """``x`` rounded to float32 (to nearest), as a float32 tensor compared with the Python number ``x``
    would use it (NumPy's scalar: ~1 us, a tensor round trip ~17 us, five times per frame)."""
    return float(np.float32(x))


def _greedy_nms(items, iou, threshold):
    """Greedy suppression on a precomputed IoU matrix, in plain Python (a frame has tens of boxes: faster
    than a tensor op per box, and the same decisions: the same float32 IoU values, compared the same way).

    Args:
        items: list of N ids, best first.
        iou: N x N nested list (a float32 matrix's ``tolist()``), ``iou[i][j]`` the IoU of ``items[i]`` and
            ``items[j]``.
        threshold: an item overlapping an earlier kept item with IoU > this is suppressed.
    Returns:
        the kept ids, in the order of ``items``.
    """
    threshold = _f32(threshold)
    kept = []
    for i, row in enumerate(iou):
        if not any(row[j] > threshold for j in kept):
            kept.append(i)
    return [items[i] for i in kept]
