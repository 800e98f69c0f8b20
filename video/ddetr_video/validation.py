"""Pre-flight check of MOTChallenge-layout datasets (``evaluator_type="mot"``), before the first iteration.

:func:`validate_mot_dataset` reads every sequence of a registered MOT dataset (metadata ``mot_root``,
``mot_split``, ``mot_format`` from :mod:`ddetr_video.datasets`) and returns **all** the problems it finds as
``ddetr_d2.data.validation.DataProblem`` s, each naming its file (and line):

* ``seqinfo.ini`` missing or unreadable, ``gt/gt.txt`` missing;
* frame images missing or empty (``os.stat`` of ``<imDir>/<frame:06d><imExt>`` for frames 1..seqLength);
* gt rows that do not parse, have NaN/inf, ``w``/``h`` <= 0 or lie entirely outside the image (MOT boxes may
  reach past the border: pedestrians walk out of the frame), frame numbers outside 1..seqLength, class ids the
  format does not know;
* a training set without any target annotation;
* more target classes than ``MODEL.DEFORMABLE_DETR.NUM_CLASSES``.

Registered for ``evaluator_type="mot"`` with ``ddetr_d2.data.validation.register_validator`` on import.
"""

from __future__ import annotations

import math
import os
from typing import List

from ddetr_d2.data.validation import INVALID_BOX, DataProblem, register_validator

from .mot_format import MOTFormatError, get_format, image_path, list_sequences, read_seqinfo

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


def _gt_problems(gt_path, info, spec):
    """(problems, number of target rows) of one gt.txt, every row checked."""
    problems, targets = [], 0
    with open(gt_path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line:
                continue
            where = f"{gt_path}:{lineno}"
            fields = [t.strip() for t in line.split(",")]
            try:
                vals = [float(t) for t in fields]
            except ValueError:
                problems.append(DataProblem(where, "bad row", f"non-numeric field in {line!r}"))
                continue
            if len(vals) < 6:
                problems.append(
                    DataProblem(where, "bad row", f"{len(vals)} fields, expected frame,id,x,y,w,h,...")
                )
                continue
            frame, _, x, y, w, h = vals[:6]
            if not all(math.isfinite(v) for v in vals):
                problems.append(DataProblem(where, INVALID_BOX, f"NaN/inf in {line!r}"))
                continue
            if frame != int(frame) or not 1 <= frame <= info.seq_length:
                problems.append(
                    DataProblem(
                        where, "bad frame", f"frame {frame:g} outside 1..{info.seq_length} (seqLength)"
                    )
                )
            if w <= 0 or h <= 0:
                problems.append(
                    DataProblem(where, INVALID_BOX, f"box [x, y, w, h]={[x, y, w, h]} has w/h <= 0")
                )
            elif x + w <= 0 or y + h <= 0 or x >= info.width or y >= info.height:
                problems.append(
                    DataProblem(
                        where,
                        INVALID_BOX,
                        f"box [x, y, w, h]={[x, y, w, h]} lies outside the {info.width}x{info.height} image",
                    )
                )
            cls = int(vals[7]) if len(vals) > 7 else spec.eval_classes[0]
            if cls not in spec.classes:
                problems.append(
                    DataProblem(
                        where,
                        "unknown class",
                        f"class {cls} is not a {spec.name} class {sorted(spec.classes)}",
                    )
                )
            elif cls in spec.eval_classes and (len(vals) < 7 or vals[6] > 0):
                targets += 1
    return problems, targets


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
        return [DataProblem(split_dir, "no sequences", "no sequence folder with a seqinfo.ini")]
    problems, targets = [], 0
    for name in names:
        seq_dir = os.path.join(split_dir, name)
        try:
            info = read_seqinfo(os.path.join(seq_dir, "seqinfo.ini"))
        except MOTFormatError as e:
            where = e.path if e.line is None else f"{e.path}:{e.line}"
            problems.append(DataProblem(where, "bad seqinfo", e.reason))
            continue
        problems += _stat_images(seq_dir, info)
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
