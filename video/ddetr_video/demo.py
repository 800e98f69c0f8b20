"""Track a video file and write an annotated video plus MOTChallenge results (``tools/demo.py --track``).

With a ``QueryTracker`` config the model's own track queries give the ids; with a plain ``DeformableDETR``
config the detections are associated frame to frame by :class:`ddetr_video.iou_tracker.IoUTracker`.
"""

import colorsys
import logging
import os

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .mot_format import write_results_file

__all__ = ["track_video", "id_colour", "draw_tracks", "output_paths"]

logger = logging.getLogger(__name__)


def id_colour(track_id):
    """A stable, well-spread BGR colour for an integer track id (golden-ratio hue steps)."""
    h = (int(track_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_tracks(frame_bgr, boxes, ids, scores=None):
    """Draw XYXY ``boxes`` with their ids (and scores) on a copy of a BGR uint8 frame."""
    out = frame_bgr.copy()
    for i, (box, tid) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), ids)):
        c = id_colour(tid)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), c, 2)
        label = f"{int(tid)}" if scores is None else f"{int(tid)} {float(scores[i]):.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        y_text = max(y0, th + 2)
        cv2.rectangle(out, (x0, y_text - th - 2), (x0 + tw + 2, y_text), c, -1)
        cv2.putText(
            out, label, (x0 + 1, y_text - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA
        )
    return out


def output_paths(video_path, output_path):
    """(annotated video path, MOT txt path). ``output_path``: a file, a folder, or None (beside the input)."""
    stem = os.path.splitext(os.path.basename(video_path))[0]
    if output_path is None:
        out_video = os.path.join(os.path.dirname(os.path.abspath(video_path)), stem + "_tracks.mp4")
    elif (
        os.path.isdir(output_path)
        or output_path.endswith(("/", os.sep))
        or not os.path.splitext(output_path)[1]
    ):
        os.makedirs(output_path, exist_ok=True)
        out_video = os.path.join(output_path, stem + "_tracks.mp4")
    else:
        out_video = output_path
    os.makedirs(os.path.dirname(os.path.abspath(out_video)), exist_ok=True)
    return out_video, os.path.splitext(out_video)[0] + ".txt"


def _open_writer(path, fps, size):
    for p, codec in ((path, "mp4v"), (os.path.splitext(path)[0] + ".avi", "MJPG")):
        w = cv2.VideoWriter(p, cv2.VideoWriter_fourcc(*codec), fps, size)
        if w.isOpened():
            return w, p
        w.release()
    raise OSError(f"cannot open a video writer for {path} (mp4v) nor its .avi fallback (MJPG)")


def _ensure_tracker_cfg(cfg):
    if "TRACKER" in cfg.MODEL:
        return cfg
    from .config import add_tracker_config

    cfg = cfg.clone()
    cfg.defrost()
    add_tracker_config(cfg)
    return cfg


def track_video(cfg, video_path, output_path=None, confidence_threshold=0.5, model=None):
    """
    Args:
        cfg: Detectron2 config of a ``QueryTracker`` (ids from track queries) or ``DeformableDETR``
            (ids from IoUTracker association); ``MODEL.WEIGHTS`` is loaded unless ``model`` is given.
        video_path: input video file readable by OpenCV.
        output_path: annotated video file, or a folder (``<stem>_tracks.mp4`` inside), or None (beside
            the input).
        confidence_threshold: boxes with a lower score are neither drawn nor written.
        model: an already built model (tests, notebooks); put in eval mode here.
    Returns:
        Path of the MOTChallenge results file (``frame,id,x,y,w,h,score,-1,-1,-1``, frames 1-based), written
        beside the annotated video (same stem, ``.txt``).
    """
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    cap = cv2.VideoCapture(video_path)
    if not cap.isOpened():
        raise OSError(f"cannot open video {video_path}")
    cfg = _ensure_tracker_cfg(cfg)
    if model is None:
        model = build_model(cfg)
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    query_tracker = hasattr(model, "track") and hasattr(model, "reset_tracks")
    if query_tracker:
        model.reset_tracks()
    else:
        from .iou_tracker import IoUTracker, assign_track_ids

        tc = cfg.MODEL.TRACKER
        iou_tracker = IoUTracker(
            birth_score=max(confidence_threshold, tc.BIRTH_THRESHOLD),
            match_score=confidence_threshold,
            max_age=tc.MAX_AGE,
        )
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    out_video, out_txt = output_paths(video_path, output_path)
    writer, rows, n = None, [], 0
    seq = os.path.splitext(os.path.basename(video_path))[0]
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            h, w = frame.shape[:2]
            if writer is None:
                writer, out_video = _open_writer(out_video, fps, (w, h))
            image = frame[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else frame
            image = resize.get_transform(image).apply_image(image)
            inp = {
                "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "height": h,
                "width": w,
                "sequence": seq,
                "frame_idx": n,
            }
            with torch.no_grad():
                if query_tracker:
                    inst = model.track([inp])[0]["instances"]
                else:
                    inst = model([inp])[0]["instances"]
                    inst = assign_track_ids(inst[inst.scores >= confidence_threshold], iou_tracker)
            inst = inst[(inst.scores >= confidence_threshold) & (inst.track_ids >= 0)].to("cpu")
            boxes = inst.pred_boxes.tensor.numpy()
            ids, scores = inst.track_ids.numpy(), inst.scores.numpy()
            writer.write(draw_tracks(frame, boxes, ids, scores))
            n += 1
            for b, i, s in zip(boxes, ids, scores):
                rows.append([n, i, b[0], b[1], b[2] - b[0], b[3] - b[1], s])
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if n == 0:
        raise OSError(f"no frame could be read from {video_path}")
    write_results_file(out_txt, np.asarray(rows, dtype=np.float64).reshape(-1, 7))
    logger.info(f"tracked {n} frames of {video_path}: {out_video}, {out_txt}")
    return out_txt
