"""Config, checked weight loading, dataset metadata and the ``VisualizationDemo`` used by tools/demo.py."""

import logging
import os

import cv2
import numpy as np
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine.defaults import DefaultPredictor
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .io import DemoError
from .sampling import SamplingRecorder, draw_level_legend, draw_sampling_points

__all__ = ["setup_cfg", "load_weights_checked", "demo_metadata", "VisualizationDemo"]

logger = logging.getLogger(__name__)


def _add_optional_keys(cfg):
    """The video add-on's keys, so tracker configs load here too (the detector's are always added)."""
    try:  # the video add-on's MODEL.TRACKER.* keys (for --track configs)
        from ddetr_video.config import add_tracker_config
    except ImportError:
        pass
    else:
        if "TRACKER" not in cfg.MODEL:
            add_tracker_config(cfg)


def setup_cfg(config_file, opts=(), freeze=True):
    """A Detectron2 config with the ddetr-d2 keys, merged from ``config_file`` and ``opts`` (KEY VALUE)."""
    from ddetr_d2.config import add_deformable_detr_config

    if not config_file:
        raise DemoError("--config-file is required")
    if not os.path.isfile(config_file):
        raise DemoError(f"config file not found: {config_file}")
    if len(opts) % 2:
        raise DemoError(f"--opts needs KEY VALUE pairs, got an odd number of items: {list(opts)}")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    _add_optional_keys(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except Exception as e:  # yacs raises KeyError/ValueError/AssertionError with the key name
        raise DemoError(f"bad config ({config_file}, opts {list(opts)}): {type(e).__name__}: {e}") from e
    if freeze:
        cfg.freeze()
    return cfg


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the incompatible keys it would otherwise only log."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _format_keys(keys, limit=8):
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights_checked(model, weights, allow_mismatch=False):
    """
    Load ``weights`` into ``model`` with DetectionCheckpointer and check that they fit the config.

    Missing keys, unexpected keys and shape mismatches (key, checkpoint shape, model shape) raise
    DemoError naming them (``allow_mismatch=True`` logs them instead). An empty path keeps the
    random initialisation with a warning. Returns the incompatible-keys record (or None).
    """
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")
        return None
    if "://" not in weights and not os.path.isfile(weights):
        raise DemoError(f"weights file not found: {weights} (set MODEL.WEIGHTS)")
    checkpointer = _RecordingCheckpointer(model)
    try:
        checkpointer.load(weights)
    except Exception as e:
        raise DemoError(f"cannot load weights {weights}: {type(e).__name__}: {e}") from e
    inc = checkpointer.incompatible
    if inc is None:
        return None
    bad_shape_keys = {k for k, _, _ in inc.incorrect_shapes}
    missing = [k for k in inc.missing_keys if k not in bad_shape_keys]
    problems = []
    if inc.incorrect_shapes:
        problems.append(
            "shape mismatch (key: checkpoint vs model): "
            + _format_keys(f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in inc.incorrect_shapes)
        )
    if missing:
        problems.append("missing in checkpoint: " + _format_keys(missing))
    if inc.unexpected_keys:
        problems.append("unexpected in checkpoint: " + _format_keys(inc.unexpected_keys))
    if problems:
        msg = f"weights {weights} do not match the config's model; " + "; ".join(problems)
        if not allow_mismatch:
            raise DemoError(msg + " (check --config-file / MODEL.* options, or pass --allow-mismatch)")
        logger.warning(msg)
    return inc


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

    Built on Detectron2's ``DefaultPredictor`` (resize, colour format, single image); the weights are
    loaded by :func:`load_weights_checked` so a config/weights mismatch is an error, not a log line.
    """

    def __init__(
        self,
        cfg,
        confidence_threshold=0.5,
        show_sampling=False,
        allow_mismatch=False,
        instance_mode=ColorMode.IMAGE,
    ):
        self.cfg = cfg
        self.metadata = demo_metadata(cfg)
        self.confidence_threshold = float(confidence_threshold)
        self.instance_mode = instance_mode
        cfg_no_weights = cfg.clone()
        cfg_no_weights.defrost()
        cfg_no_weights.MODEL.WEIGHTS = ""
        cfg_no_weights.freeze()
        try:
            self.predictor = DefaultPredictor(cfg_no_weights)
        except Exception as e:
            raise DemoError(f"cannot build the model from the config: {type(e).__name__}: {e}") from e
        self.model = self.predictor.model
        load_weights_checked(self.model, cfg.MODEL.WEIGHTS, allow_mismatch=allow_mismatch)
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
