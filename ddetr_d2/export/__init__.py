"""Export of the whole detector to ONNX / TorchScript (Detectron2's ``TracingAdapter`` way) and a
runtime predictor for an exported ONNX model (``ddetr_d2.export.onnx_predictor``, needs onnxruntime)."""

from .exporter import (
    EXPORT_FORMATS,
    ExportError,
    default_export_size,
    export_detector,
    read_export_meta,
    traceable_detector,
)

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "default_export_size",
    "export_detector",
    "read_export_meta",
    "traceable_detector",
]
