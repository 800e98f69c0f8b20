"""Export of the whole detector to ONNX / TorchScript (Detectron2's ``TracingAdapter`` way) and a
runtime predictor for an exported ONNX model (``ddetr_d2.export.onnx_predictor``, needs onnxruntime)."""

from .exporter import (  # noqa: F401  (the package's API is the exporter's)
    EXPORT_FORMATS,
    ONNX_OPSETS,
    ExportError,
    __all__,
    default_export_size,
    export_detector,
    exported_model_file,
    read_export_meta,
    traceable_detector,
)
