"""Dataset registration: the built-in synthetic shapes splits and user COCO folders.

* ``synthetic_shapes_train`` / ``synthetic_shapes_val`` are generated on first use into
  ``$DDETR_DATASETS/synthetic_shapes`` (or ``./datasets/synthetic_shapes``). Generation goes to a
  temporary folder that is renamed into place, under a file lock, so concurrent processes
  (DDP ranks, parallel test runs) never see a half-written split.
* :func:`register_coco_folder` registers any COCO-format json + image folder; its loader checks
  the json first and names the file / annotation at fault.
* ``coco_2017_*`` come from detectron2's own builtin registration (``$DETECTRON2_DATASETS``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .synthetic import FORMAT_VERSION, SHAPE_CLASSES, SHAPE_COLORS, make_synthetic_coco

__all__ = [
    "SYNTHETIC_SPLITS",
    "synthetic_root",
    "ensure_synthetic_split",
    "register_synthetic_shapes",
    "register_coco_folder",
    "parse_dataset_spec",
    "load_checked_coco_json",
]

logger = logging.getLogger(__name__)

# name -> (split folder, number of images, seed)
SYNTHETIC_SPLITS = {
    "synthetic_shapes_train": ("train", 3000, 0),
    "synthetic_shapes_val": ("val", 200, 1),
}
SYNTHETIC_IMAGE_SIZE = 160


def synthetic_root() -> str:
    """Cache folder of the synthetic splits (versioned so a changed generator regenerates)."""
    base = os.environ.get("DDETR_DATASETS")
    base = os.path.join(base, "synthetic_shapes") if base else os.path.join("datasets", "synthetic_shapes")
    return os.path.join(os.path.abspath(base), f"v{FORMAT_VERSION}-{SYNTHETIC_IMAGE_SIZE}px")


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_synthetic_split(root: str, split: str, num_images: int, seed: int, image_size: int) -> str:
    """Generate ``root/split`` unless it already exists; returns its json path. Safe across processes."""
    json_file = os.path.join(root, split, "annotations.json")
    if os.path.isfile(json_file):
        return json_file
    with _file_lock(os.path.join(root, f".{split}.lock")):
        if os.path.isfile(json_file):  # another process finished while we waited
            return json_file
        logger.info(f"Generating synthetic split '{split}' ({num_images} images) into {root} ...")
        tmp_root = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
        try:
            make_synthetic_coco(tmp_root, split, num_images, seed, image_size=image_size)
            final = os.path.join(root, split)
            if os.path.isdir(final):  # stale partial folder from an old, killed run (no json in it)
                shutil.rmtree(final)
            os.rename(os.path.join(tmp_root, split), final)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return json_file


def register_synthetic_shapes(root: str | None = None) -> None:
    """Register ``synthetic_shapes_{train,val}`` (lazy: generated when first loaded)."""
    for name, (split, num_images, seed) in SYNTHETIC_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        split_root = root or synthetic_root()

        def _load(split_root=split_root, split=split, num_images=num_images, seed=seed, name=name):
            json_file = ensure_synthetic_split(split_root, split, num_images, seed, SYNTHETIC_IMAGE_SIZE)
            return load_checked_coco_json(json_file, os.path.join(split_root, split, "images"), name)

        DatasetCatalog.register(name, _load)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            thing_colors=[list(c) for c in SHAPE_COLORS],
            json_file=os.path.join(split_root, split, "annotations.json"),
            image_root=os.path.join(split_root, split, "images"),
            evaluator_type="coco",
        )


def _check_coco_json(json_file: str, image_root: str) -> None:
    """Validate a COCO json before detectron2 parses it; raise ValueError naming the fault."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file} is not valid json: {e}") from e
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_file}: missing top-level key '{key}' (not a COCO instances file?)")
    cat_ids = {c["id"] for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    n_degenerate = 0
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        im = images.get(ann.get("image_id"))
        if im is None:
            raise ValueError(
                f"{json_file}: annotation id={aid} refers to image_id={ann.get('image_id')} "
                "which is not in 'images'"
            )
        where = f"{json_file}: annotation id={aid} (image {os.path.join(image_root, im['file_name'])})"
        if ann.get("category_id") not in cat_ids:
            raise ValueError(
                f"{where} has category_id={ann.get('category_id')}, which is not one of the "
                f"dataset's categories {sorted(cat_ids)}"
            )
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4):
            raise ValueError(f"{where} has bbox={box!r}; expected [x, y, w, h]")
        x, y, w, h = box
        W, H = im.get("width", float("inf")), im.get("height", float("inf"))
        if w <= 0 or h <= 0 or x >= W or y >= H or x + w <= 0 or y + h <= 0:
            n_degenerate += 1
    if n_degenerate:
        logger.warning(
            f"{json_file}: {n_degenerate} annotation(s) have zero area or lie outside their image; "
            "they are clipped to the image and dropped if empty (as detectron2 does)"
        )


def load_checked_coco_json(json_file: str, image_root: str, dataset_name: str | None = None):
    """``load_coco_json`` after :func:`_check_coco_json`."""
    _check_coco_json(json_file, image_root)
    return load_coco_json(json_file, image_root, dataset_name)


def register_coco_folder(name: str, json_file: str, image_root: str, metadata: dict | None = None) -> None:
    """Register a user COCO dataset (like ``register_coco_instances``, with checked loading)."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name)
        if getattr(old, "json_file", None) == json_file and getattr(old, "image_root", None) == image_root:
            return
        raise ValueError(f"dataset '{name}' is already registered with other files")
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {})
    )


def parse_dataset_spec(spec: str):
    """``"name=path/to/annotations.json:path/to/images"`` -> (name, json_file, image_root)."""
    if "=" not in spec or ":" not in spec.split("=", 1)[1]:
        raise ValueError(f"--dataset expects NAME=JSON:IMAGE_DIR, got {spec!r}")
    name, rest = spec.split("=", 1)
    json_file, image_root = rest.rsplit(":", 1)
    if not name or not json_file or not image_root:
        raise ValueError(f"--dataset expects NAME=JSON:IMAGE_DIR, got {spec!r}")
    return name, json_file, image_root
