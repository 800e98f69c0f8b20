"""QueryIoUTracker: track queries matched to the per-frame detector's detections by IoU."""

import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou, nms
from tracking_testing import FadingTrackStandIn, random_boxes

from ddetr_video.config import get_tracker_cfg
from ddetr_video.query_iou_tracker import QueryIoUTracker

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.yaml")


def _boxes(*xy, s=10.0):
    return torch.tensor([[x, y, x + s, y + s] for x, y in xy], dtype=torch.float32).reshape(-1, 4)


def _empty():
    return torch.zeros(0), torch.zeros(0, 4)


def test_matched_track_reports_the_detection_and_keeps_its_id():
    tr = QueryIoUTracker(
        birth_threshold=0.5, keep_threshold=0.3, max_age=2, duplicate_iou=0.5, iou_threshold=0.3
    )
    up = tr.update(*_empty(), torch.tensor([0.9, 0.4, 0.2]), _boxes((0, 0), (50, 0), (100, 0)))
    # 0.4 is a detection but under the birth threshold; 0.2 is not a detection
    assert up.births.tolist() == [0] and up.ids.tolist() == [1]
    # the track query predicts (2, 0); detection 1 is the object at (3, 0), detection 0 a new one; detection 2
    # duplicates detection 1 (NMS); the track's own score (0.05) does not matter
    dets = _boxes((60, 60), (3, 0), (3, 1))
    up = tr.update(torch.tensor([0.05]), _boxes((2, 0)), torch.tensor([0.8, 0.7, 0.6]), dets)
    assert up.keep.tolist() == [0] and up.reported.tolist() == [1] and up.rebound.tolist() == [-1]
    assert up.births.tolist() == [0] and up.ids.tolist() == [1, 2] and up.visible.tolist() == [True, True]
    assert up.sources(1).tolist() == [0, 1 + 0], "a matched track carries its own query"
    assert up.report_sources(1).tolist() == [1 + 1, 1 + 0], "and is reported with the detection's box"
    # no detection near track 1 for two frames: a miss (kept, hidden), then death at max_age = 2
    up = tr.update(torch.tensor([0.9, 0.9]), _boxes((3, 0), (60, 60)), torch.tensor([0.9]), _boxes((61, 60)))
    assert up.visible.tolist() == [False, True] and up.reported.tolist() == [-1, 0]
    up = tr.update(torch.tensor([0.9, 0.9]), _boxes((3, 0), (60, 60)), torch.tensor([0.9]), _boxes((61, 60)))
    assert up.ids.tolist() == [2] and up.dead_ids.tolist() == [1]


def test_match_cascade_serves_the_track_matched_last_frame_first():
    """Track 1 was matched last frame, track 2 missed it. One detection overlaps both, track 2's box more:
    one Hungarian step gives it to track 2; the cascade to track 1 (its first round: tracks with no miss)."""
    decided = {}
    for cascade in (False, True):
        tr = QueryIoUTracker(
            birth_threshold=0.5, keep_threshold=0.3, max_age=3, iou_threshold=0.3, match_cascade=cascade
        )
        tr.update(*_empty(), torch.tensor([0.9, 0.8]), _boxes((0, 0), (40, 0)))
        # frame 2: track 1 matched, track 2 missed (no detection near it)
        up = tr.update(torch.ones(2), _boxes((0, 0), (40, 0)), torch.tensor([0.9]), _boxes((1, 0)))
        assert up.reported.tolist() == [0, -1] and tr.misses.tolist() == [0, 1]
        # frame 3: the detection at x=5 has IoU 1/3 with track 1's box (x=0), 9/11 with track 2's (x=4)
        up = tr.update(torch.ones(2), _boxes((0, 0), (4, 0)), torch.tensor([0.45]), _boxes((5, 0)))
        decided[cascade] = up.reported.tolist()
        assert up.births.tolist() == []
    assert decided[False] == [-1, 0], "one step: the higher IoU wins, track 1 misses"
    assert decided[True] == [0, -1], "cascade: track 1 (matched last frame) first"


def test_bad_thresholds_and_shapes_raise():
    with pytest.raises(ValueError, match="keep <= birth"):
        QueryIoUTracker(birth_threshold=0.3, keep_threshold=0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        QueryIoUTracker(iou_threshold=0.0)
    with pytest.raises(ValueError, match="live tracks"):
        QueryIoUTracker().update(torch.zeros(1), torch.zeros(1, 4), *_empty())


def _reference(ids, misses, next_id, ts, tb, ds, db, birth, keep_thr, max_age, dup, iou_thr, cascade):
    """Independent re-statement with torchvision's nms / box_iou and scipy on float64 costs; ``cascade``:
    one scipy assignment per group of tracks with equal misses (fewest first) on the detections left."""
    det = torch.nonzero(ds >= keep_thr).flatten()
    det = det[nms(db[det], ds[det], dup)] if det.numel() else det
    match = {}
    if len(ids) and det.numel():
        iou = box_iou(tb, db[det]).double().numpy()
        groups = [[i for i in range(len(ids)) if misses[i] == m] for m in sorted(set(misses))]
        for rows in groups if cascade else [list(range(len(ids)))]:
            cols = [j for j in range(len(det)) if int(det[j]) not in match.values()]
            sub = iou[np.ix_(rows, cols)]
            r, c = linear_sum_assignment(np.where(sub >= np.float32(iou_thr), 1 - sub, 1e6))
            match.update(
                {rows[i]: int(det[cols[j]]) for i, j in zip(r, c) if sub[i, j] >= np.float32(iou_thr)}
            )
    misses = [0 if i in match else m + 1 for i, m in enumerate(misses)]
    keep = [i for i in range(len(ids)) if misses[i] < max_age]
    births = [int(q) for q in det if int(q) not in match.values() and ds[q] >= birth]
    new_ids = [ids[i] for i in keep] + list(range(next_id, next_id + len(births)))
    visible = [i in match for i in keep] + [True] * len(births)
    return (
        keep,
        births,
        new_ids,
        visible,
        [match.get(i, -1) for i in keep],
        [misses[i] for i in keep] + [0] * len(births),
    )


@pytest.mark.parametrize("cascade", [False, True])
def test_equals_a_torchvision_scipy_reference_on_random_videos(cascade):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))

    n_matched = n_later_rounds = 0
    for trial in range(20):
        kw = dict(
            birth_threshold=0.6,
            keep_threshold=0.3,
            max_age=1 + trial % 3,
            duplicate_iou=0.4,
            iou_threshold=0.3,
            match_cascade=cascade,
        )
        tr = QueryIoUTracker(**kw)
        for _ in range(10):
            T, Q = len(tr), int(torch.randint(0, 15, (1,), generator=g))
            ids, misses, next_id = tr.ids.tolist(), tr.misses.tolist(), tr.next_id
            ts, tb = torch.rand(T, generator=g), random_boxes(g, T, 80.0)
            ds, db = torch.rand(Q, generator=g), random_boxes(g, Q, 80.0)
            up = tr.update(ts, tb, ds, db)
            keep, births, new_ids, visible, reported, new_misses = _reference(
                ids, misses, next_id, ts, tb, ds, db, *kw.values()
            )
            assert up.keep.tolist() == keep and up.births.tolist() == births, trial
            assert up.ids.tolist() == new_ids and up.visible.tolist() == visible
            assert up.reported.tolist() == reported and tr.misses.tolist() == new_misses
            n_matched += sum(r >= 0 for r in reported)
            n_later_rounds += sum(r >= 0 and misses[i] > 0 for i, r in zip(keep, reported))
    assert n_matched > 20, "the random videos must exercise matching"
    assert n_later_rounds > 5, "and matches of tracks missed before (the cascade's later rounds)"


def _tiny_model():
    cfg = get_tracker_cfg(
        CONFIG,
        ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "8"],
    )
    torch.manual_seed(int(torch.randint(0, 10**6, (1,))))
    model = build_model(cfg)
    model.eval()
    return model


def test_detect_queries_blind_to_tracks_give_the_detectors_outputs():
    """With QueryIoUTracker the detect queries' outputs equal the detector's (no tracks) and the track
    queries are still decoded; with RuntimeTracker (MOTR: all queries see each other) they differ."""
    model = _tiny_model()
    img = (torch.rand(3, 64, 96) * 255).to(torch.uint8)
    T_, C = 3, model.hidden_dim
    tracks = (torch.randn(T_, C), torch.randn(T_, C), torch.rand(T_, 4) * 0.5 + 0.25)
    with torch.no_grad():
        images = model.preprocess_image([{"image": img}])
        alone = model.frame_forward(images, model._empty_tracks())
        model.tracker = QueryIoUTracker()
        blind = model.frame_forward(images, tracks)
        model.tracker = None  # RuntimeTracker's rule (any tracker without detect_sees_tracks = False)
        seeing = model.frame_forward(images, tracks)
    for key in ("pred_logits", "pred_boxes", "hs"):
        torch.testing.assert_close(blind[key][T_:], alone[key], rtol=1e-5, atol=1e-5)
    assert (seeing["pred_logits"][T_:] - alone["pred_logits"]).abs().max() > 1e-3
    assert torch.isfinite(blind["pred_boxes"][:T_]).all()
    assert blind["pred_logits"].shape[0] == T_ + model.num_detect_queries


def test_tracking_reports_detections_under_track_ids():
    """End to end through ``QueryTracker.track`` with a stand-in ``frame_forward``: the track query predicts
    a box slightly off and scores ~0; the detect query sees the object: it is reported with the detection's
    box under the track's id, and the track's own query is carried on."""
    cfg = get_tracker_cfg(
        CONFIG,
        ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "8"]
        + ["MODEL.TRACKER.ASSOCIATION", "QueryIoUTracker"],
    )
    model = build_model(cfg)
    model.eval()
    assert isinstance(model.tracker, QueryIoUTracker)
    model.frame_forward = stand_in = FadingTrackStandIn(model, [0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2])
    carried = []
    model.qim.register_forward_pre_hook(lambda module, args: carried.append(args[0]))
    img = torch.zeros(3, 64, 96, dtype=torch.uint8)
    res = [
        model([{"image": img, "height": 64, "width": 96, "sequence": "a", "frame_idx": i}])[0]["instances"]
        for i in range(3)
    ]
    assert [r.track_ids.tolist() for r in res] == [[1], [1], [1]]
    expected = torch.tensor([[0.4 * 96, 0.4 * 64, 0.6 * 96, 0.6 * 64]])  # the detection's box, XYXY pixels
    for r in res:
        torch.testing.assert_close(r.pred_boxes.tensor, expected)
    for frame in (1, 2):
        assert torch.equal(carried[frame], stand_in.outputs[frame]["hs"][[0]]), (
            "the track's own query is carried"
        )
