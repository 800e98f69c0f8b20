"""tools/make_synthetic_mot.py as a command line (run as a subprocess): user errors are one line on stderr
and exit status 2, naming the command-line flag to use."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "make_synthetic_mot.py")
SMALL = ["--frames", "8", "--val", "1"]


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small set made by the script: train 1, val 1, 8 frames."""
    root = str(tmp_path_factory.mktemp("cli") / "syn")
    p = _cli("--root", root, "--train", "1", *SMALL)
    assert p.returncode == 0, p.stderr
    return root


@pytest.fixture
def copy(made, tmp_path):
    """A private copy of the set to break."""
    return shutil.copytree(made, str(tmp_path / "syn"))


def _one_error_line(p):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_other_recipe_on_an_existing_set_names_overwrite(made):
    line = _one_error_line(_cli("--root", made, "--train", "2", *SMALL))
    assert "--overwrite" in line and "overwrite=True" not in line
    assert "splits: {'train': 1, 'val': 1} on disk, {'train': 2, 'val': 1} requested" in line


def test_check_on_malformed_gt_names_file_and_line(copy):
    gt = os.path.join(copy, "val", "SYN-val-01", "gt", "gt.txt")
    with open(gt) as f:
        n = len(f.read().splitlines())
    with open(gt, "a") as f:
        f.write("2,99,10,10,5,5,1,1\n")  # 8 columns
    line = _one_error_line(_cli("--root", copy, "--check"))
    assert line.startswith(f"error: {gt}:{n + 1}: expected 9 comma-separated columns")


def test_check_names_a_sequence_folder_without_seqinfo(made, copy):
    extra = os.path.join(copy, "train", "SYN-train-09")
    os.makedirs(os.path.join(extra, "img1"))
    line = _one_error_line(_cli("--root", copy, "--check"))
    assert os.path.join(extra, "seqinfo.ini") in line
    p = _cli("--root", made, "--check")  # the set itself is fine
    assert p.returncode == 0 and "train/SYN-train-01: 8 frames" in p.stdout, p.stderr


def test_eval_splits_over_a_set_of_another_recipe_is_one_line(tmp_path):
    """--eval-splits generates <root>_tune / <root>_hard on first use; one made with another recipe (here a
    marker of another seed, so nothing is generated) is a one-line error, not the loader's traceback."""
    root = str(tmp_path / "syn")
    os.makedirs(root + "_tune")
    with open(os.path.join(root + "_tune", ".complete"), "w") as f:
        f.write('{"seed": -1}')
    line = _one_error_line(_cli("--root", root, "--eval-splits"))
    assert line.startswith(f"error: {root}_tune: ") and "--seed" in line and "overwrite=True" not in line
