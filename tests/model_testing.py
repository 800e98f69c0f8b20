"""Shared helpers of the model tests: the tiny test config and the three paper variants."""

import os

from detectron2.config import get_cfg

from ddetr_d2.config import add_deformable_detr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "plain": {},
    "refine": {"WITH_BOX_REFINE": True},
    "two_stage": {"WITH_BOX_REFINE": True, "TWO_STAGE": True},
}


def tiny_cfg(**overrides):
    """``configs/tiny_test.yaml`` with ``MODEL.DEFORMABLE_DETR.<KEY> = value`` overrides."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "tiny_test.yaml"))
    for k, v in overrides.items():
        setattr(cfg.MODEL.DEFORMABLE_DETR, k, v)
    return cfg


def demo_model_with_random_weights(cfg, folder):
    """``build_demo_model(cfg)`` with ``MODEL.WEIGHTS`` set to a checkpoint of a freshly built model (seed 0)
    saved in ``folder``: the inference-only model as the demo and predictors build it."""
    import torch
    from detectron2.modeling import build_model

    from ddetr_d2.demo.predictor import build_demo_model

    torch.manual_seed(0)
    weights = os.path.join(str(folder), "w.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = weights
    return build_demo_model(cfg)


def export_cli_model_cfg(folder, monkeypatch, opts):
    """The config that ``tools/export_model.py``'s CLI (``ddetr_d2.export.cli.export_main``) hands to
    ``build_demo_model`` for ``configs/tiny_test.yaml`` + ``opts``; the export itself is not run
    (tests/test_export_model.py does)."""
    import pytest

    import ddetr_d2.demo.predictor as predictor
    from ddetr_d2.export import cli

    built = []

    def spy(cfg, **kw):
        built.append(cfg)
        raise RuntimeError("stop after building")

    monkeypatch.setattr(predictor, "build_demo_model", spy)
    with pytest.raises(RuntimeError, match="stop after building"):
        cli.export_main(
            ["--config-file", os.path.join(ROOT, "configs", "tiny_test.yaml"), "--format", "onnx"]
            + ["--output", str(folder), "--opts", *opts]
        )
    assert len(built) == 1
    return built[0]
