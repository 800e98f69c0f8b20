"""``TrackerTrainer``: the detector's trainer (``ddetr_d2.engine.DeformableDetrTrainer``) on T-frame clips.

Everything else is the detector trainer's: the Deformable DETR optimizer, atomic checkpoints, save-on-signal
and exact resume, CPU (gloo) data parallelism, the test loader (batch 1 in dataset order: sequence by
sequence, frames in order, as the tracker keeps state between calls) and the evaluator, chosen by the
dataset's ``evaluator_type`` (``"mot"`` -> :class:`~ddetr_video.evaluator.MOTEvaluator`, registered in
:mod:`ddetr_video.evaluator`).
"""

from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.utils import comm

from ddetr_d2.engine import DeformableDetrTrainer, check_run_datasets
from ddetr_d2.errors import ConfigError

from . import evaluator  # noqa: F401  (registers evaluator_type "mot")
from .clip_mapper import ClipDatasetMapper
from .clip_schedule import ClipLengthSchedule, IterationTaggedSampler, ScheduledClipDataset
from .config import check_clip_config, check_tracker_config

__all__ = ["TrackerTrainer", "check_run_config"]


def check_run_config(cfg, eval_only=False):
    """What ``video/train_net.py`` checks before it starts (a :class:`ConfigError` naming the key): the
    ``MODEL.TRACKER`` keys, the ``INPUT.CLIP_*`` keys (training), and that there is a dataset to run on:
    ``DATASETS.TRAIN`` for training, ``DATASETS.TEST`` with ``--eval-only`` (else it would evaluate nothing
    and exit 0)."""
    check_tracker_config(cfg)
    check_run_datasets(cfg, eval_only)
    if not eval_only:
        check_clip_config(cfg)


class TrackerTrainer(DeformableDetrTrainer):
    """``DeformableDetrTrainer`` whose training samples are clips (:class:`ClipDatasetMapper`)."""

    @classmethod
    def build_train_mapper(cls, cfg):
        return ClipDatasetMapper(cfg, is_train=True)

    @classmethod
    def build_train_loader(cls, cfg):
        """Clips from an :class:`IterationTaggedSampler` (resumable; each sample carries its iteration, so
        the clip-length schedule holds in loader worker processes too, see :mod:`ddetr_video.clip_schedule`);
        ``loader.resumable_sampler`` as the detector's."""
        schedule = ClipLengthSchedule.from_config(cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            if not schedule.fixed:
                raise ConfigError(
                    "a growing clip length (INPUT.CLIP_LENGTHS with several lengths) needs "
                    f"DATALOADER.SAMPLER_TRAIN TrainingSampler, got {cfg.DATALOADER.SAMPLER_TRAIN}"
                )
            return super().build_train_loader(cfg)
        mapper = cls.build_train_mapper(cfg)
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, min_keypoints=0
        )
        batch = cfg.SOLVER.IMS_PER_BATCH
        world = comm.get_world_size()
        if batch % world:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH {batch} is not divisible by the {world} processes")
        sampler = IterationTaggedSampler(len(dicts), batch // world)
        loader = build_detection_train_loader(
            dataset=ScheduledClipDataset(dicts, mapper),
            mapper=None,
            sampler=sampler,
            total_batch_size=batch,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )
        loader.resumable_sampler = sampler
        return loader
