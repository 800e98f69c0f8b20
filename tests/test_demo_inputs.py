"""Demo inputs and outputs: distinct output names, inputs decoded before any output exists, non-image
files skipped, still images refused as video, failed video runs leave nothing, VideoSink checks,
tools/make_demo_video.py errors, visualize_sampling argument checks (tiny model on CPU, headless)."""

import contextlib
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ddetr_d2.demo.cli import demo_main, visualize_sampling_main
from ddetr_d2.demo.io import (
    DemoError,
    VideoSink,
    expand_inputs,
    image_output_names,
    plan_image_outputs,
    process_video,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny_test.yaml")
CPU = ["--opts", "MODEL.DEVICE", "cpu", "MODEL.DEFORMABLE_DETR.DETECTIONS_PER_IMAGE", "4"]


@contextlib.contextmanager
def _demo_log():
    """Records of the ``ddetr_d2`` loggers (which do not propagate to the root once the demo set them up)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("ddetr_d2")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _messages(records):
    return "\n".join(r.getMessage() for r in records)


def _png(path, h, w, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


def _write_video(path, num_frames, size_wh=(32, 24), fps=5.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size_wh, True)
    assert writer.isOpened()
    for i in range(num_frames):
        writer.write(np.full((size_wh[1], size_wh[0], 3), 40 * i, np.uint8))
    writer.release()


@pytest.fixture(scope="module", autouse=True)
def _demo_logging():
    """Set up the demo's loggers before any capsys test: their handlers keep the stream current at setup
    (detectron2's setup_logger is cached), which must not be a capsys stream closed after its test."""
    from ddetr_d2.demo.cli import setup_demo_logging

    setup_demo_logging()


@pytest.fixture(autouse=True)
def _headless(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def test_output_names_are_distinct():
    assert image_output_names(["d/a.jpg", "d/b.png", "e/c.gif"]) == ["a.jpg", "b.png", "c.png"]
    assert image_output_names(["d/a/x.jpg", "d/b/x.jpg", "d/y.jpg"]) == [
        os.path.join("a", "x.jpg"),
        os.path.join("b", "x.jpg"),
        "y.jpg",
    ]
    assert image_output_names(["d/x.gif", "d/x.png", "d/z.bmp"]) == ["x.gif.png", "x.png", "z.bmp"]
    with pytest.raises(DemoError, match="x.gif.png"):  # an input named like another's output
        image_output_names(["d/x.gif", "d/x.png", "d/x.gif.png"])


def test_colliding_names_and_repeated_inputs_are_all_kept(tmp_path, capsys):
    """a/x.png, b/x.png (and a/x.png again): two outputs under their relative paths, one log line each."""
    _png(tmp_path / "in" / "a" / "x.png", 30, 40, 10)
    _png(tmp_path / "in" / "b" / "x.png", 50, 20, 200)
    out = tmp_path / "out"
    argv = ["--config-file", CONFIG, "--input", str(tmp_path / "in" / "*" / "x.png")]
    argv += [str(tmp_path / "in" / "a" / "x.png"), "--output", str(out), "--confidence-threshold", "0"]
    with _demo_log() as records:
        assert demo_main(argv + CPU) == 0, capsys.readouterr().err
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert written == [os.path.join("a", "x.png"), os.path.join("b", "x.png")]
    assert cv2.imread(str(out / "a" / "x.png")).shape == (30, 40, 3)  # each its own input's drawing
    assert cv2.imread(str(out / "b" / "x.png")).shape == (50, 20, 3)
    log = _messages(records)
    assert "1 input(s) given more than once, processed once" in log
    assert f"wrote 2 image(s) to {out}" in log


def test_unreadable_input_is_reported_before_any_output(tmp_path, capsys):
    """A text file named .jpg or a truncated JPEG, sorted after a good image: error, no folder created."""
    _png(tmp_path / "in" / "a_good.png", 20, 20, 50)
    ok, data = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name, payload in [("b_text.jpg", b"this is not an image"), ("b_trunc.jpg", data.tobytes()[:400])]:
        (tmp_path / "in" / name).write_bytes(payload)
        out = tmp_path / "out"
        argv = ["--config-file", CONFIG, "--input", str(tmp_path / "in" / "*"), "--output", str(out)]
        assert demo_main(argv + CPU) == 2
        err = capsys.readouterr().err
        assert "error: cannot read image" in err and name in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
        (tmp_path / "in" / name).unlink()


def test_glob_skips_non_image_files_with_a_warning(tmp_path):
    _png(tmp_path / "in" / "a.png", 10, 10, 0)
    (tmp_path / "in" / "readme.txt").write_text("notes")
    (tmp_path / "in" / "B.JPG").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    with _demo_log() as records:
        files = expand_inputs([str(tmp_path / "in" / "*")])
    assert files == [str(tmp_path / "in" / "B.JPG"), str(tmp_path / "in" / "a.png")]
    assert "skipping 1 file(s)" in _messages(records) and "readme.txt" in _messages(records)
    with pytest.raises(DemoError, match="glob matched no image file"):
        expand_inputs([str(tmp_path / "in" / "*.txt")])
    # a file named directly is taken whatever its extension (and then fails as an image, naming it)
    assert expand_inputs([str(tmp_path / "in" / "readme.txt")]) == [str(tmp_path / "in" / "readme.txt")]


def test_output_with_a_non_image_suffix_is_a_folder_with_a_warning(tmp_path):
    _png(tmp_path / "x.png", 10, 10, 0)
    with _demo_log() as records:
        paths = plan_image_outputs(str(tmp_path / "out.txt"), [str(tmp_path / "x.png")])
    assert paths == [str(tmp_path / "out.txt" / "x.png")]
    assert "has no image extension" in _messages(records) and "out.txt" in _messages(records)
    assert not (tmp_path / "out.txt").exists()  # checked only
    with _demo_log() as records:  # an existing folder with a dot in its name: no warning
        (tmp_path / "v1.2").mkdir()
        plan_image_outputs(str(tmp_path / "v1.2"), [str(tmp_path / "x.png")])
    assert not records
    with pytest.raises(DemoError, match="would overwrite the input"):
        plan_image_outputs(str(tmp_path), [str(tmp_path / "x.png")])


def test_still_image_as_video_is_refused_before_output(tmp_path, capsys):
    _png(tmp_path / "still.png", 24, 32, 90)
    out = tmp_path / "new" / "v.mp4"
    argv = ["--config-file", CONFIG, "--video", str(tmp_path / "still.png"), "--output", str(out)]
    assert demo_main(argv + CPU) == 2
    err = capsys.readouterr().err
    assert "still.png is a still PNG image" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


class _FailingDemo:
    """run_on_video that yields one frame, then fails (as a user error would)."""

    def run_on_video(self, frames):
        yield next(iter(frames))
        raise DemoError("boom after one frame")


def test_failed_video_run_removes_its_output_and_new_folder(tmp_path, capsys, monkeypatch):
    video = tmp_path / "clip.mp4"
    _write_video(video, 3)
    out = tmp_path / "existing" / "v.mp4"
    out.parent.mkdir()
    with pytest.raises(DemoError, match="boom"):
        process_video(str(video), _FailingDemo().run_on_video, str(out))
    assert os.listdir(out.parent) == []  # the partial file is gone

    import ddetr_d2.demo.predictor as predictor

    monkeypatch.setattr(predictor, "VisualizationDemo", lambda *a, **k: _FailingDemo())
    new = tmp_path / "new" / "deeper"
    argv = ["--config-file", CONFIG, "--video", str(video), "--output", str(new / "v.mp4")]
    assert demo_main(argv + CPU) == 2
    assert "boom after one frame" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no new folder left behind


def test_video_sink_checks_and_leaves_no_empty_file(tmp_path, monkeypatch, caplog):
    import ddetr_d2.demo.io as demo_io

    for fps in (0, -5, float("nan")):
        with pytest.raises(DemoError, match="frame rate must be > 0"):
            VideoSink(str(tmp_path / "f.mp4"), fps, (32, 32))
    with pytest.raises(DemoError, match="does not exist"):
        VideoSink(str(tmp_path / "nodir" / "f.mp4"), 10, (32, 32))
    with pytest.raises(DemoError, match="is a directory"):
        VideoSink(str(tmp_path), 10, (32, 32))
    assert os.listdir(tmp_path) == []

    real_writer = cv2.VideoWriter

    def no_mp4(path, fourcc, fps, size, is_color=True):
        open(path, "wb").close()  # a writer that fails to open may still leave an empty file
        if str(path).endswith(".mp4"):  # as when no MP4 muxer is available
            return real_writer()
        return real_writer(path, fourcc, fps, size, is_color)

    monkeypatch.setattr(demo_io.cv2, "VideoWriter", no_mp4)
    (tmp_path / "v.avi").write_bytes(b"an older video")  # e.g. the fallback of the same command run before
    with caplog.at_level("WARNING", logger="ddetr_d2.demo.io"):
        with VideoSink(str(tmp_path / "v.mp4"), 10.0, (32, 32)) as sink:  # re-running a command works
            sink.write(np.zeros((32, 32, 3), np.uint8))
    assert sink.path == str(tmp_path / "v.avi") and (tmp_path / "v.avi").read_bytes() != b"an older video"
    assert "writing Motion-JPEG AVI" in caplog.text and "(replacing the existing file)" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["v.avi"]  # no empty v.mp4 left

    def never(path, *args, **kwargs):
        open(path, "wb").close()
        return real_writer()

    monkeypatch.setattr(demo_io.cv2, "VideoWriter", never)
    with pytest.raises(DemoError, match="cannot open a video writer"):
        VideoSink(str(tmp_path / "w.mp4"), 10.0, (32, 32))
    assert sorted(os.listdir(tmp_path)) == ["v.avi"]  # neither w.mp4 nor w.avi left behind


def _tool(args, cwd):
    cmd = [sys.executable, os.path.join(REPO, "tools", "make_demo_video.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(cwd), env=env)


def test_make_demo_video_user_errors_are_one_line(tmp_path):
    proc = _tool([str(tmp_path / "nodir" / "clip.mp4"), "--frames", "2"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert lines == [
        f"make_demo_video.py: error: cannot write video {tmp_path}/nodir/clip.mp4: folder "
        f"{tmp_path}/nodir does not exist"
    ], proc.stderr
    assert "Traceback" not in proc.stderr


def test_make_demo_video_rejects_non_positive_fps(tmp_path):
    proc = _tool(["clip.mp4", "--frames", "2", "--fps", "0"], tmp_path)
    assert proc.returncode == 2 and "--fps must be > 0" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


def test_visualize_sampling_glob_with_several_files(tmp_path, capsys):
    _png(tmp_path / "a.png", 10, 10, 0)
    _png(tmp_path / "b.png", 10, 10, 0)
    argv = [str(tmp_path / "*.png"), "--config-file", CONFIG, "--output", str(tmp_path / "g.png")]
    assert visualize_sampling_main(argv + CPU) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path}/*.png matches 2 image files" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_visualize_sampling_max_detections(tmp_path, capsys):
    _png(tmp_path / "a.png", 40, 50, 100)
    argv = [str(tmp_path / "a.png"), "--config-file", CONFIG, "--output", str(tmp_path / "g.png")]
    with pytest.raises(SystemExit) as exc:
        visualize_sampling_main(argv + ["--max-detections", "-1"] + CPU)
    assert exc.value.code == 2 and "--max-detections: must be >= 0" in capsys.readouterr().err
    with _demo_log() as records:
        argv += ["--max-detections", "0", "--confidence-threshold", "0"]
        assert visualize_sampling_main(argv + CPU) == 0
    log = _messages(records)
    assert "--max-detections 0" in log and "no detection scored" not in log
    assert (tmp_path / "g.png").exists()
