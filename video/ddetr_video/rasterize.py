"""Per-pixel shape rasteriser for the synthetic video generator: a Numba kernel and a NumPy reference.

``render_objects(image, slot, boxes, shapes, colours)`` draws K objects in the given order (far to near, later
ones cover earlier ones) and returns each object's full pixel extent and pixel count inside the image.
A pixel (px, py) belongs to a shape when its centre (px + 0.5, py + 0.5) lies inside:

* 0 square:   the box ``[x, x + w) x [y, y + h)``;
* 1 circle:   the ellipse inscribed in the box;
* 2 triangle: apex at the top centre, base on the bottom edge.

Why Numba here: the NumPy path builds several temporary arrays per object (coordinate grids, masks,
fancy-index writes); the kernel visits each pixel of each box once. Measured figures are in
docs/tracking_data.md.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import numpy as np

# numba is in requirements.txt; it is imported (and the kernel compiled or loaded from the on-disk cache) on
# first use only, and the NumPy path keeps everything working without it.
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None
HAVE_NUMBA = _HAVE_NUMBA

__all__ = ["render_objects", "render_objects_numpy", "HAVE_NUMBA"]


def _pixel_range(x0: float, w: float, size: int):
    lo = max(int(math.floor(x0 - 0.5)), 0)
    hi = min(int(math.ceil(x0 + w - 0.5)) + 1, size)
    return lo, hi


def render_objects_numpy(image, slot, boxes, shapes, colours):
    """NumPy reference. image (H, W, 3) uint8 and slot (H, W) int32 are written in place (slot = index k).

    boxes: (K, 4) float64 XYWH; shapes: (K,) int; colours: (K, 3) uint8.
    Returns extents (K, 4) int64 inclusive pixel ``x0, y0, x1, y1`` (-1 if no pixel) and areas (K,) int64.
    """
    H, W = slot.shape
    K = boxes.shape[0]
    extents = np.full((K, 4), -1, dtype=np.int64)
    areas = np.zeros(K, dtype=np.int64)
    for k in range(K):
        x0, y0, w, h = (float(v) for v in boxes[k])
        ix0, ix1 = _pixel_range(x0, w, W)
        iy0, iy1 = _pixel_range(y0, h, H)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        cx = np.arange(ix0, ix1, dtype=np.float64)[None, :] + 0.5
        cy = np.arange(iy0, iy1, dtype=np.float64)[:, None] + 0.5
        s = int(shapes[k])
        if s == 0:
            m = (cx >= x0) & (cx < x0 + w) & (cy >= y0) & (cy < y0 + h)
        elif s == 1:
            m = ((cx - (x0 + w / 2)) / (w / 2)) ** 2 + ((cy - (y0 + h / 2)) / (h / 2)) ** 2 <= 1.0
        else:
            m = (cy >= y0) & (cy < y0 + h) & (np.abs(cx - (x0 + w / 2)) <= (cy - y0) / h * (w / 2))
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        areas[k] = ys.size
        extents[k] = (ix0 + xs.min(), iy0 + ys.min(), ix0 + xs.max(), iy0 + ys.max())
        sub_slot = slot[iy0:iy1, ix0:ix1]
        sub_img = image[iy0:iy1, ix0:ix1]
        sub_slot[m] = k
        sub_img[m] = colours[k]
    return extents, areas


def _render_kernel_py(image, slot, boxes, shapes, colours, extents, areas):  # pragma: no cover - compiled
    H, W = slot.shape
    for k in range(boxes.shape[0]):
        x0 = boxes[k, 0]
        y0 = boxes[k, 1]
        w = boxes[k, 2]
        h = boxes[k, 3]
        ix0 = max(int(math.floor(x0 - 0.5)), 0)
        ix1 = min(int(math.ceil(x0 + w - 0.5)) + 1, W)
        iy0 = max(int(math.floor(y0 - 0.5)), 0)
        iy1 = min(int(math.ceil(y0 + h - 0.5)) + 1, H)
        s = shapes[k]
        xc = x0 + w / 2
        yc = y0 + h / 2
        for py in range(iy0, iy1):
            cy = py + 0.5
            for px in range(ix0, ix1):
                cx = px + 0.5
                if s == 0:
                    inside = cx >= x0 and cx < x0 + w and cy >= y0 and cy < y0 + h
                elif s == 1:
                    dx = (cx - xc) / (w / 2)
                    dy = (cy - yc) / (h / 2)
                    inside = dx * dx + dy * dy <= 1.0
                else:
                    inside = cy >= y0 and cy < y0 + h and abs(cx - xc) <= (cy - y0) / h * (w / 2)
                if inside:
                    slot[py, px] = k
                    image[py, px, 0] = colours[k, 0]
                    image[py, px, 1] = colours[k, 1]
                    image[py, px, 2] = colours[k, 2]
                    if areas[k] == 0:
                        extents[k, 0] = px
                        extents[k, 1] = py
                        extents[k, 2] = px
                        extents[k, 3] = py
                    else:
                        extents[k, 0] = min(extents[k, 0], px)
                        extents[k, 2] = max(extents[k, 2], px)
                        extents[k, 3] = py
                    areas[k] += 1


@functools.cache
def _compiled_kernel():
    import numba

    return numba.njit(cache=True, nogil=True)(_render_kernel_py)


def render_objects(image, slot, boxes, shapes, colours, backend: str = "auto"):
    """Dispatch to the Numba kernel ("numba", default when available) or the NumPy reference ("numpy")."""
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
    boxes = np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)
    shapes = np.ascontiguousarray(shapes, dtype=np.int64).reshape(-1)
    colours = np.ascontiguousarray(colours, dtype=np.uint8).reshape(-1, 3)
    if boxes.shape[0] != shapes.shape[0] or boxes.shape[0] != colours.shape[0]:
        raise ValueError(f"boxes {boxes.shape}, shapes {shapes.shape}, colours {colours.shape} disagree on K")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != slot.shape or slot.dtype != np.int32:
        raise ValueError(
            f"need image (H, W, 3) uint8 and slot (H, W) int32, got {image.shape} {image.dtype}, "
            f"{slot.shape} {slot.dtype}"
        )
    if backend == "numpy" or (backend == "auto" and not _HAVE_NUMBA):
        return render_objects_numpy(image, slot, boxes, shapes, colours)
    if not _HAVE_NUMBA:
        raise RuntimeError("backend='numba' requested but numba is not importable")
    extents = np.full((boxes.shape[0], 4), -1, dtype=np.int64)
    areas = np.zeros(boxes.shape[0], dtype=np.int64)
    _compiled_kernel()(image, slot, boxes, shapes, colours, extents, areas)
    return extents, areas
