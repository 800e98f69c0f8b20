"""Evaluator dispatch by the dataset's ``evaluator_type`` (Detectron2's convention).

``build_evaluator(cfg, dataset_name, output_folder)`` looks up ``MetadataCatalog.get(name).evaluator_type``
in :data:`EVALUATOR_REGISTRY`: ``"coco"`` -> :class:`~detectron2.evaluation.COCOEvaluator` (bbox) is
registered here; add-ons register their own (``ddetr_video`` registers ``"mot"``), so a user's
dataset picks its evaluator through its metadata, without a trainer override::

    @EVALUATOR_REGISTRY.register("my_type")
    def build_my_evaluator(cfg, dataset_name, output_folder):
        return MyEvaluator(dataset_name, output_dir=output_folder)
"""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from .errors import ConfigError

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator", "check_evaluators"]


class _EvaluatorRegistry(dict):
    """evaluator_type -> ``fn(cfg, dataset_name, output_folder) -> DatasetEvaluator``."""

    def register(self, evaluator_type, fn=None):
        if fn is None:  # decorator form
            return lambda f: self.register(evaluator_type, f)
        self[evaluator_type] = fn
        return fn


EVALUATOR_REGISTRY = _EvaluatorRegistry()


@EVALUATOR_REGISTRY.register("coco")
def build_coco_evaluator(cfg, dataset_name, output_folder):
    return COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder)


def _registered_type(dataset_name):
    evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
    if evaluator_type not in EVALUATOR_REGISTRY:
        raise ConfigError(
            f"dataset '{dataset_name}' has evaluator_type={evaluator_type!r}, which has no registered "
            f"evaluator (registered: {sorted(EVALUATOR_REGISTRY)}); set its metadata's evaluator_type or "
            "register one with ddetr_d2.evaluation.EVALUATOR_REGISTRY.register(type, fn)"
        )
    return evaluator_type


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator registered for ``dataset_name``'s ``evaluator_type``; :class:`ConfigError`
    naming the dataset, its type and the registered types when there is none."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return EVALUATOR_REGISTRY[_registered_type(dataset_name)](cfg, dataset_name, output_folder)


def check_evaluators(cfg):
    """Before training: every dataset in DATASETS.TEST has an evaluator (else :class:`ConfigError`)."""
    for name in cfg.DATASETS.TEST:
        _registered_type(name)
