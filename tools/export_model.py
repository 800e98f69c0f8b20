#!/usr/bin/env python
"""
Export a Deformable DETR model to ONNX or TorchScript, Detectron2's way (``TracingAdapter``).

    python tools/export_model.py --config-file configs/ddetr_r50.yaml --format onnx --output out/onnx \
        [--msda grid_sample|gather] [--input-size 800 1066 | --sample-image img.jpg] \
        --opts MODEL.WEIGHTS model_final.pth

See docs/deployment.md.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import sys

from ddetr_d2.demo.cli import run_cli
from ddetr_d2.export.cli import export_main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_cli(export_main, argv, prog="export_model.py")


if __name__ == "__main__":
    sys.exit(main())
