#!/usr/bin/env python
"""
Deformable DETR demo on images, a video file or a webcam, in the style of Detectron2's demo/demo.py.

Examples::

    python tools/demo.py --config-file configs/ddetr_r50.yaml --input 'images/*.jpg' --output out/ \
        --opts MODEL.WEIGHTS out/model_final.pth MODEL.DEVICE cpu
    python tools/demo.py --config-file configs/ddetr_r50.yaml --video clip.mp4 --output out/clip.mp4 \
        --show-sampling --opts MODEL.WEIGHTS out/model_final.pth
    python tools/demo.py --config-file video/configs/... --video clip.mp4 --track --output out/

See docs/demo.md.
"""

import sys

from ddetr_d2.demo.cli import demo_main

if __name__ == "__main__":
    sys.exit(demo_main())
