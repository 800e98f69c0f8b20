"""Which queries carry on as tracks in training: fake tracks (MOTR's rule vs the top-score rule) on a
hand-built frame, and tracks kept through an absence (re-bound on return) on a hand-built 4-frame clip."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from ddetr_video.clip_criterion import FALSE_POSITIVE, NO_OBJECT
from ddetr_video.config import get_tracker_cfg

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
A = [0.3, 0.3, 0.2, 0.2]
B = [0.7, 0.7, 0.2, 0.2]


def _model(*opts):
    cfg = get_tracker_cfg(CONFIG, ["MODEL.DEFORMABLE_DETR.NUM_QUERIES", "6", *opts])
    return build_model(cfg)


def _frame_outputs(boxes, scores, C):
    n = len(boxes)
    logits = torch.full((n, 3), -9.0)
    logits[:, 0] = torch.logit(torch.tensor(scores))
    return {
        "pred_logits": logits,
        "pred_boxes": torch.tensor(boxes),
        "hs": torch.randn(n, C),
        "num_tracks": 1,
    }


def _hand_built_frame(model):
    """Slot 0: track of object 5 at A. Detect queries (slots 1..6): slot 1 matched to the untracked object 7
    (best score of all), slot 2 unmatched on top of the track, slot 3 unmatched with the best free score
    elsewhere, slots 4-6 unmatched, low, far away."""
    boxes = [
        A,
        B,
        [0.31, 0.3, 0.2, 0.2],
        [0.5, 0.9, 0.1, 0.1],
        [0.1, 0.9, 0.1, 0.1],
        [0.9, 0.1, 0.1, 0.1],
        [0.9, 0.5, 0.1, 0.1],
    ]
    out = _frame_outputs(boxes, [0.9, 0.95, 0.2, 0.6, 0.1, 0.1, 0.1], model.hidden_dim)
    target = {
        "track_ids": torch.tensor([5, 7]),
        "boxes": torch.tensor([A, B]),
        "labels": torch.tensor([0, 0]),
    }
    match = (torch.tensor([0, 1]), torch.tensor([0, 1]))
    return out, target, match


def _drop_query(model, dropped):
    """Make the random drop remove query ``dropped`` (and only it)."""

    def drop(q, ids, ages):
        keep = q != dropped
        return q[keep], ids[keep], ages[keep]

    model._random_drop_tracks = drop


@pytest.mark.parametrize("rule", ["near_track", "top_score"])
def test_fake_tracks_never_sit_on_a_dropped_real_object(rule):
    model = _model(
        "MODEL.TRACKER.FAKE_TRACKS", rule, "MODEL.TRACKER.FP_RATIO", "1.0", "MODEL.TRACKER.FP_MAX", "1"
    )
    out, target, match = _hand_built_frame(model)
    _drop_query(model, 1)  # object 7's detect query is dropped: it must be re-detected, not trained as a fake
    q, ids, ages = model._select_training_tracks(out, target, match, torch.tensor([5]), torch.tensor([0]))
    assert 1 not in q.tolist()
    if rule == "near_track":
        # MOTR: the free query overlapping the kept track most, following no object (matchable next frame)
        assert q.tolist() == [0, 2] and ids.tolist() == [5, NO_OBJECT]
    else:
        # the best-scoring free detect query (slot 1 has the best score but is bound to object 7)
        assert q.tolist() == [0, 3] and ids.tolist() == [5, FALSE_POSITIVE]
    assert ages.tolist() == [0, 0]


def test_near_track_fakes_can_be_matched_to_a_new_object():
    model = _model("MODEL.TRACKER.FAKE_TRACKS", "near_track")
    crit = model.criterion
    out = {
        "pred_logits": torch.full((4, 3), -2.0),
        "pred_boxes": torch.tensor([A, B, [0.9, 0.9, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]]),
    }
    target = {"track_ids": torch.tensor([9]), "boxes": torch.tensor([A]), "labels": torch.tensor([1])}
    # slot 0 is a fake (-1) lying on the new object 9, slot 1 a real track of an absent object
    ((q, t),) = crit.match_frame(out, target, torch.tensor([NO_OBJECT, 5]))
    assert q.tolist() == [0] and t.tolist() == [0]
    crit.match_empty_tracks = False  # the top-score rule's fakes (and empty slots) stay "no object"
    ((q, t),) = crit.match_frame(out, target, torch.tensor([NO_OBJECT, 5]))
    assert len(q) == 1 and q.item() >= 2  # a detect query (slots 2, 3) takes object 9


class _Scripted:
    """``frame_forward`` stand-in: detect query i proposes ``DETECT[i]``; tracks keep their reference box."""

    DETECT = [[20 / 96, 20 / 64, 20 / 96, 20 / 64], [65 / 96, 40 / 64, 30 / 96, 20 / 64]] + [
        [0.9, 0.1 + 0.15 * i, 0.05, 0.05] for i in range(4)
    ]

    def __init__(self, model):
        self.model = model

    def __call__(self, images, tracks):
        t_tgt, t_pos, t_ref = tracks
        T_ = t_tgt.shape[0]
        boxes = torch.cat([t_ref, torch.tensor(self.DETECT)])
        n = boxes.shape[0]
        C = self.model.hidden_dim
        return {
            "pred_logits": torch.zeros(n, 3),
            "pred_boxes": boxes,
            "aux_outputs": [],
            "hs": torch.randn(n, C),
            "tgt": torch.randn(n, C),
            "query_pos": torch.randn(n, C),
            "num_tracks": T_,
        }


def _clip():
    """4 frames (96 x 64): object 7 always there, object 5 absent from frame 3 (index 2)."""
    frames = []
    for i in range(4):
        present = [(5, [10.0, 10.0, 30.0, 30.0]), (7, [50.0, 30.0, 80.0, 50.0])]
        if i == 2:
            present = present[1:]
        inst = Instances((64, 96))
        inst.gt_boxes = Boxes(torch.tensor([b for _, b in present]))
        inst.gt_classes = torch.zeros(len(present), dtype=torch.int64)
        inst.gt_track_ids = torch.tensor([k for k, _ in present])
        frames.append({"image": torch.zeros(3, 64, 96, dtype=torch.uint8), "instances": inst})
    return frames


def _run_clip(keep_absent):
    model = _model(
        "MODEL.TRACKER.KEEP_ABSENT_TRACKS",
        str(keep_absent),
        "MODEL.TRACKER.RANDOM_DROP",
        "0.0",
        "MODEL.TRACKER.FP_RATIO",
        "0.0",
        "MODEL.TRACKER.MIN_BIRTH_VISIBILITY",
        "0.0",
    )
    model.train()
    model.frame_forward = _Scripted(model)
    records = []
    criterion = model.criterion.forward
    model.criterion.forward = lambda recs: records.extend(recs) or criterion(recs)
    losses = model._clip_losses(_clip())
    assert all(torch.isfinite(v) for v in losses.values())
    return records


def _pairs(record):
    q, t = record["indices"][-1]
    ids = record["target"]["track_ids"]
    return {int(qq): int(ids[tt]) for qq, tt in zip(q, t)}


def test_track_kept_through_an_absence_and_rebound_on_return():
    rec = _run_clip(keep_absent=True)
    assert _pairs(rec[0]) == {0: 5, 1: 7}  # frame 1 (no tracks): detect queries 0 and 1 find the objects
    assert rec[1]["track_obj_ids"].tolist() == [5, 7]
    assert _pairs(rec[1]) == {0: 5, 1: 7}
    # frame 3: object 5 is away: its track is still there, supervised as "no object" (unmatched)
    assert rec[2]["track_obj_ids"].tolist() == [5, 7]
    assert _pairs(rec[2]) == {1: 7}
    # frame 4: object 5 is back: the same track query takes it again, no detect query does
    assert rec[3]["track_obj_ids"].tolist() == [7, 5]
    assert _pairs(rec[3]) == {0: 7, 1: 5}


def test_without_keep_absent_the_track_dies_and_the_object_is_detected_again():
    rec = _run_clip(keep_absent=False)
    assert rec[2]["track_obj_ids"].tolist() == [5, 7] and _pairs(rec[2]) == {1: 7}
    assert rec[3]["track_obj_ids"].tolist() == [7]
    assert _pairs(rec[3]) == {0: 7, 1: 5}  # detect query 0 (index T + 0 = 1) finds object 5 anew
