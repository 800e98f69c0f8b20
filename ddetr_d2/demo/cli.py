"""Command lines of tools/demo.py and tools/visualize_sampling.py (here so tests can call them in-process).

The detection demo knows nothing of tracking: the video add-on's tracking demo
(``ddetr_video.demo``) extends :func:`get_demo_parser` and reuses :func:`run_cli`, and
``tools/demo.py`` hands ``--track`` to it.
"""

import argparse
import logging
import os
import sys
import time

import cv2
import numpy as np

from ddetr_d2.config import build_cfg
from ddetr_d2.errors import UserError

from .io import (
    DemoError,
    expand_inputs,
    has_display,
    missing_dirs,
    open_video,
    plan_image_outputs,
    prepare_output_dir,
    process_video,
    read_image_bgr,
    remove_empty_dirs,
    resolve_image_output,
    resolve_video_output,
)

__all__ = [
    "demo_main",
    "visualize_sampling_main",
    "get_demo_parser",
    "get_visualize_sampling_parser",
    "run_cli",
    "setup_demo_logging",
    "check_threshold",
    "sampling_grid",
]

logger = logging.getLogger("ddetr_d2.demo")
WINDOW_NAME = "ddetr-d2 detections"


def get_demo_parser(**parser_kwargs):
    """
    The demo's command line (every flag is defined here). ``parser_kwargs`` go to
    ``argparse.ArgumentParser`` (e.g. ``prog``, ``description``, ``epilog``); the tracking demo adds
    its own flags to the returned parser.
    """
    parser_kwargs.setdefault(
        "description", "Deformable DETR demo on images, a video file or a webcam (Detectron2 style)."
    )
    parser = argparse.ArgumentParser(**parser_kwargs)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument("--webcam", action="store_true", help="take frames from webcam 0")
    parser.add_argument("--video", "--video-input", dest="video", metavar="PATH", help="path to a video file")
    parser.add_argument(
        "--input", nargs="+", metavar="PATH", help="image files or glob patterns, e.g. 'dir/*.jpg' (quoted)"
    )
    parser.add_argument(
        "--output",
        help="images: an output folder (or one file name for a single input); video: an .mp4 file or a "
        "folder. Without it, results are shown in a window.",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to draw")
    parser.add_argument(
        "--show-sampling",
        action="store_true",
        help="draw the last decoder layer's cross-attention sampling points of the kept detections "
        "(colour = feature level, size = attention weight, cross = reference point)",
    )
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="load weights that do not match the config (warn only)"
    )
    parser.add_argument(
        "--backend",
        choices=("pytorch", "onnxruntime"),
        default=None,
        help="run the PyTorch model (MODEL.WEIGHTS) or an exported model (--onnx-model) with onnxruntime "
        "(default: onnxruntime when --onnx-model is given, else pytorch)",
    )
    parser.add_argument(
        "--onnx-model",
        metavar="FILE",
        help="model.onnx (or its folder) from tools/export_model.py; implies --backend onnxruntime",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS out/model_final.pth MODEL.DEVICE cpu",
    )
    return parser


def run_cli(run, argv, prog):
    """
    Run ``run(argv)`` as a command line: a :class:`~ddetr_d2.errors.UserError` (bad input, config,
    weights, output) is printed as one line ``<prog>: error: <message>`` and gives exit code 2; any
    other exception is a bug and keeps its traceback. Returns the exit code (0 on success).
    """
    try:
        run(argv)
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


def setup_demo_logging():
    """Detectron2-style console logging of fvcore, detectron2 and ddetr_d2 (checkpoint and progress lines)."""
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="ddetr_d2")


def check_threshold(value):
    """DemoError unless ``value`` (--confidence-threshold) is in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise DemoError(f"--confidence-threshold must be in [0, 1], got {value}")


def _check_images(args):
    """
    The (input file, output file or None) pairs of ``--input``, checked without creating anything:
    the output paths (distinct: ``io.image_output_names``), then every input decoded once, so an
    unreadable image is reported before any output is written.
    """
    files = expand_inputs(args.input)
    outputs = plan_image_outputs(args.output, files) if args.output else [None] * len(files)
    start = time.perf_counter()
    for path in files:
        read_image_bgr(path)
    logger.info("read %d input image(s) in %.2fs", len(files), time.perf_counter() - start)
    return list(zip(files, outputs))


def _run_images(demo, args, jobs=None):
    """Run the (input, output) pairs of :func:`_check_images`; returns the files written."""
    jobs = _check_images(args) if jobs is None else jobs
    out_dirs = {os.path.dirname(os.path.abspath(out)) for _, out in jobs if out}
    new_dirs = sorted({d for out_dir in out_dirs for d in missing_dirs(out_dir)}, key=len)
    outputs = []
    try:
        for path, out_path in jobs:
            image = read_image_bgr(path)
            start = time.perf_counter()
            instances, vis, _ = demo.run_on_image(image)
            logger.info("%s: %d detections in %.2fs", path, len(instances), time.perf_counter() - start)
            if out_path:
                prepare_output_dir(os.path.dirname(os.path.abspath(out_path)))
                if not cv2.imwrite(out_path, vis):
                    raise DemoError(f"cannot write {out_path} (unsupported extension or unwritable location)")
                outputs.append(out_path)
            else:
                cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
                cv2.imshow(WINDOW_NAME, vis)
                if cv2.waitKey(0) == 27:  # Esc quits
                    break
    except DemoError as e:
        remove_empty_dirs(new_dirs)
        if outputs:
            raise DemoError(f"{e} ({len(outputs)} image(s) already written to {args.output})") from e
        raise
    except BaseException:
        remove_empty_dirs(new_dirs)
        raise
    if outputs:
        logger.info("wrote %d image(s) to %s", len(outputs), args.output)
    return outputs


def _run_video(demo, args):
    """A video file, or with --webcam camera 0 (shown where there is a display, recorded with --output)."""
    source = 0 if args.webcam else args.video
    out_path, new_dirs = None, []
    if args.output:
        new_dirs = missing_dirs(os.path.dirname(resolve_video_output(args.output, args.video, create=False)))
        out_path = resolve_video_output(args.output, args.video)
    show = has_display() if args.webcam else out_path is None
    try:
        sink = process_video(source, demo.run_on_video, out_path, show=show)  # removes a failed output file
    except BaseException:
        remove_empty_dirs(new_dirs)  # no new folder left behind by a failed run
        raise
    return [sink.path] if sink is not None else []


def _check_inputs_and_outputs(args):
    """
    Fail on bad inputs and output paths before the model is built; creates nothing. Returns the
    (input, output) pairs of ``--input`` (:func:`_check_images`), else None.
    """
    modes = sum(bool(x) for x in (args.input, args.video, args.webcam))
    if modes != 1:
        raise DemoError("give exactly one of --input, --video (--video-input) or --webcam")
    check_threshold(args.confidence_threshold)
    if not os.path.isfile(args.config_file):
        raise DemoError(f"config file not found: {args.config_file}")
    if args.backend == "pytorch" and args.onnx_model:
        raise DemoError("--onnx-model runs with --backend onnxruntime, not --backend pytorch")
    jobs = _check_images(args) if args.input else None
    if args.webcam:
        open_video(0).release()
        if args.output is None and not has_display():
            raise DemoError("no display to show the webcam on (headless machine); pass --output to record")
    if args.video:
        open_video(args.video).release()
    if args.output:
        if args.video or args.webcam:
            resolve_video_output(args.output, args.video, create=False)
    elif not has_display():
        raise DemoError("no display to show results on (headless machine); pass --output to write files")
    return jobs


def _run_demo(argv, parser_kwargs=None):
    args = get_demo_parser(**(parser_kwargs or {})).parse_args(argv)
    setup_demo_logging()
    jobs = _check_inputs_and_outputs(args)
    cfg = build_cfg(args.config_file, args.opts)

    from .predictor import VisualizationDemo

    if args.backend == "onnxruntime" or (args.backend is None and args.onnx_model):
        # an exported model (tools/export_model.py, docs/deployment.md)
        from ddetr_d2.export.onnx_predictor import onnx_visualization_demo

        demo = onnx_visualization_demo(cfg, args.onnx_model, args.confidence_threshold, args.show_sampling)
        return _run_images(demo, args, jobs) if args.input else _run_video(demo, args)
    demo = VisualizationDemo(  # builds the model and loads MODEL.WEIGHTS (checked) before any output
        cfg,
        confidence_threshold=args.confidence_threshold,
        show_sampling=args.show_sampling,
        allow_mismatch=args.allow_mismatch,
    )
    if args.input:
        return _run_images(demo, args, jobs)
    return _run_video(demo, args)


def demo_main(argv=None, **parser_kwargs):
    """
    Entry point of tools/demo.py (detection); returns the exit code (0 ok, 2 user error).
    ``parser_kwargs`` go to :func:`get_demo_parser` (e.g. an ``epilog`` naming more modes).
    """
    return run_cli(lambda a: _run_demo(a, parser_kwargs), argv, "demo.py")


# ------------------------------------------------------------------------------------------------
# tools/visualize_sampling.py


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def get_visualize_sampling_parser():
    parser = argparse.ArgumentParser(
        description="Grid of the last decoder layer's sampling points for the top detections of one image: "
        "one panel per attention head (or per feature level)."
    )
    parser.add_argument("image", help="input image")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="output PNG file")
    parser.add_argument(
        "--per", choices=["head", "level"], default="head", help="one panel per head or level"
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument(
        "--max-detections",
        type=_non_negative_int,
        default=5,
        metavar="K",
        help="draw the top-K scoring detections (K >= 0)",
    )
    parser.add_argument("--allow-mismatch", action="store_true")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def sampling_grid(demo, image_bgr, per="head", max_detections=5):
    """
    Panels of ``image_bgr`` with the detections' boxes and the sampling points of one head (all levels)
    or one level (all heads) each. Returns (grid image, instances drawn, DetectionSampling).
    """
    from detectron2.utils.visualizer import Visualizer

    from .sampling import draw_level_legend, draw_sampling_points, make_panel_grid

    instances, sampling = demo.predict(image_bgr)
    order = np.argsort(-instances.scores.numpy(), kind="stable")[: max(0, max_detections)]
    instances = instances[order.tolist()]
    sampling = type(sampling)(
        points=sampling.points[order],
        weights=sampling.weights[order],
        reference_xy=sampling.reference_xy[order],
        image_hw=sampling.image_hw,
    )
    base = Visualizer(image_bgr[:, :, ::-1], demo.metadata).draw_instance_predictions(instances).get_image()
    base = np.ascontiguousarray(base[:, :, ::-1])
    num_heads, num_levels = sampling.weights.shape[1], sampling.weights.shape[2]
    panels, titles = [], []
    if per == "head":
        for m in range(num_heads):
            panel, _ = draw_sampling_points(base, sampling, heads=[m])
            panels.append(draw_level_legend(panel, num_levels))
            titles.append(f"head {m} (all levels)")
    else:
        for lvl in range(num_levels):
            panel, _ = draw_sampling_points(base, sampling, levels=[lvl])
            panels.append(panel)
            titles.append(f"level {lvl} (all heads)")
    return make_panel_grid(panels, titles), instances, sampling


def _run_visualize_sampling(argv):
    args = get_visualize_sampling_parser().parse_args(argv)
    setup_demo_logging()
    check_threshold(args.confidence_threshold)
    files = expand_inputs([args.image])
    if len(files) != 1:
        raise DemoError(
            f"{args.image} matches {len(files)} image files ({files[0]}, ...); "
            "visualize_sampling takes one image"
        )
    path = files[0]
    if os.path.splitext(args.output)[1].lower() != ".png":
        raise DemoError(f"--output must be a .png file, got {args.output}")
    resolve_image_output(args.output, path, 1, create=False)
    image = read_image_bgr(path)
    cfg = build_cfg(args.config_file, args.opts)

    from .predictor import VisualizationDemo

    demo = VisualizationDemo(
        cfg,
        confidence_threshold=args.confidence_threshold,
        show_sampling=True,
        allow_mismatch=args.allow_mismatch,
    )
    grid, instances, _ = sampling_grid(demo, image, per=args.per, max_detections=args.max_detections)
    if args.max_detections == 0:
        logger.warning("--max-detections 0: the panels show no detections and no sampling points")
    elif len(instances) == 0:
        logger.warning(
            "no detection scored >= %.2f; the panels show no sampling points", args.confidence_threshold
        )
    new_dirs = missing_dirs(os.path.dirname(os.path.abspath(args.output)))
    out_path = resolve_image_output(args.output, path, 1)
    if not cv2.imwrite(out_path, grid):
        remove_empty_dirs(new_dirs)
        raise DemoError(f"cannot write {out_path}")
    logger.info("wrote %s (%d detections, one panel per %s)", out_path, len(instances), args.per)
    return out_path


def visualize_sampling_main(argv=None):
    """Entry point of tools/visualize_sampling.py; returns the exit code (0 ok, 2 user error)."""
    return run_cli(_run_visualize_sampling, argv, "visualize_sampling.py")
