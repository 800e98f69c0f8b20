"""Clip label assignment and collective-average loss on hand-built and random two-frame cases."""

import itertools

import torch
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

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


def _crit():
    return ClipCriterion(num_classes=K)


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
    crit = ClipCriterion(num_classes=K, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
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
            from torchvision.ops import box_convert

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
