"""The demo's model (built, then MODEL.WEIGHTS loaded and checked), its one-image predictor, dataset
metadata for class names, and ``VisualizationDemo`` (detections drawn with Detectron2's visualizers)."""

import logging

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from ddetr_d2.allocator import retain_freed_memory
from ddetr_d2.checkpoint import load_weights_checked
from ddetr_d2.errors import ConfigError, UserError
from ddetr_d2.modeling.fuse_batchnorm import fuse_batchnorm
from ddetr_d2.modeling.inference_compile import compile_for_inference
from ddetr_d2.modeling.onednn_linear import resolve_linear_backend, use_onednn_linears

from .io import DemoError
from .sampling import SamplingRecorder, draw_level_legend, draw_sampling_points

__all__ = ["build_demo_model", "ImagePredictor", "demo_metadata", "VisualizationDemo"]

logger = logging.getLogger(__name__)


def build_demo_model(cfg, allow_mismatch=False):
    """
    The model of ``cfg`` in eval mode, with ``cfg.MODEL.WEIGHTS`` loaded by
    :func:`ddetr_d2.checkpoint.load_weights_checked`: weights that are missing, unreadable or do not
    fit the model raise ``WeightsError`` naming the file / keys (``allow_mismatch=True``: a warning).
    A config whose model cannot be built raises ``ConfigError``. With
    ``MODEL.DEFORMABLE_DETR.INFERENCE_FUSE_BATCHNORM`` (default) the backbone's batch norms are folded
    into its convolutions (:func:`ddetr_d2.modeling.fuse_batchnorm.fuse_batchnorm`): the model is for
    inference only. On the CPU, ``INFERENCE_RETAIN_FREED_MEMORY`` (default) makes this process's malloc
    keep freed memory (:func:`ddetr_d2.allocator.retain_freed_memory`); a float32 CPU model runs its linear
    layers on oneDNN where ``INFERENCE_LINEAR_BACKEND`` says so
    (:func:`ddetr_d2.modeling.onednn_linear.use_onednn_linears`). With ``INFERENCE_COMPILE`` its
    backbone and encoder / decoder layers are compiled
    (:func:`ddetr_d2.modeling.inference_compile.compile_for_inference`).
    """
    try:
        model = build_model(cfg)
    except UserError:  # already names the key (ddetr_d2.config.check_model_config, ...)
        raise
    except (KeyError, ValueError, AssertionError) as e:  # registry names, sizes, variant checks
        raise ConfigError(f"cannot build the model from the config: {type(e).__name__}: {e}") from e
    load_weights_checked(model, cfg.MODEL.WEIGHTS, allow_mismatch=allow_mismatch)
    model.eval()
    if cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_FUSE_BATCHNORM", True):
        fuse_batchnorm(model.backbone)  # inference only: one op less per convolution
    if cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_RETAIN_FREED_MEMORY", True):
        retain_freed_memory()  # process-wide: large tensors reuse freed heap instead of fresh pages
    if (
        cfg.MODEL.DEVICE == "cpu"
        and cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_DTYPE", "float32") == "float32"
        and _linear_backend_is_onednn(cfg)
    ):
        use_onednn_linears(model)  # float32 linear layers on oneDNN, weights packed once
    if cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_COMPILE", False):
        # compiled (and with freezing, its weights read) on the first call
        freezing = cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_COMPILE_FREEZING", True)
        compile_for_inference(model, freezing=freezing)
    return model


def _linear_backend_is_onednn(cfg):
    try:
        return resolve_linear_backend(cfg.MODEL.DEFORMABLE_DETR.get("INFERENCE_LINEAR_BACKEND", "auto"))
    except ValueError as e:
        raise ConfigError(str(e)) from e


class ImagePredictor:
    """
    Detectron2's ``DefaultPredictor`` on an already built model (it loads no weights itself): a BGR
    image is resized by ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, put in
    ``INPUT.FORMAT`` colour order and given to the model alone. The detection demo and the tracking
    demo both prepare frames with :meth:`preprocess`.
    """

    def __init__(self, cfg, model):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT must be RGB or BGR for the demo, got {cfg.INPUT.FORMAT!r}")
        self.model = model
        self.input_format = cfg.INPUT.FORMAT
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )

    def preprocess(self, image_bgr, **fields):
        """
        The model input of one (H, W, 3) uint8 BGR image: ``{"image": (3, h, w) float32 tensor,
        resized, in INPUT.FORMAT order, "height": H, "width": W}`` plus ``fields`` (e.g. ``sequence``,
        ``frame_idx`` for a tracker).
        """
        height, width = image_bgr.shape[:2]
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        image = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width, **fields}

    def __call__(self, image_bgr):
        """The model's output dict for one BGR image (e.g. ``{"instances": Instances}``)."""
        with torch.no_grad():
            return self.model([self.preprocess(image_bgr)])[0]


def demo_metadata(cfg):
    """
    Metadata (class names) for visualisation: from cfg.DATASETS.TEST[0], else TRAIN[0]; datasets that are
    not registered, or lack ``thing_classes``, fall back to generic names "class i". Names are padded
    with generic ones up to MODEL.DEFORMABLE_DETR.NUM_CLASSES.
    """
    num_classes = int(cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES)
    registered = set(DatasetCatalog.list()) | set(MetadataCatalog.list())
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name not in registered:
            logger.warning("dataset %s is not registered; trying the next one for class names", name)
            continue
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes", None)
        if not classes:
            continue
        if len(classes) >= num_classes:
            return meta
        extra = [f"class {i}" for i in range(len(classes), num_classes)]
        padded = MetadataCatalog.get(f"__ddetr_demo_{name}_{num_classes}")
        if not padded.get("thing_classes", None):
            padded.set(thing_classes=list(classes) + extra)
            if meta.get("thing_colors", None):
                padded.set(thing_colors=list(meta.thing_colors) + [[128, 128, 128]] * len(extra))
        return padded
    generic = MetadataCatalog.get(f"__ddetr_demo_generic_{num_classes}")
    if not generic.get("thing_classes", None):
        generic.set(thing_classes=[f"class {i}" for i in range(num_classes)])
    return generic


class VisualizationDemo:
    """
    Run a DeformableDETR on BGR images or video frames and draw its detections (score >=
    ``confidence_threshold``), optionally with the last decoder layer's sampling points.

    The model comes from :func:`build_demo_model` (a config/weights mismatch is an error, not a log
    line), unless an already built ``model`` is given, and sees images through :class:`ImagePredictor`.
    """

    def __init__(
        self,
        cfg,
        confidence_threshold=0.5,
        show_sampling=False,
        allow_mismatch=False,
        instance_mode=ColorMode.IMAGE,
        model=None,
    ):
        self.cfg = cfg
        self.metadata = demo_metadata(cfg)
        self.confidence_threshold = float(confidence_threshold)
        self.instance_mode = instance_mode
        self.model = build_demo_model(cfg, allow_mismatch=allow_mismatch) if model is None else model.eval()
        self.predictor = ImagePredictor(cfg, self.model)
        self.recorder = None
        if show_sampling:
            try:
                self.recorder = SamplingRecorder(self.model).attach()
            except ValueError as e:
                raise DemoError(f"--show-sampling: {e}") from e

    def predict(self, image_bgr):
        """
        Returns:
            instances (Instances on CPU, score-filtered) and, with sampling, a DetectionSampling of them
            mapped to the image (else None).
        """
        outputs = self.predictor(image_bgr)
        if "instances" not in outputs:
            raise DemoError(f"the model output has no 'instances' (keys: {sorted(outputs)})")
        instances = outputs["instances"].to("cpu")
        instances = instances[instances.scores >= self.confidence_threshold]
        sampling = None
        if self.recorder is not None:
            if not instances.has("query_indices"):
                raise DemoError("--show-sampling needs 'query_indices' in the model's output instances")
            record = self.recorder.latest(0)
            sampling = record.select(instances.query_indices.numpy(), image_bgr.shape[:2])
        return instances, sampling

    def _overlay_sampling(self, vis_bgr, sampling):
        if sampling is None:
            return vis_bgr
        vis_bgr, _ = draw_sampling_points(vis_bgr, sampling)
        return draw_level_legend(vis_bgr, sampling.num_levels, self.recorder.level_strides)

    def run_on_image(self, image_bgr):
        """Returns (instances, visualised BGR image of the same size, DetectionSampling or None)."""
        instances, sampling = self.predict(image_bgr)
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        vis = visualizer.draw_instance_predictions(predictions=instances).get_image()[:, :, ::-1]
        return instances, self._overlay_sampling(np.ascontiguousarray(vis), sampling), sampling

    def run_on_video(self, frames):
        """
        Visualise an iterable of BGR frames (e.g. ``io.iter_frames(cap)``) one at a time, with colours
        kept consistent across frames by Detectron2's VideoVisualizer. Yields BGR frames of the input size.
        """
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        for frame in frames:
            instances, sampling = self.predict(frame)
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            vis = video_visualizer.draw_instance_predictions(rgb, instances).get_image()
            vis_bgr = cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)
            yield self._overlay_sampling(vis_bgr, sampling)
