"""Command lines of tools/demo.py and tools/visualize_sampling.py (here so tests can call them in-process)."""

import argparse
import logging
import os
import sys
import time

import cv2
import numpy as np

from .io import (
    DemoError,
    VideoSink,
    expand_inputs,
    has_display,
    iter_frames,
    open_video,
    read_image_bgr,
    resolve_image_output,
    resolve_video_output,
    video_properties,
)

__all__ = ["demo_main", "visualize_sampling_main", "get_demo_parser", "get_visualize_sampling_parser"]

logger = logging.getLogger("ddetr_d2.demo")
WINDOW_NAME = "ddetr-d2 detections"


def get_demo_parser():
    parser = argparse.ArgumentParser(
        description="Deformable DETR demo on images, a video file or a webcam (Detectron2 style).",
    )
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
        "--track",
        action="store_true",
        help="with --video: run the query-propagation tracker (ddetr_video) and write MOT-format results",
    )
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="load weights that do not match the config (warn only)"
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS out/model_final.pth MODEL.DEVICE cpu",
    )
    return parser


def _setup_logging():
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="ddetr_d2")


def _check_threshold(value):
    if not 0.0 <= value <= 1.0:
        raise DemoError(f"--confidence-threshold must be in [0, 1], got {value}")


def _run_images(demo, args):
    files = expand_inputs(args.input)
    outputs = []
    for path in files:
        image = read_image_bgr(path)
        start = time.perf_counter()
        instances, vis, _ = demo.run_on_image(image)
        logger.info("%s: %d detections in %.2fs", path, len(instances), time.perf_counter() - start)
        if args.output:
            out_path = resolve_image_output(args.output, path, len(files))
            if not cv2.imwrite(out_path, vis):
                raise DemoError(f"cannot write {out_path} (unsupported extension or unwritable location)")
            outputs.append(out_path)
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis)
            if cv2.waitKey(0) == 27:  # Esc quits
                break
    if outputs:
        logger.info("wrote %d image(s) to %s", len(outputs), args.output)
    return outputs


def _run_video(demo, args):
    from tqdm import tqdm

    cap = open_video(args.video)
    try:
        width, height, fps, num_frames = video_properties(cap)
        sink = None
        if args.output:
            sink = VideoSink(resolve_video_output(args.output, args.video), fps, (width, height))
        try:
            frames = tqdm(iter_frames(cap), total=num_frames, unit="frame", desc=os.path.basename(args.video))
            for vis in demo.run_on_video(frames):
                if sink is not None:
                    sink.write(vis)
                else:
                    cv2.namedWindow(os.path.basename(args.video), cv2.WINDOW_NORMAL)
                    cv2.imshow(os.path.basename(args.video), vis)
                    if cv2.waitKey(1) == 27:
                        break
        finally:
            if sink is not None:
                sink.close()
    finally:
        cap.release()
    if sink is not None:
        if sink.num_frames == 0:
            raise DemoError(f"no frame could be read from {args.video}")
        logger.info("wrote %d frames (%dx%d, %.2f fps) to %s", sink.num_frames, width, height, fps, sink.path)
        return [sink.path]
    return []


def _run_webcam(demo, args):
    from tqdm import tqdm

    cap = open_video(0)
    try:
        if args.output is None and not has_display():
            raise DemoError("no display to show the webcam on (headless machine); pass --output to record")
        width, height, fps, _ = video_properties(cap)
        sink = (
            VideoSink(resolve_video_output(args.output, None), fps, (width, height)) if args.output else None
        )
        try:
            for vis in tqdm(demo.run_on_video(iter_frames(cap)), unit="frame", desc="webcam"):
                if sink is not None:
                    sink.write(vis)
                if has_display():
                    cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
                    cv2.imshow(WINDOW_NAME, vis)
                    if cv2.waitKey(1) == 27:  # Esc quits
                        break
        except KeyboardInterrupt:
            pass
        finally:
            if sink is not None:
                sink.close()
    finally:
        cap.release()
        if has_display():
            cv2.destroyAllWindows()
    return [sink.path] if sink is not None else []


def _run_track(cfg, args):
    if not args.video:
        raise DemoError("--track needs --video PATH")
    if args.webcam or args.input:
        raise DemoError("--track works on --video only (not with --input or --webcam)")
    try:
        from ddetr_video.demo import track_video
    except ImportError as e:
        raise DemoError(
            f"--track needs the video add-on package ddetr_video (video/ddetr_video) with demo.track_video; "
            f"import failed: {e}"
        ) from e
    open_video(args.video).release()  # same clear errors as the detection demo for a bad video
    try:
        result = track_video(cfg, args.video, args.output, args.confidence_threshold)
    except (OSError, ValueError) as e:  # bad output path, weights, config for the tracker
        raise DemoError(f"tracking {args.video} failed: {type(e).__name__}: {e}") from e
    logger.info("tracking results written to %s", result)
    return [result]


def _run_demo(argv):
    args = get_demo_parser().parse_args(argv)
    _setup_logging()
    modes = sum(bool(x) for x in (args.input, args.video, args.webcam))
    if modes != 1:
        raise DemoError("give exactly one of --input, --video (--video-input) or --webcam")
    _check_threshold(args.confidence_threshold)
    # fail on bad inputs and outputs before building the model
    if not os.path.isfile(args.config_file):
        raise DemoError(f"config file not found: {args.config_file}")
    if args.input:
        files = expand_inputs(args.input)
        if args.output:
            resolve_image_output(args.output, files[0], len(files))
    if args.webcam:
        open_video(0).release()
    if args.video:
        open_video(args.video).release()
        if args.output and not args.track:
            resolve_video_output(args.output, args.video)
    if args.output is None and not args.track and not has_display():
        raise DemoError("no display to show results on (headless machine); pass --output to write files")

    from .predictor import VisualizationDemo, setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    if args.track:
        return _run_track(cfg, args)
    demo = VisualizationDemo(
        cfg,
        confidence_threshold=args.confidence_threshold,
        show_sampling=args.show_sampling,
        allow_mismatch=args.allow_mismatch,
    )
    if args.input:
        return _run_images(demo, args)
    if args.video:
        return _run_video(demo, args)
    return _run_webcam(demo, args)


def demo_main(argv=None):
    """Entry point of tools/demo.py; returns the process exit code (0 ok, 1 user error)."""
    try:
        _run_demo(argv)
    except DemoError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# tools/visualize_sampling.py


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
    parser.add_argument("--max-detections", type=int, default=5, help="draw the top-K scoring detections")
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
    _setup_logging()
    _check_threshold(args.confidence_threshold)
    (path,) = expand_inputs([args.image])
    if os.path.splitext(args.output)[1].lower() != ".png":
        raise DemoError(f"--output must be a .png file, got {args.output}")
    out_path = resolve_image_output(args.output, path, 1)
    image = read_image_bgr(path)

    from .predictor import VisualizationDemo, setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    demo = VisualizationDemo(
        cfg,
        confidence_threshold=args.confidence_threshold,
        show_sampling=True,
        allow_mismatch=args.allow_mismatch,
    )
    grid, instances, _ = sampling_grid(demo, image, per=args.per, max_detections=args.max_detections)
    if len(instances) == 0:
        logger.warning(
            "no detection scored >= %.2f; the panels show no sampling points", args.confidence_threshold
        )
    if not cv2.imwrite(out_path, grid):
        raise DemoError(f"cannot write {out_path}")
    logger.info("wrote %s (%d detections, one panel per %s)", out_path, len(instances), args.per)
    return out_path


def visualize_sampling_main(argv=None):
    """Entry point of tools/visualize_sampling.py; returns the process exit code."""
    try:
        _run_visualize_sampling(argv)
    except DemoError as e:
        print(f"visualize_sampling.py: error: {e}", file=sys.stderr)
        return 1
    return 0
