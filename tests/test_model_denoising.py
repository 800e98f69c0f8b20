"""Denoising query groups (DN-DETR / DINO), mixed query selection and look-forward-twice."""

import math

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from model_testing import VARIANTS, tiny_cfg
from test_model_forward import make_inputs
from test_model_overfit import train_on_synthetic

from ddetr_d2.errors import ConfigError
from ddetr_d2.modeling import HungarianMatcher, SetCriterion
from ddetr_d2.modeling.denoising import DenoisingGroups, noise_boxes, noise_labels
from ddetr_d2.modeling.query_groups import QueryGroup, assemble_query_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DN_KEYS = (
    "ENABLED",
    "NUM_GROUPS",
    "DYNAMIC_NUM_QUERIES",
    "BOX_NOISE_SCALE",
    "LABEL_NOISE_RATIO",
    "CONTRASTIVE",
)


def dn_cfg(dn=None, **overrides):
    """Two-stage tiny config with ``MODEL.DEFORMABLE_DETR.DN.<KEY>`` from ``dn``."""
    cfg = tiny_cfg(**{**VARIANTS["two_stage"], **overrides})
    for k, v in (dn or {}).items():
        assert k in DN_KEYS, k
        setattr(cfg.MODEL.DEFORMABLE_DETR.DN, k, v)
    return cfg


def random_targets(counts, gen, num_classes=80):
    out = []
    for n in counts:
        wh = 0.02 + 0.5 * torch.rand(n, 2, generator=gen)
        c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
        out.append(
            {"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": torch.cat([c, wh], 1)}
        )
    return out


# ---------------------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("contrastive", [False, True])
def test_mask_hides_denoising_groups(contrastive):
    torch.manual_seed(0)
    model = build_model(dn_cfg({"ENABLED": True, "NUM_GROUPS": 3, "CONTRASTIVE": contrastive}, DEC_LAYERS=2))
    model.eval()  # no dropout; the groups are assembled by hand below
    dn = model.training_groups["denoising"]
    gen = torch.Generator().manual_seed(1)
    targets = random_targets([3, 1], gen)
    images = model.preprocess_image(make_inputs([(64, 96), (80, 64)], [0, 0], gen))
    with torch.no_grad():
        enc = model.transformer.forward_encoder(*model.prepare_features(images))
        tgt, ref, pos, _, _ = model.transformer.prepare_queries(enc)
        detect = QueryGroup("detect", tgt, pos, ref)
        groups, blocked, meta = dn.make_groups(targets, [detect], model.transformer)
        q = assemble_query_groups([detect] + groups, blocked)

        p = 3 * (2 if contrastive else 1)
        assert [g.name for g in groups] == ["dn0", "dn1", "dn2"] and all(len(g) == p for g in groups)
        mask = q.attn_mask
        d = slice(0, tgt.shape[1])
        assert mask[d, d].sum() == 0  # matching queries see each other
        assert mask[d, d.stop :].all()  # ... and no denoising query
        for a in range(3):
            sa = q.slices[f"dn{a}"]
            assert (
                not mask[sa, d].any() and not mask[sa, sa].any()
            )  # a group sees the matching queries and itself
            for b in range(3):
                if a != b:
                    assert mask[sa, q.slices[f"dn{b}"]].all()

        # functional check: changing a group's queries changes nothing outside it (bitwise)
        dec = model.transformer.forward_decoder
        hs, _, _ = dec(q.content, q.reference_points, q.position, enc, q.attn_mask)
        changed = [detect] + [
            QueryGroup(g.name, g.content + (5.0 if g.name == "dn1" else 0.0), g.position, g.reference_points)
            for g in groups
        ]
        q2 = assemble_query_groups(changed, blocked)
        hs2, _, _ = dec(q2.content, q2.reference_points, q2.position, enc, q2.attn_mask)
    a, b = q.split(hs, 2), q2.split(hs2, 2)
    for name in ("detect", "dn0", "dn2"):
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["dn1"], b["dn1"])


# ---------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("scale", [0.4, 1.0, 2.0])
@pytest.mark.parametrize("negative", [False, True])
def test_noised_boxes_stay_valid(scale, negative):
    gen = torch.Generator().manual_seed(int(scale * 10) + negative)
    wh = torch.rand(4000, 2, generator=gen) * 0.999 + 1e-3
    c = wh / 2 + (1 - wh) * torch.rand(4000, 2, generator=gen)
    boxes = torch.cat([c, wh], 1)
    boxes[:10, :2] = boxes[:10, 2:] / 2  # touching the top-left corner
    boxes[10:20] = torch.tensor([0.5, 0.5, 1.0, 1.0])  # the whole image
    out = noise_boxes(boxes, scale, negative, generator=gen)
    assert out.shape == boxes.shape and torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1).all() and (out[:, 2:] > 0).all()
    x0y0, x1y1 = out[:, :2] - out[:, 2:] / 2, out[:, :2] + out[:, 2:] / 2
    assert (x0y0 >= -1e-6).all() and (x1y1 <= 1 + 1e-6).all()
    if scale <= 1 and not negative:  # corners keep their order and clamping only shortens a move
        old = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        half = torch.cat([boxes[:, 2:], boxes[:, 2:]], 1) / 2
        assert ((torch.cat([x0y0, x1y1], 1) - old).abs() <= half * scale + 2e-4).all()
    assert noise_boxes(boxes, 0.0).equal(boxes)


def test_positive_and_negative_noise_ranges():
    """Away from the border (no clamping, corners keep their order at scale 0.4): a positive corner moves
    by less than scale x half the size, a negative one by [1, 2) x that."""
    gen = torch.Generator().manual_seed(5)
    wh = 0.01 + 0.1 * torch.rand(3000, 2, generator=gen)
    boxes = torch.cat([0.4 + 0.2 * torch.rand(3000, 2, generator=gen), wh], 1)
    old = torch.cat([boxes[:, :2] - wh / 2, boxes[:, :2] + wh / 2], 1).double()
    half = torch.cat([wh, wh], 1).double() / 2
    for negative, lo, hi in ((False, 0.0, 1.0), (True, 1.0, 2.0)):
        out = noise_boxes(boxes, 0.4, negative, generator=gen).double()
        new = torch.cat([out[:, :2] - out[:, 2:] / 2, out[:, :2] + out[:, 2:] / 2], 1)
        ratio = (new - old).abs() / (0.4 * half)
        assert ratio.min() >= lo - 1e-3 and ratio.max() <= hi + 1e-3, (negative, ratio.min(), ratio.max())


def test_noised_labels_within_classes_and_rate():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (20000,), generator=gen)
    out = noise_labels(labels, 0.3, 7, generator=gen)
    assert out.dtype == labels.dtype and out.min() >= 0 and out.max() < 7
    changed = (out != labels).float().mean().item()
    assert abs(changed - 0.3 * 6 / 7) < 0.015  # a flip draws the same class 1 time in 7
    assert noise_labels(labels, 0.0, 7).equal(labels)


def test_group_counts_and_padding():
    dn = DenoisingGroups(5, 16, num_groups=4)
    assert dn.groups_for(10) == 4
    dyn = DenoisingGroups(5, 16, dynamic_num_queries=20, contrastive=True)
    assert [dyn.groups_for(m) for m in (1, 3, 10, 50)] == [10, 3, 1, 1]
    gen = torch.Generator().manual_seed(3)
    targets = random_targets([2, 0, 3], gen, num_classes=5)
    q = dyn.make_queries(targets, generator=gen)
    assert q["num_groups"] == 3 and q["labels"].shape == (3, 3, 6) and q["boxes"].shape == (3, 3, 6, 4)
    assert q["valid"].tolist()[0] == [True, True, False, True, True, False]
    assert not q["valid"][1].any() and q["valid"][2].all()
    assert q["positive"].tolist() == [True] * 3 + [False] * 3
    assert q["labels"].min() >= 0 and q["labels"].max() < 5
    assert dyn.make_queries(random_targets([0, 0], gen)) is None


# ---------------------------------------------------------------------------------------- losses
def _focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def _giou(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("contrastive", [False, True])
def test_denoising_losses_hand_built(contrastive):
    """Reconstruction losses without matching, DN-DETR normalisation, from first principles (float64)."""
    gen = torch.Generator().manual_seed(11 + contrastive)
    k, g = 3, 2
    targets = random_targets([2, 1], gen, num_classes=k)
    dn = DenoisingGroups(k, 8, num_groups=g, contrastive=contrastive)
    meta = dn.make_queries(targets, generator=gen)
    meta["names"], meta["num_objects"] = ["dn0", "dn1"], [2, 1]
    p = meta["labels"].shape[2]
    layers = 2
    outs = {}
    for name in meta["names"]:
        per_layer = [
            {
                "pred_logits": torch.randn(2, p, k, generator=gen),
                "pred_boxes": torch.rand(2, p, 4, generator=gen) * 0.5 + 0.2,
            }
            for _ in range(layers)
        ]
        outs[name] = dict(per_layer[-1], aux_outputs=per_layer[:-1])
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}
    criterion = SetCriterion(k, HungarianMatcher(), weights)
    losses = dn.losses(outs, targets, meta, criterion)
    assert set(losses) == {f"loss_{n}_dn{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0")}

    num_boxes = 3.0
    for suffix, layer in (("", -1), ("_0", 0)):
        ce = l1 = giou = 0.0
        for name in meta["names"]:
            o = outs[name] if layer == -1 else outs[name]["aux_outputs"][layer]
            for i, t in enumerate(targets):
                m = p // (2 if contrastive else 1)  # positives first, then the negatives
                for j in range(p):
                    positive = j < m and j < len(t["labels"])
                    obj = j
                    for c in range(k):
                        target = 1.0 if positive and int(t["labels"][obj]) == c else 0.0
                        ce += _focal(float(o["pred_logits"][i, j, c]), target)
                    if positive:
                        pred, gt = o["pred_boxes"][i, j].double().tolist(), t["boxes"][obj].double().tolist()
                        l1 += sum(abs(a - b) for a, b in zip(pred, gt))
                        giou += 1 - _giou(pred, gt)
        norm = num_boxes * g
        # focal: mean over the g * p denoising queries, x their number -> plain sum
        assert losses[f"loss_ce_dn{suffix}"].item() == pytest.approx(2.0 * ce / norm, rel=1e-5)
        assert losses[f"loss_bbox_dn{suffix}"].item() == pytest.approx(5.0 * l1 / norm, rel=1e-5)
        assert losses[f"loss_giou_dn{suffix}"].item() == pytest.approx(3.0 * giou / norm, rel=1e-5)

    # no object in the batch: zero losses that still reach the label embedding (DDP)
    empty = dn.losses({}, random_targets([0, 0], gen), None, criterion)
    assert all(v.item() == 0 and v.requires_grad for v in empty.values())


# ---------------------------------------------------------------------------------------- inference
def test_inference_bit_identical_with_denoising_on_or_off():
    """Denoising exists in training only: the same weights give the same inference outputs, bitwise."""
    torch.manual_seed(0)
    with_dn = build_model(dn_cfg({"ENABLED": True, "CONTRASTIVE": True}, DEC_LAYERS=2))
    torch.manual_seed(0)
    plain = build_model(dn_cfg(DEC_LAYERS=2))
    # one training step on the denoising model, so the weights are not the initial ones
    with_dn.train()
    inputs = make_inputs([(64, 96), (80, 64)], [3, 2], torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(with_dn.parameters(), lr=0.1)
    sum(with_dn(inputs).values()).backward()
    opt.step()

    state = with_dn.state_dict()
    dn_keys = [k for k in state if k.startswith("training_groups.")]
    assert dn_keys == ["training_groups.denoising.label_embed.weight"]
    plain.load_state_dict({k: v for k, v in state.items() if k not in dn_keys}, strict=True)
    with_dn.eval()
    plain.eval()
    images = [{"image": x["image"]} for x in inputs]
    with torch.no_grad():
        a, b = with_dn(images), plain(images)
        ra, rb = (
            with_dn.forward_outputs(with_dn.preprocess_image(images)),
            plain.forward_outputs(plain.preprocess_image(images)),
        )
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        for f in ("scores", "pred_classes", "query_indices"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
    assert torch.equal(ra["pred_logits"], rb["pred_logits"]) and torch.equal(
        ra["pred_boxes"], rb["pred_boxes"]
    )


def test_options_need_their_variant():
    with pytest.raises(ConfigError, match="TWO_STAGE"):
        build_model(_plain_with_dn())
    with pytest.raises(ConfigError, match="TWO_STAGE"):
        build_model(tiny_cfg(WITH_BOX_REFINE=True, MIXED_QUERY_SELECTION=True))
    with pytest.raises(ConfigError, match="WITH_BOX_REFINE"):
        build_model(tiny_cfg(LOOK_FORWARD_TWICE=True))
    with pytest.raises(ConfigError, match="LABEL_NOISE_RATIO"):
        build_model(dn_cfg({"ENABLED": True, "LABEL_NOISE_RATIO": 1.5}))


def _plain_with_dn():
    cfg = tiny_cfg(WITH_BOX_REFINE=True)
    cfg.MODEL.DEFORMABLE_DETR.DN.ENABLED = True
    return cfg


def test_look_forward_twice_same_values_other_gradients():
    """Look-forward-twice changes only the gradient path: equal losses, but the box loss of layer 1 now
    reaches layer 0's box head."""
    inputs = make_inputs([(64, 64)], [3], torch.Generator().manual_seed(5))
    grads, values = {}, {}
    for lft in (False, True):
        torch.manual_seed(0)
        model = build_model(dn_cfg(DEC_LAYERS=2, DROPOUT=0.0, LOOK_FORWARD_TWICE=lft, AUX_LOSS=False))
        # non-zero box heads, so that layer 0's refinement has a gradient to pass on
        with torch.no_grad():
            for m in model.bbox_embed:
                m.layers[-1].weight.normal_(0, 0.01)
        model.train()
        losses = model(inputs)
        values[lft] = {k: v.item() for k, v in losses.items()}
        # only the last layer's loss: without look-forward-twice it cannot reach bbox_embed[0]
        (losses["loss_bbox"] + losses["loss_giou"]).backward()
        grads[lft] = model.bbox_embed[0].layers[-1].weight.grad
    assert values[False] == values[True]
    assert grads[False] is None or grads[False].abs().sum() == 0
    assert grads[True] is not None and grads[True].abs().sum() > 0


def test_mixed_query_selection_learned_content():
    torch.manual_seed(0)
    model = build_model(dn_cfg(DEC_LAYERS=2, MIXED_QUERY_SELECTION=True))
    assert model.transformer.tgt_embed.weight.shape == (20, 64)
    model.eval()
    images = model.preprocess_image(make_inputs([(64, 96)], [0], torch.Generator().manual_seed(1)))
    with torch.no_grad():
        enc = model.transformer.forward_encoder(*model.prepare_features(images))
        tgt, ref, pos, _, _ = model.transformer.prepare_queries(enc)
        boxes_pos, _ = model.transformer.embed_reference_boxes(torch.logit(ref.double(), eps=0).float())
    assert torch.equal(tgt[0], model.transformer.tgt_embed.weight)
    torch.testing.assert_close(pos, boxes_pos, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- training
OPTIONS = {
    "dn": ({"ENABLED": True, "NUM_GROUPS": 3}, {}),
    "dn_contrastive_dynamic": (
        {
            "ENABLED": True,
            "DYNAMIC_NUM_QUERIES": 12,
            "CONTRASTIVE": True,
            "BOX_NOISE_SCALE": 1.0,
            "LABEL_NOISE_RATIO": 0.25,
        },
        {},
    ),
    "mixed_query_selection": ({}, {"MIXED_QUERY_SELECTION": True}),
    "look_forward_twice": ({}, {"LOOK_FORWARD_TWICE": True}),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_short_training_run(option):
    """A few iterations of the tiny model on an overfit batch: finite losses that go down."""
    dn, extra = OPTIONS[option]
    cfg = dn_cfg(dn, NUM_CLASSES=2, NUM_QUERIES=10, DROPOUT=0.0, DEC_LAYERS=2, **extra)
    torch.manual_seed(0)
    model = build_model(cfg)

    def check(losses):
        if dn:
            assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"} <= set(losses)

    history = train_on_synthetic(model, 25, check)
    assert np.isfinite(history).all()
    assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), history
