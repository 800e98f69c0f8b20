#!/usr/bin/env python
"""Query-propagation tracking vs. detection + IoU association, in one run, on the synthetic MOT set.

1. Train the ``QueryTracker`` of ``--config-file`` on synthetic train sequences for ``--train-seconds``
   (or ``--max-iter``), or load ``--weights``.
2. On the synthetic val sequences (each has a look-alike crossing pair with a full occlusion, an entry,
   an exit and speed changes), run with the *same weights*:
   (a) ``query``: the tracker (track queries carried across frames, RuntimeTracker bookkeeping);
   (b) ``iou``: the detect queries alone, frame by frame (no track queries), class-agnostic NMS, then
       ``IoUTracker`` (Hungarian on 1 - IoU).
   Both use the same birth / keep thresholds and max age; both are scored by ``MOTEvaluator``
   (motmetrics MOTA / IDF1 / IDSW, trackeval HOTA).
3. Print a markdown table and write ``<output>/tracking_benchmark.json``.

    python tools/benchmark_tracking.py --train-seconds 600
    python tools/benchmark_tracking.py --weights output/bench_tracking/model_final.pth

Frames/s counts the model (and association) time per frame, images already decoded and resized.
"""

import argparse
import json
import logging
import math
import os
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.modeling import build_model
from torchvision.ops import batched_nms

from ddetr_d2.data.dataset_mapper import DetrDatasetMapper
from ddetr_d2.solver import build_optimizer
from ddetr_video.clip_mapper import ClipDatasetMapper
from ddetr_video.config import get_tracker_cfg
from ddetr_video.datasets import register_synthetic_mot
from ddetr_video.evaluator import MOTEvaluator
from ddetr_video.iou_tracker import IoUTracker, assign_track_ids
from ddetr_video.synthetic_video import SyntheticVideoConfig

logger = logging.getLogger("benchmark_tracking")
METRICS = ("HOTA", "MOTA", "IDF1", "IDSW", "FP", "FN", "DetA", "AssA")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="video/configs/synthetic_tiny.yaml")
    p.add_argument("--output", default="output/bench_tracking")
    p.add_argument("--data-root", default=None, help="synthetic set root (default <output>/data)")
    p.add_argument("--num-train", type=int, default=8, help="synthetic train sequences")
    p.add_argument("--num-val", type=int, default=3, help="synthetic val sequences")
    p.add_argument("--num-frames", type=int, default=40)
    p.add_argument("--weights", default="", help="skip training and load these weights")
    p.add_argument("--init-weights", default="", help="load these weights, then train (continue a run)")
    p.add_argument("--train-seconds", type=float, default=600.0)
    p.add_argument(
        "--max-iter", type=int, default=0, help="stop training after this many clips (0: time only)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: OpenMP spinning on a busy shared CPU is very slow)",
    )
    p.add_argument(
        "--nms-iou", type=float, default=None, help="baseline NMS IoU (default TRACKER.DUPLICATE_IOU)"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def train(cfg, model, seconds, max_iter, out_dir):
    model.train()
    optimizer = build_optimizer(cfg, model)
    loader = build_detection_train_loader(cfg, mapper=ClipDatasetMapper(cfg, is_train=True))
    t0, it, history = time.time(), 0, []
    budget_iter = max_iter if max_iter > 0 else math.inf
    drop_at = 0.8  # lr x0.1 for the last 20 % of the budget
    dropped = False
    for batch in loader:
        frac = max((time.time() - t0) / seconds if seconds > 0 else 0.0, it / budget_iter)
        if frac >= 1.0:
            break
        if not dropped and frac >= drop_at:
            for g in optimizer.param_groups:
                g["lr"] *= 0.1
            dropped = True
        losses = model(batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {it}: {losses}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss))
        it += 1
        if it % 10 == 0:
            logger.info(f"iter {it} loss {sum(history[-10:]) / 10:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    DetectionCheckpointer(model, save_dir=out_dir).save("model_final")
    return {
        "iterations": it,
        "seconds": time.time() - t0,
        "loss_first10": _mean(history[:10]),
        "loss_last10": _mean(history[-10:]),
    }


def _mean(x):
    return sum(x) / max(len(x), 1)


def _frames_by_sequence(cfg, dataset_name):
    mapper = DetrDatasetMapper(cfg, is_train=False)
    seqs = {}
    for d in DatasetCatalog.get(dataset_name):
        seqs.setdefault(d["sequence"], []).append(mapper(d))
    for v in seqs.values():
        v.sort(key=lambda x: x["frame_idx"])
    return seqs


@torch.no_grad()
def run_query_tracker(model, seqs, evaluator):
    evaluator.reset()
    n, dt = 0, 0.0
    for frames in seqs.values():
        model.reset_tracks()
        for f in frames:
            t = time.perf_counter()
            out = model.track([f])
            dt += time.perf_counter() - t
            n += 1
            evaluator.process([f], out)
    return evaluator.evaluate()["tracking"], n / dt


@torch.no_grad()
def run_iou_baseline(model, seqs, evaluator, cfg, nms_iou):
    tc = cfg.MODEL.TRACKER
    evaluator.reset()
    n, dt = 0, 0.0
    for frames in seqs.values():
        tracker = IoUTracker(
            iou_threshold=0.3,
            birth_score=tc.BIRTH_THRESHOLD,
            match_score=tc.KEEP_THRESHOLD,
            max_age=tc.MAX_AGE,
            class_aware=False,
        )
        for f in frames:
            t = time.perf_counter()
            inst = model.detect([f])[0]["instances"]
            inst = inst[inst.scores >= tc.KEEP_THRESHOLD]
            keep = batched_nms(
                inst.pred_boxes.tensor, inst.scores, torch.zeros_like(inst.pred_classes), nms_iou
            )
            inst = assign_track_ids(inst[keep], tracker)
            inst = inst[inst.track_ids >= 0]
            dt += time.perf_counter() - t
            n += 1
            evaluator.process([f], [{"instances": inst}])
    return evaluator.evaluate()["tracking"], n / dt


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.output, exist_ok=True)
    data_root = args.data_root or os.path.join(args.output, "data")
    names = register_synthetic_mot(
        root=data_root,
        cfg=SyntheticVideoConfig(num_frames=args.num_frames),
        splits={"train": args.num_train, "val": args.num_val},
        prefix="bench_mot",
    )
    train_name, val_name = names
    cfg = get_tracker_cfg(args.config_file, args.opts)
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,)
    cfg.OUTPUT_DIR = args.output
    cfg.freeze()
    model = build_model(cfg)
    if args.weights:
        DetectionCheckpointer(model).load(args.weights)
        train_info = {"weights": args.weights}
    else:
        if args.init_weights:
            DetectionCheckpointer(model).load(args.init_weights)
        train_info = train(cfg, model, args.train_seconds, args.max_iter, args.output)
        train_info["init_weights"] = args.init_weights
    model.eval()
    logger.info(f"training: {train_info}")
    seqs = _frames_by_sequence(cfg, val_name)
    ev = MOTEvaluator(val_name, output_dir=None, distributed=False)
    q_res, q_fps = run_query_tracker(model, seqs, ev)
    nms_iou = cfg.MODEL.TRACKER.DUPLICATE_IOU if args.nms_iou is None else args.nms_iou
    b_res, b_fps = run_iou_baseline(model, seqs, ev, cfg, nms_iou)
    n_frames = sum(len(v) for v in seqs.values())
    results = {
        "config": args.config_file,
        "opts": args.opts,
        "train": train_info,
        "val_sequences": len(seqs),
        "val_frames": n_frames,
        "query_tracker": dict(q_res, fps=q_fps),
        "detector_plus_iou_tracker": dict(b_res, fps=b_fps),
    }
    with open(os.path.join(args.output, "tracking_benchmark.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = [("(a) query propagation", q_res, q_fps), ("(b) detector + IoUTracker", b_res, b_fps)]
    print("\n| tracker | " + " | ".join(METRICS) + " | frames/s |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for name, r, fps in rows:
        vals = [f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in METRICS]
        print(f"| {name} | " + " | ".join(vals) + f" | {fps:.1f} |")
    print(f"\ntrain: {train_info}; val: {len(seqs)} sequences, {n_frames} frames")
    return results


if __name__ == "__main__":
    main()
