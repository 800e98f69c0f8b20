"""Pre-flight validation of datasets: every problem found before the model is built, reported at once.

* :func:`validate_coco_json` checks one COCO instances file and its image folder (a ``stat`` per
  image, no decoding) and returns a list of :class:`DataProblem`. Every field that Detectron2 /
  pycocotools read is checked first (:data:`_FIELDS`: present, integer ids, positive sizes, unique
  ids), so a bad file is reported, never a ``KeyError`` / ``AssertionError`` from the loader.
* :func:`validate_datasets` runs the right validator for each registered dataset: COCO-style when its
  metadata has ``json_file`` / ``image_root``, otherwise the validator registered for its
  ``evaluator_type`` with :func:`register_validator` (``ddetr_video`` registers ``"mot"``).
* :func:`check_datasets` is what the training scripts call: it logs warnings and raises one
  :class:`DatasetValidationError` (a ``UserError``: one line per problem, up to a limit, with counts).

A box is invalid when it is not 4 finite numbers, has width or height <= 0, or reaches more than
:data:`BOX_TOLERANCE` pixels outside its image. ``cfg.DATASETS.INVALID_BOXES`` chooses what happens
to invalid boxes: ``"error"`` (default) stops before training; ``"drop"`` turns them into warnings
and :func:`drop_invalid_boxes` removes them when the dataset is loaded (counted and logged). They are
never passed on: Detectron2's box transforms would turn ``[47, 13, -20, 42]`` into a valid 20x42 box.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from typing import Callable, Dict, List, NamedTuple

from ..errors import UserError

__all__ = [
    "BOX_TOLERANCE",
    "DataProblem",
    "DatasetValidationError",
    "box_problem",
    "check_datasets",
    "coco_structure_problems",
    "drop_invalid_boxes",
    "format_problems",
    "raise_if_problems",
    "register_validator",
    "validate_coco_json",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

# pixels a box may reach past the image border (rounding in real annotations, e.g. COCO's)
BOX_TOLERANCE = 1.0
INVALID_BOX = "invalid box"


class DataProblem(NamedTuple):
    """One fault in a dataset. ``where``: file, file:line or file + image/annotation id;
    ``kind``: a short category used for counts (e.g. "missing image", "invalid box");
    ``severity``: "error" stops the run, "warning" is logged."""

    where: str
    kind: str
    message: str
    severity: str = "error"


class DatasetValidationError(UserError, ValueError):
    """A dataset has faults; ``problems`` holds all of them."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


def format_problems(problems, limit=50):
    """One line per problem (at most ``limit``), then the counts per kind."""
    problems = list(problems)
    lines = [f"{p.where}: {p.kind}: {p.message}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    counts = Counter(p.kind for p in problems)
    lines.append("counts: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


def raise_if_problems(problems, what, limit=50, hint=""):
    """Raise :class:`DatasetValidationError` listing the error-severity ``problems`` of ``what``."""
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DatasetValidationError(
            f"dataset {what}: {len(errors)} problem(s)\n"
            + format_problems(errors, limit)
            + (f"\n{hint}" if hint else ""),
            errors,
        )


def box_problem(box, width=None, height=None, tol=BOX_TOLERANCE):
    """Why an XYWH box is invalid (a short text), or None. ``width``/``height``: the image size."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4):
        return f"bbox={box!r} is not [x, y, w, h]"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return f"bbox={box!r} has non-numeric values"
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        return f"bbox={list(box)} has NaN/inf"
    if w <= 0 or h <= 0:
        return f"bbox={list(box)} has width/height <= 0"
    if width is not None and height is not None:
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            return f"bbox={list(box)} reaches outside the {width}x{height} image (by more than {tol:g} px)"
    return None


# (json path, mtime, size) -> problems of the json itself (not the images, not the class count): lets
# the loader skip a second parse of a big json that this process's pre-flight check has read already
_STRUCTURE_CACHE: Dict[tuple, List[DataProblem]] = {}


def _file_key(path):
    st = os.stat(path)
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def coco_structure_problems(json_file, image_root):
    """The problems of the json itself (``validate_coco_json`` without images / classes), cached per
    file version."""
    try:
        key = _file_key(json_file)
    except OSError:
        key = None
    if key is None or key not in _STRUCTURE_CACHE:
        return validate_coco_json(json_file, image_root, check_images=False)
    return list(_STRUCTURE_CACHE[key])


def _read_coco(json_file):
    """(data, []) or (None, the problems that stop reading it: unreadable, not COCO)."""
    if not os.path.isfile(json_file):
        return None, [DataProblem(json_file, "missing file", "COCO annotation file not found")]
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [DataProblem(json_file, "unreadable json", f"not valid json: {e}")]
    if not isinstance(data, dict) or any(k not in data for k in _FIELDS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        return None, [
            DataProblem(
                json_file, "not COCO", f"needs top-level keys images/annotations/categories, has {keys}"
            )
        ]
    problems = [p for section in _FIELDS for p in _section_problems(json_file, data, section)]
    return (None, problems) if problems else (data, [])


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value):
    """A positive whole number; ``480.0`` too (some exporters write floats; Detectron2 compares sizes
    with ``==``, where 480.0 equals 480)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and value > 0 and float(value).is_integer()


def _is_text(value):
    return isinstance(value, str) and value != ""


def _json_type(value):
    """The json name of a value's type (object, array, string, ...)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


# section -> field -> (check, what the value must be); "bbox" values are checked by box_problem
_FIELDS = {
    "images": {
        "id": (_is_id, "an integer"),
        "file_name": (_is_text, "a non-empty string"),
        "height": (_is_size, "a positive whole number"),
        "width": (_is_size, "a positive whole number"),
    },
    "annotations": {
        "id": (_is_id, "an integer"),
        "image_id": (_is_id, "an integer"),
        "category_id": (_is_id, "an integer"),
        "bbox": (lambda value: True, ""),
    },
    "categories": {"id": (_is_id, "an integer"), "name": (_is_text, "a non-empty string")},
}


def _section_problems(json_file, data, section):
    """A top-level section that is not a list of objects (one problem, naming its first bad entry)."""
    entries = data[section]
    if not isinstance(entries, list):
        msg = f"'{section}' must be an array of objects, got {_json_type(entries)}"
        return [DataProblem(json_file, "not COCO", msg)]
    bad = [i for i, entry in enumerate(entries) if not isinstance(entry, dict)]
    if not bad:
        return []
    msg = f"'{section}' must be an array of objects, {section}[{bad[0]}] is {_json_type(entries[bad[0]])}"
    msg += f" ({len(bad)} such entries)" if len(bad) > 1 else ""
    return [DataProblem(f"{json_file}: {section}[{bad[0]}]", "not COCO", msg)]


def _entry_where(json_file, section, index, entry):
    """``file: section[index]``, with the entry's id when it has a valid one."""
    return f"{json_file}: {section}[{index}]" + (f" (id={entry['id']})" if _is_id(entry.get("id")) else "")


def _entry_field_problems(where, entry, fields):
    problems = []
    for field, (check, must_be) in fields.items():
        if field not in entry:
            problems.append(DataProblem(where, "missing field", f"no '{field}' field"))
        elif not check(entry[field]):
            problems.append(DataProblem(where, "bad field", f"'{field}'={entry[field]!r} is not {must_be}"))
    return problems


def _field_problems(json_file, data):
    """Missing / ill-typed required fields and duplicate ids of images, annotations and categories."""
    problems = []
    for section, fields in _FIELDS.items():
        first = {}  # id -> index of its first entry
        for i, entry in enumerate(data[section]):
            where = _entry_where(json_file, section, i, entry)
            problems += _entry_field_problems(where, entry, fields)
            entry_id = entry.get("id")
            if _is_id(entry_id) and entry_id in first:
                msg = f"id={entry_id} is also the id of {section}[{first[entry_id]}]"
                problems.append(DataProblem(where, "duplicate id", msg))
            elif _is_id(entry_id):
                first[entry_id] = i
    return problems


def _image_problems(json_file, data, image_root):
    problems = []
    for im in data["images"]:
        if not _is_text(im.get("file_name")):
            continue  # a field problem (_field_problems)
        path = os.path.join(image_root, im["file_name"])
        try:
            size = os.stat(path).st_size
        except OSError:
            problems.append(DataProblem(f"{json_file}: image id={im.get('id')}", "missing image", path))
            continue
        if size == 0:
            problems.append(DataProblem(f"{json_file}: image id={im.get('id')}", "empty image", path))
    return problems


def _category_ids(data):
    return {c["id"] for c in data["categories"] if _is_id(c.get("id"))}


def _image_size(im):
    """(width, height) of an image entry, (None, None) unless both are valid (a field problem)."""
    if _is_size(im.get("width")) and _is_size(im.get("height")):
        return im["width"], im["height"]
    return None, None


def _annotation_problems(json_file, data):
    """Annotations of unknown images or categories, invalid boxes (fields missing or of the wrong type
    are left to :func:`_field_problems`)."""
    problems = []
    cat_ids = _category_ids(data)
    images = {im["id"]: im for im in data["images"] if _is_id(im.get("id"))}
    for ann in data["annotations"]:
        if not _is_id(ann.get("image_id")):
            continue
        where = f"{json_file}: annotation id={ann.get('id', '?')}"
        im = images.get(ann["image_id"])
        if im is None:
            problems.append(
                DataProblem(where, "unknown image", f"image_id={ann.get('image_id')} is not in 'images'")
            )
            continue
        where += f" (image id={im.get('id')} {im.get('file_name')})"
        if _is_id(ann.get("category_id")) and ann["category_id"] not in cat_ids:
            problems.append(
                DataProblem(
                    where,
                    "unknown category",
                    f"category_id={ann.get('category_id')} is not one of {sorted(cat_ids, key=str)}",
                )
            )
        why = box_problem(ann["bbox"], *_image_size(im)) if "bbox" in ann else None
        if why:
            problems.append(DataProblem(where, INVALID_BOX, why))
    return problems


def validate_coco_json(json_file, image_root, num_classes=None, is_train=False, check_images=True):
    """
    All problems of a COCO instances file ``json_file`` with images under ``image_root``: an
    unreadable file or sections that are not arrays of objects (nothing else is checked then), missing
    or ill-typed fields and duplicate ids (:data:`_FIELDS`), image files that are missing or empty
    (``os.stat``; with ``check_images``), invalid boxes (:func:`box_problem`), category ids not in
    ``categories``, annotations of image ids that do not exist; with ``is_train``, no annotations at
    all; with ``num_classes``, a head smaller than the categories (error) or larger (warning).
    """
    data, fatal = _read_coco(json_file)
    if fatal:
        return fatal
    structure = _field_problems(json_file, data) + _annotation_problems(json_file, data)
    try:
        _STRUCTURE_CACHE[_file_key(json_file)] = list(structure)
    except OSError:
        pass
    problems = (_image_problems(json_file, data, image_root) if check_images else []) + structure
    if is_train and not data["annotations"]:
        problems.append(
            DataProblem(json_file, "no annotations", "a training set without a single annotation")
        )
    if num_classes is not None:
        num_categories = len(_category_ids(data))
        problems += _class_count_problems(json_file, num_categories, num_classes)
    return problems


def _class_count_problems(where, num_categories, num_classes):
    if num_classes < num_categories:
        return [
            DataProblem(
                where,
                "too few classes",
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES={num_classes} but the dataset has {num_categories} "
                f"categories; set MODEL.DEFORMABLE_DETR.NUM_CLASSES {num_categories}",
            )
        ]
    if num_classes > num_categories:
        return [
            DataProblem(
                where,
                "more classes",
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES={num_classes} > the dataset's {num_categories} "
                "categories: allowed (e.g. a 91-class COCO head), the extra classes are never trained",
                "warning",
            )
        ]
    return []


# evaluator_type -> fn(dataset_name, cfg) -> list[DataProblem]
_VALIDATORS: Dict[str, Callable] = {}


def register_validator(evaluator_type, fn):
    """Validate datasets whose metadata has ``evaluator_type`` (and no ``json_file``) with
    ``fn(dataset_name, cfg) -> list[DataProblem]``."""
    _VALIDATORS[evaluator_type] = fn
    return fn


def validate_datasets(cfg, names, is_train=False) -> List[DataProblem]:
    """Problems of the registered datasets ``names`` (training sets: ``is_train=True``). Lazily
    generated datasets (metadata ``prepare``, e.g. the synthetic shapes) are generated first."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    problems = []
    for name in names:
        if name not in DatasetCatalog.list():
            problems.append(
                DataProblem(
                    f"dataset '{name}'",
                    "unknown dataset",
                    "not registered (register it, e.g. with --dataset NAME=JSON:IMAGE_DIR)",
                )
            )
            continue
        meta = MetadataCatalog.get(name)
        prepare = getattr(meta, "prepare", None)
        if callable(prepare):
            prepare()
        json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
        evaluator_type = getattr(meta, "evaluator_type", None)
        if json_file and image_root:
            problems += validate_coco_json(
                json_file, image_root, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, is_train=is_train
            )
        elif evaluator_type in _VALIDATORS:
            problems += list(_VALIDATORS[evaluator_type](name, cfg))
        else:
            logger.info(f"No pre-flight validation for dataset '{name}' (evaluator_type={evaluator_type!r})")
    if str(cfg.DATASETS.INVALID_BOXES) == "drop":
        problems = [p._replace(severity="warning") if p.kind == INVALID_BOX else p for p in problems]
    return problems


def check_datasets(cfg, eval_only=False, limit=50):
    """Validate ``DATASETS.TEST`` (and ``DATASETS.TRAIN`` unless ``eval_only``); log warnings, raise
    :class:`DatasetValidationError` for errors."""
    mode = str(cfg.DATASETS.INVALID_BOXES)
    if mode not in ("error", "drop"):
        raise DatasetValidationError(f"DATASETS.INVALID_BOXES must be 'error' or 'drop', got {mode!r}")
    train = [] if eval_only else list(cfg.DATASETS.TRAIN)
    test = [n for n in cfg.DATASETS.TEST if n not in train]
    problems = validate_datasets(cfg, train, is_train=True) + validate_datasets(cfg, test)
    warnings = [p for p in problems if p.severity != "error"]
    if warnings:
        logger.warning("Dataset warnings:\n" + format_problems(warnings, limit))
    names = ", ".join(train + test)
    hint = ""
    if any(p.kind == INVALID_BOX and p.severity == "error" for p in problems):
        hint = "fix the boxes, or set DATASETS.INVALID_BOXES drop to skip invalid boxes (counted, logged)"
    raise_if_problems(problems, names, limit, hint)
    return problems


def drop_invalid_boxes(dataset_dicts):
    """Remove the annotations with an invalid box (XYWH_ABS, see :func:`box_problem`) from Detectron2
    dataset dicts in place. Returns the number removed."""
    dropped = 0
    for d in dataset_dicts:
        anns = d.get("annotations")
        if not anns:
            continue
        keep = [a for a in anns if box_problem(a.get("bbox"), d.get("width"), d.get("height")) is None]
        dropped += len(anns) - len(keep)
        d["annotations"] = keep
    return dropped
