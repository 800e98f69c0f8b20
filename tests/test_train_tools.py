"""tools/plot_metrics.py and tools/make_synthetic_coco.py (in-process, fast)."""

import importlib.util
import json
import os

import matplotlib.image as mpimg
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_metrics_writes_png_and_tolerates_a_cut_last_line(tmp_path, capsys):
    pm = _load("plot_metrics")
    rows = [
        {"iteration": i, "total_loss": 10.0 / (i + 1), "loss_ce": 1.0, "lr": 2e-4} for i in range(0, 100, 20)
    ]
    rows.append({"iteration": 99, "synthetic_shapes_val/bbox/AP": 12.5})
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"iteration": 100, "total_lo'
    (tmp_path / "metrics.json").write_text(text)
    parsed = pm.read_metrics(str(tmp_path / "metrics.json"))
    assert [r["iteration"] for r in parsed] == [0, 20, 40, 60, 80, 99]
    pm.main([str(tmp_path)])
    img = mpimg.imread(tmp_path / "loss_curve.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # something was drawn
    assert "skipping unreadable line 7" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        pm.main([str(tmp_path / "nowhere")])


def test_make_synthetic_coco_cli(tmp_path):
    mk = _load("make_synthetic_coco")
    mk.main(
        [
            "--root",
            str(tmp_path),
            "--split",
            "x",
            "--num-images",
            "3",
            "--image-size",
            "64",
            "--format",
            "jpg",
        ]
    )
    data = json.load(open(tmp_path / "x" / "annotations.json"))
    assert len(data["images"]) == 3 and all(im["file_name"].endswith(".jpg") for im in data["images"])
    assert all(os.path.isfile(tmp_path / "x" / "images" / im["file_name"]) for im in data["images"])
