"""tools/plot_metrics.py and tools/make_synthetic_coco.py, run as scripts."""

import json
import os
import subprocess
import sys

import matplotlib.image as mpimg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_plot_metrics_writes_png_and_tolerates_a_cut_last_line(tmp_path):
    rows = [
        {"iteration": i, "total_loss": 10.0 / (i + 1), "loss_ce": 1.0, "lr": 2e-4} for i in range(0, 100, 20)
    ]
    rows.append({"iteration": 99, "synthetic_shapes_val/bbox/AP": 12.5})
    text = "\n".join(json.dumps(r) for r in rows) + '\n5\n{"iteration": 100, "total_lo'
    (tmp_path / "metrics.json").write_text(text)
    p = _tool("plot_metrics", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "skipping line 7" in p.stderr and "not a JSON object" in p.stderr
    assert "skipping unreadable line 8" in p.stderr
    img = mpimg.imread(tmp_path / "loss_curve.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # something was drawn
    p = _tool("plot_metrics", tmp_path / "nowhere")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere' / 'metrics.json'} not found (is this a detectron2 OUTPUT_DIR?)"
    ]


def test_make_synthetic_coco_cli(tmp_path):
    p = _tool(
        "make_synthetic_coco", "--root", tmp_path, "--split", "x", "--num-images", 3, "--image-size", 64,
        "--format", "jpg",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    data = json.load(open(tmp_path / "x" / "annotations.json"))
    assert len(data["images"]) == 3 and all(im["file_name"].endswith(".jpg") for im in data["images"])
    assert all(os.path.isfile(tmp_path / "x" / "images" / im["file_name"]) for im in data["images"])


def test_plot_metrics_refuses_outputs_and_keys_it_cannot_honour(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 1, "total_loss": 1.0, "loss_ce": 0.5}))
    (tmp_path / "a_folder").mkdir()
    for args, message in [
        (["--out", tmp_path / "a_folder"], "is a folder"),
        (["--out", tmp_path / "curve"], "the file name must end in one of .png"),
        (["--out", tmp_path / "nowhere" / "c.png"], "does not exist"),
        (["--keys", "no_such_loss"], "none of --keys ['no_such_loss'] is in metrics.json"),
    ]:
        p = _tool("plot_metrics", tmp_path, *args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert message in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_folder", "metrics.json"]  # nothing written


def test_make_synthetic_coco_cli_refuses_bad_values_before_writing(tmp_path):
    for args, message in [
        (["--num-images", -5], "--num-images must be >= 0, got -5"),
        (["--image-size", 0], "--image-size must be >= 4, got 0"),
        (["--max-objects", -1], "--max-objects must be >= 0, got -1"),
        (["--split", "a/b"], "--split must be a folder name"),
    ]:
        p = _tool("make_synthetic_coco", "--root", tmp_path / "root", *args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert message in p.stderr, p.stderr
    (tmp_path / "a_file").write_text("x")
    p = _tool("make_synthetic_coco", "--root", tmp_path / "a_file", "--num-images", 1)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"error: cannot write {tmp_path / 'a_file' / 'train'}"), p.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # no half-made root
