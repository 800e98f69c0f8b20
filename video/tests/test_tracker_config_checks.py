"""Config mistakes of the tracker are one ``ConfigError`` naming the key and its allowed values (entry points:
``error: ...``, exit 2), not a ``ValueError`` traceback at build time or a run that silently ignores them."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ddetr_d2.errors import ConfigError
from ddetr_video.config import check_clip_config, check_tracker_config, get_tracker_cfg
from ddetr_video.engine import check_run_config
from ddetr_video.evaluator import SequenceGT, compute_tracking_metrics
from ddetr_video.tiny_backbone import build_tiny_conv_backbone
from ddetr_video.tracking import build_tracker

VIDEO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(VIDEO, "configs", "synthetic_tiny.yaml")


def _cfg(*opts):
    return get_tracker_cfg(CONFIG, list(opts))


def test_shipped_configs_pass():
    for name in ("synthetic_tiny.yaml", "Base-QueryTracker.yaml"):
        cfg = get_tracker_cfg(os.path.join(VIDEO, "configs", name))
        check_tracker_config(cfg)
        check_clip_config(cfg)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("BIRTH_THRESHOLD", "1.5", r"BIRTH_THRESHOLD must be a number in \[0, 1\], got 1.5"),
        ("KEEP_THRESHOLD", "-0.1", r"KEEP_THRESHOLD must be a number in \[0, 1\]"),
        ("RANDOM_DROP", "1.5", r"RANDOM_DROP must be a number in \[0, 1\]"),
        ("FP_RATIO", "-0.5", r"FP_RATIO must be a number in \[0, 1\]"),
        ("MIN_BIRTH_VISIBILITY", "1.2", r"MIN_BIRTH_VISIBILITY must be a number in \[0, 1\]"),
        ("DUPLICATE_IOU", "-1.0", r"DUPLICATE_IOU must be a number in \[0, 1\]"),
        ("UNSEEN_TRACK_IOU", "3.0", r"UNSEEN_TRACK_IOU must be a number in \[0, 1\]"),
        ("TRACK_DUPLICATE_IOU", "-0.5", r"TRACK_DUPLICATE_IOU must be a number in \[0, 1\]"),
        ("REPORT_THRESHOLD", "2.0", r"REPORT_THRESHOLD must be a number in \[0, 1\]"),
        ("IOU_MATCH_THRESHOLD", "0.0", r"IOU_MATCH_THRESHOLD must be a number in \(0, 1\]"),
        ("TRAIN_TRACK_IOU", "1.0", "TRAIN_TRACK_IOU must be a number < 1"),
        ("QIM_DROPOUT", "1.5", r"QIM_DROPOUT must be a number in \[0, 1\)"),
        ("MIN_BOX_AREA", "-5.0", "MIN_BOX_AREA must be a number >= 0"),
        ("MAX_AGE", "0", "MAX_AGE must be an integer >= 1, got 0"),
        ("MAX_AGE", "-1", "MAX_AGE must be an integer >= 1, got -1"),
        ("QIM_DIM_FEEDFORWARD", "0", "QIM_DIM_FEEDFORWARD must be an integer >= 1"),
        ("FP_MAX", "-1", "FP_MAX must be an integer >= 0"),
        ("ASSOCIATION", "Foo", "ASSOCIATION: unknown association 'Foo'"),
        ("QIM_RESIDUAL", "foo", "QIM_RESIDUAL must be one of"),
        ("QIM_INIT", "foo", "QIM_INIT must be one of"),
        ("DETECT_SEES_TRACKS", "some", "DETECT_SEES_TRACKS must be one of"),
        ("REFERENCE", "boxes", "REFERENCE must be one of"),
        ("FAKE_TRACKS", "x", "FAKE_TRACKS must be one of"),
    ],
)
def test_bad_tracker_value_names_the_key(key, value, message):
    cfg = _cfg("MODEL.TRACKER." + key, value)
    with pytest.raises(ConfigError, match="MODEL.TRACKER." + message):
        check_tracker_config(cfg)
    # the builders of every entry point (model, demo, benchmark) go through build_tracker
    with pytest.raises(ConfigError, match="MODEL.TRACKER." + key):
        build_tracker(cfg)


def test_nan_threshold_is_refused():
    cfg = _cfg()
    cfg.MODEL.TRACKER.KEEP_THRESHOLD = float("nan")  # a YAML file can say .nan
    with pytest.raises(ConfigError, match="KEEP_THRESHOLD"):
        check_tracker_config(cfg)


@pytest.mark.parametrize("association", ["IoUTracker", "QueryIoUTracker"])
def test_keep_above_birth_refused_for_iou_associations(association):
    opts = ["MODEL.TRACKER.BIRTH_THRESHOLD", "0.3", "MODEL.TRACKER.KEEP_THRESHOLD", "0.6"]
    cfg = _cfg("MODEL.TRACKER.ASSOCIATION", association, *opts)
    with pytest.raises(ConfigError, match=r"KEEP_THRESHOLD \(0.6\) must be <= MODEL.TRACKER.BIRTH_THRESHOLD"):
        build_tracker(cfg)
    # RuntimeTracker: meaningful (born shown, then needs KEEP_THRESHOLD to stay shown)
    tr = build_tracker(_cfg(*opts))
    assert (tr.birth_threshold, tr.keep_threshold) == (0.3, 0.6)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["INPUT.CLIP_MAX_INTERVAL", "0"], "INPUT.CLIP_MAX_INTERVAL must be an integer >= 1"),
        (["INPUT.CLIP_MAX_INTERVAL", "-2"], "INPUT.CLIP_MAX_INTERVAL must be an integer >= 1"),
        (["INPUT.CLIP_LENGTHS", "(2.5,)", "INPUT.CLIP_LENGTH_STEPS", "()"], "CLIP_LENGTHS must be a list"),
        (["INPUT.CLIP_LENGTH_STEPS", "(150.0, 270, 450)"], "CLIP_LENGTH_STEPS must be a list of int"),
        (["INPUT.CLIP_LENGTHS", "(2, 3)"], "INPUT.CLIP_LENGTH_STEPS needs"),
        (["INPUT.CLIP_INTERVAL_MODE", "foo"], "INPUT.CLIP_INTERVAL_MODE must be one of"),
    ],
)
def test_bad_clip_value_names_the_key(opts, message):
    with pytest.raises(ConfigError, match=message):
        check_clip_config(_cfg(*opts))


def test_run_config_needs_datasets():
    check_run_config(_cfg())
    check_run_config(_cfg(), eval_only=True)
    with pytest.raises(ConfigError, match="DATASETS.TRAIN"):
        check_run_config(_cfg("DATASETS.TRAIN", "()"))
    with pytest.raises(ConfigError, match="--eval-only needs a dataset in DATASETS.TEST"):
        check_run_config(_cfg("DATASETS.TEST", "()"), eval_only=True)
    # training-only keys do not stop an evaluation; the tracker keys do
    check_run_config(_cfg("INPUT.CLIP_MAX_INTERVAL", "0"), eval_only=True)
    with pytest.raises(ConfigError, match="INPUT.CLIP_MAX_INTERVAL"):
        check_run_config(_cfg("INPUT.CLIP_MAX_INTERVAL", "0"))
    with pytest.raises(ConfigError, match="MODEL.TRACKER.MAX_AGE"):
        check_run_config(_cfg("MODEL.TRACKER.MAX_AGE", "0"), eval_only=True)


@pytest.mark.parametrize("channels", ["[16, 32]", "[12, 32, 64, 128]", "[16, 32, 0, 128]"])
def test_tiny_backbone_channels(channels):
    with pytest.raises(ConfigError, match=r"MODEL.TINY_BACKBONE.CHANNELS needs 4 integers"):
        build_tiny_conv_backbone(_cfg("MODEL.TINY_BACKBONE.CHANNELS", channels))


def test_evaluator_refuses_an_id_twice_in_a_frame():
    row = [1, 1, 10, 10, 20, 20, 1, 0, 1]
    gt = {"s": SequenceGT(np.array([1]), np.array([row], float), np.zeros((0, 9)))}
    overall, _ = compute_tracking_metrics(gt, {"s": np.array([row], float)})
    assert overall["IDF1"] == 100.0
    with pytest.raises(ValueError, match="predictions of sequence 's': track id 1 occurs 2 times in frame 1"):
        compute_tracking_metrics(gt, {"s": np.array([row, row], float)})  # was IDF1 133 %
    gt2 = {"s": SequenceGT(np.array([1]), np.array([row, row], float), np.zeros((0, 9)))}
    with pytest.raises(ValueError, match="ground truth of sequence 's': track id 1 occurs 2 times"):
        compute_tracking_metrics(gt2, {"s": np.array([row], float)})


def _one_error_line(cmd, tmp_path):
    # a regression would train / generate data: keep both tiny and in tmp_path
    env = dict(os.environ, OMP_NUM_THREADS="1", DDETR_DATASETS=str(tmp_path / "datasets"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=os.path.dirname(VIDEO))
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    return [ln for ln in p.stderr.splitlines() if "error:" in ln]


def test_train_net_bad_tracker_key_is_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(VIDEO, "train_net.py"), "--config-file", CONFIG,
           "OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()",
           "MODEL.TRACKER.RANDOM_DROP", "1.5"]  # fmt: skip
    lines = _one_error_line(cmd, tmp_path)
    assert lines == ["error: MODEL.TRACKER.RANDOM_DROP must be a number in [0, 1], got 1.5"], lines
    assert not (tmp_path / "out").exists()


def test_demo_bad_tracker_key_is_one_line(tmp_path):
    cmd = [sys.executable, os.path.join(VIDEO, "demo.py"), "--config-file", CONFIG, "--video",
           str(tmp_path / "clip.mp4"), "--output", str(tmp_path / "out"),
           "--opts", "MODEL.TRACKER.MAX_AGE", "0"]  # fmt: skip
    lines = _one_error_line(cmd, tmp_path)
    assert len(lines) == 1 and "MODEL.TRACKER.MAX_AGE must be an integer >= 1, got 0" in lines[0], lines


def test_synthetic_generator_options_are_user_errors(tmp_path):
    """tools/benchmark_tracking.py prints UserErrors as one line: bad generator options were a traceback."""
    from ddetr_video.synthetic_video import SyntheticVideoConfig, generate_dataset

    with pytest.raises(ConfigError, match="num_frames must be >= 8, got 0"):
        SyntheticVideoConfig(num_frames=0)
    with pytest.raises(ConfigError, match="split 'val': sequence count must be an integer >= 0, got -1"):
        generate_dataset(str(tmp_path / "syn"), {"train": 1, "val": -1}, SyntheticVideoConfig(num_frames=8))
    assert not (tmp_path / "syn").exists()
