"""Input/output helpers of the demo: image and video reading, output paths, an MP4 writer with a fallback.

Every failure a user can cause (missing file, unreadable video, unwritable output) raises
:class:`DemoError` with a message naming the path, so the command line tools exit cleanly.
Output paths are resolved twice: first with ``create=False`` (checks only, before the model is
built and its weights loaded), then with ``create=True`` once the run can start, so a run that fails
leaves no new folder behind.
"""

import glob
import logging
import math
import os

import cv2
import numpy as np

from ddetr_d2.errors import UserError

__all__ = [
    "DemoError",
    "expand_inputs",
    "read_image_bgr",
    "open_video",
    "video_properties",
    "iter_frames",
    "prepare_output_dir",
    "resolve_image_output",
    "resolve_video_output",
    "VideoSink",
    "process_video",
    "has_display",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")


class DemoError(UserError):
    """A user-facing error of the demo tools (bad input or output); printed as one line, exit code 2."""


def expand_inputs(patterns):
    """
    Expand ``--input`` arguments (file names or glob patterns) into a sorted list of existing files.

    Raises DemoError naming the patterns that match nothing and the paths that do not exist.
    """
    files, missing = [], []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(pattern):
            matched = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matched:
                missing.append(f"{pattern} (glob matched no file)")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern):
            missing.append(f"{pattern} (is a directory; use a glob such as '{pattern}/*.jpg')")
        else:
            missing.append(f"{pattern} (no such file)")
    if missing:
        raise DemoError("input not found: " + "; ".join(missing))
    return files


def read_image_bgr(path):
    """Read an image as an (H, W, 3) uint8 BGR array (EXIF orientation applied); DemoError if unreadable."""
    from detectron2.data.detection_utils import read_image

    try:
        image = read_image(path, format="BGR")
    except Exception as e:  # PIL raises several types for broken / non-image files
        raise DemoError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if image is None or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise DemoError(f"cannot read image {path}: empty or not a colour image")
    return np.ascontiguousarray(image)


def open_video(source):
    """
    Open a video file path or a camera index with OpenCV; check that a first frame can be read.

    Returns an opened ``cv2.VideoCapture`` positioned at the first frame.
    """
    is_camera = isinstance(source, int)
    if not is_camera:
        if not os.path.exists(source):
            raise DemoError(f"video not found: {source}")
        if not os.path.isfile(source):
            raise DemoError(f"video path is not a file: {source}")
        if os.path.getsize(source) == 0:
            raise DemoError(f"video file is empty (0 bytes): {source}")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        if is_camera:
            raise DemoError(
                f"cannot open webcam {source}: no camera device is available "
                "(this machine may be headless; use --video or --input instead)"
            )
        raise DemoError(
            f"cannot open video {source}: OpenCV could not decode it (unsupported or corrupt file)"
        )
    if not is_camera:
        ok, _ = cap.read()
        if not ok:
            cap.release()
            raise DemoError(f"video {source} has no readable frame (empty or corrupt)")
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    return cap


def video_properties(cap, default_fps=30.0):
    """(width, height, fps, num_frames or None) of an opened capture; fps falls back to ``default_fps``."""
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not fps or not math.isfinite(fps) or fps <= 0 or fps > 1000:
        logger.warning("video reports no valid frame rate (%s); writing at %.1f fps", fps, default_fps)
        fps = default_fps
    num_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    return width, height, float(fps), (num_frames if num_frames > 0 else None)


def iter_frames(cap):
    """Yield BGR frames one at a time from an opened capture (never holds the whole video)."""
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        yield frame


def _check_dir_creatable(path):
    """DemoError unless ``path`` is a writable directory or could be created as one (creates nothing)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise DemoError(f"output path {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise DemoError(f"output directory {path} is not writable")
        return
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise DemoError(f"cannot create output directory {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DemoError(f"cannot create output directory {path}: {ancestor} is not writable")


def prepare_output_dir(path, create=True):
    """
    Create ``path`` as a directory if needed; DemoError if it cannot be created or written to.
    ``create=False`` only checks that it could be (nothing is created).
    """
    if not create:
        _check_dir_creatable(path)
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise DemoError(f"output path {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create output directory {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise DemoError(f"output directory {path} is not writable")
    return path


def _check_file_writable(path, create=True):
    parent = os.path.dirname(os.path.abspath(path))
    prepare_output_dir(parent, create=create)
    if os.path.isdir(path):
        raise DemoError(f"output file {path} is a directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise DemoError(f"output file {path} is not writable")


def resolve_image_output(output, input_path, num_inputs, create=True):
    """
    Output file of one input image. ``output`` is a directory (created if needed, unless
    ``create=False``; required for several inputs), or, with one input, a file name with an image
    extension.
    """
    is_file = os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS and not os.path.isdir(output)
    if is_file:
        if num_inputs > 1:
            raise DemoError(
                f"--output {output} looks like a file but there are {num_inputs} inputs; give a folder"
            )
        _check_file_writable(output, create=create)
        return output
    prepare_output_dir(output, create=create)
    name = os.path.basename(input_path)
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:  # e.g. .gif: written as PNG
        name = stem + ".png"
    return os.path.join(output, name)


def resolve_video_output(output, video_path, suffix=".mp4", create=True):
    """
    Output file of a video: ``output`` if it is a file name, else ``output/<video stem><suffix>``
    (``video_path`` None: ``webcam<suffix>``). Folders are created unless ``create=False``.
    """
    if os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]:
        prepare_output_dir(output, create=create)
        stem = os.path.splitext(os.path.basename(video_path))[0] if video_path else "webcam"
        return os.path.join(output, stem + suffix)
    _check_file_writable(output, create=create)
    return output


class VideoSink:
    """
    Write BGR frames of a fixed size to ``path`` as MP4 (``mp4v``). If that writer cannot be opened
    (OpenCV built without an MP4 muxer), fall back to Motion-JPEG in ``<path stem>.avi`` with a
    warning; if neither opens, raise DemoError. ``self.path`` is the file actually written.
    """

    def __init__(self, path, fps, frame_size):
        self.frame_size = tuple(int(s) for s in frame_size)  # (width, height)
        self.fps = float(fps)
        self.num_frames = 0
        attempts = [(path, "mp4v")]
        fallback = os.path.splitext(path)[0] + ".avi"
        if fallback != path:
            attempts.append((fallback, "MJPG"))
        self._writer = None
        for candidate, fourcc in attempts:
            writer = cv2.VideoWriter(
                candidate, cv2.VideoWriter_fourcc(*fourcc), self.fps, self.frame_size, True
            )
            if writer.isOpened():
                if candidate != path:
                    logger.warning(
                        "could not open an MP4 (mp4v) writer for %s; writing Motion-JPEG AVI %s instead",
                        path,
                        candidate,
                    )
                self._writer, self.path, self.fourcc = writer, candidate, fourcc
                break
            writer.release()
        if self._writer is None:
            tried = ", ".join(f"{p} ({f})" for p, f in attempts)
            raise DemoError(f"cannot open a video writer; tried {tried}")

    def write(self, frame):
        h, w = frame.shape[:2]
        if (w, h) != self.frame_size:
            raise DemoError(
                f"frame size {w}x{h} differs from the video size {self.frame_size[0]}x{self.frame_size[1]}"
            )
        self._writer.write(np.ascontiguousarray(frame, dtype=np.uint8))
        self.num_frames += 1

    def close(self):
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def process_video(source, process_frames, output_path=None, show=None):
    """
    Run a video file (or a camera index) through ``process_frames`` and write and/or show what it yields.

    The frames are read one at a time (the video is never held in memory) behind a tqdm progress
    bar. ``process_frames`` takes the iterator of BGR frames and yields one BGR frame of the same
    size per input frame (e.g. ``VisualizationDemo.run_on_video``). With ``output_path`` they are
    written by a :class:`VideoSink` at the input's frame rate; with ``show`` (default: when there is
    no ``output_path``) they are shown in a window (Esc stops; Ctrl-C stops a camera).

    Returns the closed VideoSink (``path``: the file actually written, ``num_frames``) or None.
    """
    from tqdm import tqdm

    is_camera = isinstance(source, int)
    window = f"webcam {source}" if is_camera else os.path.basename(source)
    show = output_path is None if show is None else show
    cap = open_video(source)
    sink = None
    try:
        width, height, fps, num_frames = video_properties(cap)
        if output_path is not None:
            sink = VideoSink(output_path, fps, (width, height))
        frames = tqdm(iter_frames(cap), total=num_frames, unit="frame", desc=window)
        for vis in process_frames(frames):
            if sink is not None:
                sink.write(vis)
            if show:
                cv2.namedWindow(window, cv2.WINDOW_NORMAL)
                cv2.imshow(window, vis)
                if cv2.waitKey(1) == 27:  # Esc quits
                    break
    except KeyboardInterrupt:
        if not is_camera:
            raise
    finally:
        if sink is not None:
            sink.close()
        cap.release()
        if show:
            cv2.destroyAllWindows()
    if sink is not None:
        if sink.num_frames == 0:
            raise DemoError(f"no frame could be read from {window}")
        logger.info("wrote %d frames (%dx%d, %.2f fps) to %s", sink.num_frames, width, height, fps, sink.path)
    return sink


def has_display():
    """Whether an OpenCV window can be opened (on Linux: an X11 or Wayland display is set)."""
    import sys

    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True
