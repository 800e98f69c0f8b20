"""Tracking evaluation: MOTA/IDF1/... with ``motmetrics``, HOTA/DetA/AssA with ``trackeval``.

Expected model output per frame (one input dict = one frame, fields as in :mod:`ddetr_video.datasets`)::

    inputs[i]  = {"sequence": str, "mot_frame": int (1-based), "frame_idx": int, "video_length": int, ...}
    outputs[i] = {"instances": Instances(image_size=(H, W),
                      pred_boxes=Boxes (K, 4) XYXY absolute, original image coordinates,
                      scores=(K,) float, pred_classes=(K,) int64 contiguous ids,
                      track_ids=(K,) int64; < 0 = not a track (skipped), MOT ids are usually >= 1)}

Ground truth comes from the dataset dicts of ``dataset_name`` (annotations with ``iscrowd=1`` are
distractors / ignore regions) or is passed in directly. Before scoring, each frame is preprocessed as
TrackEval does for MOTChallenge: predictions matched (Hungarian, IoU >= 0.5) to a distractor are removed.
Both libraries then see the same frames, boxes and IoU similarities; no metric is re-implemented here.

Returned like Detectron2 evaluators: ``OrderedDict(tracking={HOTA, DetA, AssA, LocA, MOTA, MOTP, IDF1, IDP,
IDR, Recall, Precision (percent), IDSW, MT, PT, ML, FP, FN, Frag, num_* (counts)})``; per-sequence numbers are
written to ``<output_dir>/tracking_metrics.json`` next to the result files ``<output_dir>/<sequence>.txt``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .mot_format import CLASS, FRAME, ID, X, get_format, list_sequences, load_sequence, write_results_file

try:
    from detectron2.evaluation import DatasetEvaluator
except ImportError:  # pragma: no cover - the metric functions below work without detectron2

    class DatasetEvaluator:  # type: ignore[no-redef]
        pass


__all__ = [
    "SequenceGT",
    "MOTEvaluator",
    "box_iou_xywh",
    "compute_tracking_metrics",
    "gt_from_dataset_dicts",
    "gt_from_mot_split",
    "instances_to_rows",
    "evaluate_mot_files",
]
logger = logging.getLogger(__name__)

PERCENT_KEYS = ("HOTA", "DetA", "AssA", "LocA", "MOTA", "MOTP", "IDF1", "IDP", "IDR", "Recall", "Precision")


@dataclass
class SequenceGT:
    """Ground truth of one sequence. Row arrays are (N, 9) in MOT column order (frame, id, x, y, w, h, conf,
    class, visibility); ``class`` holds *contiguous* ids here. ``frames``: the MOT frame numbers to score."""

    frames: np.ndarray
    targets: np.ndarray
    distractors: np.ndarray


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between (N, 4) and (M, 4) XYWH boxes -> (N, M) float64 (0 where the union is empty)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1[:, None], bx1[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay1[:, None], by1[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------
# metric computation (library-independent inputs -> motmetrics + trackeval)
# ----------------------------------------------------------------------------------------------------
def _preprocess_frame(gt_t, dis_t, pred_t, class_aware):
    """Drop predictions matched to distractors; return (gt rows, pred rows, IoU gt x pred)."""
    if len(dis_t) and len(pred_t):
        allgt = np.concatenate([gt_t, dis_t], 0)
        sim = box_iou_xywh(allgt[:, X : X + 4], pred_t[:, X : X + 4])
        sim[sim < 0.5 - np.finfo(float).eps] = 0.0
        rows, cols = linear_sum_assignment(-sim)
        ok = sim[rows, cols] > np.finfo(float).eps
        rows, cols = rows[ok], cols[ok]
        drop = cols[rows >= len(gt_t)]
        pred_t = np.delete(pred_t, drop, axis=0)
    iou = box_iou_xywh(gt_t[:, X : X + 4], pred_t[:, X : X + 4])
    if class_aware and iou.size:
        iou = np.where(gt_t[:, CLASS][:, None] == pred_t[:, CLASS][None, :], iou, 0.0)
    return gt_t, pred_t, iou


def _split_by_frame(rows: np.ndarray, frames: np.ndarray) -> Dict[int, np.ndarray]:
    rows = rows.reshape(-1, rows.shape[-1] if rows.size else 9)
    order = np.argsort(rows[:, FRAME], kind="stable")
    rows = rows[order]
    out = {int(f): rows[:0] for f in frames}
    if len(rows):
        uniq, start = np.unique(rows[:, FRAME].astype(np.int64), return_index=True)
        ends = list(start[1:]) + [len(rows)]
        for f, s, e in zip(uniq, start, ends):
            if int(f) in out:
                out[int(f)] = rows[s:e]
    return out


def compute_tracking_metrics(
    gt: Dict[str, SequenceGT],
    predictions: Dict[str, np.ndarray],
    iou_threshold: float = 0.5,
    class_aware: bool = False,
) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Score tracks. ``predictions[seq]``: (K, >=8) rows ``frame, id, x, y, w, h, score, class``
    (class only used when ``class_aware``: then a prediction can only match gt of its own class).

    Returns ``(overall, per_sequence)`` metric dicts (percentages for ratios, ints for counts).
    A sequence present in ``gt`` but absent from ``predictions`` is scored with no predictions.
    """
    import motmetrics as mm
    from trackeval.metrics import HOTA

    hota = HOTA()
    accs, names, hota_res = [], [], {}
    counts = {}
    for seq in sorted(gt):
        g = gt[seq]
        pred = np.asarray(predictions.get(seq, np.zeros((0, 9))), dtype=np.float64)
        if pred.size and pred.shape[1] < 9:
            pred = np.concatenate([pred, -np.ones((len(pred), 9 - pred.shape[1]))], 1)
        pred = pred.reshape(-1, 9)
        _check_unique_ids(pred, f"predictions of sequence {seq!r}")
        _check_unique_ids(g.targets, f"ground truth of sequence {seq!r}")
        gt_by_f = _split_by_frame(g.targets, g.frames)
        dis_by_f = _split_by_frame(g.distractors, g.frames)
        pred_by_f = _split_by_frame(pred, g.frames)
        acc = mm.MOTAccumulator(auto_id=False)
        gt_ids_t, tr_ids_t, sims = [], [], []
        for f in g.frames:
            f = int(f)
            gt_t, pred_t, iou = _preprocess_frame(gt_by_f[f], dis_by_f[f], pred_by_f[f], class_aware)
            dist = np.where(iou >= iou_threshold - np.finfo(float).eps, 1.0 - iou, np.nan)
            acc.update(gt_t[:, ID].astype(np.int64), pred_t[:, ID].astype(np.int64), dist, frameid=f)
            gt_ids_t.append(gt_t[:, ID].astype(np.int64))
            tr_ids_t.append(pred_t[:, ID].astype(np.int64))
            sims.append(iou)
        accs.append(acc)
        names.append(seq)
        hota_res[seq] = hota.eval_sequence(_trackeval_data(gt_ids_t, tr_ids_t, sims))
        counts[seq] = {
            "num_frames": len(g.frames),
            "num_gt_dets": int(sum(len(x) for x in gt_ids_t)),
            "num_pred_dets": int(sum(len(x) for x in tr_ids_t)),
            "num_gt_ids": int(len(np.unique(np.concatenate(gt_ids_t)))) if gt_ids_t else 0,
            "num_pred_ids": int(len(np.unique(np.concatenate(tr_ids_t)))) if tr_ids_t else 0,
        }
    if not names:
        raise ValueError("no sequences to evaluate")

    mh = mm.metrics.create()
    wanted = [
        "mota", "motp", "idf1", "idp", "idr", "recall", "precision", "num_switches", "mostly_tracked",
        "partially_tracked", "mostly_lost", "num_false_positives", "num_misses", "num_fragmentations",
        "num_detections",
    ]  # fmt: skip
    summary = mh.compute_many(accs, metrics=wanted, names=names, generate_overall=True)
    per_seq = {seq: _row(summary.loc[seq], hota_res[seq], counts[seq]) for seq in names}
    total_counts = {k: sum(c[k] for c in counts.values()) for k in next(iter(counts.values()))}
    overall = _row(summary.loc["OVERALL"], hota.combine_sequences(hota_res), total_counts)
    overall["MOTP"] = _pooled_motp(summary.loc[names])
    return overall, per_seq


def _check_unique_ids(rows: np.ndarray, what: str) -> None:
    """Raise ValueError if an id occurs twice in one frame: both libraries would count it twice (IDF1 above
    100 %) instead of refusing it."""
    if not len(rows):
        return
    keys, counts = np.unique(rows[:, [FRAME, ID]].astype(np.int64), axis=0, return_counts=True)
    if (counts > 1).any():
        k = int(np.argmax(counts > 1))
        f, i = keys[k]
        raise ValueError(
            f"{what}: track id {i} occurs {counts[k]} times in frame {f} (one box per id and frame)"
        )


def _pooled_motp(per_seq_rows) -> float:
    """MOTP (percent IoU) over all matches of all sequences: each sequence's ``motp`` weighted by its matches
    (``num_detections`` = matches + switches, motmetrics' ``motp`` denominator). motmetrics' OVERALL row is
    NaN as soon as one sequence has no match (NaN x 0); NaN here only when no sequence has one."""
    n = per_seq_rows["num_detections"].to_numpy(np.float64)
    dist = per_seq_rows["motp"].to_numpy(np.float64)
    used = n > 0
    if not used.any():
        return float("nan")
    return 100.0 * (1.0 - float((dist[used] * n[used]).sum() / n[used].sum()))


def _trackeval_data(gt_ids_t: List[np.ndarray], tr_ids_t: List[np.ndarray], sims: List[np.ndarray]) -> Dict:
    """The dict ``trackeval.metrics.HOTA.eval_sequence`` expects (ids relabelled to 0..n-1)."""
    gt_u = np.unique(np.concatenate(gt_ids_t)) if gt_ids_t else np.zeros(0, np.int64)
    tr_u = np.unique(np.concatenate(tr_ids_t)) if tr_ids_t else np.zeros(0, np.int64)
    return {
        "num_timesteps": len(gt_ids_t),
        "gt_ids": [np.searchsorted(gt_u, x).astype(int) for x in gt_ids_t],
        "tracker_ids": [np.searchsorted(tr_u, x).astype(int) for x in tr_ids_t],
        "similarity_scores": sims,
        "num_gt_ids": len(gt_u),
        "num_tracker_ids": len(tr_u),
        "num_gt_dets": int(sum(len(x) for x in gt_ids_t)),
        "num_tracker_dets": int(sum(len(x) for x in tr_ids_t)),
    }


def _row(mm_row, hota_res, counts) -> Dict[str, float]:
    def pct(v):
        v = float(v)
        return 100.0 * v if np.isfinite(v) else float("nan")

    out = {
        "HOTA": pct(np.mean(hota_res["HOTA"])),
        "DetA": pct(np.mean(hota_res["DetA"])),
        "AssA": pct(np.mean(hota_res["AssA"])),
        "LocA": pct(np.mean(hota_res["LocA"])),
        "MOTA": pct(mm_row["mota"]),
        # motmetrics' motp is the mean matched distance (1 - IoU); report the mean matched IoU instead
        "MOTP": pct(1.0 - float(mm_row["motp"])),
        "IDF1": pct(mm_row["idf1"]),
        "IDP": pct(mm_row["idp"]),
        "IDR": pct(mm_row["idr"]),
        "Recall": pct(mm_row["recall"]),
        "Precision": pct(mm_row["precision"]),
        "IDSW": int(mm_row["num_switches"]),
        "MT": int(mm_row["mostly_tracked"]),
        "PT": int(mm_row["partially_tracked"]),
        "ML": int(mm_row["mostly_lost"]),
        "FP": int(mm_row["num_false_positives"]),
        "FN": int(mm_row["num_misses"]),
        "Frag": int(mm_row["num_fragmentations"]),
    }
    out.update({k: int(v) for k, v in counts.items()})
    return out


# ----------------------------------------------------------------------------------------------------
# ground truth sources
# ----------------------------------------------------------------------------------------------------
def gt_from_dataset_dicts(dicts: Iterable[Dict]) -> Dict[str, SequenceGT]:
    """Build :class:`SequenceGT` per sequence from per-frame dataset dicts (:mod:`ddetr_video.datasets`)."""
    rows: Dict[str, Tuple[List, List, List]] = {}
    for d in dicts:
        seq = _seq_name(d)
        f = _mot_frame(d)
        frames, tg, ds = rows.setdefault(seq, ([], [], []))
        frames.append(f)
        for a in d.get("annotations", []):
            x, y, w, h = _xywh(a)
            r = [f, a["track_id"], x, y, w, h, 1, a.get("category_id", 0), a.get("visibility", 1.0)]
            (ds if a.get("iscrowd", 0) else tg).append(r)
    return {
        s: SequenceGT(np.unique(np.asarray(fr, np.int64)), np.asarray(t, np.float64).reshape(-1, 9),
                      np.asarray(d_, np.float64).reshape(-1, 9))
        for s, (fr, t, d_) in rows.items()
    }  # fmt: skip


def gt_from_mot_split(
    split_dir: str, fmt="mot17", sequences: Iterable[str] | None = None
) -> Dict[str, SequenceGT]:
    """Read gt straight from MOT files (same filtering as the dataset loader: consider flag, targets,
    distractors)."""
    spec = get_format(fmt)
    contiguous = {c: i for i, c in enumerate(spec.eval_classes)}
    out = {}
    for name in list_sequences(split_dir, sequences):
        seq = load_sequence(os.path.join(split_dir, name), spec, check_images=False)
        g = seq.gt.data[seq.gt.data[:, 6] > 0]
        tg = g[np.isin(g[:, CLASS], spec.eval_classes)].copy()
        tg[:, CLASS] = [contiguous[int(c)] for c in tg[:, CLASS]]
        ds = g[np.isin(g[:, CLASS], spec.distractor_classes)]
        out[name] = SequenceGT(np.arange(1, seq.info.seq_length + 1), tg, ds)
    return out


def evaluate_mot_files(
    split_dir: str, results_dir: str, fmt="mot17", sequences=None, iou_threshold: float = 0.5
) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Score ``<results_dir>/<seq>.txt`` against ``<split_dir>/<seq>/gt/gt.txt`` (a missing result file = no
    predictions for that sequence)."""
    from .mot_format import read_mot_file

    gt = gt_from_mot_split(split_dir, fmt, sequences)
    preds = {}
    for seq in gt:
        p = os.path.join(results_dir, f"{seq}.txt")
        if os.path.isfile(p):
            preds[seq] = read_mot_file(p, "result", fmt).data
    return compute_tracking_metrics(gt, preds, iou_threshold)


def _xywh(a: Dict) -> List[float]:
    from detectron2.structures import BoxMode

    mode = a.get("bbox_mode", BoxMode.XYWH_ABS)
    return list(BoxMode.convert(list(a["bbox"]), mode, BoxMode.XYWH_ABS))


def _seq_name(d: Dict) -> str:
    if "sequence" in d:
        return str(d["sequence"])
    if "video_id" in d:
        return str(d["video_id"])
    raise KeyError(f"frame input needs 'sequence' (or 'video_id'); has keys {sorted(d)}")


def _mot_frame(d: Dict) -> int:
    if "mot_frame" in d:
        return int(d["mot_frame"])
    if "frame_idx" in d:
        return int(d["frame_idx"]) + 1
    raise KeyError(f"frame input needs 'mot_frame' (or 'frame_idx'); has keys {sorted(d)}")


def instances_to_rows(instances, mot_frame: int, score_threshold: float = 0.0) -> np.ndarray:
    """Instances with ``pred_boxes`` (XYXY), ``scores``, ``pred_classes``, ``track_ids`` -> (K, 9) rows
    ``frame, id, x, y, w, h, score, class, -1`` (track_ids < 0 and scores below threshold dropped)."""
    if not instances.has("track_ids"):
        raise KeyError("instances need a 'track_ids' field (int64, one per box; < 0 = untracked)")
    boxes = instances.pred_boxes.tensor.detach().cpu().double().numpy().reshape(-1, 4)
    ids = instances.track_ids.detach().cpu().numpy().astype(np.int64).reshape(-1)
    n = len(ids)
    scores = (
        instances.scores.detach().cpu().double().numpy()
        if instances.has("scores")
        else np.ones(n, np.float64)
    )
    classes = (
        instances.pred_classes.detach().cpu().numpy().astype(np.float64)
        if instances.has("pred_classes")
        else np.zeros(n)
    )
    if not (len(boxes) == len(scores) == len(classes) == n):
        raise ValueError(
            f"instances fields disagree: boxes {len(boxes)}, scores {len(scores)}, track_ids {n}"
        )
    keep = (ids >= 0) & (scores >= score_threshold)
    b = boxes[keep]
    return np.stack(
        [np.full(keep.sum(), float(mot_frame)), ids[keep].astype(np.float64), b[:, 0], b[:, 1],
         b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], scores[keep], classes[keep], -np.ones(keep.sum())],
        axis=1,
    ).reshape(-1, 9)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# the Detectron2 evaluator
# ----------------------------------------------------------------------------------------------------
class MOTEvaluator(DatasetEvaluator):
    """Detectron2 ``DatasetEvaluator`` for multi-object tracking (see module docstring for the I/O contract).

    Args:
        dataset_name: registered dataset (per-frame dicts from :mod:`ddetr_video.datasets`); its frames give
            the gt. Ignored when ``gt`` is given.
        output_dir: where ``<sequence>.txt`` result files and ``tracking_metrics.json`` go
            (None = don't write).
        gt: optional ``{sequence: SequenceGT}`` to use instead of the dataset.
        iou_threshold: IoU for a match in MOTA/IDF1 (HOTA integrates over 0.05..0.95 itself).
        score_threshold: predictions below it are not written nor scored.
        class_aware: a prediction can only match gt of the same (contiguous) class.
        distributed: gather predictions from all workers before scoring.

    Only frames that went through :meth:`process` are scored (a partially processed sequence is scored on its
    processed frames; a warning says so).
    """

    def __init__(
        self,
        dataset_name: str | None = None,
        output_dir: str | None = None,
        *,
        gt: Dict[str, SequenceGT] | None = None,
        iou_threshold: float = 0.5,
        score_threshold: float = 0.0,
        class_aware: bool = False,
        distributed: bool = True,
    ):
        if dataset_name is None and gt is None:
            raise ValueError("MOTEvaluator needs a dataset_name or gt")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._gt = gt
        self._iou_threshold = iou_threshold
        self._score_threshold = score_threshold
        self._class_aware = class_aware
        self._distributed = distributed
        self.reset()

    def reset(self):
        self._rows: Dict[str, List[np.ndarray]] = {}
        self._frames: Dict[str, List[int]] = {}
        self._written: set = set()

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            seq, f = _seq_name(inp), _mot_frame(inp)
            if "instances" not in out:
                raise KeyError(f"output for {seq} frame {f} has no 'instances' (keys {sorted(out)})")
            rows = instances_to_rows(out["instances"], f, self._score_threshold)
            self._rows.setdefault(seq, []).append(rows)
            self._frames.setdefault(seq, []).append(f)
            # a sequence is complete at its last frame: write its MOT result file now
            if self._output_dir and "video_length" in inp and "frame_idx" in inp:
                if int(inp["frame_idx"]) == int(inp["video_length"]) - 1:
                    self._write(seq, np.concatenate(self._rows[seq], 0))

    def _write(self, seq: str, rows: np.ndarray):
        write_results_file(os.path.join(self._output_dir, f"{seq}.txt"), rows[:, :7])
        self._written.add(seq)

    def evaluate(self):
        rows, frames = self._rows, self._frames
        if self._distributed:
            from detectron2.utils import comm

            comm.synchronize()
            all_rows = comm.gather(rows, dst=0)
            all_frames = comm.gather(frames, dst=0)
            if not comm.is_main_process():
                return {}
            rows, frames = {}, {}
            for r, fr in zip(all_rows, all_frames):
                for s in r:
                    rows.setdefault(s, []).extend(r[s])
                    frames.setdefault(s, []).extend(fr[s])
        if not rows:
            logger.warning("MOTEvaluator received no predictions")
            return {}
        preds = {s: np.concatenate(v, 0) for s, v in rows.items()}
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            for s, p in preds.items():
                self._write(s, p)
        gt_all = self._gt if self._gt is not None else self._gt_from_dataset()
        gt = {}
        for s, fr in frames.items():
            if s not in gt_all:
                raise KeyError(
                    f"predictions for sequence {s!r} which is not in the ground truth {sorted(gt_all)}"
                )
            g = copy.copy(gt_all[s])
            done = np.unique(np.asarray(fr, np.int64))
            missing = np.setdiff1d(g.frames, done)
            if len(missing):
                logger.warning(
                    f"{s}: {len(missing)} of {len(g.frames)} frames were not processed; scoring the rest"
                )
            g.frames = np.intersect1d(g.frames, done)
            gt[s] = g
        overall, per_seq = compute_tracking_metrics(gt, preds, self._iou_threshold, self._class_aware)
        if self._output_dir:
            with open(os.path.join(self._output_dir, "tracking_metrics.json"), "w") as f:
                json.dump({"overall": overall, "per_sequence": per_seq}, f, indent=1)
        logger.info(
            "Tracking results: " + ", ".join(f"{k}={v:.2f}" for k, v in overall.items() if k in PERCENT_KEYS)
        )
        return OrderedDict(tracking=overall)

    def _gt_from_dataset(self) -> Dict[str, SequenceGT]:
        from detectron2.data import DatasetCatalog

        return gt_from_dataset_dicts(DatasetCatalog.get(self._dataset_name))


try:  # Detectron2's convention: datasets whose metadata says evaluator_type="mot" are scored by MOTEvaluator
    from ddetr_d2.evaluation import EVALUATOR_REGISTRY
except ImportError:  # pragma: no cover - without detectron2 the metric functions above still work
    EVALUATOR_REGISTRY = None
else:

    @EVALUATOR_REGISTRY.register("mot")
    def build_mot_evaluator(cfg, dataset_name, output_folder):
        """``MOTEvaluator`` of a dataset whose metadata has ``evaluator_type="mot"``."""
        return MOTEvaluator(dataset_name, output_dir=output_folder)
