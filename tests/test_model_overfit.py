"""The tiny model overfits two synthetic images (a red rectangle and blue ellipses) in a few dozen steps."""

import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou

from ddetr_d2.config import add_deformable_detr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_images(size=64, seed=0):
    """Two RGB images with shapes: class 0 = filled red rectangle, class 1 = filled blue ellipse."""
    rng = np.random.default_rng(seed)
    layouts = [[(8, 10, 30, 40, 0), (36, 30, 58, 56, 1)], [(20, 6, 52, 28, 1)]]
    out = []
    for layout in layouts:
        img = np.full((size, size, 3), 30, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        boxes, classes = [], []
        for x0, y0, x1, y1, c in layout:
            if c == 0:
                img[y0:y1, x0:x1] = (220, 40, 40)
            else:
                yy, xx = np.mgrid[y0:y1, x0:x1]
                cy, cx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2
                inside = ((yy - cy) / ((y1 - y0) / 2)) ** 2 + ((xx - cx) / ((x1 - x0) / 2)) ** 2 <= 1
                img[yy[inside], xx[inside]] = (40, 60, 230)
            boxes.append([x0, y0, x1, y1])
            classes.append(c)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        out.append({"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "instances": inst})
    return out


def train_on_synthetic(model, steps, check_losses=None):
    """
    ``steps`` AdamW steps (lr 1e-3, weight decay 1e-4, gradient norm clipped at 0.1) of ``model`` on the two
    :func:`synthetic_images`, its backbone frozen (speed: the random ResNet is a fixed feature extractor
    here); ``check_losses(loss_dict)`` runs on every step's losses. Returns the total loss of every step.
    """
    model.backbone.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    data = synthetic_images()
    history = []
    for _ in range(steps):
        losses = model(data)
        if check_losses is not None:
            check_losses(losses)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        history.append(loss.item())
    return history


def test_overfit_two_images():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "tiny_test.yaml"))
    cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = 2
    cfg.MODEL.DEFORMABLE_DETR.NUM_QUERIES = 10
    cfg.MODEL.DEFORMABLE_DETR.DROPOUT = 0.0
    torch.manual_seed(0)
    model = build_model(cfg)
    history = train_on_synthetic(model, 80)
    data = synthetic_images()
    assert np.isfinite(history).all()
    assert history[0] / np.mean(history[-5:]) >= 5.0, (history[0], history[-5:])

    model.eval()
    with torch.no_grad():
        results = model([{"image": d["image"]} for d in data])
    for d, r in zip(data, results):
        inst = r["instances"]
        gt = d["instances"]
        for j in range(len(gt)):
            keep = (inst.pred_classes == gt.gt_classes[j]) & (inst.scores > 0.3)
            assert keep.any(), f"no confident detection of class {int(gt.gt_classes[j])}"
            iou = pairwise_iou(gt.gt_boxes[j : j + 1], inst.pred_boxes[keep])
            assert iou.max() > 0.5, iou
