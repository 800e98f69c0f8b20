"""Training loop pieces: the DefaultTrainer subclass, CPU (gloo) data parallelism.

``DeformableDetrTrainer`` is what ``tools/train_net.py`` trains with; the tracking add-on subclasses
it and swaps the data loaders and the evaluator.
"""

import logging
import os
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import AtomicDetectionCheckpointer
from .data import DetrDatasetMapper
from .solver import build_optimizer

__all__ = ["DeformableDetrTrainer", "create_ddp_model", "is_cpu", "launch_processes"]


def is_cpu(cfg):
    return str(cfg.MODEL.DEVICE).startswith("cpu")


def create_ddp_model(model, cfg):
    """DDP when world size > 1: on CPU (gloo) without ``device_ids``, on GPU with the local rank."""
    if comm.get_world_size() == 1:
        return model
    device_ids = None if is_cpu(cfg) else [comm.get_local_rank()]
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class DeformableDetrTrainer(DefaultTrainer):
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
