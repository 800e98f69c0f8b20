"""Pre-flight MOT validator on generated MOT folders with planted faults: each is reported, with its place."""

import os
import re
import shutil

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from ddetr_d2.data.validation import INVALID_BOX, validate_datasets
from ddetr_video.config import get_tracker_cfg
from ddetr_video.datasets import load_mot_dataset, register_mot_dataset
from ddetr_video.mot_format import MOTFormatError
from ddetr_video.synthetic_video import SyntheticVideoConfig, generate_dataset
from ddetr_video.validation import validate_mot_split

SMALL = SyntheticVideoConfig(num_frames=8, width=96, height=64, min_size=10, max_size=20, num_objects=4)
SEQ = "SYN-train-01"


@pytest.fixture
def mot_root(tmp_path):
    root = str(tmp_path / "mot")
    generate_dataset(root, {"train": 2}, SMALL, 7)
    return root


def _seq(root, name=SEQ):
    return os.path.join(root, "train", name)


def test_clean_folder_has_no_problem(mot_root):
    assert validate_mot_split(mot_root, "train", "synthetic", is_train=True, num_classes=3) == []


def test_missing_and_empty_images_named_by_path(mot_root):
    img = os.path.join(_seq(mot_root), "img1")
    os.remove(os.path.join(img, "000003.jpg"))
    open(os.path.join(img, "000005.jpg"), "wb").close()
    problems = validate_mot_split(mot_root, "train", "synthetic")
    got = {(p.kind, os.path.basename(p.where)) for p in problems}
    assert got == {("missing image", "000003.jpg"), ("empty image", "000005.jpg")}


def test_bad_gt_rows_each_reported_as_file_line(mot_root):
    gt = os.path.join(_seq(mot_root), "gt", "gt.txt")
    with open(gt) as f:
        n = sum(1 for line in f if line.strip())
    bad = [
        "2,9,10,10,0,5,1,1,1.0",  # w = 0
        "2,10,10,10,5,-3,1,1,1.0",  # h < 0
        "3,11,nan,10,5,5,1,1,1.0",  # NaN
        "3,12,10,10,inf,5,1,1,1.0",  # inf
        "4,13,200,10,5,5,1,1,1.0",  # right of the 96-px image
        "4,14,-30,10,20,5,1,1,1.0",  # left of it
        "5,15,10,10,5,5,1,9,1.0",  # class 9 is not a synthetic class
        "9,16,10,10,5,5,1,1,1.0",  # frame past seqLength 8
        "5,17,10,10,a,5,1,1,1.0",  # not a number
        "6,18,-5,-5,20,20,1,1,1.0",  # partly outside: allowed (objects leave the frame)
    ]
    with open(gt, "a") as f:
        f.write("\n".join(bad) + "\n")
    problems = validate_mot_split(mot_root, "train", "synthetic", is_train=True, num_classes=3)
    by_line = {int(p.where.rsplit(":", 1)[1]): p.kind for p in problems}
    assert all(p.where.startswith(gt + ":") for p in problems)
    expected = {
        n + 1: INVALID_BOX,
        n + 2: INVALID_BOX,
        n + 3: INVALID_BOX,
        n + 4: INVALID_BOX,
        n + 5: INVALID_BOX,
        n + 6: INVALID_BOX,
        n + 7: "unknown class",
        n + 8: "bad frame",
        n + 9: "bad row",
    }
    assert by_line == expected


def test_training_set_without_annotations_and_too_few_classes(mot_root):
    for name in (SEQ, "SYN-train-02"):
        open(os.path.join(_seq(mot_root, name), "gt", "gt.txt"), "w").close()
    problems = validate_mot_split(mot_root, "train", "synthetic", is_train=True, num_classes=2)
    kinds = sorted(p.kind for p in problems)
    assert kinds == ["no annotations", "too few classes"]
    # not a training set: an empty gt is fine (e.g. a sequence without objects)
    assert validate_mot_split(mot_root, "train", "synthetic", is_train=False, num_classes=3) == []


def test_missing_gt_and_broken_seqinfo(mot_root):
    os.remove(os.path.join(_seq(mot_root), "gt", "gt.txt"))
    with open(os.path.join(_seq(mot_root, "SYN-train-02"), "seqinfo.ini"), "a") as f:
        f.write("seqLength=zero\n")
    kinds = sorted(p.kind for p in validate_mot_split(mot_root, "train", "synthetic"))
    assert kinds == ["bad seqinfo", "missing annotations"]


def test_registered_for_mot_evaluator_type(mot_root):
    """ddetr_d2's pre-flight check dispatches a dataset with evaluator_type "mot" to this validator."""
    os.remove(os.path.join(_seq(mot_root), "img1", "000002.jpg"))
    name = "test_mot_validation_train"
    register_mot_dataset(name, mot_root, "train", "synthetic")
    try:
        assert MetadataCatalog.get(name).evaluator_type == "mot"
        cfg = get_tracker_cfg(
            opts=["DATASETS.TRAIN", f"('{name}',)", "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"]
        )
        problems = validate_datasets(cfg, [name], is_train=True)
        assert [(p.kind, os.path.basename(p.where)) for p in problems] == [("missing image", "000002.jpg")]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _append_gt(root, line):
    """Append ``line`` to the first sequence's gt.txt; returns (gt path, its 1-based line number)."""
    gt = os.path.join(_seq(root), "gt", "gt.txt")
    with open(gt) as f:
        n = len(f.read().splitlines())
    with open(gt, "a") as f:
        f.write(line + "\n")
    return gt, n + 1


@pytest.mark.parametrize(
    "line, kind, message",
    [
        ("2,9,10,10,5,5,1,1", "bad row", "expected 9 comma-separated columns"),  # 8 columns
        ("1,1,10,10,5,5,1,1,1.0", "duplicate id", "duplicate id 1 in frame 1"),  # frame 1 has id 1 already
        ("2,0,10,10,5,5,1,1,1.0", "bad id", "positive integer, got 0"),
        ("2,-3,10,10,5,5,1,1,1.0", "bad id", "positive integer, got -3"),
        ("2,9,10,10,5,5,2,1,1.0", "bad flag", r"consider flag \(column 7\) must be 0 or 1, got 2"),
        ("2,9,10,10,5,5,0.5,1,1.0", "bad flag", "must be 0 or 1, got 0.5"),
        ("2,9,10,10,5,5,1,1,1.5", "bad visibility", r"visibility must be in \[0, 1\], got 1.5"),
        ("2,9,10,10,5,5,1,1,-0.1", "bad visibility", "got -0.1"),
    ],
)
def test_preflight_reports_what_the_loader_refuses(mot_root, line, kind, message):
    """Each gt fault the loader raises on is one pre-flight problem at the same file:line (same parser)."""
    gt, lineno = _append_gt(mot_root, line)
    problems = validate_mot_split(mot_root, "train", "synthetic", is_train=True, num_classes=3)
    assert [(p.where, p.kind) for p in problems] == [(f"{gt}:{lineno}", kind)]
    assert re.search(message, problems[0].message)
    with pytest.raises(MOTFormatError, match=re.escape(f"{gt}:{lineno}: ") + ".*" + message):
        load_mot_dataset(mot_root, "train", "synthetic")


def test_every_faulty_row_is_reported_once(mot_root):
    """All faults of a file at once, each with its own line (the loader stops at the first)."""
    gt, first = _append_gt(mot_root, "2,9,10,10,5,5,1,1")
    _append_gt(mot_root, "2,9,10,10,5,5,1,1,1.0")
    _append_gt(mot_root, "2,9,10,10,5,5,1,1,1.0")  # duplicate of the line before
    _append_gt(mot_root, "3,0,10,10,5,5,1,1,1.0")
    problems = validate_mot_split(mot_root, "train", "synthetic")
    assert [(p.where, p.kind) for p in problems] == [
        (f"{gt}:{first}", "bad row"),
        (f"{gt}:{first + 2}", "duplicate id"),
        (f"{gt}:{first + 3}", "bad id"),
    ]


def test_sequence_folder_without_seqinfo_is_a_problem(mot_root):
    """A folder with img1/ or gt/ but no seqinfo.ini is reported (and fails loading), not skipped."""
    os.remove(os.path.join(_seq(mot_root), "seqinfo.ini"))
    os.makedirs(os.path.join(mot_root, "train", "SYN-train-03", "gt"))
    os.makedirs(os.path.join(mot_root, "train", "notes"))  # no img1/, gt/ nor seqinfo.ini: not a sequence
    problems = validate_mot_split(mot_root, "train", "synthetic", is_train=True, num_classes=3)
    assert [(p.where, p.kind) for p in problems] == [
        (os.path.join(_seq(mot_root), "seqinfo.ini"), "missing seqinfo"),
        (os.path.join(_seq(mot_root, "SYN-train-03"), "seqinfo.ini"), "missing seqinfo"),
    ]
    assert _seq(mot_root) in problems[0].message
    with pytest.raises(MOTFormatError, match=re.escape(os.path.join(_seq(mot_root), "seqinfo.ini"))):
        load_mot_dataset(mot_root, "train", "synthetic")


def test_image_past_seqlength_is_a_problem(mot_root):
    """The loader refuses an image folder holding more than seqLength frames: so does pre-flight."""
    img = os.path.join(_seq(mot_root), "img1")
    shutil.copy(os.path.join(img, "000001.jpg"), os.path.join(img, "000009.jpg"))
    problems = validate_mot_split(mot_root, "train", "synthetic")
    seqinfo = os.path.join(_seq(mot_root), "seqinfo.ini")
    assert [(p.where.rsplit(":", 1)[0], p.kind) for p in problems] == [(seqinfo, "image count")]
    assert "000009.jpg" in problems[0].message
    with pytest.raises(MOTFormatError, match="seqLength=8"):
        load_mot_dataset(mot_root, "train", "synthetic")
