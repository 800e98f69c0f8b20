#!/usr/bin/env python
"""Write a short synthetic MP4: a camera panning across a large image of the quickstart's shape classes.

    python tools/make_demo_video.py OUT.mp4 [--frames 48] [--size 224 160] [--fps 12] [--seed 0]

Used by ``make quickstart`` to show the demo's video mode on data the project generates itself. The
image is the synthetic dataset's own (``ddetr_d2.data.synthetic.render_image``), 1.6x the frame size;
the frames are a window sliding diagonally across it, written by the demo's ``VideoSink``.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import math
import sys

import cv2
import numpy as np

from ddetr_d2.data.synthetic import render_image
from ddetr_d2.demo.cli import run_cli
from ddetr_d2.demo.io import VideoSink

PAN_SCALE = 1.6  # the panned image is this many times the frame size


def render_video(path, num_frames=48, width=224, height=160, fps=12.0, seed=0, max_objects=8):
    """Render ``num_frames`` frames of a window panning across one synthetic image; returns the file
    written (``path``, or its ``.avi`` fallback where OpenCV has no MP4 writer)."""
    big_w, big_h = int(round(width * PAN_SCALE)), int(round(height * PAN_SCALE))
    image_rgb, _ = render_image(np.random.RandomState(seed), big_w, big_h, max_objects=max_objects)
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    with VideoSink(path, fps, (width, height)) as sink:
        for t in np.linspace(0.0, 1.0, num_frames):
            x, y = int(round(t * (big_w - width))), int(round(t * (big_h - height)))
            sink.write(image_bgr[y : y + height, x : x + width])
    return sink.path


def _run(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "output",
        help="output .mp4 path (without an MP4 writer in OpenCV: <stem>.avi; the path written is printed)",
    )
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, nargs=2, default=(224, 160), metavar=("W", "H"))
    p.add_argument("--fps", type=float, default=12.0, help="frames per second (> 0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.frames < 1 or min(args.size) < 32:
        p.error("--frames must be >= 1 and --size at least 32x32")
    if not (math.isfinite(args.fps) and args.fps > 0):
        p.error(f"--fps must be > 0, got {args.fps}")
    print(render_video(args.output, args.frames, args.size[0], args.size[1], args.fps, args.seed))


def main(argv=None):
    """Exit code 0, or 2 with one line ``make_demo_video.py: error: ...`` for an unwritable output."""
    return run_cli(_run, argv, "make_demo_video.py")


if __name__ == "__main__":
    sys.exit(main())
