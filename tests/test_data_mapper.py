"""DetrDatasetMapper: augmentation geometry against pixels, test resize, and bad-data handling."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, pairwise_iou

from ddetr_d2.data import (
    DetrDatasetMapper,
    add_dataset_mapper_config,
    build_detr_augmentations,
    register_coco_folder,
)


def _cfg(**input_overrides):
    cfg = get_cfg()
    add_dataset_mapper_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 112, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = (48, 96)
    for k, v in input_overrides.items():
        setattr(cfg.INPUT, k, v)
    return cfg


def _rect_image(path, h, w, rects):
    """Black image with white filled rectangles rects=[(x0,y0,x1,y1)] (pixel-exact, exclusive end)."""
    img = np.zeros((h, w, 3), np.uint8)
    for x0, y0, x1, y1 in rects:
        img[y0:y1, x0:x1] = 255
    cv2.imwrite(str(path), img)


def test_augmented_boxes_follow_the_pixels(tmp_path):
    """After flip / resize / crop, each gt box equals the bbox of its bright pixels (independent check)."""
    rng = np.random.RandomState(0)
    mapper = DetrDatasetMapper(_cfg(), is_train=True)
    np.random.seed(1)
    n_checked = 0
    for i in range(40):
        h, w = int(rng.randint(90, 140)), int(rng.randint(90, 140))
        x0, y0 = int(rng.randint(0, w - 40)), int(rng.randint(0, h - 40))
        x1, y1 = x0 + int(rng.randint(15, 40)), y0 + int(rng.randint(15, 40))
        path = tmp_path / f"{i}.png"
        _rect_image(path, h, w, [(x0, y0, x1, y1)])
        d = {
            "file_name": str(path),
            "height": h,
            "width": w,
            "image_id": i,
            "annotations": [
                {
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": 3,
                    "iscrowd": 0,
                }
            ],
        }
        out = mapper(d)
        img = out["image"]
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        H, W = img.shape[1:]
        assert out["instances"].image_size == (H, W)
        ys, xs = np.nonzero(img[0].numpy() > 127)
        boxes = out["instances"].gt_boxes.tensor
        if len(xs) == 0:  # cropped away entirely -> box must be dropped
            assert len(boxes) == 0
            continue
        assert len(boxes) == 1 and out["instances"].gt_classes.tolist() == [3]
        ref = Boxes(torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32))
        # chained resizes shift edges by up to ~half a pixel per scale step (x up to ~2.7 here)
        assert torch.allclose(boxes, ref.tensor, atol=3.0), (boxes, ref)
        assert pairwise_iou(Boxes(boxes), ref).item() > 0.6
        n_checked += 1
    assert n_checked >= 20


def test_train_sizes_and_both_branches():
    cfg = _cfg()
    augs = build_detr_augmentations(cfg, is_train=True)
    assert "RandomCrop" in repr(augs[-1]) and "RandomFlip" in repr(augs[0])
    # pre-crop sizes default to the official (400, 500, 600) scaled by max(MIN_SIZE_TRAIN)/800
    assert "(64, 80, 96)" in repr(augs[-1])
    from detectron2.data import transforms as T

    aug = T.AugmentationList(augs)
    np.random.seed(0)
    shapes = set()
    for _ in range(60):
        inp = T.AugInput(np.zeros((120, 200, 3), np.uint8))
        aug(inp)
        h, w = inp.image.shape[:2]
        assert min(h, w) in (96, 112, 128) or max(h, w) == 160, (h, w)
        shapes.add((h, w))
    assert len(shapes) > 3  # crops give varied aspect ratios


def test_test_mapper_resizes_and_keeps_original_size(tmp_path):
    _rect_image(tmp_path / "a.png", 100, 300, [(10, 10, 30, 30)])
    out = DetrDatasetMapper(_cfg(), is_train=False)(
        {"file_name": str(tmp_path / "a.png"), "height": 100, "width": 300, "image_id": 0, "annotations": []}
    )
    assert tuple(out["image"].shape[1:]) == (53, 160)  # max-size bound wins over MIN_SIZE_TEST
    assert out["height"] == 100 and out["width"] == 300 and "instances" not in out


def test_crowd_dropped_and_empty_image_handled(tmp_path):
    _rect_image(tmp_path / "a.png", 100, 100, [(10, 10, 40, 40)])
    cfg = _cfg(RANDOM_FLIP="none")
    cfg.INPUT.CROP.ENABLED = False
    mapper = DetrDatasetMapper(cfg, is_train=True)
    base = {"file_name": str(tmp_path / "a.png"), "height": 100, "width": 100, "image_id": 0}
    crowd = {"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 1}
    out = mapper({**base, "annotations": [crowd]})
    assert len(out["instances"]) == 0
    out = mapper({**base, "annotations": []})
    assert len(out["instances"]) == 0 and out["instances"].gt_boxes.tensor.shape == (0, 4)


def test_zero_area_and_outside_boxes_are_dropped_and_counted(tmp_path, caplog):
    _rect_image(tmp_path / "a.png", 100, 100, [(10, 10, 40, 40)])
    cfg = _cfg(RANDOM_FLIP="none", MIN_SIZE_TRAIN=(100,), MAX_SIZE_TRAIN=1000)
    cfg.INPUT.CROP.ENABLED = False
    mapper = DetrDatasetMapper(cfg, is_train=True)
    anns = [
        {"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0},
        {"bbox": [50, 50, 0, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 0},
        {"bbox": [150, 20, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 0},
        {"bbox": [90, 90, 30, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 4, "iscrowd": 0},
    ]
    with caplog.at_level(logging.INFO, logger="ddetr_d2.data.dataset_mapper"):
        out = mapper({"file_name": str(tmp_path / "a.png"), "height": 100, "width": 100, "annotations": anns})
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 4]
    assert inst.gt_boxes.tensor.tolist() == [[10, 10, 40, 40], [90, 90, 100, 100]]  # clipped to the image
    assert mapper.num_removed == 2 and "dropped 2 of 4 boxes" in caplog.text


def test_missing_and_unreadable_images_name_the_file(tmp_path):
    mapper = DetrDatasetMapper(_cfg(), is_train=True)
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(OSError, match="nope.jpg"):
        mapper({"file_name": missing, "height": 10, "width": 10, "annotations": []})
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(OSError, match="broken.jpg"):
        mapper({"file_name": str(bad), "height": 10, "width": 10, "annotations": []})
    _rect_image(tmp_path / "ok.png", 50, 60, [])
    with pytest.raises(ValueError, match="ok.png"):  # size disagrees with the json
        mapper({"file_name": str(tmp_path / "ok.png"), "height": 99, "width": 60, "annotations": []})


def _write_coco(tmp_path, anns, cats=(1, 2)):
    _rect_image(tmp_path / "img.png", 50, 60, [])
    data = {
        "images": [
            {"id": 1, "file_name": "img.png", "width": 60, "height": 50},
            {"id": 2, "file_name": "img.png", "width": 60, "height": 50},
        ],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in cats],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_unknown_category_names_file_and_annotation(tmp_path):
    j = _write_coco(
        tmp_path,
        [{"id": 17, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 9, "iscrowd": 0, "area": 25}],
    )
    register_coco_folder("bad_cat_ds", j, str(tmp_path))
    with pytest.raises(ValueError, match=r"ann\.json: annotation id=17 .*img\.png.* category_id=9"):
        DatasetCatalog.get("bad_cat_ds")


def test_degenerate_boxes_are_logged_at_load_and_empty_images_kept(tmp_path, caplog):
    anns = [
        {"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1, "iscrowd": 0, "area": 25},
        {"id": 2, "image_id": 1, "bbox": [3, 3, 0, 5], "category_id": 2, "iscrowd": 0, "area": 0},
        {"id": 3, "image_id": 1, "bbox": [70, 3, 5, 5], "category_id": 2, "iscrowd": 0, "area": 25},
    ]
    j = _write_coco(tmp_path, anns)
    register_coco_folder("degenerate_ds", j, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ddetr_d2.data.datasets"):
        dicts = DatasetCatalog.get("degenerate_ds")
    assert "2 annotation(s) have zero area or lie outside" in caplog.text
    assert len(dicts) == 2 and len(dicts[1].get("annotations", [])) == 0  # image without annotations kept
    cfg = _cfg(RANDOM_FLIP="none", MIN_SIZE_TRAIN=(50,), MAX_SIZE_TRAIN=1000)
    cfg.INPUT.CROP.ENABLED = False
    mapper = DetrDatasetMapper(cfg, is_train=True)
    assert mapper(dicts[0])["instances"].gt_classes.tolist() == [0]
    assert len(mapper(dicts[1])["instances"]) == 0
    assert os.path.basename(dicts[0]["file_name"]) == "img.png"
