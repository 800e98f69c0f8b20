"""Command line of tools/export_model.py (Detectron2's tools/deploy/export_model.py, for Deformable DETR)."""

import argparse
import logging
import os
import warnings

import torch

from ddetr_d2.config import build_cfg
from ddetr_d2.ops.ms_deform_attn_export import FORMULATIONS

from .exporter import EXPORT_FORMATS, ExportError, default_export_size, export_detector

__all__ = ["get_export_parser", "export_main"]

logger = logging.getLogger("ddetr_d2.export")


def get_export_parser():
    parser = argparse.ArgumentParser(
        description="Export a Deformable DETR model (all three variants) to ONNX or TorchScript by tracing.",
        epilog="The exported graph has a fixed input size (see docs/deployment.md); run it with "
        "ddetr_d2.export.onnx_predictor.ONNXPredictor or tools/demo.py --backend onnxruntime.",
    )
    parser.add_argument(
        "--config-file", required=True, metavar="FILE", help="path to the model's config file"
    )
    parser.add_argument(
        "--format", choices=EXPORT_FORMATS, default="onnx", help="output format (default onnx)"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="output folder (model file + export_meta.json)"
    )
    parser.add_argument(
        "--msda",
        choices=FORMULATIONS,
        default="grid_sample",
        help="deformable-attention formulation of the graph: grid_sample (ONNX GridSample, opset 16) or "
        "gather (Gather + arithmetic only, no GridSample; for TensorRT and runtimes without GridSample)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input size of the exported graph (default: the test-time resize of a 480x640 image)",
    )
    size.add_argument(
        "--sample-image",
        metavar="FILE",
        help="trace with this image, resized as the predictor resizes it (sets the input size)",
    )
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="load weights that do not match the config (warn only)"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ..."
    )
    return parser


def check_output_folder(path):
    """ExportError unless ``path`` is a folder, or can become one, that this process may write to
    (checked before the model is built; nothing is created here)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(
            f"--output {path} is a file; pass a folder (the export writes model + export_meta.json)"
        )
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--output {path}: cannot write there ({parent} is not a writable folder)")


def export_main(argv):
    """Parse ``argv`` and export; returns the path of the model file. Raises UserError on bad input."""
    args = get_export_parser().parse_args(argv)
    check_output_folder(args.output)
    from ddetr_d2.demo.io import read_image_bgr
    from ddetr_d2.demo.predictor import ImagePredictor, build_demo_model

    cfg = build_cfg(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"  # the export traces on the CPU
    if cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_DTYPE", "float32") != "float32":
        raise ExportError(
            "export runs in float32: drop MODEL.DEFORMABLE_DETR.INFERENCE_DTYPE from the options"
        )
    # tracing needs the plain modules: no compiled ones, aten's linear (exporters know no oneDNN op)
    cfg.MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE = False
    cfg.MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND = "torch"
    cfg.freeze()
    model = build_demo_model(cfg, allow_mismatch=args.allow_mismatch)
    image, input_size = None, None
    if args.sample_image:
        image = ImagePredictor(cfg, model).preprocess(read_image_bgr(args.sample_image))["image"]
    else:
        input_size = tuple(args.input_size) if args.input_size else default_export_size(cfg)
    # the tracer flags every Python int taken from a tensor (level shapes, loop bounds): that the graph
    # is fixed to one input size is by design (exporter docstring, docs/deployment.md)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        path = export_detector(
            model,
            args.output,
            args.format,
            args.msda,
            input_size=input_size,
            image=image,
            input_format=cfg.INPUT.FORMAT,
        )
    print(f"exported {args.config_file} ({args.format}, MSDA {args.msda}) to {os.path.abspath(path)}")
    return path
