#!/usr/bin/env python
"""Train / evaluate Deformable DETR with detectron2's training loop.

Examples::

    # quick start on the synthetic shapes (CPU, generated on first use)
    python tools/train_net.py --config-file configs/quickstart.yaml
    # evaluate a checkpoint (its keys and shapes must fit the config's model, or --allow-mismatch)
    python tools/train_net.py --config-file configs/quickstart.yaml --eval-only \\
        MODEL.WEIGHTS output/quickstart/model_final.pth
    # your own COCO-format data
    python tools/train_net.py --config-file configs/ddetr_r50.yaml \\
        --dataset mytrain=data/train.json:data/train_images --dataset myval=data/val.json:data/val_images \\
        DATASETS.TRAIN '("mytrain",)' DATASETS.TEST '("myval",)' MODEL.DEFORMABLE_DETR.NUM_CLASSES 3
    # 2 processes (GPUs: NCCL; with MODEL.DEVICE cpu: gloo on CPU processes)
    python tools/train_net.py --config-file ... --num-gpus 2
    # continue an interrupted run (SIGTERM / Ctrl-C save a checkpoint) from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file ... --resume

Before the model is built, every dataset in DATASETS.TRAIN / DATASETS.TEST is validated (missing
images, invalid boxes, unknown categories, NUM_CLASSES). User errors print ``error: ...`` and exit 2;
SIGTERM / SIGINT save a checkpoint and exit 143 / 130 (docs/training.md).
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import json
import logging
import os
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ddetr_d2.config import setup_cfg
from ddetr_d2.data import parse_dataset_spec, register_coco_folder
from ddetr_d2.engine import DeformableDetrTrainer as Trainer
from ddetr_d2.engine import check_output_dir, is_cpu, run_entry_point, train_or_evaluate
from ddetr_d2.errors import ConfigError


def _check_config(cfg):
    if cfg.SOLVER.AMP.ENABLED and (is_cpu(cfg) or not torch.cuda.is_available()):
        raise ConfigError(
            "SOLVER.AMP.ENABLED=True needs a CUDA device (detectron2's AMPTrainer is CUDA-only); "
            "set SOLVER.AMP.ENABLED False or MODEL.DEVICE cuda"
        )
    if not is_cpu(cfg) and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available; add MODEL.DEVICE cpu")


def setup(args):
    cfg = setup_cfg(args)
    _check_config(cfg)
    for spec in args.dataset:
        register_coco_folder(*parse_dataset_spec(spec))
    check_output_dir(cfg)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ddetr_d2")
    return cfg


def _save_results(cfg, results):
    """Write evaluation results (dataset -> task -> metric; NaN as null) to OUTPUT_DIR/eval_results.json."""
    if "bbox" in results:  # detectron2 un-nests the dict when there is a single test dataset
        results = {cfg.DATASETS.TEST[0]: results}
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")

    def _clean(x):  # NaN (e.g. APl without large objects) -> null: strict json
        if isinstance(x, dict):
            return {k: _clean(v) for k, v in x.items()}
        return None if isinstance(x, float) and x != x else x

    with open(path + ".tmp", "w") as f:
        json.dump(_clean(results), f, indent=2)
    os.replace(path + ".tmp", path)
    logging.getLogger("ddetr_d2").info(f"Evaluation results written to {path}")


def main(args):
    cfg = setup(args)
    res = train_or_evaluate(cfg, args, Trainer)
    if res and comm.is_main_process():
        _save_results(cfg, res)
    return res


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); use it in DATASETS.TRAIN/TEST",
    )
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="--eval-only: log (instead of refusing) MODEL.WEIGHTS keys/shapes that do not fit the model, or "
        "an empty MODEL.WEIGHTS (the random initialisation)",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    sys.exit(run_entry_point(main, args, setup_cfg))
