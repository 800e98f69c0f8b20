"""Detectron2 registration of MOTChallenge-layout datasets (MOT17, MOT20, DanceTrack, synthetic).

One dataset dict per **frame**, sorted by (video_id, frame_idx)::

    file_name    str   absolute path of the frame image
    height/width int   from seqinfo.ini
    image_id     int   video_id * 1_000_000 + mot_frame (unique inside the dataset)
    video_id     int   index of the sequence in this dataset (sorted by name)
    sequence     str   sequence name (folder name), e.g. "MOT17-02-FRCNN", "SYN-val-01"
    frame_idx    int   0-based index of the frame inside the sequence
    mot_frame    int   1-based MOT frame number (= the image name; what result files use)
    video_length int   seqLength
    annotations  list  [{bbox [x, y, w, h] (XYWH_ABS), bbox_mode, category_id (contiguous, 0-based),
                         track_id (MOT id, > 0), iscrowd (1 = distractor / ignore region), visibility}]

Frames without objects keep an empty ``annotations`` list (a tracker needs every frame).
Rows dropped while loading: gt rows with consider flag 0, classes that are neither targets nor distractors
(cars, occluders, ... in MOT17), distractors unless ``include_ignored``, and rows whose visibility is below
``min_visibility`` (0 by default: fully occluded targets stay, as in the MOT17 ground truth).

Registered names (see :func:`register_all`; roots are under ``$DDETR_DATASETS``, default ``./datasets``):
``synthetic_mot_train``, ``synthetic_mot_val`` (generated on first use), ``synthetic_mot_tune`` (same
generator, other sequences: choose thresholds here, never on val), ``synthetic_mot_hard_val``
(:data:`SYNTHETIC_HARD_CONFIG`: more objects, two more look-alike crossings, 4-frame occlusions, a panning
camera; root ``synthetic_mot_hard``), ``mot17_train``,
``mot17_train_half``, ``mot17_val_half`` (FRCNN copies; halves = first / second half of each sequence's
frames, the usual local split),
``mot20_train``, ``mot20_train_half``, ``mot20_val_half``, ``dancetrack_train``, ``dancetrack_val``.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List

import numpy as np

from .mot_format import CLASS, CONF, FRAME, ID, VIS, H, W, X, Y, get_format, list_sequences, load_sequence
from .synthetic_video import SyntheticVideoConfig, generate_dataset

__all__ = [
    "datasets_root",
    "synthetic_mot_root",
    "load_mot_dataset",
    "register_mot_dataset",
    "register_synthetic_mot",
    "register_all",
    "SYNTHETIC_SPLITS",
    "SYNTHETIC_TUNE_SPLITS",
    "SYNTHETIC_HARD_SPLITS",
    "SYNTHETIC_HARD_CONFIG",
    "register_synthetic_eval_splits",
]

SYNTHETIC_SPLITS = {"train": 8, "val": 3}
SYNTHETIC_CONFIG = SyntheticVideoConfig(num_frames=40)
SYNTHETIC_SEED = 2024
# threshold-tuning split: the val generator, other seeds (split name "tune"); its own root, so a set generated
# before it existed keeps its recipe
SYNTHETIC_TUNE_SPLITS = {"tune": 3}
# harder split: 8 + 2 x 2 identities, every look-alike pair hidden 4 frames, camera pan up to 2 px/frame
SYNTHETIC_HARD_CONFIG = SyntheticVideoConfig(
    num_frames=40, num_objects=8, extra_crossings=2, occlusion_frames=4, camera_motion=2.0
)
SYNTHETIC_HARD_SPLITS = {"hard_val": 3}


def datasets_root() -> str:
    return os.path.expanduser(os.environ.get("DDETR_DATASETS", "datasets"))


def synthetic_mot_root() -> str:
    return os.path.join(datasets_root(), "synthetic_mot")


def load_mot_dataset(
    root: str,
    split: str,
    fmt: str = "mot17",
    *,
    sequences: Iterable[str] | None = None,
    detector: str | None = None,
    half: str | None = None,
    min_visibility: float = 0.0,
    include_ignored: bool = True,
    check_images: bool = True,
) -> List[Dict]:
    """Read ``<root>/<split>/<seq>`` sequences into per-frame Detectron2 dicts (see module docstring).

    detector: keep only MOT17 copies whose name ends with ``-<detector>`` (the three copies share one gt).
    half: None (all frames), "train" (frames 1..n//2) or "val" (frames n//2+1..n).
    Raises :class:`ddetr_video.mot_format.MOTFormatError` (file + line) on malformed input.
    """
    spec = get_format(fmt)
    if half not in (None, "train", "val"):
        raise ValueError(f"half must be None, 'train' or 'val', got {half!r}")
    split_dir = os.path.join(root, split)
    names = list_sequences(split_dir, sequences)
    if detector is not None:
        names = [n for n in names if n.endswith("-" + detector)]
    if not names:
        raise FileNotFoundError(f"no sequences found in {split_dir} (detector={detector!r})")
    contiguous = {c: i for i, c in enumerate(spec.eval_classes)}
    dicts: List[Dict] = []
    for video_id, name in enumerate(names):
        seq = load_sequence(os.path.join(split_dir, name), spec, require_gt=True, check_images=check_images)
        info = seq.info
        n = info.seq_length
        first, last = {None: (1, n), "train": (1, n // 2), "val": (n // 2 + 1, n)}[half]
        gt = seq.gt.data
        keep = (gt[:, CONF] > 0) & (gt[:, VIS] >= min_visibility)
        target = np.isin(gt[:, CLASS], spec.eval_classes)
        ignore = (
            np.isin(gt[:, CLASS], spec.distractor_classes) if include_ignored else np.zeros(len(gt), bool)
        )
        gt = gt[keep & (target | ignore)]
        by_frame: Dict[int, List[Dict]] = {}
        for r in gt:
            is_target = int(r[CLASS]) in contiguous
            by_frame.setdefault(int(r[FRAME]), []).append(
                {
                    "bbox": [float(r[X]), float(r[Y]), float(r[W]), float(r[H])],
                    "bbox_mode": _xywh_abs(),
                    "category_id": contiguous[int(r[CLASS])] if is_target else 0,
                    "track_id": int(r[ID]),
                    "iscrowd": 0 if is_target else 1,
                    "visibility": float(r[VIS]),
                }
            )
        for f in range(first, last + 1):
            dicts.append(
                {
                    "file_name": os.path.abspath(seq.image_path(f)),
                    "height": info.height,
                    "width": info.width,
                    "image_id": video_id * 1_000_000 + f,
                    "video_id": video_id,
                    "sequence": name,
                    "frame_idx": f - first,
                    "mot_frame": f,
                    "video_length": last - first + 1,
                    "annotations": by_frame.get(f, []),
                }
            )
    return dicts


def _xywh_abs():
    from detectron2.structures import BoxMode

    return BoxMode.XYWH_ABS


def _set_metadata(name: str, fmt: str, **extra) -> None:
    from detectron2.data import MetadataCatalog

    spec = get_format(fmt)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(
        thing_classes=[spec.classes[c] for c in spec.eval_classes],
        mot_format=spec.name,
        evaluator_type="mot",
        **extra,
    )


def register_mot_dataset(name: str, root: str, split: str, fmt: str = "mot17", **load_kwargs) -> None:
    """Register ``name`` in Detectron2's catalogs (lazy: files are read on ``DatasetCatalog.get(name)``)."""
    from detectron2.data import DatasetCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_mot_dataset(root, split, fmt, **load_kwargs))
    _set_metadata(
        name, fmt, mot_root=root, mot_split=split, **{k: v for k, v in load_kwargs.items() if v is not None}
    )


def register_synthetic_mot(
    root: str | None = None,
    cfg: SyntheticVideoConfig = SYNTHETIC_CONFIG,
    splits: Dict[str, int] | None = None,
    seed: int = SYNTHETIC_SEED,
    prefix: str = "synthetic_mot",
) -> List[str]:
    """Register ``<prefix>_<split>`` for each split; the data is generated (atomically) on first use."""
    from detectron2.data import DatasetCatalog

    root_ = root
    splits = dict(SYNTHETIC_SPLITS if splits is None else splits)
    names = []
    for split in splits:
        name = f"{prefix}_{split}"

        def _prepare():
            r = root_ if root_ is not None else synthetic_mot_root()
            generate_dataset(r, splits, cfg, seed)
            return r

        def _load(split=split):
            return load_mot_dataset(_prepare(), split, "synthetic")

        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, _load)
        # ``prepare``: generate the files before a pre-flight validation reads them (ddetr_d2.data.validation)
        _set_metadata(
            name, "synthetic", mot_root=root_ or synthetic_mot_root(), mot_split=split, prepare=_prepare
        )
        names.append(name)
    return names


def register_synthetic_eval_splits(
    root: str | None = None,
    prefix: str = "synthetic_mot",
    num_tune: int = 3,
    num_hard: int = 3,
    seed=SYNTHETIC_SEED,
) -> Dict[str, str]:
    """Register ``<prefix>_tune`` (at ``<root>_tune``) and ``<prefix>_hard_val`` (at ``<root>_hard``, the
    :data:`SYNTHETIC_HARD_CONFIG` generator); a count of 0 skips the split. ``root`` defaults to
    ``$DDETR_DATASETS/synthetic_mot``. Returns ``{"tune": name, "hard_val": name}`` of those registered."""
    base = root if root is not None else synthetic_mot_root()
    out = {}
    if num_tune > 0:
        (out["tune"],) = register_synthetic_mot(
            base + "_tune", SYNTHETIC_CONFIG, {"tune": num_tune}, seed, prefix
        )
    if num_hard > 0:
        (out["hard_val"],) = register_synthetic_mot(
            base + "_hard", SYNTHETIC_HARD_CONFIG, {"hard_val": num_hard}, seed, prefix
        )
    return out


def register_all(root: str | None = None) -> None:
    """Register the synthetic set and the MOT17/MOT20/DanceTrack layouts under ``root`` (default
    ``$DDETR_DATASETS``)."""
    base = datasets_root() if root is None else root
    register_synthetic_mot(None if root is None else os.path.join(root, "synthetic_mot"))
    register_synthetic_eval_splits(os.path.join(base, "synthetic_mot"))
    for bench, fmt in (("MOT17", "mot17"), ("MOT20", "mot20")):
        det = "FRCNN" if fmt == "mot17" else None
        low = bench.lower()
        r = os.path.join(base, bench)
        register_mot_dataset(f"{low}_train", r, "train", fmt, detector=det)
        register_mot_dataset(f"{low}_train_half", r, "train", fmt, detector=det, half="train")
        register_mot_dataset(f"{low}_val_half", r, "train", fmt, detector=det, half="val")
    for split in ("train", "val"):
        register_mot_dataset(f"dancetrack_{split}", os.path.join(base, "DanceTrack"), split, "dancetrack")


try:  # register on import, like detectron2's builtin datasets
    import detectron2.data  # noqa: F401

    register_all()
except ImportError:  # pragma: no cover - detectron2 is a hard dependency of the trainer, not of the generator
    pass
