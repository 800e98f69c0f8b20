"""Matcher, criterion and position encoding against independent references."""

import itertools
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from ddetr_d2.modeling import HungarianMatcher, PositionEmbeddingSine, SetCriterion, sigmoid_focal_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_boxes(n, gen):
    """(n, 4) valid cxcywh boxes inside [0, 1]."""
    wh = 0.05 + 0.4 * torch.rand(n, 2, generator=gen)
    c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([c, wh], 1)


def brute_force(cost):
    """Minimum-cost assignment of every column (target) to a distinct row (query)."""
    q, t = cost.shape
    best, best_rows = math.inf, None
    for rows in itertools.permutations(range(q), t):
        c = sum(cost[r, j].item() for j, r in enumerate(rows))
        if c < best:
            best, best_rows = c, rows
    return best, best_rows


def focal_cost_reference(logits, labels, alpha=0.25, gamma=2.0):
    p = logits.double().sigmoid()[:, labels]
    pos = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8)
    return pos - neg


def giou_reference(a, b):
    """Pairwise GIoU of cxcywh boxes, written out from the definition (float64)."""
    a, b = a.double(), b.double()
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    for i, j in itertools.product(range(len(a)), range(len(b))):
        ax0, ay0, ax1, ay1 = (
            a[i, 0] - a[i, 2] / 2,
            a[i, 1] - a[i, 3] / 2,
            a[i, 0] + a[i, 2] / 2,
            a[i, 1] + a[i, 3] / 2,
        )
        bx0, by0, bx1, by1 = (
            b[j, 0] - b[j, 2] / 2,
            b[j, 1] - b[j, 3] / 2,
            b[j, 0] + b[j, 2] / 2,
            b[j, 1] + b[j, 3] / 2,
        )
        iw = (min(ax1, bx1) - max(ax0, bx0)).clamp(min=0)
        ih = (min(ay1, by1) - max(ay0, by0)).clamp(min=0)
        inter = iw * ih
        union = a[i, 2] * a[i, 3] + b[j, 2] * b[j, 3] - inter
        hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
        out[i, j] = inter / union - (hull - union) / hull
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = 6, 5
    t = [0, 1, 3, 4, 2, 5][seed]
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    logits = torch.randn(3, q, k, generator=gen) * 2
    boxes = random_boxes(3 * q, gen).view(3, q, 4)
    # an image without objects between two with (the costs of the batch are computed at once)
    targets = [
        {"labels": torch.randint(0, k, (n,), generator=gen), "boxes": random_boxes(n, gen)}
        for n in (t, 0, max(t - 1, 0))
    ]
    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for i, (rows, cols) in enumerate(indices):
        n = len(targets[i]["labels"])
        assert len(rows) == len(cols) == n
        if n == 0:
            continue
        # cost from first principles (float64)
        lab, tb = targets[i]["labels"], targets[i]["boxes"]
        cost = (
            5.0 * (boxes[i].double()[:, None] - tb.double()[None]).abs().sum(-1)
            + 2.0 * focal_cost_reference(logits[i], lab)
            - 2.0 * giou_reference(boxes[i], tb)
        )
        torch.testing.assert_close(
            matcher.cost_matrix(logits[i], boxes[i], lab, tb).double(), cost, rtol=1e-5, atol=1e-5
        )
        best, _ = brute_force(cost)
        got = sum(cost[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
        assert got == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))


def test_focal_loss_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64) * 3
    targets = (torch.rand(3, 7, 5, generator=gen) < 0.2).double()
    for alpha, gamma, num_boxes in [(0.25, 2.0, 4.0), (0.5, 1.0, 1.0), (-1, 2.0, 2.5)]:
        ours = sigmoid_focal_loss(logits, targets, num_boxes, alpha, gamma)
        ref = tv_focal(logits, targets, alpha=alpha, gamma=gamma, reduction="none").mean(1).sum() / num_boxes
        torch.testing.assert_close(ours, ref)


def _criterion(num_classes=4):
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return SetCriterion(num_classes, matcher, weights)


def test_criterion_hand_built_cases():
    gen = torch.Generator().manual_seed(0)
    crit = _criterion()
    q, k = 5, 4
    tgt_boxes = random_boxes(3, gen)
    labels = torch.tensor([2, 0, 3])
    # perfect prediction: the matched queries carry the exact boxes and very confident logits
    pred_boxes = random_boxes(q, gen)[None].clone()
    pred_boxes[0, [4, 1, 2]] = tgt_boxes
    logits = torch.full((1, q, k), -20.0)
    logits[0, [4, 1, 2], labels] = 20.0
    out = {"pred_logits": logits, "pred_boxes": pred_boxes}
    losses = crit(out, [{"labels": labels, "boxes": tgt_boxes}])
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-6
    assert losses["loss_ce"].item() < 1e-6

    # classification: focal x num_queries / num_boxes, weighted; boxes: L1 sum / num_boxes, weighted
    logits = torch.randn(1, q, k, generator=gen)
    out = {"pred_logits": logits, "pred_boxes": pred_boxes}
    losses = crit(out, [{"labels": labels, "boxes": tgt_boxes}])
    onehot = torch.zeros(1, q, k)
    onehot[0, [4, 1, 2], labels] = 1
    expected_ce = 2.0 * q * tv_focal(logits, onehot, reduction="none").mean(1).sum() / 3
    torch.testing.assert_close(losses["loss_ce"], expected_ce)

    # a box shifted by d in cx: L1 = d / num_boxes (x5); GIoU from the reference
    shifted = pred_boxes.clone()
    shifted[0, 4, 0] += 0.03
    losses = crit({"pred_logits": logits, "pred_boxes": shifted}, [{"labels": labels, "boxes": tgt_boxes}])
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.03 / 3, rel=1e-4)
    g = giou_reference(shifted[0, 4:5], tgt_boxes[:1])[0, 0].item()
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - g) / 3, rel=1e-4, abs=1e-6)


def test_criterion_aux_enc_and_empty():
    gen = torch.Generator().manual_seed(1)
    crit = _criterion()
    q, k = 6, 4

    def layer():
        return {
            "pred_logits": torch.randn(2, q, k, generator=gen),
            "pred_boxes": random_boxes(2 * q, gen).view(2, q, 4),
        }

    out = layer()
    out["aux_outputs"] = [layer(), layer()]
    out["enc_outputs"] = layer()
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": random_boxes(2, gen)},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    losses = crit(out, targets)
    names = {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1", "_enc")}
    assert set(losses) == names
    # aux layer 0 equals the criterion applied to that layer alone
    alone = crit(out["aux_outputs"][0], targets)
    for n in ("ce", "bbox", "giou"):
        torch.testing.assert_close(losses[f"loss_{n}_0"], alone[f"loss_{n}"])
    # the encoder loss uses class-agnostic targets (all labels 0)
    bin_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    torch.testing.assert_close(losses["loss_ce_enc"], crit(out["enc_outputs"], bin_targets)["loss_ce"])
    # no boxes anywhere: num_boxes clamps to 1, box losses 0, all finite
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    losses = crit(layer(), empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0


def test_position_encoding_reference():
    torch.manual_seed(0)
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[0, :5, :7] = False
    mask[1, :3, :4] = False
    feats = 8
    pos = PositionEmbeddingSine(feats, normalize=True)(mask)
    assert pos.shape == (2, 2 * feats, 5, 7)
    for n, (h, w) in enumerate([(5, 7), (3, 4)]):
        for y, x in itertools.product(range(h), range(w)):
            # pixel centre over valid extent, scaled to 2*pi
            ey, ex = (y + 0.5) / h * 2 * math.pi, (x + 0.5) / w * 2 * math.pi
            for axis, e in ((0, ey), (1, ex)):
                for c in range(feats):
                    v = e / 10000 ** (2 * (c // 2) / feats)
                    ref = math.sin(v) if c % 2 == 0 else math.cos(v)
                    assert pos[n, axis * feats + c, y, x].item() == pytest.approx(ref, abs=1e-5)
