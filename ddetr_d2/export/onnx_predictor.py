"""Run an exported detector (``tools/export_model.py --format onnx``) with onnxruntime, with the call
contract of Detectron2's ``DefaultPredictor``: one BGR image in, ``{"instances": Instances}`` out, in
the original image's coordinates."""

import logging

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

from .exporter import ExportError, exported_model_file, read_export_meta

__all__ = ["ONNXPredictor", "onnx_visualization_demo"]

logger = logging.getLogger(__name__)


class ONNXPredictor:
    """
    ``ONNXPredictor(cfg, onnx_path)(image_bgr) -> {"instances": Instances}`` with ``pred_boxes``, ``scores``,
    ``pred_classes`` and ``query_indices``, like ``DefaultPredictor`` on the PyTorch model.

    The image is resized by ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)`` and put in
    ``INPUT.FORMAT`` order, as the PyTorch predictor does. The graph has a fixed input size (see
    :mod:`ddetr_d2.export.exporter`): an image whose resized size differs is resized to the exported size
    instead (aspect ratio not kept; boxes are scaled back per axis; a one-time warning).
    """

    def __init__(self, cfg, onnx_path, num_threads=None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError(
                "--backend onnxruntime needs the onnxruntime package (pip install onnxruntime)"
            ) from e
        meta = read_export_meta(onnx_path)
        if meta.get("format") != "onnx":
            raise ExportError(f"{onnx_path}: export_meta.json says format {meta.get('format')!r}, not 'onnx'")
        onnx_path = exported_model_file(onnx_path, meta)
        num_classes = cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES
        if meta.get("num_classes", num_classes) != num_classes:  # exports before 2026-11-27 lack the field
            raise ExportError(
                f"{onnx_path} was exported with {meta['num_classes']} classes, the config has "
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES {num_classes}: pass the config it was exported with"
            )
        self.input_size = tuple(meta["input_size"])
        self.output_names = list(meta["output_names"])
        self.input_name = meta.get("input_name", "image")
        self.input_format = cfg.INPUT.FORMAT
        if meta.get("input_format", self.input_format) != self.input_format:
            raise ExportError(
                f"{onnx_path} was exported for INPUT.FORMAT {meta['input_format']}, "
                f"the config has {self.input_format}"
            )
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own types (InvalidProtobuf, NoSuchFile, Fail, ...)
            reason = " ".join(str(e).split())[:300]
            raise ExportError(f"onnxruntime cannot load {onnx_path}: {type(e).__name__}: {reason}") from None
        self._warned = False

    def preprocess(self, image_bgr):
        """(H, W, 3) uint8 BGR -> (3, h, w) float32 array of the exported size, in INPUT.FORMAT order."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        resized = self.aug.get_transform(image).apply_image(image)
        if resized.shape[:2] != self.input_size:
            if not self._warned:
                logger.warning(
                    "image resized to %s, but the ONNX model was exported for %s: resizing to %s instead "
                    "(export one model per input size for exact results)",
                    resized.shape[:2],
                    self.input_size,
                    self.input_size,
                )
                self._warned = True
            h, w = self.input_size
            resized = T.ResizeTransform(image.shape[0], image.shape[1], h, w).apply_image(image)
        return np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1))

    def run(self, image_chw):
        """Raw outputs of the graph for one preprocessed image: dict name -> array."""
        outputs = self.session.run(None, {self.input_name: image_chw})
        return dict(zip(self.output_names, outputs))

    def __call__(self, image_bgr):
        height, width = image_bgr.shape[:2]
        image = self.preprocess(image_bgr)
        out = self.run(image)
        res = Instances(tuple(int(v) for v in out["image_size"]))
        res.pred_boxes = Boxes(torch.from_numpy(out["pred_boxes"]))
        res.scores = torch.from_numpy(out["scores"])
        res.pred_classes = torch.from_numpy(out["pred_classes"]).long()
        if "query_indices" in out:
            res.query_indices = torch.from_numpy(out["query_indices"]).long()
        return {"instances": detector_postprocess(res, height, width)}


def onnx_visualization_demo(cfg, onnx_model, confidence_threshold=0.5, show_sampling=False):
    """
    The demo's ``VisualizationDemo`` running an exported ONNX model through :class:`ONNXPredictor`
    instead of the PyTorch model (``tools/demo.py --backend onnxruntime --onnx-model PATH``).
    """
    if not onnx_model:
        raise ExportError("--backend onnxruntime needs --onnx-model PATH (from tools/export_model.py)")
    if show_sampling:
        raise ExportError("--show-sampling needs the PyTorch model (--backend pytorch)")
    from detectron2.utils.visualizer import ColorMode

    from ddetr_d2.demo.predictor import VisualizationDemo, demo_metadata

    class ONNXVisualizationDemo(VisualizationDemo):
        def __init__(self):  # no PyTorch model: only what predict() / run_on_*() use
            self.cfg = cfg
            self.metadata = demo_metadata(cfg)
            self.confidence_threshold = float(confidence_threshold)
            self.instance_mode = ColorMode.IMAGE
            self.model = None
            self.predictor = ONNXPredictor(cfg, onnx_model)
            self.recorder = None

    return ONNXVisualizationDemo()
