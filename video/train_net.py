#!/usr/bin/env python
"""Train / evaluate the query-propagation tracker (``QueryTracker``) with Detectron2.

    python video/train_net.py --config-file video/configs/synthetic_tiny.yaml
    python video/train_net.py --config-file video/configs/synthetic_tiny.yaml --eval-only \
        MODEL.WEIGHTS out/model_final.pth

Training reads T-frame clips (:class:`ddetr_video.clip_mapper.ClipDatasetMapper`); evaluation runs each test
sequence frame by frame in order (batch 1) and scores it with ``ddetr_video.evaluator.MOTEvaluator``
(MOTA / IDF1 / IDSW / HOTA).
"""

import logging
import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import ddetr_video  # noqa: F401  (registers the meta-architecture and datasets)
from ddetr_d2.checkpoint import AtomicDetectionCheckpointer
from ddetr_d2.data.dataset_mapper import DetrDatasetMapper
from ddetr_d2.engine import DeformableDetrTrainer, is_cpu, launch_processes
from ddetr_video.clip_mapper import ClipDatasetMapper
from ddetr_video.config import get_tracker_cfg
from ddetr_video.datasets import register_all

logger = logging.getLogger("ddetr_video")


class TrackerTrainer(DeformableDetrTrainer):
    """The detector trainer (optimizer, atomic checkpoints, CPU DDP) with clips and MOT evaluation."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=ClipDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # batch 1, dataset order (sequence by sequence, frames in order): the tracker keeps state
        # between calls
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from ddetr_video.evaluator import MOTEvaluator

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return MOTEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    cfg = get_tracker_cfg(args.config_file, args.opts)
    cfg.freeze()
    register_all()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ddetr_video")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = TrackerTrainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = TrackerTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = TrackerTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch_processes(main, args, cpu=is_cpu(get_tracker_cfg(args.config_file, args.opts)))
