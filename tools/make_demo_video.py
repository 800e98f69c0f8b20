#!/usr/bin/env python
"""Write a short synthetic MP4 of the quickstart's shape classes moving over a fixed background.

    python tools/make_demo_video.py OUT.mp4 [--frames 48] [--size 224 160] [--fps 12] [--seed 0]

Used by ``make quickstart`` to show the demo's video mode on data the project generates itself.
"""

import argparse
import sys

import cv2
import numpy as np

from ddetr_d2.data.synthetic import SHAPE_CLASSES, _background, _polygon


def render_video(path, num_frames=48, width=224, height=160, fps=12.0, seed=0, num_objects=4):
    """Render ``num_frames`` frames of ``num_objects`` shapes moving on straight lines; returns the path."""
    rs = np.random.RandomState(seed)
    background = _background(height, width, rs)
    objects = []
    for k in range(num_objects):
        kind = SHAPE_CLASSES[k % len(SHAPE_CLASSES)]
        size = rs.uniform(0.25, 0.4) * min(width, height)
        start = rs.uniform([size / 2, size / 2], [width - size / 2, height - size / 2])
        velocity = rs.uniform(-1.5, 1.5, size=2)
        color = tuple(int(c) for c in rs.randint(0, 256, size=3))
        objects.append((kind, size, start, velocity, color, rs.uniform(0, np.pi)))
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot open a video writer for {path!r}")
    try:
        for t in range(num_frames):
            frame = background.copy()
            for kind, size, start, velocity, color, angle in objects:
                cx, cy = start + velocity * t
                cx, cy = np.clip(cx, size / 2, width - size / 2), np.clip(cy, size / 2, height - size / 2)
                poly = _polygon(kind, cx, cy, size, angle, np.random.RandomState(0))
                cv2.fillPoly(frame, [np.round(poly).astype(np.int32)], color, lineType=cv2.LINE_AA)
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="output .mp4 path")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, nargs=2, default=(224, 160), metavar=("W", "H"))
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.frames < 1 or min(args.size) < 32:
        p.error("--frames must be >= 1 and --size at least 32x32")
    print(render_video(args.output, args.frames, args.size[0], args.size[1], args.fps, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
