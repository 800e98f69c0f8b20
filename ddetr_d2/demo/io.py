"""Input/output helpers of the demo: image and video reading, output paths, an MP4 writer with a fallback.

Every failure a user can cause (missing file, unreadable video, unwritable output) raises
:class:`DemoError` with a message naming the path, so the command line tools exit cleanly.
Output paths are resolved twice: first with ``create=False`` (checks only, before the model is
built and its weights loaded), then with ``create=True`` once the run can start, so a run that fails
leaves no new folder behind.

Images are read by :func:`ddetr_d2.data.image_io.read_image` (Detectron2's ``read_image``, with 16-bit
images scaled to 8 bits), the reader of the training / evaluation mapper too.
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
    "image_output_names",
    "plan_image_outputs",
    "missing_dirs",
    "remove_empty_dirs",
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # written as they are
# what a glob picks up as an image (the others are written as .png); other files are skipped
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + (".gif", ".jpe", ".jfif", ".pbm", ".pgm", ".ppm", ".pnm", ".jp2")
# PIL formats that are still images, refused as --video (OpenCV reads them as a 1-frame "video")
_STILL_IMAGE_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000", "GIF", "MPO", "ICO", "TGA"}
_GLOB_CHARS = set("*?[")


class DemoError(UserError):
    """A user-facing error of the demo tools (bad input or output); printed as one line, exit code 2."""


def _few(paths, n=5):
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def expand_inputs(patterns):
    """
    Expand ``--input`` arguments (file names or glob patterns) into a list of existing files: each
    glob's matches sorted, in the order of ``patterns``. A glob takes only files with an image
    extension (``INPUT_EXTENSIONS``, any case); the other files it matches are skipped with a
    warning. A file named directly is kept whatever its extension. A file given more than once (also
    through another path to it) is kept once, at its first place, with a warning.

    Raises DemoError naming the patterns that match nothing and the paths that do not exist.
    """
    files, missing, skipped = [], [], []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(pattern):
            matched = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            images = [p for p in matched if os.path.splitext(p)[1].lower() in INPUT_EXTENSIONS]
            skipped.extend(p for p in matched if p not in images)
            if not matched:
                missing.append(f"{pattern} (glob matched no file)")
            elif not images:
                missing.append(f"{pattern} (glob matched no image file, only {_few(matched)})")
            files.extend(images)
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern):
            missing.append(f"{pattern} (is a directory; use a glob such as '{pattern}/*.jpg')")
        else:
            missing.append(f"{pattern} (no such file)")
    if missing:
        raise DemoError("input not found: " + "; ".join(missing))
    if skipped:
        logger.warning(
            "skipping %d file(s) matched by a glob without an image extension (%s): %s",
            len(skipped),
            " ".join(INPUT_EXTENSIONS),
            _few(skipped),
        )
    unique, seen, repeated = [], set(), []
    for path in files:
        key = os.path.normcase(os.path.realpath(path))
        if key in seen:
            repeated.append(path)
        else:
            seen.add(key)
            unique.append(path)
    if repeated:
        logger.warning("%d input(s) given more than once, processed once: %s", len(repeated), _few(repeated))
    return unique


def read_image_bgr(path):
    """
    Read an image as an (H, W, 3) uint8 BGR array (EXIF orientation applied, 16-bit images scaled to
    8 bits: :func:`ddetr_d2.data.image_io.read_image`); DemoError naming the file if unreadable.
    """
    from ddetr_d2.data.image_io import read_image

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
        cap.release()
        if not ok:
            raise DemoError(f"video {source} has no readable frame (empty or corrupt)")
        still = _still_image_format(source)
        if still:
            raise DemoError(
                f"video {source} is a still {still} image, not a video (pass images with --input)"
            )
        cap = cv2.VideoCapture(source)  # reopened: seeking back to frame 0 does not work for every file
        if not cap.isOpened():
            cap.release()
            raise DemoError(f"cannot reopen video {source}")
    return cap


def _still_image_format(path):
    """PIL's format name of ``path`` if it is a single-frame still image, else None (e.g. a video)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format in _STILL_IMAGE_FORMATS and getattr(image, "n_frames", 1) == 1:
                return image.format
    except Exception:  # not an image PIL knows: a video
        pass
    return None


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


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def missing_dirs(path):
    """The folders that ``os.makedirs(path)`` would create, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


def remove_empty_dirs(dirs):
    """Remove the empty folders of ``dirs`` (:func:`missing_dirs`, created since), innermost first."""
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except OSError:  # not empty (or already gone)
            pass


def _is_image_file_name(output):
    return os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS and not os.path.isdir(output)


def image_output_names(files):
    """
    Output file names (relative to the output folder) of the input images ``files`` (distinct files):

    - the input's base name; an extension that is not written as is (not in ``IMAGE_EXTENSIONS``,
      e.g. ``.gif``) becomes ``.png`` (``x.gif`` -> ``x.png``);
    - if two of those names are equal (``a/x.jpg`` and ``b/x.jpg``), every output keeps its input's path
      relative to the inputs' common folder (``a/x.jpg``, ``b/x.jpg``);
    - if names are still equal (``x.gif`` and ``x.png`` in one folder), the re-encoded inputs keep their
      whole name plus ``.png`` (``x.gif.png``).
    """

    def name(rel, keep_ext):
        stem, ext = os.path.splitext(rel)
        if ext.lower() in IMAGE_EXTENSIONS:
            return rel
        return rel + ".png" if keep_ext else stem + ".png"

    def collides(names):
        return len({os.path.normcase(n) for n in names}) < len(names)

    names = [name(os.path.basename(f), False) for f in files]
    if collides(names):
        absolute = [os.path.abspath(f) for f in files]
        common = os.path.commonpath([os.path.dirname(a) for a in absolute])
        rels = [os.path.relpath(a, common) for a in absolute]
        names = [name(r, False) for r in rels]
        if collides(names):
            names = [name(r, True) for r in rels]
    if collides(names):  # only when an input is itself named like another's output (x.gif, x.gif.png)
        seen = {}
        for f, n in zip(files, names):
            key = os.path.normcase(n)
            if key in seen:
                raise DemoError(f"inputs {seen[key]} and {f} would both be written as {n}; rename one")
            seen[key] = f
    return names


def plan_image_outputs(output, files):
    """
    The output file of each input image (a list parallel to ``files``, distinct files), checked but
    nothing created: ``output`` is one file name with an image extension (one input only), else a
    folder holding :func:`image_output_names`. DemoError for an output that cannot be written or that
    is one of the inputs; a warning when a folder name has a (non-image) extension, e.g. ``out.txt``.
    """
    if _is_image_file_name(output):
        paths = [resolve_image_output(output, files[0], len(files), create=False)]
    else:
        ext = os.path.splitext(output.rstrip("/" + os.sep))[1]
        if ext and not os.path.isdir(output):
            logger.warning(
                "--output %s has no image extension (%s); writing the images into a folder of that name",
                output,
                " ".join(IMAGE_EXTENSIONS),
            )
        prepare_output_dir(output, create=False)
        paths = [os.path.join(output, n) for n in image_output_names(files)]
    inputs = {os.path.normcase(os.path.realpath(f)): f for f in files}
    for path in paths:
        if os.path.isdir(path):
            raise DemoError(f"output file {path} is a directory")
        same = inputs.get(os.path.normcase(os.path.realpath(path)))
        if same is not None:
            raise DemoError(f"output {path} would overwrite the input {same}; choose another --output folder")
    return paths


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
        self._writer = None
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise DemoError(f"cannot write video {path}: the frame rate must be > 0, got {fps}")
        if min(self.frame_size) < 1:
            raise DemoError(f"cannot write video {path}: empty frame size {self.frame_size}")
        if os.path.isdir(path):
            raise DemoError(f"cannot write video {path}: it is a directory")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DemoError(f"cannot write video {path}: folder {parent} does not exist")
        attempts = [(path, "mp4v")]
        fallback = os.path.splitext(path)[0] + ".avi"
        if fallback != path:
            attempts.append((fallback, "MJPG"))
        for candidate, fourcc in attempts:
            existed = os.path.lexists(candidate)
            writer = cv2.VideoWriter(
                candidate, cv2.VideoWriter_fourcc(*fourcc), self.fps, self.frame_size, True
            )
            if writer.isOpened():
                if candidate != path:  # the user named the .mp4: say which file is written (or replaced)
                    logger.warning(
                        "could not open an MP4 (mp4v) writer for %s; writing Motion-JPEG AVI %s instead%s",
                        path,
                        candidate,
                        " (replacing the existing file)" if existed else "",
                    )
                self._writer, self.path, self.fourcc = writer, candidate, fourcc
                break
            writer.release()
            if not existed:  # a writer that failed to open may leave an empty file
                _remove_quietly(candidate)
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

    Returns the closed VideoSink (``path``: the file actually written, ``num_frames``) or None. If the
    run fails after the writer was opened (an error, or no frame at all), the output file is removed;
    Esc or Ctrl-C keep the frames written so far.
    """
    from tqdm import tqdm

    is_camera = isinstance(source, int)
    window = f"webcam {source}" if is_camera else os.path.basename(source)
    show = output_path is None if show is None else show
    cap = open_video(source)
    sink = None
    failed = True
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
        failed = False
    except KeyboardInterrupt:
        failed = False
        if not is_camera:
            raise
    finally:
        if sink is not None:
            sink.close()
            if failed or sink.num_frames == 0:  # no partial or empty (unplayable) output file
                _remove_quietly(sink.path)
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
