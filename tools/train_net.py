#!/usr/bin/env python
"""Train / evaluate Deformable DETR with detectron2's training loop.

Examples::

    # quick start on the synthetic shapes (CPU, generated on first use)
    python tools/train_net.py --config-file configs/quickstart.yaml
    # evaluate a checkpoint
    python tools/train_net.py --config-file configs/quickstart.yaml --eval-only \\
        MODEL.WEIGHTS output/quickstart/model_final.pth
    # your own COCO-format data
    python tools/train_net.py --config-file configs/ddetr_r50.yaml \\
        --dataset mytrain=data/train.json:data/train_images --dataset myval=data/val.json:data/val_images \\
        DATASETS.TRAIN '("mytrain",)' DATASETS.TEST '("myval",)' MODEL.DEFORMABLE_DETR.NUM_CLASSES 3
    # 2 processes (GPUs: NCCL; with MODEL.DEVICE cpu: gloo on CPU processes)
    python tools/train_net.py --config-file ... --num-gpus 2
    # continue an interrupted run from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file ... --resume
"""

import json
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ddetr_d2 import add_deformable_detr_config
from ddetr_d2.checkpoint import AtomicDetectionCheckpointer, CheckpointError  # noqa: F401  (re-exported)
from ddetr_d2.data import parse_dataset_spec, register_coco_folder
from ddetr_d2.engine import DeformableDetrTrainer as Trainer
from ddetr_d2.engine import is_cpu, launch_processes


class RankWeightsDumper:
    """After training, every rank writes ``DIR/rank{r}.pth`` (its model's state_dict); used to
    check that data-parallel replicas stay identical."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def __call__(self, model):
        os.makedirs(self.out_dir, exist_ok=True)
        model = model.module if isinstance(model, DistributedDataParallel) else model
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(self.out_dir, f"rank{comm.get_rank()}.pth"))


def _check_config(cfg):
    if cfg.SOLVER.AMP.ENABLED and (is_cpu(cfg) or not torch.cuda.is_available()):
        raise ValueError(
            "SOLVER.AMP.ENABLED=True needs a CUDA device (detectron2's AMPTrainer is CUDA-only); "
            "set SOLVER.AMP.ENABLED False or MODEL.DEVICE cuda"
        )
    if not is_cpu(cfg) and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available; add MODEL.DEVICE cpu")


def setup(args):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    _check_config(cfg)
    for spec in args.dataset:
        register_coco_folder(*parse_dataset_spec(spec))
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
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            _save_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    res = getattr(trainer, "_last_eval_results", None)
    if args.dump_rank_weights:
        RankWeightsDumper(args.dump_rank_weights)(trainer.model)
    if not res and len(cfg.DATASETS.TEST) and cfg.TEST.EVAL_PERIOD == 0:
        # no periodic evaluation configured: evaluate the final model once
        res = Trainer.test(cfg, trainer.model)
    if res and comm.is_main_process():
        _save_results(cfg, res)
    return res


def _device_from_args(args):
    """MODEL.DEVICE as it will be after merging the config file and --opts (before launching)."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg.MODEL.DEVICE


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
        "--dump-rank-weights",
        default="",
        metavar="DIR",
        help="after training, every process saves its model weights to DIR/rank{r}.pth (DDP sanity check)",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    launch_processes(main, args, cpu=str(_device_from_args(args)).startswith("cpu"))
