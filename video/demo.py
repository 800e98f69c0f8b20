#!/usr/bin/env python
"""Track the objects of a video with the query-propagation tracker (or, with a detector config, the IoU
baseline): writes ``<stem>_tracks.mp4`` (one colour per track id) and the MOTChallenge results
``<stem>_tracks.txt``. The same as ``tools/demo.py --track``; see docs/demo.md.

    python video/demo.py --config-file video/configs/synthetic_tiny.yaml --video clip.mp4 --output out/ \
        --opts MODEL.WEIGHTS output/tracker/model_final.pth MODEL.DEVICE cpu
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import sys

from ddetr_video.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="video/demo.py"))
