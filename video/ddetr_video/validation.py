"""Pre-flight check of MOTChallenge-layout datasets (``evaluator_type="mot"``), before the first iteration.

:func:`validate_mot_dataset` reads every sequence of a registered MOT dataset (metadata ``mot_root``,
``mot_split``, ``mot_format`` from :mod:`ddetr_video.datasets`) and returns **all** the problems it finds as
``ddetr_d2.data.validation.DataProblem`` s, each naming its file (and line):

* ``seqinfo.ini`` missing (a folder with ``img1/`` or ``gt/`` but no seqinfo.ini) or unreadable,
  ``gt/gt.txt`` missing;
* frame images missing or empty (``os.stat`` of ``<imDir>/<frame:06d><imExt>`` for frames 1..seqLength), or
  image files past seqLength;
* every gt row the loader would refuse, found by the loader's own parser
  (:func:`ddetr_video.mot_format.read_mot_file`, one problem per row: wrong column count, not a number,
  NaN/inf, frame outside 1..seqLength, id < 1, duplicate (frame, id), class ids the format does not know,
  consider flag other than 0/1, visibility outside [0, 1], negative w/h), so pre-flight and loader agree;
* besides, gt boxes with ``w``/``h`` = 0 or entirely outside the image (MOT boxes may reach past the border:
  pedestrians walk out of the frame);
* a training set without any target annotation;
* more target classes than ``MODEL.DEFORMABLE_DETR.NUM_CLASSES``.

Registered for ``evaluator_type="mot"`` with ``ddetr_d2.data.validation.register_validator`` on import.
"""

from __future__ import annotations

import os
from typing import List

import numpy as np

from ddetr_d2.data.validation import INVALID_BOX, DataProblem, register_validator

from .mot_format import (
    CLASS,
    CONF,
    MOTFormatError,
    X,
    get_format,
    image_path,
    list_sequences,
    read_mot_file,
    read_seqinfo,
)

__all__ = ["validate_mot_dataset", "validate_mot_split"]


def _stat_images(seq_dir, info) -> List[DataProblem]:
    problems = []
    for f in range(1, info.seq_length + 1):
        path = image_path(seq_dir, info, f)
        try:
            size = os.stat(path).st_size
        except OSError:
            problems.append(
                DataProblem(path, "missing image", f"frame {f} of {info.name} (seqLength {info.seq_length})")
            )
            continue
        if size == 0:
            problems.append(DataProblem(path, "empty image", f"frame {f} of {info.name} is a 0-byte file"))
    return problems


def _problem(e: MOTFormatError) -> DataProblem:
    """A loader error as a pre-flight problem (same place, same category)."""
    return DataProblem(e.where, INVALID_BOX if e.kind == "invalid box" else e.kind, e.reason)


def _extra_images(seq_dir, info) -> List[DataProblem]:
    """Image files past seqLength (the loader refuses a folder that does not hold exactly seqLength)."""
    im_dir = os.path.join(seq_dir, info.im_dir)
    if not os.path.isdir(im_dir):
        return []
    expected = {os.path.basename(image_path(seq_dir, info, f)) for f in range(1, info.seq_length + 1)}
    extra = sorted(n for n in os.listdir(im_dir) if n.endswith(info.im_ext) and n not in expected)
    if not extra:
        return []
    where = f"{info.path}:{info.key_lines['seqLength']}" if "seqLength" in info.key_lines else info.path
    more = "..." if len(extra) > 3 else ""
    return [
        DataProblem(
            where, "image count", f"seqLength={info.seq_length} but {im_dir} also holds {extra[:3]}{more}"
        )
    ]


def _box_problem(row, info) -> str | None:
    """Why a parsed gt box is unusable for training (w/h = 0, or entirely outside the image), or None."""
    x, y, w, h = (float(v) for v in row[X : X + 4])
    if w <= 0 or h <= 0:
        return f"box [x, y, w, h]={[x, y, w, h]} has w/h <= 0"
    if x + w <= 0 or y + h <= 0 or x >= info.width or y >= info.height:
        return f"box [x, y, w, h]={[x, y, w, h]} lies outside the {info.width}x{info.height} image"
    return None


def _gt_problems(gt_path, info, spec):
    """(problems, number of target rows) of one gt.txt, every row checked by the loader's parser."""
    errors: List[MOTFormatError] = []
    gt = read_mot_file(gt_path, "gt", spec, seq_length=info.seq_length, errors=errors)
    problems = [_problem(e) for e in errors]
    for row, lineno in zip(gt.data, gt.lines):
        why = _box_problem(row, info)
        if why is not None:
            problems.append(DataProblem(f"{gt_path}:{lineno}", INVALID_BOX, why))
    is_target = np.isin(gt.data[:, CLASS], spec.eval_classes) & (gt.data[:, CONF] > 0)
    return problems, int(is_target.sum())


def validate_mot_split(
    root, split, fmt, *, is_train=False, num_classes=None, detector=None
) -> List[DataProblem]:
    """All problems of the sequences in ``<root>/<split>`` (see the module docstring)."""
    spec = get_format(fmt)
    split_dir = os.path.join(root, split)
    try:
        names = list_sequences(split_dir)
    except FileNotFoundError as e:
        return [DataProblem(split_dir, "missing folder", str(e))]
    if detector is not None:
        names = [n for n in names if n.endswith("-" + detector)]
    if not names:
        return [DataProblem(split_dir, "no sequences", "no sequence folder (with seqinfo.ini, img1/ or gt/)")]
    problems, targets = [], 0
    for name in names:
        seq_dir = os.path.join(split_dir, name)
        try:
            info = read_seqinfo(os.path.join(seq_dir, "seqinfo.ini"))
        except MOTFormatError as e:
            problems.append(_problem(e))
            continue
        problems += _stat_images(seq_dir, info) + _extra_images(seq_dir, info)
        gt_path = os.path.join(seq_dir, "gt", "gt.txt")
        if not os.path.isfile(gt_path):
            problems.append(DataProblem(gt_path, "missing annotations", "gt file not found"))
            continue
        p, n = _gt_problems(gt_path, info, spec)
        problems += p
        targets += n
    if is_train and targets == 0:
        problems.append(
            DataProblem(
                split_dir, "no annotations", f"training set without any {spec.name} target row in gt.txt"
            )
        )
    n_cls = len(spec.eval_classes)
    if num_classes is not None and num_classes < n_cls:
        problems.append(
            DataProblem(
                split_dir,
                "too few classes",
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES={num_classes} but the {spec.name} format has {n_cls} "
                f"target classes; set MODEL.DEFORMABLE_DETR.NUM_CLASSES {n_cls}",
            )
        )
    return problems


def validate_mot_dataset(dataset_name, cfg) -> List[DataProblem]:
    """Validator of a dataset registered by :mod:`ddetr_video.datasets` (``register_validator`` signature)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    root, split = getattr(meta, "mot_root", None), getattr(meta, "mot_split", None)
    if root is None or split is None:
        return [
            DataProblem(f"dataset '{dataset_name}'", "no MOT folder", "metadata lacks mot_root / mot_split")
        ]
    return validate_mot_split(
        root,
        split,
        getattr(meta, "mot_format", "mot17"),
        is_train=dataset_name in cfg.DATASETS.TRAIN,
        num_classes=cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES,
        detector=getattr(meta, "detector", None),
    )


register_validator("mot", validate_mot_dataset)
