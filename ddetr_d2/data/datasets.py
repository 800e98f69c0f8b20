"""Dataset registration: the built-in synthetic shapes splits and user COCO folders.

* ``synthetic_shapes_train`` / ``synthetic_shapes_val`` / ``synthetic_shapes_tune`` are generated on first
  use into ``$DDETR_DATASETS/synthetic_shapes`` (or ``./datasets/synthetic_shapes``). Generation goes to a
  temporary folder that is renamed into place, under a file lock, so concurrent processes
  (DDP ranks, parallel test runs) never see a half-written split.
* :func:`register_coco_folder` registers any COCO-format json + image folder; its loader checks
  the json first and names the file / annotation at fault (the full pre-flight check, images
  included, is :func:`~ddetr_d2.data.validation.check_datasets`).
* ``coco_2017_*`` come from detectron2's own builtin registration (``$DETECTRON2_DATASETS``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..errors import ConfigError
from .synthetic import FORMAT_VERSION, SHAPE_CLASSES, SHAPE_COLORS, make_synthetic_coco
from .validation import INVALID_BOX, coco_structure_problems, drop_invalid_boxes, raise_if_problems

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
    # a held-out split for choosing settings (test size, thresholds) so that val is reported, not tuned on
    "synthetic_shapes_tune": ("tune", 200, 2),
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
    """Register ``synthetic_shapes_{train,val,tune}`` (lazy: generated when first loaded)."""
    for name, (split, num_images, seed) in SYNTHETIC_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        split_root = root or synthetic_root()

        def _load(split_root=split_root, split=split, num_images=num_images, seed=seed, name=name):
            json_file = ensure_synthetic_split(split_root, split, num_images, seed, SYNTHETIC_IMAGE_SIZE)
            return load_checked_coco_json(json_file, os.path.join(split_root, split, "images"), name)

        def _prepare(split_root=split_root, split=split, num_images=num_images, seed=seed):
            ensure_synthetic_split(split_root, split, num_images, seed, SYNTHETIC_IMAGE_SIZE)

        DatasetCatalog.register(name, _load)
        MetadataCatalog.get(name).set(
            prepare=_prepare,  # generation before the pre-flight validation (validation.py)
            thing_classes=list(SHAPE_CLASSES),
            thing_colors=[list(c) for c in SHAPE_COLORS],
            json_file=os.path.join(split_root, split, "annotations.json"),
            image_root=os.path.join(split_root, split, "images"),
            evaluator_type="coco",
        )


def load_checked_coco_json(json_file: str, image_root: str, dataset_name: str | None = None):
    """``load_coco_json`` after the json checks of :func:`~ddetr_d2.data.validation.validate_coco_json`
    (images are not stat-ed again; a json this process's pre-flight check has read is not parsed again):
    a structural fault raises ``DatasetValidationError`` naming it; invalid boxes (only present when
    ``DATASETS.INVALID_BOXES`` is "drop", since the pre-flight check stops on them otherwise) are
    removed, counted and logged, never handed to the box transforms."""
    problems = coco_structure_problems(json_file, image_root)
    raise_if_problems([p for p in problems if p.kind != INVALID_BOX], dataset_name or json_file)
    dicts = load_coco_json(json_file, image_root, dataset_name)
    dropped = drop_invalid_boxes(dicts)
    if dropped:
        logger.warning(
            f"{dataset_name or json_file}: {dropped} annotation(s) have zero area or lie outside their "
            "image (or are NaN/inf): dropped, not trained on (DATASETS.INVALID_BOXES)"
        )
    return dicts


def register_coco_folder(name: str, json_file: str, image_root: str, metadata: dict | None = None) -> None:
    """Register a user COCO dataset (like ``register_coco_instances``, with checked loading)."""
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name)
        if getattr(old, "json_file", None) == json_file and getattr(old, "image_root", None) == image_root:
            return
        raise ConfigError(f"dataset '{name}' is already registered with other files")
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {})
    )


def parse_dataset_spec(spec: str):
    """``"name=path/to/annotations.json:path/to/images"`` -> (name, json_file, image_root)."""
    if "=" not in spec or ":" not in spec.split("=", 1)[1]:
        raise ConfigError(f"--dataset expects NAME=JSON:IMAGE_DIR, got {spec!r}")
    name, rest = spec.split("=", 1)
    json_file, image_root = rest.rsplit(":", 1)
    if not name or not json_file or not image_root:
        raise ConfigError(f"--dataset expects NAME=JSON:IMAGE_DIR, got {spec!r}")
    return name, json_file, image_root
