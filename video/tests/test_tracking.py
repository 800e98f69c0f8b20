"""build_tracker (registry), one MAX_AGE meaning for both associations, TrackingPredictor for both kinds."""

import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ddetr_d2.errors import ConfigError
from ddetr_video.config import get_tracker_cfg
from ddetr_video.iou_tracker import IoUTracker
from ddetr_video.predictor import TrackingPredictor
from ddetr_video.query_iou_tracker import QueryIoUTracker
from ddetr_video.runtime_tracker import RuntimeTracker
from ddetr_video.tracking import TRACKER_REGISTRY, build_tracker

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(*opts):
    return get_tracker_cfg(
        CONFIG,
        [
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "96",
            "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
            "8",
            *opts,
        ],
    )


def test_build_tracker_from_config():
    tr = build_tracker(
        _cfg(
            "MODEL.TRACKER.BIRTH_THRESHOLD",
            "0.6",
            "MODEL.TRACKER.MAX_AGE",
            "3",
            "MODEL.TRACKER.TRACK_DUPLICATE_IOU",
            "0.0",
        )
    )
    assert type(tr) is RuntimeTracker and tr.uses_track_queries
    assert (tr.birth_threshold, tr.keep_threshold, tr.max_age, tr.track_duplicate_iou) == (0.6, 0.4, 3, None)
    tr = build_tracker(
        _cfg(
            "MODEL.TRACKER.ASSOCIATION",
            "IoUTracker",
            "MODEL.TRACKER.IOU_MATCH_THRESHOLD",
            "0.45",
            "MODEL.TRACKER.MAX_AGE",
            "2",
        )
    )
    assert type(tr) is IoUTracker and not tr.uses_track_queries
    assert (tr.iou_threshold, tr.birth_score, tr.match_score, tr.max_age, tr.nms_iou) == (
        0.45,
        0.5,
        0.4,
        2,
        0.7,
    )
    assert {name for name, _ in TRACKER_REGISTRY} >= {"RuntimeTracker", "IoUTracker"}
    with pytest.raises(ConfigError, match="MODEL.TRACKER.ASSOCIATION.*'Kalman'"):
        build_tracker(_cfg("MODEL.TRACKER.ASSOCIATION", "Kalman"))


def _death_frame_runtime(max_age, n_frames):
    tr = build_tracker(_cfg("MODEL.TRACKER.MAX_AGE", str(max_age)))
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    tr.update(torch.zeros(0), torch.zeros(0, 4), torch.tensor([0.9]), box)  # frame 1: born
    for f in range(2, n_frames + 1):  # then missed every frame (score under KEEP_THRESHOLD)
        up = tr.update(torch.full((len(tr),), 0.1), box.repeat(len(tr), 1), torch.zeros(0), torch.zeros(0, 4))
        if up.dead_ids.numel():
            return f
    return None


def _death_frame_iou(max_age, n_frames):
    tr = build_tracker(_cfg("MODEL.TRACKER.ASSOCIATION", "IoUTracker", "MODEL.TRACKER.MAX_AGE", str(max_age)))
    tr.update(np.array([[10.0, 10.0, 30.0, 30.0]]), [0.9])  # frame 1: born
    for f in range(2, n_frames + 1):
        tr.update(np.zeros((0, 4)), [])
        if not tr.tracks:
            return f
    return None


@pytest.mark.parametrize("max_age", [1, 2, 3, 5])
def test_max_age_kills_a_track_at_the_same_frame_in_both_trackers(max_age):
    # MOTR's miss_tolerance: born at frame 1, missed from frame 2 on, dead at its max_age-th miss
    expected = 1 + max_age
    assert _death_frame_runtime(max_age, 12) == expected
    assert _death_frame_iou(max_age, 12) == expected


class _StaticObject:
    """Stand-in for ``QueryTracker.frame_forward``: every detect query proposes one static object at ``box``
    (cxcywh, normalised) with score ~1, track queries keep their reference box; records the images it saw."""

    def __init__(self, model, box):
        self.model, self.box, self.images = model, torch.tensor(box), []

    def __call__(self, images, tracks, hidden=None):
        m = self.model
        self.images.append(
            images.tensor[0, :, : images.image_sizes[0][0], : images.image_sizes[0][1]].clone()
        )
        t_tgt, _, t_ref = tracks
        T_, Q = t_tgt.shape[0], m.num_detect_queries
        logits = torch.full((T_ + Q, m.num_classes), -9.0)
        logits[:, 1] = 9.0
        det = self.box[None].repeat(Q, 1) + 0.002 * torch.arange(Q)[:, None]
        return {
            "pred_logits": logits,
            "pred_boxes": torch.cat([t_ref, det]),
            "aux_outputs": [],
            "hs": torch.randn(T_ + Q, m.hidden_dim),
            "tgt": torch.randn(T_ + Q, m.hidden_dim),
            "query_pos": torch.randn(T_ + Q, m.hidden_dim),
            "num_tracks": T_,
        }


def _frames(n, rng, size=(72, 120)):
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("association", ["RuntimeTracker", "IoUTracker"])
def test_tracking_predictor_static_object_original_coordinates(association):
    cfg = _cfg("MODEL.TRACKER.ASSOCIATION", association)
    model = build_model(cfg)
    double = _StaticObject(model, [0.5, 0.4, 0.25, 0.3])
    model.frame_forward = double
    predictor = TrackingPredictor(cfg, model)
    rng = np.random.default_rng()
    frames = _frames(5, rng)
    H, W = frames[0].shape[:2]
    expected = torch.tensor([0.375 * W, 0.25 * H, 0.625 * W, 0.55 * H])
    for _ in range(2):  # a second video after reset(): ids restart at 1
        for f in frames:
            inst = predictor(f)
            assert inst.image_size == (H, W)
            assert inst.track_ids.tolist() == [1] and inst.pred_classes.tolist() == [1]
            torch.testing.assert_close(inst.pred_boxes.tensor[0], expected, atol=0.02 * W, rtol=0)
            assert inst.scores.item() > 0.99
        predictor.reset()
    # preprocessing = Detectron2's DefaultPredictor: RGB, ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    ref = aug.get_transform(frames[0][:, :, ::-1]).apply_image(frames[0][:, :, ::-1])
    ref = (torch.as_tensor(ref.astype("float32").transpose(2, 0, 1)) - model.pixel_mean) / model.pixel_std
    assert torch.equal(double.images[0], ref)


@pytest.mark.parametrize("association", ["RuntimeTracker", "IoUTracker"])
def test_tracking_predictor_on_a_tiny_random_model(association):
    torch.manual_seed(0)
    cfg = _cfg(
        "MODEL.TRACKER.ASSOCIATION",
        association,
        "MODEL.TRACKER.BIRTH_THRESHOLD",
        "0.0",
        "MODEL.TRACKER.KEEP_THRESHOLD",
        "0.0",
    )
    predictor = TrackingPredictor(cfg, build_model(cfg))
    rng = np.random.default_rng()
    for f in _frames(3, rng):
        inst = predictor(f)
        assert len(inst) > 0 and inst.image_size == f.shape[:2]
        assert {"pred_boxes", "scores", "pred_classes", "track_ids"} <= set(inst.get_fields())
        assert inst.track_ids.dtype == torch.int64 and (inst.track_ids >= 1).all()
        assert len(set(inst.track_ids.tolist())) == len(inst)
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= f.shape[1]).all() and (b[:, 3] <= f.shape[0]).all()


def test_plain_detector_needs_iou_association():
    cfg = _cfg("MODEL.META_ARCHITECTURE", "DeformableDETR")
    model = build_model(cfg)
    with pytest.raises(ConfigError, match="QueryTracker"):
        TrackingPredictor(cfg, model)
    cfg = _cfg(
        "MODEL.META_ARCHITECTURE",
        "DeformableDETR",
        "MODEL.TRACKER.ASSOCIATION",
        "IoUTracker",
        "MODEL.TRACKER.BIRTH_THRESHOLD",
        "0.0",
        "MODEL.TRACKER.KEEP_THRESHOLD",
        "0.0",
    )
    predictor = TrackingPredictor(cfg, model)
    frames = _frames(2, np.random.default_rng())
    first = predictor(frames[0])
    # one box per query (its best class), NMS, then ids 1.. in the first frame
    assert 0 < len(first) <= cfg.MODEL.DEFORMABLE_DETR.NUM_QUERIES
    assert sorted(first.track_ids.tolist()) == list(range(1, len(first) + 1))
    assert len(predictor(frames[1])) > 0


@pytest.mark.cuda
def test_training_clip_and_both_associations_on_cuda():
    """Device placement: a training clip (losses, backward), TrackingPredictor for both kinds on the GPU."""
    from detectron2.structures import Boxes, Instances

    torch.manual_seed(0)
    cfg = _cfg(
        "MODEL.DEVICE", "cuda", "MODEL.TRACKER.BIRTH_THRESHOLD", "0.0", "MODEL.TRACKER.KEEP_THRESHOLD", "0.0"
    )
    model = build_model(cfg)
    model.train()
    clip = []
    for i in range(3):
        inst = Instances((64, 96))
        inst.gt_boxes = Boxes(torch.tensor([[10.0 + i, 10.0, 30.0 + i, 30.0], [50.0, 30.0, 80.0, 50.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        inst.gt_track_ids = torch.tensor([5, 7]) if i != 1 else torch.tensor([7, 9])
        clip.append({"image": (torch.rand(3, 64, 96) * 255).to(torch.uint8), "instances": inst})
    losses = model([{"clip": clip}])
    sum(losses.values()).backward()
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    for association in ("RuntimeTracker", "IoUTracker"):
        predictor = TrackingPredictor(
            _cfg("MODEL.DEVICE", "cuda", "MODEL.TRACKER.ASSOCIATION", association), model
        )
        for f in _frames(3, np.random.default_rng()):
            inst = predictor(f)
            assert inst.image_size == f.shape[:2] and inst.track_ids.dtype == torch.int64


def test_build_query_iou_tracker_and_rebind_option_from_config():
    assert build_tracker(_cfg()).rebind_missed, "REBIND_MISSED_TRACKS is on by default"
    assert not build_tracker(_cfg("MODEL.TRACKER.REBIND_MISSED_TRACKS", "False")).rebind_missed
    tr = build_tracker(
        _cfg(
            "MODEL.TRACKER.ASSOCIATION",
            "QueryIoUTracker",
            "MODEL.TRACKER.IOU_MATCH_THRESHOLD",
            "0.45",
            "MODEL.TRACKER.MAX_AGE",
            "2",
            "MODEL.TRACKER.BIRTH_THRESHOLD",
            "0.6",
            "MODEL.TRACKER.MATCH_CASCADE",
            "True",
        )
    )
    assert type(tr) is QueryIoUTracker and tr.uses_track_queries and not tr.detect_sees_tracks
    assert tr.match_cascade, "MODEL.TRACKER.MATCH_CASCADE reaches the tracker"
    assert (tr.iou_threshold, tr.birth_threshold, tr.keep_threshold, tr.max_age, tr.duplicate_iou) == (
        0.45,
        0.6,
        0.4,
        2,
        0.7,
    )
