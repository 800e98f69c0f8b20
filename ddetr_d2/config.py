"""Config keys of ddetr-d2: ``add_deformable_detr_config(cfg)`` adds them to a Detectron2 config;
``build_cfg`` / ``setup_cfg`` are the one way every entry point makes its config."""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import ConfigError

__all__ = ["add_deformable_detr_config", "build_cfg", "setup_cfg", "check_model_config"]


def build_cfg(config_file=None, opts=(), add_config_fns=(), freeze=True):
    """
    A Detectron2 config with the ddetr-d2 keys (plus those of ``add_config_fns``, e.g. the video
    add-on's ``add_tracker_config``), merged from ``config_file`` and ``opts`` (KEY VALUE pairs).

    Raises :class:`ConfigError` naming the file / key for a missing file, odd ``opts`` or a key the
    config does not have.
    """
    opts = list(opts or ())
    if config_file and os.path.isdir(config_file):
        raise ConfigError(f"config file {config_file} is a folder: give a .yaml file in it")
    if config_file and not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    if len(opts) % 2:
        raise ConfigError(f"options need KEY VALUE pairs, got an odd number of items: {opts}")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    for fn in add_config_fns:
        fn(cfg)
    if config_file:
        if os.path.getsize(config_file) == 0:
            raise ConfigError(f"config file {config_file} is empty")
        try:
            cfg.merge_from_file(config_file)
        except Exception as e:  # yacs raises KeyError/ValueError/AssertionError naming the key
            raise ConfigError(f"bad config file {config_file}: {_yacs_reason(e)}") from e
    try:
        cfg.merge_from_list(opts)
    except Exception as e:
        raise ConfigError(f"bad config option: {_yacs_reason(e)}") from e
    if freeze:
        cfg.freeze()
    return cfg


def _yacs_reason(e):
    """yacs' message, with a hint for the empty / non-mapping yaml files it does not explain."""
    if isinstance(e, TypeError) and "NoneType" in str(e):
        return "the file (or a file it names in _BASE_) holds no settings"
    if isinstance(e, (TypeError, AttributeError)) and ("str" in str(e) or "list" in str(e)):
        return f"expected 'KEY: value' settings at the top level ({type(e).__name__}: {e})"
    return f"{type(e).__name__}: {e}"


def setup_cfg(args, add_config_fns=(), freeze=True):
    """``build_cfg`` from command-line ``args`` (``args.config_file``, ``args.opts``)."""
    return build_cfg(args.config_file, args.opts, add_config_fns=add_config_fns, freeze=freeze)


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
    # backbone outputs fed to the transformer, fine to coarse (the last NUM_FEATURE_LEVELS of them;
    # further levels are stride-2 convs). The backbone must produce them (MODEL.RESNETS.OUT_FEATURES).
    _C.IN_FEATURES = ["res3", "res4", "res5"]
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
    # DINO options (off = official): query positions from the encoder's top-k with learned content
    # (TWO_STAGE); box losses of layer l also train layer l-1's box head (WITH_BOX_REFINE; same values)
    _C.MIXED_QUERY_SELECTION = False
    _C.LOOK_FORWARD_TWICE = False
    # denoising query groups (DN-DETR / DINO; training only, two-stage only; see docs/model.md)
    _C.DN = CN()
    _C.DN.ENABLED = False
    # fixed number of groups, or, if DYNAMIC_NUM_QUERIES > 0, max(1, DYNAMIC_NUM_QUERIES // max objects
    # per image of the batch) groups (DINO's dn_number = 100; contrastive groups count 2 queries per object)
    _C.DN.NUM_GROUPS = 5
    _C.DN.DYNAMIC_NUM_QUERIES = 0
    # box corners move by up to BOX_NOISE_SCALE * half the box size (DN-DETR 0.4, DINO 1.0)
    _C.DN.BOX_NOISE_SCALE = 0.4
    # probability that a label is replaced by a random class (DN-DETR 0.2; DINO's 0.5 flips 0.25)
    _C.DN.LABEL_NOISE_RATIO = 0.2
    # DINO contrastive denoising: each group adds negatives (noise in [1, 2) x the scale) to be
    # classified as background
    _C.DN.CONTRASTIVE = False
    # hybrid matching (H-DETR; training only): NUM_QUERIES extra queries run through the decoder,
    # hidden from the detector's (both ways), matched one-to-many to every target repeated K times;
    # two-stage: the encoder proposals ranked after the detector's. H-DETR: 1500 queries beside 300,
    # K 6, LOSS_WEIGHT (its lambda) 1.0. See ddetr_d2/modeling/one_to_many.py
    _C.ONE_TO_MANY = CN()
    _C.ONE_TO_MANY.ENABLED = False
    _C.ONE_TO_MANY.NUM_QUERIES = 1500
    _C.ONE_TO_MANY.K = 6
    _C.ONE_TO_MANY.LOSS_WEIGHT = 1.0
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
    # Precision of the eval-mode forward: "float32", or "bfloat16" (dense layers under
    # torch.autocast(bfloat16), deformable sampling and outputs in float32; training is unaffected).
    _C.INFERENCE_DTYPE = "float32"
    # Eval-mode forward on the CPU: the backbone gets a channels-last (NHWC) batch, so that oneDNN's
    # convolutions skip layout reorders (R-50 at 800x1066, 2 cores of an AMX Xeon: backbone in bfloat16
    # 0.98 -> 0.25 s, float32 1.26 -> 0.85 s; 2-core AVX2 CPU, float32 with BN folded: 1.80 -> 1.30 s).
    # Same values up to rounding;
    # training, CUDA and export keep NCHW.
    _C.INFERENCE_CHANNELS_LAST = True
    # Inference-only models (demo, predictors, export, benchmarks: build_demo_model) fold each backbone
    # batch norm (FrozenBatchNorm2d, or BatchNorm2d's running statistics) into the convolution it
    # follows, after loading the weights: one pass over each feature map less, same values up to
    # rounding. Models built for training or --eval-only are not changed.
    _C.INFERENCE_FUSE_BATCHNORM = True
    # Inference-only models (build_demo_model; never export): torch.compile the backbone and the encoder /
    # decoder layers (modeling/inference_compile.py). R-50 at 800x1066 on a 2-core AVX2 CPU: whole forward
    # -22 % with one thread, -10 to -15 % with two (docs/benchmarks.md), after ~15-70 s of compiling on the
    # first call (and once more at the first new image size). Off by default: it pays off after ~100-200
    # images of one size (a video, a folder of same-size images).
    _C.INFERENCE_COMPILE = False
    # With INFERENCE_COMPILE: Inductor's weight freezing (weights become constants of the compiled graph,
    # pre-packed once for oneDNN; read at the first call, so they must not change afterwards). Two cores of
    # an AMX Xeon, bfloat16, R-50 at 800x1066: 1.65-1.71 s -> 1.08-1.25 s per image; 2-core AVX2 CPU,
    # float32, one thread: 7.06 -> 6.62 s (docs/benchmarks.md). The first call compiles about twice as long.
    _C.INFERENCE_COMPILE_FREEZING = True
    # Inference-only models on the CPU (build_demo_model): glibc's malloc keeps freed memory for reuse
    # (ddetr_d2/allocator.py; process-wide) instead of mapping each large tensor afresh: no page faults
    # after the first few images (R-50 at 800x1066: 150-200k faults, 0.4-0.6 s of system time per forward
    # without it; docs/benchmarks.md). The process keeps its peak heap.
    _C.INFERENCE_RETAIN_FREED_MEMORY = True
    # Inference-only float32 models on the CPU (build_demo_model; never export): the nn.Linear layers run
    # oneDNN's inner product on weights packed once (modeling/onednn_linear.py) instead of PyTorch's BLAS
    # GEMM (MKL). "auto": on AMD CPUs, where MKL's float32 GEMM is the slower one (2 cores of an AVX-512
    # EPYC, R-50 at 800x1066: the encoder's linear layers ~1.35x faster, docs/benchmarks.md); "onednn":
    # always; "torch": never (PyTorch's own; the "auto" choice on other CPUs, not measured against it).
    # Layers under 128 x 256 weights keep F.linear either way (oneDNN's per-call cost is larger there).
    _C.INFERENCE_LINEAR_BACKEND = "auto"

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
    # > 0: a wall-clock budget (whole seconds) for the training loop. After its first 100 iterations the run
    # measures its speed; if SOLVER.MAX_ITER iterations would not fit, MAX_ITER is lowered to what fits and
    # the lr schedule (STEPS, warm-up) scaled with it (ddetr_d2/time_budget.py). A faster machine trains
    # the configured schedule unchanged. 0: off.
    cfg.SOLVER.TIME_BUDGET_SECONDS = 0

    # input / backbone: torchvision R-50, RGB
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]

    # pre-flight dataset validation (ddetr_d2/data/validation.py): what to do with invalid boxes
    # (width/height <= 0, NaN/inf, outside the image): "error" stops before training, "drop"
    # removes them when the dataset is loaded (counted and logged)
    cfg.DATASETS.INVALID_BOXES = "error"

    # dataset mapper keys (cfg.INPUT.DETR_*)
    from .data.dataset_mapper import add_dataset_mapper_config

    add_dataset_mapper_config(cfg)
    return cfg


def check_model_config(cfg):
    """Raise :class:`ConfigError` naming the key for ``MODEL.DEFORMABLE_DETR`` values the model cannot be
    built or trained with (instead of a ``ZeroDivisionError`` at build time or a reshape error at the first
    step)."""
    c = cfg.MODEL.DEFORMABLE_DETR
    key = "MODEL.DEFORMABLE_DETR."
    at_least = {
        "NUM_CLASSES": 1, "NUM_QUERIES": 1, "HIDDEN_DIM": 1, "NHEADS": 1, "ENC_LAYERS": 0,
        "DEC_LAYERS": 1, "DIM_FEEDFORWARD": 1, "ENC_N_POINTS": 1, "DEC_N_POINTS": 1,
        "DETECTIONS_PER_IMAGE": 1, "IM2COL_STEP": 1,
    }  # fmt: skip
    for name, low in at_least.items():
        value = c[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{key}{name} must be an integer >= {low}, got {value!r}")
    if c.HIDDEN_DIM % c.NHEADS:
        raise ConfigError(f"{key}NHEADS ({c.NHEADS}) must divide {key}HIDDEN_DIM ({c.HIDDEN_DIM})")
    if not 0.0 <= c.DROPOUT < 1.0:
        raise ConfigError(f"{key}DROPOUT must be in [0, 1), got {c.DROPOUT}")
    weights = ("COST_CLASS", "COST_BBOX", "COST_GIOU", "CLASS_WEIGHT", "BBOX_WEIGHT", "GIOU_WEIGHT")
    for name in weights + ("FOCAL_GAMMA",):
        if c[name] < 0:
            raise ConfigError(f"{key}{name} must be >= 0, got {c[name]}")
    if not 0.0 <= c.FOCAL_ALPHA <= 1.0:
        raise ConfigError(f"{key}FOCAL_ALPHA must be in [0, 1], got {c.FOCAL_ALPHA}")
    if c.TWO_STAGE and not c.WITH_BOX_REFINE:
        raise ConfigError(f"{key}TWO_STAGE needs WITH_BOX_REFINE: True (as in the official code)")
