"""Config keys of ddetr-d2: ``add_deformable_detr_config(cfg)`` adds them to a Detectron2 config."""

from detectron2.config import CfgNode as CN

__all__ = ["add_deformable_detr_config"]


def add_deformable_detr_config(cfg):
    """
    Add the Deformable DETR keys to ``cfg`` (in place). Defaults follow the official
    implementation (fundamentalvision/Deformable-DETR ``main.py``), except ``NUM_CLASSES``,
    which uses Detectron2's contiguous ids (80 for COCO; the official code uses 91).
    """
    cfg.MODEL.DEFORMABLE_DETR = CN()
    _C = cfg.MODEL.DEFORMABLE_DETR
    _C.NUM_CLASSES = 80
    _C.NUM_QUERIES = 300
    # transformer
    _C.HIDDEN_DIM = 256
    _C.NHEADS = 8
    _C.ENC_LAYERS = 6
    _C.DEC_LAYERS = 6
    _C.DIM_FEEDFORWARD = 1024
    _C.DROPOUT = 0.1
    _C.NUM_FEATURE_LEVELS = 4
    _C.ENC_N_POINTS = 4
    _C.DEC_N_POINTS = 4
    # variants
    _C.WITH_BOX_REFINE = False
    _C.TWO_STAGE = False
    # loss / matching
    _C.AUX_LOSS = True
    _C.COST_CLASS = 2.0
    _C.COST_BBOX = 5.0
    _C.COST_GIOU = 2.0
    _C.CLASS_WEIGHT = 2.0
    _C.BBOX_WEIGHT = 5.0
    _C.GIOU_WEIGHT = 2.0
    _C.FOCAL_ALPHA = 0.25
    _C.FOCAL_GAMMA = 2.0
    # inference: top-k over all (query, class) pairs
    _C.DETECTIONS_PER_IMAGE = 100
    # chunk size of the deformable-attention kernel over the batch
    _C.IM2COL_STEP = 64
    # Batch independence. True: backbone + input projections run per image (grouped by size) so
    # padding never reaches an image's features, and two-stage never picks padded positions as
    # proposals; outputs do not depend on the rest of the batch. False: the official behaviour (one
    # padded batch pass with nearest-resized masks; padded proposals ranked too). Identical for
    # batches of one image (or of equal-size images).
    _C.PER_IMAGE_FEATURES = True

    # optimizer (used by ddetr_d2/solver.py)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 2e-4
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # lr multiplier of params whose name contains "sampling_offsets" or "reference_points"
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

    # input / backbone: torchvision R-50, RGB
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]

    # dataset mapper keys (cfg.INPUT.DETR_*)
    from .data.dataset_mapper import add_dataset_mapper_config

    add_dataset_mapper_config(cfg)
    return cfg
