"""Clip label assignment and collective-average loss on hand-built and random two-frame cases."""

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from ddetr_d2.modeling import criterion as criterion_module
from ddetr_d2.modeling.criterion import SetCriterion
from ddetr_d2.modeling.matcher import HungarianMatcher
from ddetr_video.clip_criterion import ClipCriterion

K = 3


def _logits_for(labels, Q, hot=None):
    """(Q, K) logits: -8 everywhere, +8 at (query, label) for the given {query: label}."""
    lg = torch.full((Q, K), -8.0)
    for q, c in (hot or {}).items():
        lg[q, c] = 8.0
    return lg


def _target(ids, boxes, labels):
    return {
        "track_ids": torch.tensor(ids, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _crit(min_birth_visibility=0.0):
    """ClipCriterion on the detector's SetCriterion with the default costs and weights."""
    matcher = HungarianMatcher(
        cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0
    )
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return ClipCriterion(SetCriterion(K, matcher, weights, 0.25, 2.0), min_birth_visibility)


def test_perfect_predictions_near_zero_and_track_keeps_its_id():
    crit = _crit()
    b5, b7, b9 = [0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3], [0.5, 0.8, 0.2, 0.1]
    # frame 1: no tracks, 4 detect queries; queries 1 and 3 predict the two objects perfectly
    t1 = _target([5, 7], [b5, b7], [0, 2])
    boxes1 = torch.tensor([[0.5, 0.5, 0.1, 0.1], b7, [0.1, 0.1, 0.1, 0.1], b5])
    o1 = {"pred_logits": _logits_for(None, 4, {1: 2, 3: 0}), "pred_boxes": boxes1}
    ((q, t),) = crit.match_frame(o1, t1, torch.zeros(0, dtype=torch.int64))
    assert sorted(zip(q.tolist(), t.tolist())) == [(1, 1), (3, 0)]
    # frame 2: the two tracks follow ids [7, 5]; object 9 is new, detect query 2 (index T+2 = 4) finds it
    t2 = _target([9, 5, 7], [b9, b5, b7], [1, 0, 2])
    boxes2 = torch.tensor([b7, b5, [0.2, 0.2, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05], b9, [0.4, 0.4, 0.1, 0.1]])
    o2 = {"pred_logits": _logits_for(None, 6, {0: 2, 1: 0, 4: 1}), "pred_boxes": boxes2}
    ((q2, t2i),) = crit.match_frame(o2, t2, torch.tensor([7, 5]))
    assert sorted(zip(q2.tolist(), t2i.tolist())) == [(0, 2), (1, 1), (4, 0)]
    losses = crit(
        [
            {"outputs": o1, "target": t1, "indices": [(q, t)]},
            {"outputs": o2, "target": t2, "indices": [(q2, t2i)]},
        ]
    )
    assert losses["loss_bbox"] < 1e-6 and losses["loss_giou"] < 1e-6
    assert losses["loss_ce"] < 1e-3


def test_object_leaving_makes_track_target_no_object_and_detect_cannot_steal_tracked():
    crit = _crit()
    b5, b7 = [0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]
    t2 = _target([5], [b5], [0])  # object 7 left
    # a detect query (index 2) also predicts object 5 perfectly: it must NOT be matched (5 is tracked)
    boxes = torch.tensor([b5, b7, b5, [0.1, 0.1, 0.1, 0.1]])
    track_ids = torch.tensor([5, 7])
    lg_low = _logits_for(None, 4, {0: 0})
    ((q, t),) = crit.match_frame({"pred_logits": lg_low, "pred_boxes": boxes}, t2, track_ids)
    assert q.tolist() == [0] and t.tolist() == [0]
    rec = {"outputs": {"pred_logits": lg_low, "pred_boxes": boxes}, "target": t2, "indices": [(q, t)]}
    low = crit([rec])["loss_ce"]
    # the departed track (query 1) still confident of its class -> penalised as a false positive
    lg_high = lg_low.clone()
    lg_high[1, 2] = 8.0
    rec_h = {"outputs": {"pred_logits": lg_high, "pred_boxes": boxes}, "target": t2, "indices": [(q, t)]}
    high = crit([rec_h])["loss_ce"]
    assert high > low + 1.0
    # injected false-positive track (-2) and empty slot (-1) are never matched
    ((q3, _),) = crit.match_frame({"pred_logits": lg_low, "pred_boxes": boxes}, t2, torch.tensor([-2, -1]))
    assert 0 not in q3.tolist() and 1 not in q3.tolist()


def _brute_force_match(cost):
    Q, M = len(cost), len(cost[0])
    best = None
    for perm in itertools.permutations(range(Q), M):
        c = sum(cost[perm[j]][j] for j in range(M))
        if best is None or c < best:
            best = c
    return best


def test_random_clip_against_reference():
    g = torch.Generator().manual_seed(1)
    crit = _crit()
    records, ref = [], {"loss_ce": 0.0, "loss_bbox": 0.0, "loss_giou": 0.0, "loss_ce_0": 0.0}
    n_obj = 0
    for M, track_ids in [(3, [0, 4]), (4, [4, 1, -2])]:
        T, Q = len(track_ids), 5
        ids = torch.randperm(6, generator=g)[:M]
        ids[0] = 4  # make sure one tracked object is present
        cxcy = torch.rand(M, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(M, 2, generator=g) * 0.2 + 0.05
        tgt = {
            "track_ids": ids,
            "boxes": torch.cat([cxcy, wh], 1),
            "labels": torch.randint(0, K, (M,), generator=g),
        }
        layers = []
        for _ in range(2):
            pb = torch.cat(
                [
                    torch.rand(T + Q, 2, generator=g) * 0.6 + 0.2,
                    torch.rand(T + Q, 2, generator=g) * 0.2 + 0.05,
                ],
                1,
            )
            layers.append({"pred_logits": torch.randn(T + Q, K, generator=g), "pred_boxes": pb})
        out = dict(layers[1], aux_outputs=[layers[0]])
        tid = torch.tensor(track_ids)
        idx = crit.match_frame(out, tgt, tid)
        n_obj += M
        for li, (o, (q, t)) in enumerate(zip(layers, idx)):
            # tracked objects assigned by id
            for i, oid in enumerate(track_ids):
                hits = (ids == oid).nonzero().flatten().tolist()
                if hits:
                    assert t[q.tolist().index(i)].item() == hits[0]
                else:
                    assert i not in q.tolist()
            # detect assignment is optimal over the untracked objects (brute force)
            free = [j for j in range(M) if ids[j].item() not in track_ids]
            p = o["pred_logits"][T:].double().sigmoid()
            neg = 0.75 * p**2 * -(1 - p + 1e-8).log()
            pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
            xy = lambda b: box_convert(b.double(), "cxcywh", "xyxy")  # noqa: E731
            C = (
                5 * torch.cdist(o["pred_boxes"][T:].double(), tgt["boxes"][free].double(), p=1)
                + 2 * (pos[:, tgt["labels"][free]] - neg[:, tgt["labels"][free]])
                - 2 * generalized_box_iou(xy(o["pred_boxes"][T:]), xy(tgt["boxes"][free]))
            )
            det_pairs = [(qq - T, tt) for qq, tt in zip(q.tolist(), t.tolist()) if qq >= T]
            got = sum(C[qq, free.index(tt)].item() for qq, tt in det_pairs)
            assert abs(got - _brute_force_match(C.tolist())) < 1e-5
            # independent loss reference (torchvision focal, float64)
            oh = torch.zeros(T + Q, K, dtype=torch.float64)
            oh[q, tgt["labels"][t]] = 1
            sfx = "" if li == 1 else "_0"
            ref["loss_ce" + sfx] += 2.0 * sigmoid_focal_loss(o["pred_logits"].double(), oh, reduction="sum")
            if li == 1:
                ref["loss_bbox"] += 5.0 * (o["pred_boxes"][q].double() - tgt["boxes"][t].double()).abs().sum()
                ref["loss_giou"] += (
                    2.0
                    * (1 - torch.diag(generalized_box_iou(xy(o["pred_boxes"][q]), xy(tgt["boxes"][t])))).sum()
                )
        records.append({"outputs": out, "target": tgt, "indices": idx})
    losses = crit(records)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    for k, v in ref.items():
        torch.testing.assert_close(losses[k].double(), v / n_obj, rtol=1e-4, atol=1e-5)


def _old_focal(inputs, targets, alpha, gamma):
    """The focal loss both criteria carried before switching to torchvision's (element-wise)."""
    p = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def test_torchvision_focal_loss_is_bit_identical_to_the_old_one():
    for dtype in (torch.float32, torch.float64):
        for alpha, gamma in ((0.25, 2.0), (0.4, 1.5), (-1.0, 2.0), (0.25, 0.0)):
            x = torch.randn(2, 37, 5, dtype=dtype) * 4
            t = (torch.rand(2, 37, 5) < 0.1).to(dtype)
            assert torch.equal(
                sigmoid_focal_loss(x, t, alpha, gamma, reduction="none"), _old_focal(x, t, alpha, gamma)
            )
            # and the detector's normalised form is built on it
            got = criterion_module.sigmoid_focal_loss(x, t, 3.0, alpha, gamma)
            assert torch.equal(got, _old_focal(x, t, alpha, gamma).mean(1).sum() / 3.0)


def _old_hungarian(logits, boxes, tgt_labels, tgt_boxes, a=0.25, g=2.0):
    """The ClipCriterion's own copy of the matcher cost before it used the detector's HungarianMatcher."""
    if logits.shape[0] == 0 or tgt_labels.numel() == 0:
        return [], []
    p = logits.float().sigmoid()
    neg = (1 - a) * p**g * -(1 - p + 1e-8).log()
    pos = a * (1 - p) ** g * -(p + 1e-8).log()
    c_cls = pos[:, tgt_labels] - neg[:, tgt_labels]
    c_box = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
    xy = lambda b: box_convert(b.float(), "cxcywh", "xyxy")  # noqa: E731
    c_giou = -generalized_box_iou(xy(boxes), xy(tgt_boxes))
    r, c = linear_sum_assignment((5.0 * c_box + 2.0 * c_cls + 2.0 * c_giou).numpy())
    return r.tolist(), c.tolist()


def test_detect_matching_uses_the_detector_matcher_and_keeps_the_old_assignment():
    crit = _crit()
    assert isinstance(crit.matcher, HungarianMatcher) and crit.matcher is crit.set_criterion.matcher
    rng = np.random.default_rng()
    for _ in range(30):
        T, Q, M = int(rng.integers(0, 4)), int(rng.integers(1, 9)), int(rng.integers(0, 7))
        ids = torch.as_tensor(rng.permutation(10)[:M], dtype=torch.int64)
        track_ids = torch.as_tensor(rng.integers(-2, 10, size=T), dtype=torch.int64)
        boxes = torch.cat([torch.rand(M, 2) * 0.6 + 0.2, torch.rand(M, 2) * 0.3 + 0.02], 1)
        tgt = {"track_ids": ids, "boxes": boxes, "labels": torch.randint(0, K, (M,))}
        out = {
            "pred_logits": torch.randn(T + Q, K) * 3,
            "pred_boxes": torch.cat([torch.rand(T + Q, 2), torch.rand(T + Q, 2) * 0.3 + 0.02], 1),
        }
        ((q, t),) = crit.match_frame(out, tgt, track_ids)
        tracked = {int(i) for i in track_ids.tolist() if i >= 0}
        free = [j for j in range(M) if int(ids[j]) not in tracked]
        r, c = _old_hungarian(out["pred_logits"][T:], out["pred_boxes"][T:], tgt["labels"][free], boxes[free])
        expected = sorted((rr + T, free[cc]) for rr, cc in zip(r, c))
        got = sorted((qq, tt) for qq, tt in zip(q.tolist(), t.tolist()) if qq >= T)
        assert got == expected


def test_box_normaliser_is_all_reduced_across_processes(monkeypatch):
    """With 2 processes, num_boxes = (own + other's count) / 2, as SetCriterion's (other worker simulated)."""
    crit = _crit()
    b5 = [0.3, 0.3, 0.2, 0.2]
    tgt = _target([5, 6], [b5, [0.6, 0.6, 0.1, 0.1]], [0, 1])
    out = {"pred_logits": torch.randn(4, K), "pred_boxes": torch.rand(4, 4) * 0.3 + 0.1}
    rec = {
        "outputs": out,
        "target": tgt,
        "indices": crit.match_frame(out, tgt, torch.zeros(0, dtype=torch.int64)),
    }
    single = crit([rec, rec])  # 4 objects in the clip
    other = 12.0  # the other worker's clip has 12 objects -> (4 + 12) / 2 = 8
    monkeypatch.setattr(criterion_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.add_(other))
    multi = crit([rec, rec])
    for k in single:
        torch.testing.assert_close(multi[k], single[k] * 4 / 8)
