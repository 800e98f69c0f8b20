"""The tracking demo (``tools/demo.py --track`` = ``video/demo.py``, code in ``ddetr_video.demo``) on the tiny
random-weight tracker of video/configs (CPU, headless): end to end, weight errors, per-id colours."""

import contextlib
import io
import os
import subprocess
import sys
from subprocess import PIPE

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from ddetr_d2.config import build_cfg
from ddetr_video.config import add_tracker_config
from ddetr_video.demo import draw_tracks, track_colour, track_video
from ddetr_video.demo import main as tracking_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACKER_CONFIG = os.path.join(REPO, "video", "configs", "synthetic_tiny.yaml")
# the same config as a plain detector, tracked by the IoU baseline
AS_DETECTOR = ["MODEL.META_ARCHITECTURE", "DeformableDETR", "MODEL.TRACKER.ASSOCIATION", "IoUTracker"]
ENV = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(opts=()):
    return build_cfg(TRACKER_CONFIG, ["MODEL.DEVICE", "cpu", *opts], add_config_fns=(add_tracker_config,))


def _write_video(path, frames, fps=10.0):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h), True)
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def _moving_square(num_frames, rng, size_wh=(96, 64)):
    w, h = size_wh
    background = rng.integers(20, 80, size=(h, w, 3), dtype=np.uint8)
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        cv2.rectangle(frame, (x0 + 3 * t, y0), (x0 + 3 * t + 24, y0 + 20), (0, 200, 255), -1)
        frames.append(frame)
    return frames


def _read_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _demo_cmd(tool, video, output, weights, *opts, flags=()):
    cmd = [sys.executable, os.path.join(REPO, *tool), "--config-file", TRACKER_CONFIG, "--video", str(video)]
    cmd += ["--output", str(output), *flags, "--opts", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)]
    return cmd + list(opts)


TOOLS_DEMO = ("tools", "demo.py")  # the user's entry point, with --track
VIDEO_DEMO = ("video", "demo.py")  # the add-on's own entry point


def test_track_cli_end_to_end_and_weight_errors(tmp_path):
    """
    Detector weights into the tracker config and tracker weights into the detector config stop with exit code
    2 and one line naming the keys; so do missing and truncated weights; none creates its output folder. With
    --allow-mismatch the run goes through and writes the annotated video (same frame count and size as the
    input) and the MOT results. Two runs are subprocesses of the two entry points (tools/demo.py --track,
    video/demo.py: each a ``sys.exit(main(...))`` wrapper around ``ddetr_video.demo.main``); the other errors
    call that ``main`` in this process (no interpreter start-up each).
    """
    rng = np.random.default_rng()
    frames = _moving_square(5, rng)
    video = tmp_path / "clip.mp4"
    _write_video(video, frames)
    torch.manual_seed(int(rng.integers(1 << 30)))
    detector_weights, tracker_weights = tmp_path / "detector.pth", tmp_path / "tracker.pth"
    torch.save({"model": build_model(_cfg(AS_DETECTOR)).state_dict()}, detector_weights)
    torch.save({"model": build_model(_cfg()).state_dict()}, tracker_weights)
    truncated = tmp_path / "truncated.pth"
    data = tracker_weights.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    track = ("--track",)
    subprocess_runs = {
        "truncated": _demo_cmd(VIDEO_DEMO, video, tmp_path / "d", truncated),
        "allow_mismatch": _demo_cmd(
            TOOLS_DEMO,
            video,
            tmp_path / "e",
            detector_weights,
            "MODEL.TRACKER.BIRTH_THRESHOLD",
            "0.0",
            flags=track + ("--allow-mismatch", "--confidence-threshold", "0.0"),
        ),
    }
    procs = {
        name: subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=ENV, cwd=tmp_path)
        for name, cmd in subprocess_runs.items()
    }
    # the argv after the script name; tools/demo.py passes "--track" on to ddetr_video.demo.main as well
    in_process = {
        "detector_into_tracker": _demo_cmd(TOOLS_DEMO, video, tmp_path / "a", detector_weights, flags=track),
        "tracker_into_detector": _demo_cmd(VIDEO_DEMO, video, tmp_path / "b", tracker_weights, *AS_DETECTOR),
        "missing": _demo_cmd(TOOLS_DEMO, video, tmp_path / "c", tmp_path / "nope.pth", flags=track),
    }
    out = {}
    try:
        for name, cmd in in_process.items():
            # stderr only: detectron2's loggers keep the stdout they first see (not a per-test capture)
            with contextlib.redirect_stderr(io.StringIO()) as err:
                code = tracking_main(cmd[2:])
            out[name] = ("", err.getvalue(), code)
    finally:
        out.update({name: p.communicate(timeout=300) + (p.returncode,) for name, p in procs.items()})

    expected_errors = {
        "detector_into_tracker": ["missing in checkpoint", "qim.", "detect_ref_wh", "--allow-mismatch"],
        "tracker_into_detector": ["unexpected in checkpoint", "qim.", "detect_ref_wh"],
        "missing": ["weights file not found", "nope.pth"],
        "truncated": ["cannot load weights", "truncated.pth"],
    }
    for (name, words), folder in zip(expected_errors.items(), "abcd"):
        stdout, stderr, code = out[name]
        assert code == 2, (name, stderr[-3000:])
        lines = stderr.strip().splitlines()
        error_lines = [line for line in lines if "error:" in line]
        assert len(error_lines) == 1 and "Traceback" not in stderr, (name, stderr[-3000:])
        assert all(w in error_lines[0] for w in words), (name, error_lines[0])
        assert not (tmp_path / folder).exists(), name  # checked before any output folder is made

    stdout, stderr, code = out["allow_mismatch"]
    assert code == 0, stderr[-3000:]
    assert "missing in checkpoint" in stdout + stderr  # warned, not stopped
    assert "No checkpoint found" not in stdout + stderr
    written = _read_frames(tmp_path / "e" / "clip_tracks.mp4")
    assert len(written) == len(frames) and all(f.shape == frames[0].shape for f in written)
    rows = np.loadtxt(tmp_path / "e" / "clip_tracks.txt", delimiter=",", ndmin=2)
    assert rows.shape[1] == 10 and len(rows) > 0  # every detect query may start a track (threshold 0)
    assert set(rows[:, 0].astype(int)) <= set(range(1, len(frames) + 1)) and (rows[:, 1] >= 1).all()


def test_iou_baseline_keeps_ids_on_a_static_video(tmp_path):
    """A detector config tracks with IoUTracker: on identical frames every track keeps its id and box."""
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    cfg = _cfg(AS_DETECTOR + ["MODEL.TRACKER.BIRTH_THRESHOLD", "0.0", "MODEL.TRACKER.KEEP_THRESHOLD", "0.0"])
    model = build_model(cfg)
    frame = _moving_square(1, rng)[0]
    video = tmp_path / "static.mp4"
    _write_video(video, [frame] * 4)
    txt = track_video(cfg, str(video), str(tmp_path / "out") + "/", confidence_threshold=0.0, model=model)
    rows = np.loadtxt(txt, delimiter=",", ndmin=2)
    per_frame = [rows[rows[:, 0] == f] for f in range(1, 5)]
    assert len(per_frame[0]) > 0
    first = per_frame[0][np.argsort(per_frame[0][:, 1])]
    for later in per_frame[1:]:
        later = later[np.argsort(later[:, 1])]
        np.testing.assert_array_equal(later[:, 1], first[:, 1])  # the same ids
        np.testing.assert_allclose(later[:, 2:6], first[:, 2:6], atol=0.05)  # on the same boxes (mp4 noise)


def _instances(hw, boxes, ids):
    inst = Instances(hw)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.full((len(ids),), 0.9)
    inst.pred_classes = torch.zeros(len(ids), dtype=torch.int64)
    inst.track_ids = torch.tensor(ids, dtype=torch.int64)
    return inst


def test_track_colours_are_stable_per_id_and_distinct():
    from detectron2.data import MetadataCatalog

    ids = np.random.default_rng().permutation(np.arange(1, 200))[:40]
    colours = np.array([track_colour(i) for i in ids])
    np.testing.assert_array_equal(colours, np.array([track_colour(i) for i in ids]))  # same id, same colour
    assert ((colours >= 0) & (colours <= 1)).all()
    hues = (ids * 0.618033988749895) % 1.0
    consecutive = np.array([track_colour(i) for i in range(1, 9)])
    dist = np.linalg.norm(consecutive[:, None] - consecutive[None], axis=-1) + np.eye(8)
    assert dist.min() > 0.15, dist.min()  # neighbouring ids stay far apart
    assert len(np.unique(hues.round(6))) == len(ids)

    meta = MetadataCatalog.get("__demo_tracking_test").set(thing_classes=["box"])
    black = np.zeros((120, 200, 3), np.uint8)
    box7 = [60.0, 30.0, 110.0, 90.0]
    # id 7 drawn with different neighbours, in a different position of the list: same pixels on its edge
    a = draw_tracks(black, _instances((120, 200), [[5.0, 5.0, 40.0, 40.0], box7], [3, 7]), meta)
    b = draw_tracks(black, _instances((120, 200), [box7, [150.0, 60.0, 190.0, 110.0]], [7, 12]), meta)
    edge = (90, 85)  # (y, x) on the bottom edge of box 7, away from its label
    assert a[edge].max() > 0
    np.testing.assert_array_equal(a[edge], b[edge])
    c = draw_tracks(black, _instances((120, 200), [box7], [8]), meta)
    assert not np.array_equal(c[edge], a[edge])  # another id, another colour
    # the edge's hue is the id's hue (BGR frame, RGB colour)
    rgb = a[edge][::-1].astype(np.float64)
    np.testing.assert_allclose(rgb / rgb.max(), np.array(track_colour(7)) / max(track_colour(7)), atol=0.08)
