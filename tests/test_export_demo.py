"""tools/export_model.py exports a model from its weights file, and tools/demo.py --backend onnxruntime
runs that export: on the same weights and image it finds and draws as many detections as the PyTorch
backend; a missing --onnx-model is a one-line error, and so are the other bad requests (an --output that
is a file, an ONNX model with the PyTorch backend or with --track, weights that do not fit without
--allow-mismatch); --onnx-model alone selects onnxruntime."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from model_testing import tiny_cfg

pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (requirements-test.txt)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny_test.yaml")


def _demo(args, tool="demo"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--config-file", CONFIG] + args,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


def test_export_command_line_and_onnxruntime_demo_draw_the_pytorch_detections(tmp_path):
    from ddetr_d2.export import default_export_size, read_export_meta

    two_stage = ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", "True", "MODEL.DEFORMABLE_DETR.TWO_STAGE", "True"]
    cfg = tiny_cfg(DETECTIONS_PER_IMAGE=5, WITH_BOX_REFINE=True, TWO_STAGE=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in.png"), image)
    size = default_export_size(cfg, (120, 160))
    # the exported graph keeps its own top-k: DETECTIONS_PER_IMAGE 5 at export and in both demo runs
    opts = ["--opts", "MODEL.DEVICE", "cpu", "MODEL.DEFORMABLE_DETR.DETECTIONS_PER_IMAGE", "5", *two_stage]
    out = tmp_path / "onnx"
    export = ["--format", "onnx", "--msda", "gather", "--input-size", *map(str, size), "--output", str(out)]
    res = _demo(export + opts + ["MODEL.WEIGHTS", str(weights)], tool="export_model")
    assert res.returncode == 0, res.stderr[-3000:]
    onnx_path = str(out / "model.onnx")
    meta = read_export_meta(onnx_path)
    assert os.path.isfile(onnx_path) and meta["input_size"] == list(size) and meta["msda"] == "gather"

    common = ["--input", str(tmp_path / "in.png"), "--confidence-threshold", "0.0"]
    res = _demo(
        common
        + ["--output", str(tmp_path / "ort.png"), "--backend", "onnxruntime", "--onnx-model", onnx_path]
        + opts
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ort_log = res.stdout + res.stderr
    res = _demo(common + ["--output", str(tmp_path / "pt.png")] + opts + ["MODEL.WEIGHTS", str(weights)])
    assert res.returncode == 0, res.stderr[-3000:]
    ort_img, pt_img = cv2.imread(str(tmp_path / "ort.png")), cv2.imread(str(tmp_path / "pt.png"))
    assert ort_img.shape == pt_img.shape == image.shape
    # both draw the 5 detections (the Visualizer's colours are random, so the pixels are not compared;
    # ONNXPredictor == the PyTorch predictor is tests/test_export_model.py)
    assert "5 detections" in ort_log and "5 detections" in res.stdout + res.stderr
    assert np.abs(ort_img.astype(int) - image.astype(int)).mean() > 1.0


def test_onnxruntime_backend_needs_a_model_file(tmp_path):
    cv2.imwrite(str(tmp_path / "in.png"), np.zeros((40, 50, 3), dtype=np.uint8))
    res = _demo(
        [
            "--input",
            str(tmp_path / "in.png"),
            "--output",
            str(tmp_path / "o.png"),
            "--backend",
            "onnxruntime",
            "--opts",
            "MODEL.DEVICE",
            "cpu",
        ]
    )
    assert res.returncode == 2 and "--onnx-model" in res.stderr and "Traceback" not in res.stderr


def _cli(main, argv, capsys):
    """In-process run of a command line (ddetr_d2's own entry points, as tools/*.py call them):
    (exit code, stderr)."""
    from ddetr_d2.demo.cli import run_cli

    code = run_cli(main, argv, "cli")
    return code, capsys.readouterr().err


def test_bad_export_and_backend_requests_are_one_line_errors(tmp_path, capsys):
    """Checked before any model is built: an --output that is a file or cannot be written, an ONNX model
    with the PyTorch backend, and --track with onnxruntime."""
    from ddetr_d2.demo.cli import _run_demo
    from ddetr_d2.export.cli import export_main
    from ddetr_video.demo import _run as track_run

    afile = tmp_path / "afile"
    afile.write_text("mine")
    base = ["--config-file", CONFIG, "--opts", "MODEL.DEVICE", "cpu"]
    code, err = _cli(export_main, ["--output", str(afile)] + base, capsys)
    assert code == 2 and "is a file" in err and afile.read_text() == "mine"
    code, err = _cli(export_main, ["--output", str(afile / "sub")] + base, capsys)
    assert code == 2 and "cannot write there" in err and not (tmp_path / "sub").exists()

    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.zeros((40, 50, 3), dtype=np.uint8))
    demo = ["--config-file", CONFIG, "--input", str(image), "--output", str(tmp_path / "o.png")]
    code, err = _cli(_run_demo, demo + ["--backend", "pytorch", "--onnx-model", "m.onnx"], capsys)
    assert code == 2 and "--backend onnxruntime" in err
    video = ["--config-file", CONFIG, "--video", str(image), "--onnx-model", "m.onnx"]
    code, err = _cli(track_run, video, capsys)
    assert code == 2 and "--track runs the PyTorch tracker" in err
    assert not (tmp_path / "o.png").exists()


def test_onnx_model_implies_onnxruntime_and_export_takes_allow_mismatch(tmp_path, capsys):
    """--onnx-model alone runs onnxruntime (a missing export is its one-line error, not a random PyTorch
    model); export_model accepts --allow-mismatch, which the weights error advises."""
    from ddetr_d2.demo.cli import _run_demo
    from ddetr_d2.export.cli import export_main

    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.zeros((40, 50, 3), dtype=np.uint8))
    demo = ["--config-file", CONFIG, "--input", str(image), "--output", str(tmp_path / "o.png")]
    missing = str(tmp_path / "nope" / "model.onnx")
    code, err = _cli(_run_demo, demo + ["--onnx-model", missing], capsys)
    assert code == 2 and f"{missing} not found" in err and "export_meta.json" not in err
    (tmp_path / "model.onnx").write_bytes(b"")  # a model file without its export_meta.json: both named
    code, err = _cli(_run_demo, demo + ["--onnx-model", str(tmp_path / "model.onnx")], capsys)
    assert code == 2 and f"export_meta.json not found beside {tmp_path / 'model.onnx'}" in err

    cfg = tiny_cfg(NUM_CLASSES=5)
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "five.pth")
    opts = ["--opts", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(tmp_path / "five.pth")]
    argv = ["--config-file", CONFIG, "--input-size", "64", "64", "--output", str(tmp_path / "e")] + opts
    code, err = _cli(export_main, argv, capsys)
    assert code == 2 and "--allow-mismatch" in err and not (tmp_path / "e").exists()
    code, err = _cli(export_main, ["--allow-mismatch"] + argv, capsys)
    assert code == 0, err
    assert torch.is_grad_enabled()  # the in-process export leaves autograd as it found it
    assert (tmp_path / "e" / "model.onnx").is_file()
