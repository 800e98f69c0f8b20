"""tools/demo.py and tools/visualize_sampling.py on the tiny random-weight model (CPU, headless)."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from ddetr_d2.checkpoint import load_weights_checked
from ddetr_d2.config import build_cfg
from ddetr_d2.demo.cli import demo_main, sampling_grid, visualize_sampling_main
from ddetr_d2.demo.io import DemoError, resolve_video_output
from ddetr_d2.demo.predictor import VisualizationDemo, demo_metadata
from ddetr_d2.demo.sampling import draw_sampling_points, points_inside
from ddetr_d2.errors import WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny_test.yaml")
CPU = ["--opts", "MODEL.DEVICE", "cpu"]
FEW_DETS = ["MODEL.DEFORMABLE_DETR.DETECTIONS_PER_IMAGE", "4"]  # after CPU: less drawing, faster tests


def _image(h, w, rng):
    """A noisy image with a few filled rectangles (something for the detector to look at)."""
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        color = tuple(int(c) for c in rng.integers(80, 255, 3))
        cv2.rectangle(
            img, (x0, y0), (x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))), color, -1
        )
    return img


def _write_video(path, num_frames, size_wh, fps, rng):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size_wh, True)
    assert writer.isOpened()
    for _ in range(num_frames):
        writer.write(_image(size_wh[1], size_wh[0], rng))
    writer.release()


def _read_video(path):
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames, fps


@pytest.fixture(scope="module")
def demo():
    cfg = build_cfg(CONFIG, ["MODEL.DEVICE", "cpu"])
    return VisualizationDemo(cfg, confidence_threshold=0.0, show_sampling=True)


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_image_mode_subprocess_writes_one_output_per_input(tmp_path, rng):
    (tmp_path / "in").mkdir()
    shapes = {"a.png": (150, 260), "b.jpg": (97, 120)}
    for name, (h, w) in shapes.items():
        cv2.imwrite(str(tmp_path / "in" / name), _image(h, w, rng))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--config-file", CONFIG]
    cmd += ["--input", str(tmp_path / "in" / "*"), "--output", str(out), "--confidence-threshold", "0.0"]
    cmd += ["--show-sampling"] + CPU + FEW_DETS
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")  # 2 shared cores: no thread thrashing
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No checkpoint found" not in proc.stdout + proc.stderr  # no empty-weights load before the real one
    assert sorted(os.listdir(out)) == sorted(shapes)
    for name, hw in shapes.items():
        written = cv2.imread(str(out / name))
        assert written is not None and written.shape[:2] == hw
        assert not np.array_equal(written, cv2.imread(str(tmp_path / "in" / name)))  # something was drawn


def test_sampling_points_inside_and_reference_is_the_box_centre(demo, rng):
    h, w = int(rng.integers(80, 300)), int(rng.integers(80, 300))
    image = _image(h, w, rng)
    instances, vis, sampling = demo.run_on_image(image)
    assert vis.shape == image.shape and len(instances) > 0
    record = demo.recorder.latest(0)
    from detectron2.data.transforms import ResizeShortestEdge

    assert record.input_hw == ResizeShortestEdge.get_output_shape(h, w, 128, 192)
    assert record.padded_hw[0] >= record.input_hw[0] and record.padded_hw[1] >= record.input_hw[1]
    num_heads, num_levels, num_points = record.weights.shape[1:]
    assert sampling.points.shape == (len(instances), num_heads, num_levels, num_points, 2)
    # Zero-initialised last box layer: a box's centre is its query's reference point, mapped by the
    # meta-arch's own post-processing; boxes clipped at the border are excluded.
    boxes = instances.pred_boxes.tensor.numpy()
    unclipped = (boxes[:, :2] > 1e-3).all(1) & (boxes[:, 2] < w - 1e-3) & (boxes[:, 3] < h - 1e-3)
    assert unclipped.any()
    centres = instances.pred_boxes.get_centers().numpy()
    np.testing.assert_allclose(sampling.reference_xy[unclipped], centres[unclipped], atol=1e-2)
    # drawn points are inside the image and painted there
    canvas, drawn = draw_sampling_points(np.zeros_like(image), sampling, draw_reference=False, alpha=1.0)
    assert len(drawn) == int(points_inside(sampling.points, (h, w)).sum()) > 0
    assert points_inside(drawn, (h, w)).all()
    px = np.floor(drawn).astype(int)
    assert (canvas[px[:, 1], px[:, 0]].max(-1) > 0).all()


def test_video_mode_keeps_frame_count_size_and_fps(tmp_path, rng):
    video = tmp_path / "clip.mp4"
    _write_video(video, 4, (96, 80), 12.0, rng)
    out = tmp_path / "out" / "result.mp4"
    argv = ["--config-file", CONFIG, "--video-input", str(video), "--output", str(out), "--show-sampling"]
    assert demo_main(argv + ["--confidence-threshold", "0.0"] + CPU + FEW_DETS) == 0
    frames, fps = _read_video(out)
    src_frames, src_fps = _read_video(video)
    assert len(frames) == len(src_frames) == 4
    assert all(f.shape == (80, 96, 3) for f in frames)
    assert fps == pytest.approx(src_fps) == pytest.approx(12.0)
    assert not np.array_equal(frames[0], src_frames[0])  # detections and sampling points were drawn
    # a folder (existing, or given without extension) gets <video stem>.mp4
    assert resolve_video_output(str(tmp_path / "d"), str(video)) == str(tmp_path / "d" / "clip.mp4")
    assert (tmp_path / "d").is_dir()


def test_visualize_sampling_grid_per_head_and_level(tmp_path, rng, demo):
    image = _image(90, 120, rng)
    cv2.imwrite(str(tmp_path / "img.png"), image)
    out = tmp_path / "grid.png"
    argv = [str(tmp_path / "img.png"), "--config-file", CONFIG, "--output", str(out), "--per", "head"]
    assert (
        visualize_sampling_main(
            argv + ["--confidence-threshold", "0", "--max-detections", "3"] + CPU + FEW_DETS
        )
        == 0
    )
    grid = cv2.imread(str(out))
    cols = int(np.ceil(np.sqrt(demo.recorder.attn.n_heads)))
    assert grid.shape[1] == cols * (120 + 4) + 4 and grid.shape[0] > 90 * np.ceil(
        demo.recorder.attn.n_heads / cols
    )
    level_grid, instances, sampling = sampling_grid(demo, image, per="level", max_detections=2)
    assert len(instances) == 2 and sampling.points.shape[0] == 2
    assert instances.scores[0] >= instances.scores[1]
    cols = int(np.ceil(np.sqrt(demo.recorder.attn.n_levels)))
    assert level_grid.shape[1] == cols * (120 + 4) + 4


def test_weights_are_loaded_and_mismatches_named(tmp_path, demo):
    from detectron2.modeling import build_model

    # (the demo's own model has its batch norms folded: INFERENCE_FUSE_BATCHNORM; a model built for
    # training keeps the checkpoint layout)
    torch.manual_seed(1)
    source = build_model(demo.cfg)
    good = tmp_path / "good.pth"
    torch.save({"model": source.state_dict()}, good)
    fresh = build_model(demo.cfg)  # another random init
    before = fresh.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in source.state_dict().items())
    inc = load_weights_checked(fresh, str(good))
    assert not inc.missing_keys and not inc.unexpected_keys and not inc.incorrect_shapes
    for k, v in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    state = dict(source.state_dict())
    dropped = next(k for k in state if "sampling_offsets.weight" in k)
    reshaped = next(k for k in state if "class_embed" in k and k.endswith("bias"))
    del state[dropped]
    state[reshaped] = torch.zeros(state[reshaped].shape[0] + 1)
    state["extra_head.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(WeightsError) as exc:
        load_weights_checked(fresh, str(bad))
    err = str(exc.value)
    assert dropped in err and reshaped in err and "extra_head.weight" in err and "shape mismatch" in err
    inc = load_weights_checked(fresh, str(bad), allow_mismatch=True)  # warns only
    assert inc.unexpected_keys == ["extra_head.weight"]


def test_metadata_fallbacks():
    from detectron2.data import MetadataCatalog

    cfg = build_cfg(CONFIG, ["DATASETS.TEST", "('no_such_dataset_xyz',)"])
    meta = demo_metadata(cfg)
    assert meta.thing_classes == [f"class {i}" for i in range(80)]
    MetadataCatalog.get("__demo_test_two_classes").set(thing_classes=["cat", "dog"])
    cfg = build_cfg(CONFIG, ["DATASETS.TEST", "('__demo_test_two_classes',)"])
    meta = demo_metadata(cfg)
    assert meta.thing_classes[:3] == ["cat", "dog", "class 2"] and len(meta.thing_classes) == 80


def _bad_cases(tmp):
    """(argv without --config-file, expected message) for inputs that must fail cleanly."""
    (tmp / "not_image.jpg").write_text("this is not an image")
    (tmp / "empty.mp4").write_bytes(b"")
    (tmp / "garbage.mp4").write_bytes(os.urandom(4096))
    writer = cv2.VideoWriter(str(tmp / "no_frames.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32))
    writer.release()
    (tmp / "a_file").write_text("x")
    cv2.imwrite(str(tmp / "ok.png"), np.zeros((40, 50, 3), np.uint8))
    _write_video(tmp / "ok.mp4", 2, (32, 32), 5.0, np.random.default_rng(0))
    torch.save({"model": {"extra_head.weight": torch.zeros(3)}}, tmp / "other.pth")
    (tmp / "truncated.pth").write_bytes(b"PK\x03\x04" + os.urandom(64))
    return [
        (["--input", str(tmp / "missing.png")], "no such file"),
        (["--input", str(tmp / "*.jpeg")], "glob matched no file"),
        (["--input", str(tmp / "not_image.jpg"), "--output", str(tmp / "o")], "cannot read image"),
        (["--video", str(tmp / "missing.mp4")], "video not found"),
        (["--video", str(tmp / "empty.mp4")], "empty"),
        (["--video", str(tmp / "garbage.mp4")], "cannot open video"),
        (["--video", str(tmp / "no_frames.mp4")], "no_frames.mp4"),
        (["--input", str(tmp / "ok.png"), "--output", str(tmp / "a_file" / "out")], "output"),
        (["--video", str(tmp / "ok.mp4"), "--output", str(tmp / "a_file" / "v.mp4")], "output"),
        (["--webcam", "--output", str(tmp / "cam.mp4")], "cannot open webcam"),
        (["--input", str(tmp / "ok.png"), "--video", str(tmp / "ok.mp4")], "exactly one of"),
        (["--input", str(tmp / "ok.png"), "--confidence-threshold", "1.5"], "confidence-threshold"),
        (
            [
                "--video",
                str(tmp / "ok.mp4"),
                "--output",
                str(tmp / "o.mp4"),
                "--opts",
                "MODEL.NO_SUCH_KEY",
                "1",
            ],
            "bad config",
        ),
        (
            ["--input", str(tmp / "ok.png"), "--output", str(tmp / "o")]
            + CPU
            + ["MODEL.WEIGHTS", str(tmp / "w")],
            "weights file not found",
        ),
        (
            ["--input", str(tmp / "ok.png"), "--output", str(tmp / "o")]
            + CPU
            + ["MODEL.WEIGHTS", str(tmp / "other.pth")],
            "unexpected in checkpoint: extra_head.weight",
        ),
        (
            ["--video", str(tmp / "ok.mp4"), "--output", str(tmp / "o/")]
            + CPU
            + ["MODEL.WEIGHTS", str(tmp / "truncated.pth")],
            "cannot load weights",
        ),
        (["--input", str(tmp / "ok.png")] + CPU, "no display"),
    ]


def test_bad_inputs_give_clear_errors_and_non_zero_exit(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for argv, message in _bad_cases(tmp_path):
        before = set(os.listdir(tmp_path))
        assert demo_main(["--config-file", CONFIG] + argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        assert set(os.listdir(tmp_path)) == before, argv  # a failed run creates no output folder
    assert demo_main(["--config-file", str(tmp_path / "nope.yaml"), "--input", str(tmp_path / "ok.png")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_video_sink_falls_back_to_mjpg_avi_and_output_paths(tmp_path, monkeypatch, rng):
    import ddetr_d2.demo.io as demo_io

    real_writer = cv2.VideoWriter

    def no_mp4(path, fourcc, fps, size, is_color=True):
        if fourcc == cv2.VideoWriter_fourcc(*"mp4v"):
            return real_writer()  # an unopened writer, as when no MP4 muxer is available
        return real_writer(path, fourcc, fps, size, is_color)

    monkeypatch.setattr(demo_io.cv2, "VideoWriter", no_mp4)
    with demo_io.VideoSink(str(tmp_path / "v.mp4"), 10.0, (48, 32)) as sink:
        for _ in range(3):
            sink.write(_image(32, 48, rng))
        with pytest.raises(DemoError, match="frame size"):
            sink.write(np.zeros((10, 10, 3), np.uint8))
    assert sink.path == str(tmp_path / "v.avi") and sink.fourcc == "MJPG"
    frames, fps = _read_video(sink.path)
    assert len(frames) == 3 and frames[0].shape == (32, 48, 3) and fps == pytest.approx(10.0)

    monkeypatch.setattr(demo_io.cv2, "VideoWriter", lambda *a, **k: real_writer())
    with pytest.raises(DemoError, match="cannot open a video writer"):
        demo_io.VideoSink(str(tmp_path / "w.mp4"), 10.0, (48, 32))

    assert demo_io.resolve_image_output(str(tmp_path / "one.png"), "in/x.jpg", 1) == str(tmp_path / "one.png")
    with pytest.raises(DemoError, match="give a folder"):
        demo_io.resolve_image_output(str(tmp_path / "one.png"), "in/x.jpg", 2)
    assert demo_io.resolve_image_output(str(tmp_path / "dir"), "in/x.jpg", 2) == str(
        tmp_path / "dir" / "x.jpg"
    )
