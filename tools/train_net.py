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
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ddetr_d2 import add_deformable_detr_config
from ddetr_d2.data import (
    DetrDatasetMapper,
    add_dataset_mapper_config,
    parse_dataset_spec,
    register_coco_folder,
)
from ddetr_d2.solver import build_optimizer


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, not a checkpoint)."""


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and whose load errors name the file.

    fvcore's ``Checkpointer.save`` writes ``model_XXX.pth`` and ``last_checkpoint`` in place, so a
    kill during the write leaves a truncated file that ``--resume`` would then pick up. Here both
    are written to a temporary file in the same folder and moved into place with ``os.replace``.
    """

    def _atomic_write(self, path, write_fn, mode):
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, mode) as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._atomic_write(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._atomic_write(path, lambda f: f.write(last_filename_basename), "w")

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:
            size = os.path.getsize(filename) if os.path.isfile(filename) else "missing"
            raise CheckpointError(
                f"Cannot load checkpoint '{filename}' (size: {size} bytes): {type(e).__name__}: {e}. "
                "The file is probably truncated or corrupt (e.g. the job was killed while writing it); "
                "delete it, or point OUTPUT_DIR/last_checkpoint / MODEL.WEIGHTS at an intact checkpoint."
            ) from e


def _is_cpu(cfg):
    return str(cfg.MODEL.DEVICE).startswith("cpu")


def create_ddp_model(model, cfg):
    """DDP when world size > 1: on CPU (gloo) without ``device_ids``, on GPU with the local rank."""
    if comm.get_world_size() == 1:
        return model
    device_ids = None if _is_cpu(cfg) else [comm.get_local_rank()]
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


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


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DETR mapper, the Deformable DETR optimizer, COCO evaluation,
    atomic checkpoints and CPU (gloo) data parallelism."""

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, but with our DDP wrapper and checkpointer.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, cfg)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder)


def _check_config(cfg):
    if cfg.SOLVER.AMP.ENABLED and (_is_cpu(cfg) or not torch.cuda.is_available()):
        raise ValueError(
            "SOLVER.AMP.ENABLED=True needs a CUDA device (detectron2's AMPTrainer is CUDA-only); "
            "set SOLVER.AMP.ENABLED False or MODEL.DEVICE cuda"
        )
    if not _is_cpu(cfg) and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available; add MODEL.DEVICE cpu")


def setup(args):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    add_dataset_mapper_config(cfg)
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
    """Write the evaluation results (dataset -> task -> metric) to OUTPUT_DIR/eval_results.json."""
    if "bbox" in results:  # detectron2 un-nests the dict when there is a single test dataset
        results = {cfg.DATASETS.TEST[0]: results}
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
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


def _cpu_worker(local_rank, main_func, world_size, dist_url, args, timeout):
    """Like detectron2's ``_distributed_worker`` but always gloo and never touching CUDA."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))  # share the cores
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=local_rank, timeout=timeout
    )
    comm.create_local_process_group(world_size)
    comm.synchronize()
    main_func(*args)
    dist.destroy_process_group()


def launch_processes(main_func, args, cpu):
    """detectron2's ``launch``; for MODEL.DEVICE cpu with --num-gpus N > 1, N gloo CPU processes."""
    if cpu and args.num_gpus > 1:
        if args.num_machines != 1:
            raise ValueError("CPU data parallelism (MODEL.DEVICE cpu) supports --num-machines 1 only")
        dist_url = args.dist_url
        if dist_url == "auto":
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
        mp.start_processes(
            _cpu_worker,
            nprocs=args.num_gpus,
            args=(main_func, args.num_gpus, dist_url, (args,), DEFAULT_TIMEOUT),
            daemon=False,
        )
        return
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def _device_from_args(args):
    """MODEL.DEVICE as it will be after merging the config file and --opts (before launching)."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    add_dataset_mapper_config(cfg)
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
