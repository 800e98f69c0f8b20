"""Config keys of the query-propagation tracker (on top of ``add_deformable_detr_config``)."""

from detectron2.config import CfgNode as CN

__all__ = ["add_tracker_config", "get_tracker_cfg"]


def add_tracker_config(cfg):
    """Add ``cfg.MODEL.TRACKER.*`` and the clip sampling keys ``cfg.INPUT.CLIP_*`` (in place)."""
    cfg.MODEL.TRACKER = CN()
    # --- inference bookkeeping (RuntimeTracker) ---
    cfg.MODEL.TRACKER.BIRTH_THRESHOLD = 0.5  # detect query score that starts a new track
    cfg.MODEL.TRACKER.KEEP_THRESHOLD = 0.4  # track query score that keeps (and shows) a track
    cfg.MODEL.TRACKER.MAX_AGE = 5  # consecutive frames under KEEP_THRESHOLD before a track dies
    cfg.MODEL.TRACKER.DUPLICATE_IOU = 0.7  # births overlapping a live track more than this are dropped
    # a track overlapping a higher-scoring visible track more than this is hidden for the frame (0: off)
    cfg.MODEL.TRACKER.TRACK_DUPLICATE_IOU = 0.7
    cfg.MODEL.TRACKER.MIN_BOX_AREA = 0.0  # reported boxes smaller than this (pixels^2) are not written
    # --- query interaction module ---
    cfg.MODEL.TRACKER.QIM_DIM_FEEDFORWARD = 1024
    cfg.MODEL.TRACKER.QIM_DROPOUT = 0.0
    cfg.MODEL.TRACKER.QIM_UPDATE_QUERY_POS = True
    # --- training-time track augmentation (MOTR / TrackFormer) ---
    cfg.MODEL.TRACKER.RANDOM_DROP = 0.1  # probability to drop a track query for the next frame
    cfg.MODEL.TRACKER.FP_RATIO = 0.3  # probability per frame to add unmatched detect queries as fake tracks
    cfg.MODEL.TRACKER.FP_MAX = 2  # at most this many fake tracks per frame
    cfg.MODEL.TRACKER.MIN_BIRTH_VISIBILITY = 0.3  # untracked objects less visible are not detect targets
    cfg.MODEL.TRACKER.MIN_TRACK_IOU = 0.0  # matched detect queries become tracks only above this box IoU
    # --- tiny CPU backbone (MODEL.BACKBONE.NAME: build_tiny_conv_backbone) ---
    cfg.MODEL.TINY_BACKBONE = CN()
    cfg.MODEL.TINY_BACKBONE.CHANNELS = [16, 32, 64, 128]  # stem, res3, res4, res5
    # --- clip sampling (ClipDatasetMapper) ---
    cfg.INPUT.CLIP_LENGTH = 3  # frames per training clip
    cfg.INPUT.CLIP_MAX_INTERVAL = 3  # gap between consecutive clip frames drawn uniformly in [1, this]
    return cfg


def get_tracker_cfg(config_file=None, opts=()):
    """A fresh config with the detector and tracker keys, merged with ``config_file`` and ``opts``."""
    from detectron2.config import get_cfg

    from ddetr_d2.config import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    add_tracker_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
