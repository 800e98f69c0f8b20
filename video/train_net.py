#!/usr/bin/env python
"""Train / evaluate the query-propagation tracker (``QueryTracker``) with Detectron2.

    python video/train_net.py --config-file video/configs/synthetic_tiny.yaml
    python video/train_net.py --config-file video/configs/synthetic_tiny.yaml --eval-only \
        MODEL.WEIGHTS out/model_final.pth

Training reads T-frame clips (``ddetr_video.engine.TrackerTrainer``, the detector's trainer with
:class:`ddetr_video.clip_mapper.ClipDatasetMapper`); evaluation runs each test sequence frame by frame
in order (batch 1) and scores it with the evaluator of the dataset's ``evaluator_type`` (``"mot"``:
``ddetr_video.evaluator.MOTEvaluator``: MOTA / IDF1 / IDSW / HOTA). As in ``tools/train_net.py``: datasets are
validated before the model is built, ``--eval-only`` weights must fit the model (or ``--allow-mismatch``),
SIGTERM / SIGINT save a checkpoint for ``--resume``, user errors exit 2 with one line.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import ddetr_video  # noqa: F401  (registers the meta-architecture, datasets, "mot" evaluator and validator)
from ddetr_d2.config import setup_cfg
from ddetr_d2.engine import check_output_dir, run_entry_point, train_or_evaluate
from ddetr_video.config import add_tracker_config
from ddetr_video.datasets import register_all
from ddetr_video.engine import TrackerTrainer, check_run_config


def tracker_cfg(args):
    cfg = setup_cfg(args, add_config_fns=(add_tracker_config,))
    check_run_config(cfg, eval_only=args.eval_only)
    return cfg


def setup(args):
    cfg = tracker_cfg(args)
    register_all()
    check_output_dir(cfg)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ddetr_video")
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ddetr_d2")
    return cfg


def main(args):
    return train_or_evaluate(setup(args), args, TrackerTrainer)


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="--eval-only: log (instead of refusing) MODEL.WEIGHTS keys/shapes that do not fit the model, or "
        "an empty MODEL.WEIGHTS (the random initialisation)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(run_entry_point(main, build_parser().parse_args(), tracker_cfg))
