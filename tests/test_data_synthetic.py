"""Synthetic shapes generator, lazy registration and user COCO folder registration."""

import hashlib
import json
import multiprocessing as mp
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from ddetr_d2.data import SHAPE_CLASSES, make_synthetic_coco, parse_dataset_spec, register_coco_folder
from ddetr_d2.data.datasets import SYNTHETIC_SPLITS, ensure_synthetic_split, synthetic_root


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_generator_is_deterministic_and_seed_dependent(tmp_path):
    a = make_synthetic_coco(str(tmp_path / "a"), "s", 6, seed=7, image_size=96)
    b = make_synthetic_coco(str(tmp_path / "b"), "s", 6, seed=7, image_size=96)
    c = make_synthetic_coco(str(tmp_path / "c"), "s", 6, seed=8, image_size=96)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert open(a, "rb").read() != open(c, "rb").read()


def test_generator_annotations_are_valid_and_match_pixels(tmp_path):
    json_file = make_synthetic_coco(str(tmp_path), "s", 12, seed=3, image_size=128)
    data = json.load(open(json_file))
    assert [c["name"] for c in data["categories"]] == SHAPE_CLASSES
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    images = {im["id"]: im for im in data["images"]}
    classes = set()
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < ann["area"] <= w * h
        classes.add(ann["category_id"])
    assert classes <= set(range(1, len(SHAPE_CLASSES) + 1)) and len(classes) >= 4
    for im in data["images"]:
        img = cv2.imread(os.path.join(tmp_path, "s", "images", im["file_name"]))
        assert img.shape == (im["height"], im["width"], 3)
        assert 96 <= im["width"] <= 128 and 96 <= im["height"] <= 128
    # boxes cover objects of very different sizes
    areas = np.array([a["area"] for a in data["annotations"]])
    assert areas.min() < 32**2 < areas.max()


def _ensure(args):
    return ensure_synthetic_split(*args)


def test_lazy_generation_is_race_free(tmp_path):
    args = (str(tmp_path), "val", 5, 1, 64)
    ctx = mp.get_context("fork")  # two real processes; fork avoids re-importing torch
    with ctx.Pool(2) as pool:
        outs = pool.map(_ensure, [args, args])
    assert outs[0] == outs[1] and os.path.isfile(outs[0])
    # only the final split folder (plus the lock file) remains: no temporary folders
    assert sorted(os.listdir(tmp_path)) == [".val.lock", "val"]
    assert len(os.listdir(tmp_path / "val" / "images")) == 5


def test_builtin_synthetic_registration():
    for name in SYNTHETIC_SPLITS:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == SHAPE_CLASSES and meta.evaluator_type == "coco"
        assert len(meta.thing_colors) == len(SHAPE_CLASSES)
        assert meta.json_file.startswith(synthetic_root())
    assert "coco_2017_val" in DatasetCatalog.list()  # detectron2's own registration


def test_register_user_coco_folder(tmp_path):
    json_file = make_synthetic_coco(str(tmp_path), "u", 3, seed=0, image_size=64)
    spec = f"user_shapes_a={json_file}:{tmp_path / 'u' / 'images'}"
    name, j, d = parse_dataset_spec(spec)
    register_coco_folder(name, j, d)
    register_coco_folder(name, j, d)  # same files again: no error
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3 and all(os.path.isfile(r["file_name"]) for r in dicts)
    assert MetadataCatalog.get(name).thing_classes == SHAPE_CLASSES
    with pytest.raises(ValueError, match="already registered"):
        register_coco_folder(name, j, str(tmp_path))
    with pytest.raises(ValueError, match="NAME=JSON:IMAGE_DIR"):
        parse_dataset_spec("no_equals_sign")


def test_generator_without_objects_and_bad_arguments(tmp_path):
    """max_objects 0 gives images without objects (the docs' "0-6 shapes"); bad sizes are refused before
    any folder is made."""
    json_file = make_synthetic_coco(str(tmp_path), "empty", 4, seed=0, image_size=32, max_objects=0)
    d = json.load(open(json_file))
    assert len(d["images"]) == 4 and d["annotations"] == []
    for kwargs, message in [
        ({"image_size": 3}, "image_size must be >= 4"),
        ({"max_objects": -1}, "max_objects must be >= 0"),
        ({"num_images": -1}, "num_images must be >= 0"),
    ]:
        args = {"num_images": 1, **kwargs}
        with pytest.raises(ValueError, match=message):
            make_synthetic_coco(str(tmp_path), "bad", args.pop("num_images"), seed=0, **args)
    assert not (tmp_path / "bad").exists()
