"""The tracking demo: track the objects of a video file, write an annotated video and MOTChallenge results.

Entry points: ``video/demo.py`` and ``tools/demo.py --track`` (which hands its command line to
:func:`main`). It is the detection demo (:mod:`ddetr_d2.demo`) plus tracking: the same command line
(:func:`get_tracking_parser` extends ``get_demo_parser``), the same config and checked weight loading
(``build_cfg`` with the tracker keys, ``build_demo_model``), the same frame preprocessing
(``ImagePredictor``), video reading / writing / progress bar (``process_video``, ``VideoSink``) and
Detectron2's ``Visualizer``, with one stable colour per track id.

The tracking itself is :class:`ddetr_video.predictor.TrackingPredictor` (one BGR frame per call, the
association that ``MODEL.TRACKER.ASSOCIATION`` names: ``RuntimeTracker``, query propagation with a
``QueryTracker``, or ``IoUTracker``, the IoU baseline, with any detector); this module only reads,
draws and writes.
"""

import colorsys
import logging
import os

import numpy as np
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from ddetr_d2.config import build_cfg
from ddetr_d2.demo.cli import check_threshold, get_demo_parser, run_cli, setup_demo_logging
from ddetr_d2.demo.io import DemoError, open_video, process_video, resolve_video_output
from ddetr_d2.demo.predictor import demo_metadata

from .config import add_tracker_config, check_tracker_config
from .mot_format import write_results_file
from .predictor import TrackingPredictor

__all__ = ["get_tracking_parser", "main", "track_video", "track_colour", "draw_tracks"]

logger = logging.getLogger(__name__)


def get_tracking_parser(**parser_kwargs):
    """The detection demo's command line plus ``--track`` (accepted, and implied: this demo always tracks)."""
    parser_kwargs.setdefault(
        "description",
        "Track the objects of a video (ddetr_video): writes <output>/<video stem>_tracks.mp4 with one colour "
        "per track id and the MOTChallenge results <...>_tracks.txt beside it.",
    )
    parser = get_demo_parser(**parser_kwargs)
    parser.add_argument(
        "--track",
        action="store_true",
        help="track (always on here; tools/demo.py passes --track on to this demo). --output: an .mp4 file "
        "or a folder; without it, the results are written beside the input video",
    )
    return parser


def track_colour(track_id):
    """A stable RGB colour (floats in [0, 1]) of an integer track id: golden-ratio hue steps, so
    neighbouring ids get far-apart hues and an id keeps its colour in every frame and run."""
    hue = (int(track_id) * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.85, 0.95)


def draw_tracks(frame_bgr, instances, metadata):
    """
    Draw one frame's tracks with Detectron2's Visualizer: each box in its id's :func:`track_colour`,
    labelled ``<id> <class> <score %>``. ``instances``: pred_boxes (XYXY, frame pixels), scores,
    pred_classes, track_ids. Returns a new BGR uint8 frame of the same size.
    """
    classes = metadata.get("thing_classes", None)
    labels = []
    for tid, cls, score in zip(
        instances.track_ids.tolist(), instances.pred_classes.tolist(), instances.scores.tolist()
    ):
        name = classes[cls] if classes and 0 <= cls < len(classes) else f"class {cls}"
        labels.append(f"{tid} {name} {score:.0%}")
    visualizer = Visualizer(frame_bgr[:, :, ::-1], metadata)
    vis = visualizer.overlay_instances(
        boxes=instances.pred_boxes.tensor.numpy(),
        labels=labels,
        assigned_colors=[track_colour(t) for t in instances.track_ids.tolist()],
    )
    return np.ascontiguousarray(vis.get_image()[:, :, ::-1])


def track_video(
    cfg, video_path, output_path=None, confidence_threshold=0.5, model=None, allow_mismatch=False
):
    """
    Args:
        cfg: config with the tracker keys: a ``QueryTracker`` with ``MODEL.TRACKER.ASSOCIATION``
            ``RuntimeTracker`` (ids from track queries), or any detector with ``IoUTracker``.
        video_path: input video file readable by OpenCV.
        output_path: annotated video file, or a folder (``<stem>_tracks.mp4`` inside), or None (a
            ``<stem>_tracks.mp4`` beside the input).
        confidence_threshold: tracks with a lower score in a frame are neither drawn nor written
            there (births and deaths follow the ``MODEL.TRACKER`` thresholds).
        model: an already built model (tests, notebooks); else ``MODEL.WEIGHTS`` is loaded and
            checked (``allow_mismatch``: warn instead of stopping on keys that do not fit).
    Returns:
        Path of the MOTChallenge results file (``frame,id,x,y,w,h,score,-1,-1,-1``, frames 1-based),
        written beside the annotated video (same stem, ``.txt``).

    The video, the output location and the weights are checked before anything is created.
    """
    check_threshold(confidence_threshold)
    open_video(video_path).release()
    if output_path is None:
        output_path = os.path.dirname(os.path.abspath(video_path)) + os.sep
    resolve_video_output(output_path, video_path, suffix="_tracks.mp4", create=False)
    if model is None:
        tracker = TrackingPredictor.from_config(cfg, allow_mismatch=allow_mismatch)
    else:
        tracker = TrackingPredictor(cfg, model)
    metadata = demo_metadata(cfg)
    rows = []

    def annotate(frames):
        for n, frame in enumerate(frames, start=1):
            inst = tracker(frame).to("cpu")
            inst = inst[(inst.scores >= confidence_threshold) & (inst.track_ids >= 0)]
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
            for box, tid, score in zip(boxes, inst.track_ids.tolist(), inst.scores.tolist()):
                rows.append([n, tid, box[0], box[1], box[2] - box[0], box[3] - box[1], score])
            yield draw_tracks(frame, inst, metadata)

    out_video = resolve_video_output(output_path, video_path, suffix="_tracks.mp4")
    sink = process_video(video_path, annotate, out_video)
    out_txt = os.path.splitext(sink.path)[0] + ".txt"
    write_results_file(out_txt, np.asarray(rows, dtype=np.float64).reshape(-1, 7))
    num_ids = len({int(r[1]) for r in rows})
    logger.info(
        "tracked %d frames of %s (%d ids): %s, %s", sink.num_frames, video_path, num_ids, sink.path, out_txt
    )
    return out_txt


def _run(argv):
    args = get_tracking_parser().parse_args(argv)
    setup_demo_logging()
    setup_logger(name="ddetr_video")
    if args.input or args.webcam:
        raise DemoError("--track works on --video only (not with --input or --webcam)")
    if not args.video:
        raise DemoError("--track needs --video PATH")
    if args.show_sampling:
        raise DemoError("--show-sampling is not available with --track")
    if args.backend == "onnxruntime" or args.onnx_model:
        raise DemoError("--track runs the PyTorch tracker: --backend onnxruntime / --onnx-model do not apply")
    check_threshold(args.confidence_threshold)
    cfg = build_cfg(args.config_file, args.opts, add_config_fns=(add_tracker_config,))
    check_tracker_config(cfg)  # before the model is built: one line naming the key
    return track_video(
        cfg, args.video, args.output, args.confidence_threshold, allow_mismatch=args.allow_mismatch
    )


def main(argv=None, prog="demo.py --track"):
    """Entry point of video/demo.py and tools/demo.py --track; returns the exit code (0 ok, 2 user error)."""
    return run_cli(_run, argv, prog)
