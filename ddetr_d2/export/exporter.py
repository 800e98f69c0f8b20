"""
Export the whole detector (backbone to top-k detections) to ONNX or TorchScript by tracing, the way
Detectron2's ``tools/deploy/export_model.py`` does: a :class:`detectron2.export.TracingAdapter` flattens
the model's ``image -> Instances`` call into tensors.

The exported graph takes one ``(3, H, W)`` float32 image in ``INPUT.FORMAT`` colour order (resized as
the predictor resizes it, not normalised) and returns the fields of the ``Instances`` of
``DeformableDETR.inference`` in that image's coordinates, flattened in Detectron2's order:
``pred_boxes (K, 4) XYXY, pred_classes (K,), query_indices (K,), scores (K,), image_size (2,)``.
Scaling to the original image (``detector_postprocess``) is left to the runtime
(:class:`ddetr_d2.export.onnx_predictor.ONNXPredictor`), as Detectron2 leaves it for its R-CNN exports.

Fixed input size: the graph is traced for one ``(H, W)``. The model computes its per-level shapes,
the encoder's reference points, the per-level split of the value tensor and the sampling loops on
the host (``spatial_shapes.tolist()``), so a trace records them as constants; an ONNX graph exported
with dynamic height / width would run on another size with the first size's level shapes and give
wrong boxes. Export one model per input size instead (``--input-size`` / ``--sample-image``).
"""

import json
import logging
import os

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter

from ddetr_d2.checkpoint import atomic_write
from ddetr_d2.errors import UserError
from ddetr_d2.ops import msda_export_formulation
from ddetr_d2.ops.ms_deform_attn_export import FORMULATIONS

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ONNX_OPSETS",
    "default_export_size",
    "exported_model_file",
    "export_detector",
    "read_export_meta",
    "traceable_detector",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
META_FILE = "export_meta.json"
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
# the lowest opset each formulation needs: GridSample came with 16; the gather form runs on runtimes that
# stop at 13 (e.g. older TensorRT / onnxruntime builds)
ONNX_OPSETS = {"grid_sample": 16, "gather": 13}


class ExportError(UserError, ValueError):
    """Bad export request (format, formulation, size, missing files)."""


def default_export_size(cfg, image_hw=(480, 640)):
    """(H, W) the predictor resizes an ``image_hw`` image to (``ResizeShortestEdge`` of ``INPUT.*_TEST``)."""
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    blank = np.zeros((*image_hw, 3), dtype=np.uint8)
    return tuple(aug.get_transform(blank).apply_image(blank).shape[:2])


def _detect(model, image):
    """image (3, H, W) float -> Instances of ``model.inference`` in the image's coordinates (no rescaling)."""
    images = model.preprocess_image([{"image": image}])
    out = model.forward_outputs(images)
    return model.inference(out["pred_logits"], out["pred_boxes"], images.image_sizes)[0]


def traceable_detector(model, image):
    """
    A ``TracingAdapter`` around ``model`` (eval mode) that maps a ``(3, H, W)`` image to the flattened
    ``Instances`` fields; its ``outputs_schema`` is set (one eager call) and ``output_names`` lists them.
    """
    # eval: torch.onnx.export restores the exported module's train flag recursively afterwards
    adapter = TracingAdapter(model, (image,), inference_func=_detect).eval()
    with torch.no_grad():
        adapter(image)
    schema = adapter.outputs_schema
    names = list(getattr(schema, "keys", []))
    if list(getattr(schema, "sizes", [])) != [1] * len(names):
        raise RuntimeError(f"unexpected output schema of the detector: {schema}")
    adapter.output_names = names + ["image_size"]
    return adapter


def _check_request(fmt, msda, input_size):
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if msda not in FORMULATIONS:
        raise ExportError(f"--msda must be one of {FORMULATIONS}, got {msda!r}")
    if len(input_size) != 2 or min(input_size) < 32:
        raise ExportError(f"input size must be (H, W) with H, W >= 32, got {tuple(input_size)}")


def export_detector(
    model, output_dir, fmt="onnx", msda="grid_sample", input_size=(480, 640), image=None, input_format="RGB"
):
    """
    Trace ``model`` (a ``DeformableDETR`` in eval mode, fp32, on CPU) for one input size and write
    ``model.onnx`` or ``model.ts`` plus ``export_meta.json`` (format, formulation, input size, number of
    classes, output names) into ``output_dir``. Each file is written atomically
    (:func:`ddetr_d2.checkpoint.atomic_write`): a failed export leaves an earlier export in that folder as it
    was.

    Args:
        fmt: "onnx" or "torchscript".
        msda: deformable-attention formulation of the graph, "grid_sample" (ONNX GridSample, opset 16)
            or "gather" (Gather + arithmetic only, opset 13).
        input_size: (H, W) of the exported graph's input (ignored when ``image`` is given).
        image: optional (3, H, W) float32 tensor traced with (a real image gives a representative trace;
            default: a seeded random image).
    Returns:
        path of the model file.
    """
    if image is not None:
        input_size = tuple(int(v) for v in image.shape[-2:])
    input_size = tuple(int(v) for v in input_size)
    _check_request(fmt, msda, input_size)
    if image is None:
        g = torch.Generator().manual_seed(0)
        image = torch.rand((3, *input_size), generator=g) * 255
    image = image.float().cpu()
    model = model.eval()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_FILES[fmt])
    meta_path = os.path.join(output_dir, META_FILE)
    if os.path.isfile(meta_path):
        logger.warning("%s holds an earlier export: replacing it", output_dir)
    opset = ONNX_OPSETS[msda] if fmt == "onnx" else None
    with msda_export_formulation(msda):
        adapter = traceable_detector(model, image)
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(adapter, (image,), check_trace=False)
            atomic_write(path, lambda f: torch.jit.save(traced, f))
        else:
            export = dict(opset_version=opset, input_names=["image"], output_names=adapter.output_names)
            atomic_write(
                path, lambda f: torch.onnx.export(adapter, (image,), f, do_constant_folding=True, **export)
            )
    meta = {
        "format": fmt,
        "msda": msda,
        "input_size": list(input_size),
        "input_format": input_format,
        "num_classes": int(model.num_classes),
        "input_name": "image",
        "output_names": adapter.output_names,
        "opset": opset,
        "model_file": MODEL_FILES[fmt],
    }
    atomic_write(meta_path, lambda f: json.dump(meta, f, indent=2), mode="w")
    stale = [f for k, f in MODEL_FILES.items() if k != fmt and os.path.isfile(os.path.join(output_dir, f))]
    if stale:
        logger.warning(
            "%s also holds %s of an earlier export (export_meta.json now names %s)",
            output_dir,
            ", ".join(stale),
            MODEL_FILES[fmt],
        )
    logger.info(
        "exported %s (%s, MSDA %s, input %s) to %s", type(model).__name__, fmt, msda, input_size, path
    )
    return path


def read_export_meta(model_path):
    """The ``export_meta.json`` written beside ``model_path`` (a model file or its directory)."""
    if not os.path.exists(model_path):
        raise ExportError(f"{model_path} not found: export the model with tools/export_model.py")
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
        raise ExportError(
            f"{meta_path} not found beside {model_path}: export the model with tools/export_model.py"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_path}: not readable as JSON ({e})") from None
    missing = [k for k in ("format", "input_size", "output_names") if k not in meta]
    if missing:
        raise ExportError(f"{meta_path}: missing {', '.join(missing)}: export the model again")
    return meta


def exported_model_file(model_path, meta):
    """The model file of an export: ``model_path`` itself, or for a folder the file its ``meta`` names;
    ExportError where it is missing or is not the file the meta describes."""
    expected = meta.get("model_file") or MODEL_FILES.get(meta["format"], "")
    path = os.path.join(model_path, expected) if os.path.isdir(model_path) else model_path
    if not os.path.isfile(path):
        raise ExportError(f"{path} not found (export_meta.json beside it names {expected!r})")
    if os.path.basename(path) != expected:
        raise ExportError(
            f"{path}: export_meta.json beside it describes {expected!r} ({meta['format']}), not this file"
        )
    return path
