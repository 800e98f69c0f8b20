"""MOT readers/loader: round trips on generated files, every malformed input names file + line."""

import os
import shutil

import numpy as np
import pytest

from ddetr_video.datasets import load_mot_dataset, register_mot_dataset, register_synthetic_mot
from ddetr_video.mot_format import (
    MOTFormatError,
    load_sequence,
    read_mot_file,
    read_seqinfo,
    write_gt_file,
    write_results_file,
)
from ddetr_video.synthetic_video import SyntheticVideo, SyntheticVideoConfig, generate_dataset

CFG = SyntheticVideoConfig(num_frames=10, width=96, height=72, min_size=10, max_size=20, num_objects=5)


@pytest.fixture(scope="module")
def mot_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mot") / "syn")
    generate_dataset(root, {"train": 2, "val": 1}, CFG, seed=11)
    return root


@pytest.fixture
def seq_copy(mot_root, tmp_path):
    """A private copy of one generated sequence to break."""
    dst = tmp_path / "split" / "SEQ"
    shutil.copytree(os.path.join(mot_root, "train", "SYN-train-01"), dst)
    return dst


def _gt_lines(seq):
    return (seq / "gt" / "gt.txt").read_text().splitlines()


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_loader_round_trip(mot_root):
    dicts = load_mot_dataset(mot_root, "train", "synthetic")
    assert len(dicts) == 2 * CFG.num_frames
    assert [d["sequence"] for d in dicts[: CFG.num_frames]] == ["SYN-train-01"] * CFG.num_frames
    assert [d["frame_idx"] for d in dicts[: CFG.num_frames]] == list(range(CFG.num_frames))
    assert len({d["image_id"] for d in dicts}) == len(dicts)
    # the dicts reproduce exactly what the generator rendered (boxes, ids, classes, visibility)
    seq_dicts = [d for d in dicts if d["sequence"] == "SYN-train-02"]
    gt = read_mot_file(
        os.path.join(mot_root, "train", "SYN-train-02", "gt", "gt.txt"), "gt", "synthetic"
    ).data
    flat = [
        [d["mot_frame"], a["track_id"], *a["bbox"], a["category_id"] + 1, a["visibility"]]
        for d in seq_dicts
        for a in d["annotations"]
    ]
    flat = np.array(sorted(flat))
    ref = gt[np.lexsort((gt[:, 1], gt[:, 0]))][:, [0, 1, 2, 3, 4, 5, 7, 8]]
    np.testing.assert_allclose(flat, ref, atol=1e-4)
    for d in seq_dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (CFG.height, CFG.width)
        assert all(a["iscrowd"] == 0 and a["bbox_mode"] == 1 for a in d["annotations"])  # 1 = XYWH_ABS


def test_halves_and_visibility_filter(mot_root):
    full = load_mot_dataset(mot_root, "train", "synthetic")
    a = load_mot_dataset(mot_root, "train", "synthetic", half="train")
    b = load_mot_dataset(mot_root, "train", "synthetic", half="val")
    assert len(a) + len(b) == len(full)
    assert {d["mot_frame"] for d in a if d["video_id"] == 0} == set(range(1, CFG.num_frames // 2 + 1))
    assert b[0]["frame_idx"] == 0 and b[0]["mot_frame"] == CFG.num_frames // 2 + 1
    vis = load_mot_dataset(mot_root, "train", "synthetic", min_visibility=0.5)
    assert all(x["visibility"] >= 0.5 for d in vis for x in d["annotations"])
    assert sum(len(d["annotations"]) for d in vis) <= sum(len(d["annotations"]) for d in full)


def test_detectron2_registration(mot_root, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_mot_dataset("_test_mot_val", mot_root, "val", "synthetic")
    dicts = DatasetCatalog.get("_test_mot_val")
    assert len(dicts) == CFG.num_frames
    meta = MetadataCatalog.get("_test_mot_val")
    assert meta.thing_classes == ["square", "circle", "triangle"] and meta.evaluator_type == "mot"
    # lazily generated synthetic set: nothing on disk until the dataset is requested
    root = str(tmp_path / "lazy")
    names = register_synthetic_mot(root, CFG, {"train": 1, "val": 1}, seed=5, prefix="_test_syn")
    assert names == ["_test_syn_train", "_test_syn_val"] and not os.path.exists(root)
    assert len(DatasetCatalog.get("_test_syn_val")) == CFG.num_frames
    assert os.path.isfile(os.path.join(root, ".complete"))
    for n in ["_test_mot_val", *names]:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_mot17_layout_classes_and_distractors(tmp_path):
    """MOT17: class 1 = targets, consider flag 0 dropped, distractor classes -> iscrowd, cars dropped."""
    seq = tmp_path / "train" / "MOT17-02-FRCNN"
    (seq / "img1").mkdir(parents=True)
    (seq / "gt").mkdir()
    for f in (1, 2):
        (seq / "img1" / f"{f:06d}.jpg").write_bytes(b"")
    (seq / "seqinfo.ini").write_text(
        "[Sequence]\nname=MOT17-02-FRCNN\nimDir=img1\nframeRate=30\nseqLength=2\nimWidth=1920\nimHeight=1080\nimExt=.jpg\n"
    )
    _write_lines(
        seq / "gt" / "gt.txt",
        [
            "1,1,912,484,97,109,0,7,1",  # static person, consider 0 -> dropped
            "1,2,1338,418,167,379,1,1,1",  # pedestrian -> target
            "2,2,1342,417,168,380,1,1,0.86",
            "1,3,586,447,85,263,1,8,0.5",  # distractor -> ignore region
            "1,4,1585,-1,336,578,1,3,1",  # car -> dropped
        ],
    )
    dicts = load_mot_dataset(str(tmp_path), "train", "mot17", detector="FRCNN")
    assert [len(d["annotations"]) for d in dicts] == [2, 1]
    kinds = {(a["track_id"], a["iscrowd"], a["category_id"]) for a in dicts[0]["annotations"]}
    assert kinds == {(2, 0, 0), (3, 1, 0)}
    assert dicts[1]["annotations"][0]["visibility"] == pytest.approx(0.86)
    no_ign = load_mot_dataset(str(tmp_path), "train", "mot17", include_ignored=False)
    assert [len(d["annotations"]) for d in no_ign] == [1, 1]
    # DanceTrack knows only class 1: the first offending row (line 1, class 7) is reported
    with pytest.raises(MOTFormatError, match=r"gt\.txt:1: unknown class id 7 for format dancetrack"):
        load_mot_dataset(str(tmp_path), "train", "dancetrack")


@pytest.mark.parametrize(
    "line, lineno, message",
    [
        ("3,1,10,10,5", 4, "expected 9"),  # wrong column count
        ("3,1,10,abc,5,5,1,1,1", 4, r"column 4 \(y\) is not a number"),
        ("3,1,10,10,-5,5,1,1,1", 4, "negative box size"),
        ("3,0,10,10,5,5,1,1,1", 4, "track id must be a positive integer"),
        ("3,7,10,10,5,5,1,9,1", 4, "unknown class id 9"),
        ("3,7,10,10,5,5,1,1,1.5", 4, "visibility must be in"),
        ("3,7,10,10,5,5,2,1,1", 4, "consider flag"),
        ("0,7,10,10,5,5,1,1,1", 4, "frame must be an integer >= 1"),
        ("99,7,10,10,5,5,1,1,1", 4, "beyond seqLength=10"),
        ("1.5,7,10,10,5,5,1,1,1", 4, "frame must be an integer"),
        ("3,7,10,10,nan,5,1,1,1", 4, "not finite"),
    ],
)
def test_malformed_gt_rows_name_file_and_line(seq_copy, line, lineno, message):
    lines = _gt_lines(seq_copy)
    lines.insert(lineno - 1, line)
    _write_lines(seq_copy / "gt" / "gt.txt", lines)
    with pytest.raises(MOTFormatError, match=message) as e:
        load_sequence(str(seq_copy), "synthetic")
    assert e.value.path.endswith(os.path.join("SEQ", "gt", "gt.txt")) and e.value.line == lineno
    assert str(e.value).startswith(f"{e.value.path}:{lineno}: ")


def test_duplicate_id_in_frame(seq_copy):
    lines = _gt_lines(seq_copy)
    lines.append(lines[1])
    _write_lines(seq_copy / "gt" / "gt.txt", lines)
    with pytest.raises(MOTFormatError, match=r"duplicate id .* \(first on line 2\)") as e:
        load_sequence(str(seq_copy), "synthetic")
    assert e.value.line == len(lines)


def test_missing_frame_image(seq_copy):
    gt = read_mot_file(str(seq_copy / "gt" / "gt.txt"), "gt", "synthetic")
    frame = int(gt.data[len(gt) // 2, 0])
    os.remove(seq_copy / "img1" / f"{frame:06d}.jpg")
    first_line = int(gt.lines[np.nonzero(gt.data[:, 0] == frame)[0][0]])
    with pytest.raises(MOTFormatError, match=f"frame {frame} has gt rows but image .* is missing") as e:
        load_sequence(str(seq_copy), "synthetic")
    assert e.value.path.endswith("gt.txt") and e.value.line == first_line


def test_seqlength_mismatch(seq_copy):
    ini = seq_copy / "seqinfo.ini"
    ini.write_text(ini.read_text().replace(f"seqLength={CFG.num_frames}", f"seqLength={CFG.num_frames + 2}"))
    with pytest.raises(MOTFormatError, match="seqLength=12 but .* holds 10 '.jpg' files") as e:
        load_sequence(str(seq_copy), "synthetic")
    assert e.value.path.endswith("seqinfo.ini") and e.value.line == 5
    ini.write_text(ini.read_text().replace("seqLength=12", "seqLength=ten"))
    with pytest.raises(MOTFormatError, match=r"seqinfo\.ini:5: seqLength='ten' is not an integer"):
        read_seqinfo(str(ini))
    ini.write_text("[Sequence]\nname=x\n")
    with pytest.raises(MOTFormatError, match="lacks key"):
        read_seqinfo(str(ini))


def test_loader_propagates_errors(seq_copy):
    lines = _gt_lines(seq_copy)
    lines[2] = "x" + lines[2]
    _write_lines(seq_copy / "gt" / "gt.txt", lines)
    with pytest.raises(MOTFormatError, match=r"SEQ/gt/gt\.txt:3: column 1 \(frame\) is not a number"):
        load_mot_dataset(str(seq_copy.parent.parent), "split", "synthetic")


def test_results_and_det_files_round_trip(tmp_path):
    rng = np.random.default_rng()
    n = 20
    rows = np.stack(
        [
            rng.integers(1, 9, n),
            np.arange(1, n + 1),
            *(rng.uniform(0, 100, (4, n)).round(2)),
            rng.uniform(0, 1, n).round(4),
        ],
        1,
    )
    write_results_file(str(tmp_path / "r.txt"), rows)
    back = read_mot_file(str(tmp_path / "r.txt"), "result", "mot17")
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    np.testing.assert_allclose(back.data[:, :7], rows[order], atol=1e-4)
    assert (back.data[:, 7:] == -1).all()
    # det files: id column -1 allowed, column 7 is a score (not the consider flag)
    (tmp_path / "det.txt").write_text("1,-1,10,20,30,40,2.31,-1,-1,-1\n")
    det = read_mot_file(str(tmp_path / "det.txt"), "det", "mot17")
    assert det.data[0, 6] == pytest.approx(2.31)
    with pytest.raises(MOTFormatError, match=r"r2\.txt:1: result track id must be >= 0"):
        (tmp_path / "r2.txt").write_text("1,-3,10,20,30,40,0.5,-1,-1,-1\n")
        read_mot_file(str(tmp_path / "r2.txt"), "result", "mot17")


def test_gt_writer_reader_round_trip(tmp_path):
    gt = SyntheticVideo(CFG, int(np.random.default_rng().integers(1 << 30))).gt()
    write_gt_file(str(tmp_path / "gt.txt"), gt)
    back = read_mot_file(str(tmp_path / "gt.txt"), "gt", "synthetic", seq_length=CFG.num_frames)
    np.testing.assert_allclose(back.data, gt[np.lexsort((gt[:, 1], gt[:, 0]))], atol=1e-4)
