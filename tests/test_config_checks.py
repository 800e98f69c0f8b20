"""Config values the model, the optimizer or the entry points cannot work with are :class:`ConfigError` /
:class:`WeightsError` naming the key (before anything is built), not a traceback from deep inside."""
import os

import pytest
import torch
from detectron2.modeling import build_model

from ddetr_d2.config import build_cfg
from ddetr_d2.engine import (
    check_output_dir,
    check_run_datasets,
    check_training_config,
    check_training_weights,
)
from ddetr_d2.errors import ConfigError, WeightsError
from ddetr_d2.solver import build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_test.yaml")
D = "MODEL.DEFORMABLE_DETR."


def _cfg(*opts, freeze=True):
    return build_cfg(TINY, ["MODEL.DEVICE", "cpu", *opts], freeze=freeze)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("NHEADS", "5", "NHEADS (5) must divide MODEL.DEFORMABLE_DETR.HIDDEN_DIM"),
        ("NHEADS", "0", "NHEADS must be an integer >= 1, got 0"),
        ("HIDDEN_DIM", "0", "HIDDEN_DIM must be an integer >= 1, got 0"),
        ("NUM_QUERIES", "0", "NUM_QUERIES must be an integer >= 1, got 0"),
        ("NUM_QUERIES", "-1", "NUM_QUERIES must be an integer >= 1, got -1"),
        ("DEC_LAYERS", "0", "DEC_LAYERS must be an integer >= 1, got 0"),
        ("ENC_LAYERS", "-1", "ENC_LAYERS must be an integer >= 0, got -1"),
        ("DEC_N_POINTS", "0", "DEC_N_POINTS must be an integer >= 1, got 0"),
        ("ENC_N_POINTS", "0", "ENC_N_POINTS must be an integer >= 1, got 0"),
        ("DIM_FEEDFORWARD", "0", "DIM_FEEDFORWARD must be an integer >= 1, got 0"),
        ("DETECTIONS_PER_IMAGE", "0", "DETECTIONS_PER_IMAGE must be an integer >= 1, got 0"),
        ("IM2COL_STEP", "0", "IM2COL_STEP must be an integer >= 1, got 0"),
        ("NUM_CLASSES", "0", "NUM_CLASSES must be an integer >= 1, got 0"),
        ("DROPOUT", "1.0", "DROPOUT must be in [0, 1), got 1.0"),
        ("FOCAL_ALPHA", "1.5", "FOCAL_ALPHA must be in [0, 1], got 1.5"),
        ("COST_GIOU", "-1.0", "COST_GIOU must be >= 0, got -1.0"),
        ("TWO_STAGE", "True", "TWO_STAGE needs WITH_BOX_REFINE: True"),
    ],
)
def test_model_keys_out_of_range_are_config_errors(key, value, message):
    with pytest.raises(ConfigError) as e:
        build_model(_cfg(D + key, value))
    assert str(e.value).startswith(D + message), str(e.value)


@pytest.mark.parametrize(
    "opts",
    [
        [],
        [D + "ENC_LAYERS", "0"],  # DETR-style: no encoder layer is a valid model
        [D + "NHEADS", "4", D + "DROPOUT", "0.0", D + "DETECTIONS_PER_IMAGE", "1"],
        [D + "WITH_BOX_REFINE", "True", D + "TWO_STAGE", "True"],
    ],
)
def test_valid_edge_values_build_and_run(opts):
    """The bounds are not too tight: these build, and run a forward pass."""
    model = build_model(_cfg(*opts)).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 80)).float(), "height": 64, "width": 80}])
    assert len(out[0]["instances"]) >= 1


@pytest.mark.parametrize("key", ["BASE_LR", "BACKBONE_MULTIPLIER", "LINEAR_PROJ_MULTIPLIER", "WEIGHT_DECAY"])
def test_negative_solver_values_are_config_errors(key):
    cfg = _cfg("SOLVER." + key, "-1.0")
    model = build_model(_cfg())
    with pytest.raises(ConfigError, match=rf"^SOLVER\.{key} must be >= 0, got -1\.0$"):
        build_optimizer(cfg, model)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("# only a comment\n", "holds no settings"),
        ("- a\n- b\n", "expected 'KEY: value' settings at the top level"),
        ("just text\n", "expected 'KEY: value' settings at the top level"),
    ],
)
def test_config_files_without_settings_are_named(text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        build_cfg(str(path))
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_a_config_folder_is_named():
    with pytest.raises(ConfigError, match=r"^config file .*configs is a folder: give a \.yaml file in it$"):
        build_cfg(os.path.join(REPO, "configs"))


def test_a_bad_option_names_the_key_not_the_whole_list():
    opts = ["SOLVER.MAX_ITER", "3"] * 20 + ["MODEL.NO_SUCH_KEY", "1"]
    with pytest.raises(ConfigError) as e:
        build_cfg(TINY, opts)
    assert "MODEL.NO_SUCH_KEY" in str(e.value) and "SOLVER.MAX_ITER" not in str(e.value), str(e.value)


def test_output_dir_checks(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in [
        (str(a_file), f"OUTPUT_DIR {a_file} is a file, not a folder"),
        (str(a_file / "sub"), f"OUTPUT_DIR {a_file / 'sub'} cannot be created"),
        ("", "OUTPUT_DIR is empty"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_output_dir(_cfg("OUTPUT_DIR", out))
        assert str(e.value).startswith(message), str(e.value)
    fresh = tmp_path / "new" / "run"
    check_output_dir(_cfg("OUTPUT_DIR", str(fresh)))
    assert fresh.is_dir()


def test_training_weights_checks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    missing = tmp_path / "missing.pth"
    with pytest.raises(WeightsError, match="not found"):
        check_training_weights(_cfg("MODEL.WEIGHTS", str(missing), "OUTPUT_DIR", str(out)), resume=False)
    with pytest.raises(WeightsError, match="not found"):
        check_training_weights(_cfg("MODEL.WEIGHTS", f"file://{missing}", "OUTPUT_DIR", str(out)), False)
    with pytest.raises(WeightsError, match="is a folder"):
        check_training_weights(_cfg("MODEL.WEIGHTS", str(out), "OUTPUT_DIR", str(out)), resume=False)
    # --resume without a last_checkpoint still starts from MODEL.WEIGHTS: checked
    with pytest.raises(WeightsError, match="not found"):
        check_training_weights(_cfg("MODEL.WEIGHTS", str(missing), "OUTPUT_DIR", str(out)), resume=True)
    # not checked: --resume with a last_checkpoint (MODEL.WEIGHTS is not read), empty weights, URLs
    (out / "last_checkpoint").write_text("model_0000009.pth")
    check_training_weights(_cfg("MODEL.WEIGHTS", str(missing), "OUTPUT_DIR", str(out)), resume=True)
    check_training_weights(_cfg("MODEL.WEIGHTS", "", "OUTPUT_DIR", str(out)), resume=False)
    check_training_weights(_cfg("MODEL.WEIGHTS", "https://example.com/w.pth"), resume=False)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    check_training_weights(_cfg("MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)), resume=False)


def test_a_run_needs_a_dataset():
    both = ["DATASETS.TRAIN", '("a",)', "DATASETS.TEST", '("b",)']
    check_run_datasets(_cfg(*both), eval_only=False)
    check_run_datasets(_cfg(*both), eval_only=True)
    with pytest.raises(ConfigError, match=r"^training needs a dataset in DATASETS.TRAIN, got none$"):
        check_run_datasets(_cfg(*both, "DATASETS.TRAIN", "()"), eval_only=False)
    with pytest.raises(ConfigError, match=r"^--eval-only needs a dataset in DATASETS.TEST, got none$"):
        check_run_datasets(_cfg(*both, "DATASETS.TEST", "()"), eval_only=True)
    # training without evaluation, evaluation without training data: fine
    check_run_datasets(_cfg(*both, "DATASETS.TEST", "()"), eval_only=False)
    check_run_datasets(_cfg(*both, "DATASETS.TRAIN", "()"), eval_only=True)


def test_the_demo_model_keeps_the_config_error_naming_the_key():
    from ddetr_d2.demo.predictor import build_demo_model

    with pytest.raises(ConfigError) as e:
        build_demo_model(_cfg(D + "NHEADS", "5"))
    assert str(e.value).startswith(D + "NHEADS (5) must divide"), str(e.value)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be an integer >= 1, got 0"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be an integer >= 1, got 0"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD must be an integer >= 1, got 0"),
        (["SOLVER.WARMUP_ITERS", "-1"], "SOLVER.WARMUP_ITERS must be an integer >= 0, got -1"),
        (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS must be an integer >= 0, got -1"),
        (["TEST.EVAL_PERIOD", "-1"], "TEST.EVAL_PERIOD must be an integer >= 0, got -1"),
        (["SOLVER.STEPS", "(5, 2)"], "SOLVER.STEPS must be increasing iterations >= 1, got (5, 2)"),
        (["SOLVER.STEPS", "(0,)"], "SOLVER.STEPS must be increasing iterations >= 1, got (0,)"),
        (["SOLVER.MAX_ITER", "15"], "SOLVER.STEPS (15,) has a step at SOLVER.MAX_ITER 15"),
    ],
)
def test_training_values_trainer_would_fail_on_are_config_errors(opts, message):
    with pytest.raises(ConfigError) as e:
        check_training_config(_cfg(*opts))
    assert str(e.value).startswith(message), str(e.value)


def test_training_values_that_are_fine():
    check_training_config(_cfg())  # tiny_test.yaml: MAX_ITER 20, STEPS (15,)
    check_training_config(_cfg("SOLVER.MAX_ITER", "2"))  # steps after MAX_ITER are ignored (Detectron2)
    check_training_config(_cfg("SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0"))
    with pytest.raises(ConfigError, match="IMS_PER_BATCH 2 is not divisible by the 3 processes"):
        check_training_config(_cfg("SOLVER.IMS_PER_BATCH", "2"), world_size=3)


def test_optimizer_settings_are_config_errors():
    model = build_model(_cfg())
    with pytest.raises(ConfigError, match=r"^SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got -1.0$"):
        build_optimizer(_cfg("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "-1.0"), model)
