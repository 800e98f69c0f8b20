#!/usr/bin/env python
"""
Deformable DETR demo on images, a video file or a webcam, in the style of Detectron2's demo/demo.py.
With ``--track`` (and ``--video``) the command line goes to the video add-on's tracking demo
(``ddetr_video.demo``, also ``video/demo.py``).

Examples::

    python tools/demo.py --config-file configs/ddetr_r50.yaml --input 'images/*.jpg' --output out/ \
        --opts MODEL.WEIGHTS out/model_final.pth MODEL.DEVICE cpu
    python tools/demo.py --config-file configs/ddetr_r50.yaml --video clip.mp4 --output out/clip.mp4 \
        --show-sampling --opts MODEL.WEIGHTS out/model_final.pth
    python tools/demo.py --config-file video/configs/synthetic_tiny.yaml --video clip.mp4 --track \
        --output out/ --opts MODEL.WEIGHTS output/tracker/model_final.pth

See docs/demo.md.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import sys

from ddetr_d2.demo.cli import demo_main

TRACK_EPILOG = (
    "--track: with --video, track the objects with the video add-on (ddetr_video) and write an annotated "
    "video plus MOTChallenge results; 'tools/demo.py --track --help' lists its options."
)


def wants_tracking(argv):
    """Whether ``--track`` is among the flags (not among the ``--opts`` config overrides after them)."""
    flags = argv[: argv.index("--opts")] if "--opts" in argv else argv
    return "--track" in flags


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_tracking(argv):
        from ddetr_video.demo import main as tracking_main

        return tracking_main(argv, prog="demo.py --track")
    return demo_main(argv, epilog=TRACK_EPILOG)


if __name__ == "__main__":
    sys.exit(main())
