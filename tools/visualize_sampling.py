#!/usr/bin/env python
"""
Grid of the last decoder layer's deformable cross-attention sampling points on one image: one panel per
attention head (``--per head``, default) or per feature level (``--per level``). See docs/demo.md.

Example::

    python tools/visualize_sampling.py image.jpg --config-file configs/ddetr_r50.yaml --output grid.png \
        --confidence-threshold 0.5 --opts MODEL.WEIGHTS out/model_final.pth MODEL.DEVICE cpu
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import sys

from ddetr_d2.demo.cli import visualize_sampling_main

if __name__ == "__main__":
    sys.exit(visualize_sampling_main())
