"""``TrackingPredictor``: Detectron2's ``DefaultPredictor`` for tracking, one BGR frame per call.

    predictor = TrackingPredictor(cfg, model)  # or .from_config(cfg): builds the model, loads its weights
    for frame_bgr in video:
        instances = predictor(frame_bgr)  # pred_boxes (original pixels), scores, pred_classes, track_ids
    predictor.reset()  # before the next video

The association is ``build_tracker(cfg)`` (``MODEL.TRACKER.ASSOCIATION``):

* ``RuntimeTracker`` (query propagation) needs a ``QueryTracker``: its ``track`` carries the track queries;
* ``IoUTracker`` (the baseline) works with any ``DeformableDETR``: one detection per query (its best class,
  :func:`ddetr_video.tracking.query_instances`; a ``QueryTracker`` uses its detect queries alone), then
  :func:`ddetr_video.tracking.associate_detections`. ``tools/benchmark_tracking.py`` and the demo run this.

Frames are prepared as the detection demo's (``ddetr_d2.demo.predictor.ImagePredictor.preprocess``:
Detectron2's ``DefaultPredictor`` resize ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``
and colour order ``INPUT.FORMAT``).
"""

import torch
from detectron2.modeling import detector_postprocess

from ddetr_d2.demo.predictor import ImagePredictor, build_demo_model
from ddetr_d2.errors import ConfigError

from .tracking import associate_detections, build_tracker, query_instances

__all__ = ["TrackingPredictor"]


def _detections_per_query(model, inputs):
    """One detection per query of a plain ``DeformableDETR`` (original image coordinates)."""
    images = model.preprocess_image([inputs])
    out = model.forward_outputs(images)
    size = images.image_sizes[0]
    inst = query_instances(out["pred_logits"][0], out["pred_boxes"][0], size)
    return detector_postprocess(inst, inputs.get("height", size[0]), inputs.get("width", size[1]))


class TrackingPredictor:
    """
    Args:
        cfg: config with the tracker keys (``add_tracker_config``); ``MODEL.TRACKER.ASSOCIATION`` picks the
            association, ``INPUT.*`` the preprocessing.
        model: a built model with its weights loaded (``QueryTracker`` or ``DeformableDETR``); put in eval
            mode. A ``QueryTracker``'s association is replaced by this config's, so use one predictor per
            model at a time.
    """

    def __init__(self, cfg, model):
        if "TRACKER" not in cfg.MODEL:
            raise ConfigError(
                "TrackingPredictor needs the MODEL.TRACKER keys (ddetr_video.add_tracker_config)"
            )
        self.cfg = cfg
        self.model = model.eval()
        self.frames = ImagePredictor(cfg, self.model)
        self.tracker = build_tracker(cfg)
        self.model_tracks = hasattr(self.model, "track") and hasattr(self.model, "reset_tracks")
        if self.model_tracks:
            self.model.tracker = self.tracker
        elif self.tracker.uses_track_queries:
            raise ConfigError(
                f"MODEL.TRACKER.ASSOCIATION {cfg.MODEL.TRACKER.ASSOCIATION} needs a model with track queries "
                f"(META_ARCHITECTURE QueryTracker), got {type(self.model).__name__}; use IoUTracker"
            )
        self.reset()

    @classmethod
    def from_config(cls, cfg, allow_mismatch=False):
        """Build ``cfg``'s model, load ``MODEL.WEIGHTS`` (checked: a mismatch is a ``WeightsError``)."""
        return cls(cfg, build_demo_model(cfg, allow_mismatch=allow_mismatch))

    def reset(self):
        """Forget every track (start of a new video); ids restart at 1."""
        if self.model_tracks:
            self.model.reset_tracks()
        else:
            self.tracker.reset()

    @torch.no_grad()
    def __call__(self, image_bgr):
        """
        Args:
            image_bgr: (H, W, 3) uint8 BGR frame, the next frame of the current video.
        Returns:
            Instances of the tracked objects shown in this frame: ``pred_boxes`` (XYXY in the H x W frame),
            ``scores``, ``pred_classes``, ``track_ids`` (int64, >= 1).
        """
        inputs = self.frames.preprocess(image_bgr)
        if self.model_tracks:
            return self.model.track([inputs])[0]["instances"]
        return associate_detections(_detections_per_query(self.model, inputs), self.tracker)
