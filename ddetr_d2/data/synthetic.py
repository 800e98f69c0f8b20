"""A synthetic COCO-format detection dataset of coloured shapes (no downloads needed).

Each image has a random background (noise, gradient or texture), non-object clutter
(lines, dots) and 0-6 filled shapes from :data:`SHAPE_CLASSES`, sized from tiny to large,
possibly overlapping a little and possibly cut by the image border. The class is the shape;
colours are random, so a detector has to learn geometry. Everything is drawn with OpenCV
from one ``numpy.random.RandomState(seed)``: the same arguments give byte-identical
images and json.
"""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np

__all__ = ["SHAPE_CLASSES", "SHAPE_COLORS", "make_synthetic_coco", "render_image"]

SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross", "ellipse"]
# visualisation colours (RGB), one per class
SHAPE_COLORS = [[220, 20, 60], [0, 130, 200], [60, 180, 75], [255, 225, 25], [145, 30, 180], [245, 130, 48]]

FORMAT_VERSION = 1


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float, rs: np.random.RandomState):
    """Vertices (K, 2) float of a shape whose unrotated extent is about ``size`` pixels."""
    r = size / 2.0
    if kind == "square":
        pts = np.array([[-r, -r], [r, -r], [r, r], [-r, r]])
    elif kind == "triangle":
        t = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif kind == "star":
        t = np.deg2rad(np.arange(10) * 36.0 - 90)
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    elif kind == "cross":
        a = r * 0.32
        pts = np.array(
            [
                [-a, -r],
                [a, -r],
                [a, -a],
                [r, -a],
                [r, a],
                [a, a],
                [a, r],
                [-a, r],
                [-a, a],
                [-r, a],
                [-r, -a],
                [-a, -a],
            ]
        )
    elif kind == "ellipse":
        ratio = rs.uniform(0.35, 0.6)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r * ratio], 1)
    elif kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r], 1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _background(h: int, w: int, rs: np.random.RandomState) -> np.ndarray:
    """(h, w, 3) uint8 RGB background: noise, gradient or texture, plus mild noise."""
    kind = rs.randint(3)
    base = rs.uniform(0, 255, size=3)
    if kind == 0:  # smooth coloured noise
        small = rs.uniform(-60, 60, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) + base
    elif kind == 1:  # linear gradient between two colours
        other = rs.uniform(0, 255, size=3)
        theta = rs.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = base * (1 - t[..., None]) + other * t[..., None]
    else:  # stripes / checker texture
        period = rs.uniform(6, 30)
        theta = rs.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        pattern = np.sin(2 * np.pi * u / period)
        if rs.rand() < 0.5:
            v = -xx * math.sin(theta) + yy * math.cos(theta)
            pattern = pattern * np.sin(2 * np.pi * v / period)
        img = base + pattern[..., None] * rs.uniform(15, 45)
    img = img + rs.normal(0, rs.uniform(2, 12), size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _clutter(img: np.ndarray, rs: np.random.RandomState) -> None:
    """Draw non-object distractors (thin lines, small dots) in place."""
    h, w = img.shape[:2]
    for _ in range(rs.randint(0, 6)):
        color = tuple(int(c) for c in rs.randint(0, 256, size=3))
        p1 = (int(rs.randint(0, w)), int(rs.randint(0, h)))
        p2 = (int(rs.randint(0, w)), int(rs.randint(0, h)))
        cv2.line(img, p1, p2, color, int(rs.randint(1, 3)), lineType=cv2.LINE_AA)
    for _ in range(rs.randint(0, 8)):
        color = tuple(int(c) for c in rs.randint(0, 256, size=3))
        cv2.circle(img, (int(rs.randint(0, w)), int(rs.randint(0, h))), int(rs.randint(1, 3)), color, -1)


def _object_color(img: np.ndarray, mask: np.ndarray, rs: np.random.RandomState) -> tuple:
    """A random colour that differs clearly from the background under ``mask``."""
    bg = img[mask > 0].reshape(-1, 3).mean(0) if mask.any() else np.full(3, 128.0)
    best, best_d = None, -1.0
    for _ in range(8):
        c = rs.randint(0, 256, size=3).astype(np.float64)
        d = float(np.abs(c - bg).sum())
        if d > best_d:
            best, best_d = c, d
        if d > 180:
            break
    return tuple(int(v) for v in best)


def _sample_size(short_side: int, rs: np.random.RandomState) -> float:
    """Object extent in pixels: 15% tiny/small (8-28 px), 85% medium/large (32 px to 65% of the image)."""
    if rs.rand() < 0.15:
        return float(np.exp(rs.uniform(np.log(8), np.log(28))))
    return float(np.exp(rs.uniform(np.log(32), np.log(max(0.65 * short_side, 33)))))


MIN_IMAGE_SIZE = 4  # the smallest longest side make_synthetic_coco draws (sides vary in [0.75, 1]x)


def render_image(rs: np.random.RandomState, width: int, height: int, max_objects: int = 6):
    """Draw one image.

    Returns:
        image (H, W, 3) uint8 RGB and a list of (class_index, [x, y, w, h], area) with
        tight XYWH boxes of the visible pixels (area = pixel count of the shape mask).
    """
    img = _background(height, width, rs)
    _clutter(img, rs)
    at_least = min(1, max_objects)  # max_objects 0: images without objects
    n = rs.randint(0, max_objects + 1) if rs.rand() < 0.03 else rs.randint(at_least, max_objects + 1)
    occupied = np.zeros((height, width), np.uint8)
    objects = []
    for _ in range(n):
        for _attempt in range(10):
            cls = int(rs.randint(len(SHAPE_CLASSES)))
            size = _sample_size(min(height, width), rs)
            # up to ~20% of a shape may be cut by the image border
            cx = rs.uniform(0.3 * size, max(width - 0.3 * size, 0.3 * size + 1))
            cy = rs.uniform(0.3 * size, max(height - 0.3 * size, 0.3 * size + 1))
            max_rot = {"square": 0.3, "cross": 0.3, "circle": 0.0}.get(SHAPE_CLASSES[cls], np.pi)
            angle = rs.uniform(-max_rot, max_rot)
            poly = _polygon(SHAPE_CLASSES[cls], cx, cy, size, angle, rs)
            mask = np.zeros((height, width), np.uint8)
            cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            area = int(mask.sum())
            if area < 30:
                continue
            inter = int((mask & occupied).sum())
            # mild overlaps only: each shape stays recognisable
            if inter > 0.25 * area:
                continue
            color = _object_color(img, mask, rs)
            cv2.fillPoly(img, [np.round(poly * 16).astype(np.int32)], color, lineType=cv2.LINE_AA, shift=4)
            if rs.rand() < 0.3:  # darker outline on some shapes
                outline = tuple(int(c * 0.5) for c in color)
                cv2.polylines(img, [np.round(poly * 16).astype(np.int32)], True, outline, 1, cv2.LINE_AA, 4)
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            objects.append((cls, [x0, y0, x1 - x0, y1 - y0], area))
            occupied |= mask
            break
    return img, objects


def make_synthetic_coco(
    root: str,
    split: str,
    num_images: int,
    seed: int,
    image_size: int = 256,
    max_objects: int = 6,
    image_format: str = "png",
) -> str:
    """Write ``root/split/images/*.{png,jpg}`` and ``root/split/annotations.json`` (COCO format).

    Image sides are drawn from [0.75, 1] x ``image_size``. Deterministic given the arguments.

    Returns:
        the path of the json file.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    rs = np.random.RandomState(seed)
    split_dir = os.path.join(root, split)
    img_dir = os.path.join(split_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        w = int(rs.randint(int(0.75 * image_size), image_size + 1))
        h = int(rs.randint(int(0.75 * image_size), image_size + 1))
        img, objects = render_image(rs, w, h, max_objects)
        file_name = f"{i:06d}.{image_format}"
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if image_format == "png" else [cv2.IMWRITE_JPEG_QUALITY, 92]
        if not cv2.imwrite(os.path.join(img_dir, file_name), img[:, :, ::-1], params):
            raise OSError(f"could not write {os.path.join(img_dir, file_name)}")
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for cls, box, area in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    data = {
        "info": {
            "description": "ddetr-d2 synthetic shapes",
            "version": FORMAT_VERSION,
            "split": split,
            "seed": seed,
            "image_size": image_size,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPE_CLASSES)
        ],
    }
    json_file = os.path.join(split_dir, "annotations.json")
    tmp = json_file + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, json_file)
    return json_file
