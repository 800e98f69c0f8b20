"""Config keys of the query-propagation tracker (on top of ``add_deformable_detr_config``)."""

import math

from detectron2.config import CfgNode as CN

from ddetr_d2.errors import ConfigError

__all__ = ["add_tracker_config", "get_tracker_cfg", "check_tracker_config", "check_clip_config"]


def add_tracker_config(cfg):
    """Add ``cfg.MODEL.TRACKER.*`` and the clip sampling keys ``cfg.INPUT.CLIP_*`` (in place)."""
    cfg.MODEL.TRACKER = CN()
    # --- runtime association (ddetr_video.tracking.TRACKER_REGISTRY, built by build_tracker(cfg)) ---
    # "RuntimeTracker": query propagation (track queries carried by the model; needs QueryTracker);
    # "QueryIoUTracker": track queries carried as RuntimeTracker, but the per-frame detector's detections are
    # reported, matched to the track queries' boxes by IoU (TransTrack-style; measured: video/README.md);
    # "IoUTracker": per-frame detections (one box per query) + Hungarian on 1 - IoU, the baseline.
    cfg.MODEL.TRACKER.ASSOCIATION = "RuntimeTracker"
    # detect query score that starts a new track (IoUTracker: detection score that starts a track)
    cfg.MODEL.TRACKER.BIRTH_THRESHOLD = 0.5
    # track query score that keeps (and shows) a track (IoUTracker: detection score that can continue a track)
    cfg.MODEL.TRACKER.KEEP_THRESHOLD = 0.4
    # a track missed in MAX_AGE consecutive frames dies at that frame (MOTR's miss_tolerance): it survives
    # MAX_AGE - 1 consecutive misses; 1 = it dies at its first miss. Same meaning for both associations.
    cfg.MODEL.TRACKER.MAX_AGE = 5
    # births overlapping a live track more than this are dropped (IoUTracker: class-agnostic NMS IoU of the
    # detections before association)
    cfg.MODEL.TRACKER.DUPLICATE_IOU = 0.7
    cfg.MODEL.TRACKER.IOU_MATCH_THRESHOLD = 0.3  # IoUTracker: minimum IoU of a track-detection match
    # QueryIoUTracker: match the tracks in rounds by consecutive misses, 0 first (DeepSORT's matching cascade)
    # instead of one Hungarian assignment over all tracks. Off by the rule fixed before measuring: on the big
    # val it cut ID switches on all three models (176 -> 80, 140 -> 83, 110 -> 100) but lowered IDF1 by more
    # than 1 on two of them (docs/benchmarks.md, "Matching cascade"); on a fresh val with thresholds chosen on
    # 15 tune sequences it had more ID switches on one of three (77 vs 69): off again
    cfg.MODEL.TRACKER.MATCH_CASCADE = False
    cfg.MODEL.TRACKER.IOU_CLASS_AWARE = False  # IoUTracker: only match tracks and detections of one class
    # RuntimeTracker, not in MOTR (False = MOTR): a would-be birth overlapping a track missed this frame
    # (IoU > DUPLICATE_IOU) and no visible track takes over that track (its query, same id, shown) instead of
    # being suppressed. On by the rule fixed before measuring (IDF1 and MOTA not lower on the tune split on
    # 2 of 3 seeds); its measured effect is small (video/README.md)
    cfg.MODEL.TRACKER.REBIND_MISSED_TRACKS = True
    # RuntimeTracker: which track queries the detect queries attend to in the decoder's self-attention.
    # "all" (MOTR): every track, so a track suppresses the detect queries on its object; "shown": not the
    # tracks missed in the previous frame (score < KEEP_THRESHOLD), so the detect queries find those objects
    # again (training carries only tracks with IoU > TRAIN_TRACK_IOU to their object: a lost track is no
    # track there); "none": no track, the detect queries give the per-frame detector's outputs and a
    # detection overlapping a live track by IoU > UNSEEN_TRACK_IOU is no birth (a missed one re-binds with
    # REBIND_MISSED_TRACKS). "none" by the rule fixed before a fresh val (higher IDF1 and MOTA than "all" on
    # both models: met); measured: video/README.md, "Where it differs from MOTR"
    cfg.MODEL.TRACKER.DETECT_SEES_TRACKS = "none"
    # RuntimeTracker: for a track the detect queries did not see this frame (DETECT_SEES_TRACKS), this IoU
    # stands in for DUPLICATE_IOU between the track's box and a detection (no birth above it; a missed track
    # re-binds): the detection was not suppressed by attention, so it overlaps the track less than a
    # duplicate does
    cfg.MODEL.TRACKER.UNSEEN_TRACK_IOU = 0.1
    # a track overlapping a higher-scoring visible track more than this is hidden for the frame (0: off)
    cfg.MODEL.TRACKER.TRACK_DUPLICATE_IOU = 0.7
    cfg.MODEL.TRACKER.MIN_BOX_AREA = 0.0  # reported boxes smaller than this (pixels^2) are not written
    # reported boxes need a score above this (MOTR's prob_threshold 0.7); 0: every shown track is reported
    cfg.MODEL.TRACKER.REPORT_THRESHOLD = 0.0
    # decoder reference of every query: "box" (cx, cy, w, h; detect queries get a learned size) or "point"
    # (MOTR: (cx, cy), a track's is its last box centre)
    cfg.MODEL.TRACKER.REFERENCE = "box"
    # --- query interaction module ---
    cfg.MODEL.TRACKER.QIM_DIM_FEEDFORWARD = 1024
    cfg.MODEL.TRACKER.QIM_DROPOUT = 0.0
    cfg.MODEL.TRACKER.QIM_UPDATE_QUERY_POS = True
    # base of the content update: "previous_query" (MOTR: the track's content query fed to the decoder this
    # frame) or "decoder_output" (this frame's decoder output, the former rule)
    cfg.MODEL.TRACKER.QIM_RESIDUAL = "previous_query"
    cfg.MODEL.TRACKER.QIM_INIT = "xavier"  # "xavier" (MOTR: xavier_uniform_ on every matrix) or "default"
    # MOTR's --extra_track_attn: before each decoder layer's self-attention, the track queries attend among
    # themselves (ddetr_video.track_attention)
    cfg.MODEL.TRACKER.EXTRA_TRACK_ATTN = False
    # --- training-time track augmentation (MOTR / TrackFormer) ---
    cfg.MODEL.TRACKER.RANDOM_DROP = 0.1  # probability to drop a track query for the next frame
    cfg.MODEL.TRACKER.FP_RATIO = 0.3  # probability per frame to add unmatched detect queries as fake tracks
    cfg.MODEL.TRACKER.FP_MAX = 2  # at most this many fake tracks per frame
    cfg.MODEL.TRACKER.MIN_BIRTH_VISIBILITY = 0.3  # untracked objects less visible are not detect targets
    # training: a matched query (old track or new detection) is carried to the next frame only if its box IoU
    # with its target is above this (MOTR: 0.5, old and new tracks); <= 0: no gate
    cfg.MODEL.TRACKER.TRAIN_TRACK_IOU = 0.5
    # fake tracks (trained as "no object"): "near_track" (MOTR): for each kept track, with probability
    # FP_RATIO, the unmatched query overlapping it most, matchable to a new object in the next frame (FP_MAX
    # unused); "top_score": with probability FP_RATIO per frame, the FP_MAX best-scoring unmatched detect
    # queries
    cfg.MODEL.TRACKER.FAKE_TRACKS = "near_track"
    # training keeps the track of an absent object ("no object" target, re-bound by id when it returns) until
    # its MAX_AGE-th consecutive absence, as inference does (MOTR); False: dropped at the first absence
    cfg.MODEL.TRACKER.KEEP_ABSENT_TRACKS = True
    # the loss normaliser also counts track slots whose object is absent (MOTR's num_samples); False: objects
    cfg.MODEL.TRACKER.LOSS_COUNTS_ABSENT_TRACKS = False
    # --- tiny CPU backbone (MODEL.BACKBONE.NAME: build_tiny_conv_backbone) ---
    cfg.MODEL.TINY_BACKBONE = CN()
    cfg.MODEL.TINY_BACKBONE.CHANNELS = [16, 32, 64, 128]  # stem, res3, res4, res5
    # --- clip sampling (ClipDatasetMapper) ---
    # frames per training clip: CLIP_LENGTHS[i] from iteration CLIP_LENGTH_STEPS[i - 1] on (MOTR's
    # sampler_lengths / sampler_steps, in iterations here); one length and no steps: fixed
    cfg.INPUT.CLIP_LENGTHS = (3,)
    cfg.INPUT.CLIP_LENGTH_STEPS = ()
    cfg.INPUT.CLIP_MAX_INTERVAL = 3  # gap between consecutive clip frames drawn uniformly in [1, this]
    # "per_clip" (MOTR's random_interval): one gap drawn per clip; "per_gap": each gap drawn anew
    cfg.INPUT.CLIP_INTERVAL_MODE = "per_clip"
    return cfg


# float keys in [0, 1] (probabilities, scores, IoUs)
_UNIT_INTERVAL = (
    "BIRTH_THRESHOLD", "KEEP_THRESHOLD", "DUPLICATE_IOU", "UNSEEN_TRACK_IOU", "TRACK_DUPLICATE_IOU",
    "REPORT_THRESHOLD", "RANDOM_DROP", "FP_RATIO", "MIN_BIRTH_VISIBILITY",
)  # fmt: skip
_BOOLS = (
    "MATCH_CASCADE", "IOU_CLASS_AWARE", "REBIND_MISSED_TRACKS", "QIM_UPDATE_QUERY_POS", "EXTRA_TRACK_ATTN",
    "KEEP_ABSENT_TRACKS", "LOSS_COUNTS_ABSENT_TRACKS",
)  # fmt: skip


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def check_tracker_config(cfg):
    """Raise :class:`ConfigError` naming the key and its allowed values for a ``MODEL.TRACKER.*`` value the
    tracker cannot use (instead of a ``ValueError`` traceback at build time, or a run that silently ignores
    it, e.g. ``RANDOM_DROP 1.5`` or ``MAX_AGE 0``). ``KEEP_THRESHOLD`` > ``BIRTH_THRESHOLD`` is refused for
    ``IoUTracker`` / ``QueryIoUTracker`` (a detection under the keep threshold is no candidate, so such a
    birth threshold would never apply); ``RuntimeTracker`` allows it (a newborn is shown in its birth frame,
    then needs ``KEEP_THRESHOLD`` to stay shown)."""
    if "TRACKER" not in cfg.MODEL:
        raise ConfigError("the config has no MODEL.TRACKER keys (ddetr_video.config.add_tracker_config)")
    tc = cfg.MODEL.TRACKER
    key = "MODEL.TRACKER."
    from .tracking import TRACKER_REGISTRY  # the trackers import torch

    names = sorted(k for k, _ in TRACKER_REGISTRY)
    if tc.ASSOCIATION not in names:
        raise ConfigError(
            f"{key}ASSOCIATION: unknown association {tc.ASSOCIATION!r}, expected one of {names}"
        )
    for name in _UNIT_INTERVAL:
        v = tc[name]
        if not _is_number(v) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key}{name} must be a number in [0, 1], got {v!r}")
    if tc.ASSOCIATION in ("IoUTracker", "QueryIoUTracker") and tc.KEEP_THRESHOLD > tc.BIRTH_THRESHOLD:
        raise ConfigError(
            f"{key}KEEP_THRESHOLD ({tc.KEEP_THRESHOLD}) must be <= {key}BIRTH_THRESHOLD "
            f"({tc.BIRTH_THRESHOLD}) with ASSOCIATION {tc.ASSOCIATION}: a detection under KEEP_THRESHOLD is "
            "no candidate at all, so a lower BIRTH_THRESHOLD would never apply"
        )
    v = tc.IOU_MATCH_THRESHOLD
    if not _is_number(v) or not 0.0 < v <= 1.0:
        raise ConfigError(f"{key}IOU_MATCH_THRESHOLD must be a number in (0, 1], got {v!r}")
    v = tc.TRAIN_TRACK_IOU
    if not _is_number(v) or v >= 1.0:
        raise ConfigError(
            f"{key}TRAIN_TRACK_IOU must be a number < 1 (a box IoU is never above 1, so no track would be "
            f"carried; <= 0: no gate), got {v!r}"
        )
    v = tc.QIM_DROPOUT
    if not _is_number(v) or not 0.0 <= v < 1.0:
        raise ConfigError(f"{key}QIM_DROPOUT must be a number in [0, 1), got {v!r}")
    v = tc.MIN_BOX_AREA
    if not _is_number(v) or v < 0:
        raise ConfigError(f"{key}MIN_BOX_AREA must be a number >= 0 (pixels^2; 0: off), got {v!r}")
    for name, low in (("MAX_AGE", 1), ("QIM_DIM_FEEDFORWARD", 1), ("FP_MAX", 0)):
        v = tc[name]
        if not _is_int(v) or v < low:
            raise ConfigError(f"{key}{name} must be an integer >= {low}, got {v!r}")
    from .qim import QIM_INITS, QIM_RESIDUALS
    from .runtime_tracker import DETECT_SEES
    from .tracker_model import FAKE_TRACKS, REFERENCES

    # the names the modules that read these keys accept
    choices = {
        "DETECT_SEES_TRACKS": DETECT_SEES,
        "REFERENCE": REFERENCES,
        "QIM_RESIDUAL": QIM_RESIDUALS,
        "QIM_INIT": QIM_INITS,
        "FAKE_TRACKS": FAKE_TRACKS,
    }
    for name, allowed in choices.items():
        if tc[name] not in allowed:
            raise ConfigError(f"{key}{name} must be one of {allowed}, got {tc[name]!r}")
    for name in _BOOLS:
        if not isinstance(tc[name], bool):
            raise ConfigError(f"{key}{name} must be True or False, got {tc[name]!r}")


def check_clip_config(cfg):
    """Raise :class:`ConfigError` naming the key for ``INPUT.CLIP_*`` values the clip sampler cannot use
    (the length schedule's own rules are :class:`~ddetr_video.clip_schedule.ClipLengthSchedule`'s)."""
    from .clip_mapper import CLIP_INTERVAL_MODES
    from .clip_schedule import ClipLengthSchedule

    for name in ("CLIP_LENGTHS", "CLIP_LENGTH_STEPS"):
        values = cfg.INPUT[name]
        if not isinstance(values, (list, tuple)) or not all(_is_int(x) for x in values):
            raise ConfigError(f"INPUT.{name} must be a list of integers, got {values!r}")
    ClipLengthSchedule.from_config(cfg)
    v = cfg.INPUT.CLIP_MAX_INTERVAL
    if not _is_int(v) or v < 1:
        raise ConfigError(f"INPUT.CLIP_MAX_INTERVAL must be an integer >= 1 (largest gap), got {v!r}")
    mode = cfg.INPUT.CLIP_INTERVAL_MODE
    if mode not in CLIP_INTERVAL_MODES:
        raise ConfigError(f"INPUT.CLIP_INTERVAL_MODE must be one of {CLIP_INTERVAL_MODES}, got {mode!r}")


def get_tracker_cfg(config_file=None, opts=(), freeze=False):
    """``ddetr_d2.config.build_cfg`` with the tracker keys (``add_tracker_config``); unfrozen by default."""
    from ddetr_d2.config import build_cfg

    return build_cfg(config_file, opts, add_config_fns=(add_tracker_config,), freeze=freeze)
