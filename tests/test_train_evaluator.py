"""Evaluator dispatch by the dataset's evaluator_type (ddetr_d2.evaluation, Detectron2's convention)."""

import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from ddetr_d2.config import build_cfg
from ddetr_d2.data import make_synthetic_coco, register_coco_folder
from ddetr_d2.engine import DeformableDetrTrainer
from ddetr_d2.errors import ConfigError
from ddetr_d2.evaluation import EVALUATOR_REGISTRY, build_evaluator, check_evaluators

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, test=()):
    return build_cfg(
        os.path.join(REPO, "configs", "tiny_test.yaml"),
        ["OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", str(tuple(test))],
    )


def test_coco_datasets_get_cocoevaluator(tmp_path):
    j = make_synthetic_coco(str(tmp_path), "v", 2, seed=0, image_size=64)
    register_coco_folder("eval_dispatch_coco", j, str(tmp_path / "v" / "images"))
    ev = DeformableDetrTrainer.build_evaluator(_cfg(tmp_path), "eval_dispatch_coco")
    assert isinstance(ev, COCOEvaluator)
    assert ev._output_dir == os.path.join(str(tmp_path), "inference", "eval_dispatch_coco")


class _CountingEvaluator(DatasetEvaluator):
    def __init__(self, name, output_folder):
        self.name, self.output_folder = name, output_folder


def test_a_registered_type_is_used_without_a_trainer_override(tmp_path):
    DatasetCatalog.register("eval_dispatch_custom", lambda: [])
    MetadataCatalog.get("eval_dispatch_custom").set(evaluator_type="ddetr_test_type")
    EVALUATOR_REGISTRY.register("ddetr_test_type", lambda cfg, name, out: _CountingEvaluator(name, out))
    ev = build_evaluator(_cfg(tmp_path), "eval_dispatch_custom", str(tmp_path / "o"))
    assert isinstance(ev, _CountingEvaluator)
    assert (ev.name, ev.output_folder) == ("eval_dispatch_custom", str(tmp_path / "o"))


def test_unknown_type_names_dataset_type_and_registered_ones(tmp_path):
    DatasetCatalog.register("eval_dispatch_odd", lambda: [])
    MetadataCatalog.get("eval_dispatch_odd").set(evaluator_type="lvis_like")
    with pytest.raises(ConfigError, match=r"'eval_dispatch_odd' has evaluator_type='lvis_like'.*'coco'"):
        DeformableDetrTrainer.build_evaluator(_cfg(tmp_path), "eval_dispatch_odd")
    # checked before training too
    with pytest.raises(ConfigError, match="eval_dispatch_odd"):
        check_evaluators(_cfg(tmp_path, test=["eval_dispatch_odd"]))
