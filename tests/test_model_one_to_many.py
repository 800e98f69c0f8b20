"""The one-to-many query group (H-DETR hybrid matching): isolation, proposals, losses, inference."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from model_testing import VARIANTS, tiny_cfg
from test_model_denoising import _focal, _giou
from test_model_forward import make_inputs
from test_model_overfit import train_on_synthetic

from ddetr_d2.errors import ConfigError
from ddetr_d2.modeling import HungarianMatcher, SetCriterion
from ddetr_d2.modeling.one_to_many import OneToManyGroup, repeat_targets
from ddetr_d2.modeling.query_groups import QueryGroup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

O2M_VARIANTS = {
    "two_stage_mixed": {**VARIANTS["two_stage"], "MIXED_QUERY_SELECTION": True},
    "two_stage": VARIANTS["two_stage"],
    "refine": VARIANTS["refine"],
}


def o2m_cfg(variant, num_queries=12, k=3, dn=False, **overrides):
    cfg = tiny_cfg(**{**O2M_VARIANTS[variant], "DROPOUT": 0.0, "DEC_LAYERS": 2, **overrides})
    o = cfg.MODEL.DEFORMABLE_DETR.ONE_TO_MANY
    o.ENABLED, o.NUM_QUERIES, o.K = True, num_queries, k
    cfg.MODEL.DEFORMABLE_DETR.DN.ENABLED = dn
    return cfg


def _setup(variant, dn):
    torch.manual_seed(0)
    model = build_model(o2m_cfg(variant, dn=dn))
    model.train()
    inputs = make_inputs([(64, 96), (80, 64)], [3, 1], torch.Generator().manual_seed(3))
    images = model.preprocess_image(inputs)
    targets = model.prepare_targets([x["instances"] for x in inputs], images.image_sizes)
    return model, images, targets


def _outputs(model, images, targets):
    torch.manual_seed(5)  # the denoising noise comes from the global RNG: the same draws every call
    with torch.no_grad():
        return model.forward_outputs(images, targets)


@pytest.mark.parametrize("variant", ["two_stage_mixed", "refine"])
def test_groups_cannot_see_each_other(variant):
    """Changing the one-to-many queries leaves the detector's (and the denoising) outputs bit-identical;
    changing the detector's queries leaves the one-to-many outputs bit-identical."""
    dn = variant != "refine"
    model, images, targets = _setup(variant, dn)
    own = model.training_groups["one_to_many"]
    own = own.query_embed if variant == "refine" else own.content
    detector = model.query_embed if variant == "refine" else model.transformer.tgt_embed
    base = _outputs(model, images, targets)
    assert base["query_groups"]["o2m"]["pred_logits"].shape[1] == 12
    assert ("dn0" in base["query_groups"]) == dn

    with torch.no_grad():
        own.weight.add_(torch.randn_like(own.weight))
    moved = _outputs(model, images, targets)
    assert not torch.equal(
        moved["query_groups"]["o2m"]["pred_logits"], base["query_groups"]["o2m"]["pred_logits"]
    )
    assert torch.equal(moved["pred_logits"], base["pred_logits"])
    assert torch.equal(moved["pred_boxes"], base["pred_boxes"])
    for name in [n for n in base["query_groups"] if n != "o2m"]:
        assert torch.equal(
            moved["query_groups"][name]["pred_logits"], base["query_groups"][name]["pred_logits"]
        )

    with torch.no_grad():
        detector.weight.add_(torch.randn_like(detector.weight))
    third = _outputs(model, images, targets)
    assert not torch.equal(third["pred_logits"], moved["pred_logits"])
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(third["query_groups"]["o2m"][key], moved["query_groups"]["o2m"][key])


@pytest.mark.parametrize("variant", list(O2M_VARIANTS))
def test_detector_outputs_as_without_the_group(variant):
    """In training, the detector's outputs are those of the same model without the group (to float
    rounding: the decoder's matrix products have other sizes)."""
    model, images, targets = _setup(variant, dn=False)
    with_group = _outputs(model, images, targets)
    del model.training_groups["one_to_many"]
    without = _outputs(model, images, targets)
    assert "query_groups" not in without
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(with_group[key], without[key], rtol=1e-5, atol=1e-5)


def test_mask_blocks_both_ways_with_every_group():
    group = OneToManyGroup(8, 5, k=2, two_stage=False)
    groups = [
        QueryGroup(n, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.rand(1, 3, 2))
        for n in ("detect", "dn0")
    ]
    _, blocked, _ = group.make_groups([], groups, _FakeSingleStage(), None)
    assert set(blocked) == {("o2m", "detect"), ("o2m", "dn0"), ("detect", "o2m"), ("dn0", "o2m")}


class _FakeSingleStage:
    reference_points = torch.nn.Linear(8, 2)


def test_two_stage_queries_are_the_proposals_ranked_after_the_detectors():
    """Reference boxes of the group = encoder proposals of rank Q .. Q+n-1 (padding excluded), from an
    independent ranking (numpy argsort of the class-0 scores)."""
    torch.manual_seed(0)
    model = build_model(o2m_cfg("two_stage_mixed", num_queries=7))
    model.train()
    gen = torch.Generator().manual_seed(4)
    inputs = make_inputs([(64, 96), (80, 64)], [2, 2], gen)  # different sizes: padding in image 0 and 1
    images = model.preprocess_image(inputs)
    t = model.transformer
    with torch.no_grad():
        enc = t.forward_encoder(*model.prepare_features(images))
        tgt, ref, pos, enc_cls, enc_coord = t.prepare_queries(enc)
        detect = QueryGroup("detect", tgt, pos, ref)
        context = {"enc": enc, "enc_outputs_class": enc_cls, "enc_outputs_coord_unact": enc_coord}
        (group,), _, _ = model.training_groups["one_to_many"].make_groups([], [detect], t, context)
    q = tgt.shape[1]
    scores = enc_cls[..., 0].double().numpy()
    pad = enc["mask_flatten"].numpy()
    assert pad.any()
    for i in range(2):
        order = [j for j in np.argsort(-scores[i], kind="stable") if not pad[i, j]]
        expected = enc_coord[i, order[q : q + 7]].sigmoid()
        # to one float32 ulp: the vectorised sigmoid rounds an element differently when it falls in a
        # loop's tail (AVX-512 vs AVX2 widths); proposals of other ranks differ by >= 1e-2
        torch.testing.assert_close(group.reference_points[i], expected, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(ref[i], enc_coord[i, order[:q]].sigmoid(), atol=1e-7, rtol=1e-6)
    assert torch.equal(group.content[0], model.training_groups["one_to_many"].content.weight)


def test_losses_hand_built():
    """k copies of every object: all k are matched (positives), losses from first principles (float64),
    normalised by k x the number of objects, scaled by the group's loss weight."""
    gen = torch.Generator().manual_seed(7)
    k, num_classes, n_q, weight = 3, 3, 12, 0.5
    targets = []
    for n in (2, 1):
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=gen)
        c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
        targets.append(
            {"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": torch.cat([c, wh], 1)}
        )
    layers = []
    copies = []  # per image: {query: target index}
    for _layer in range(2):
        logits = -4 + torch.rand(2, n_q, num_classes, generator=gen)
        boxes = torch.cat([torch.rand(2, n_q, 2, generator=gen), torch.full((2, n_q, 2), 0.02)], -1)
        for i, t in enumerate(targets):
            for j in range(len(t["labels"]) * k):
                obj = j % len(t["labels"])
                boxes[i, j] = t["boxes"][obj] + 0.01 * torch.rand(4, generator=gen)
                logits[i, j, t["labels"][obj]] = 2.0
        layers.append({"pred_logits": logits, "pred_boxes": boxes})
    for t in targets:
        copies.append({j: j % len(t["labels"]) for j in range(len(t["labels"]) * k)})
    outputs = {"o2m": dict(layers[-1], aux_outputs=layers[:-1])}
    criterion = SetCriterion(
        num_classes, HungarianMatcher(), {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}
    )
    group = OneToManyGroup(8, n_q, k=k, loss_weight=weight, two_stage=False)
    losses = group.losses(outputs, targets, {"name": "o2m"}, criterion)
    assert set(losses) == {f"loss_{n}_o2m{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0")}

    num_boxes = k * 3.0
    for suffix, o in (("", layers[-1]), ("_0", layers[0])):
        ce = l1 = giou = 0.0
        for i, t in enumerate(targets):
            for j in range(n_q):
                for c in range(num_classes):
                    target = 1.0 if j in copies[i] and int(t["labels"][copies[i][j]]) == c else 0.0
                    ce += _focal(float(o["pred_logits"][i, j, c]), target)
                if j in copies[i]:
                    pred, gt = (
                        o["pred_boxes"][i, j].double().tolist(),
                        t["boxes"][copies[i][j]].double().tolist(),
                    )
                    l1 += sum(abs(a - b) for a, b in zip(pred, gt))
                    giou += 1 - _giou(pred, gt)
        assert losses[f"loss_ce_o2m{suffix}"].item() == pytest.approx(weight * 2.0 * ce / num_boxes, rel=1e-5)
        assert losses[f"loss_bbox_o2m{suffix}"].item() == pytest.approx(
            weight * 5.0 * l1 / num_boxes, rel=1e-5
        )
        assert losses[f"loss_giou_o2m{suffix}"].item() == pytest.approx(
            weight * 3.0 * giou / num_boxes, rel=1e-4
        )


def test_repeat_targets():
    t = [{"labels": torch.tensor([4, 1]), "boxes": torch.rand(2, 4), "extra": 1}]
    (r,) = repeat_targets(t, 3)
    assert r["labels"].tolist() == [4, 1, 4, 1, 4, 1] and set(r) == {"labels", "boxes"}
    assert torch.equal(r["boxes"][2:4], t[0]["boxes"]) and torch.equal(r["boxes"][4:], t[0]["boxes"])


def test_no_proposal_left_gives_zero_losses_in_the_graph():
    """More detector queries than encoder tokens: the group is empty and its losses are zeros that still
    reach its parameters (DDP)."""
    torch.manual_seed(0)
    model = build_model(o2m_cfg("two_stage_mixed", NUM_QUERIES=400))
    model.train()
    losses = model(make_inputs([(32, 32), (32, 32)], [1, 1], torch.Generator().manual_seed(1)))
    for key in ("loss_ce_o2m", "loss_bbox_o2m", "loss_giou_o2m"):
        assert losses[key].item() == 0 and losses[key].requires_grad


@pytest.mark.parametrize("variant", ["two_stage_mixed", "refine"])
def test_inference_bit_identical_with_the_group_on_or_off(variant):
    """The group exists in training only: the same weights give the same inference outputs, bitwise, and
    its parameters are the only extra keys (dropped for a plain model)."""
    torch.manual_seed(0)
    with_group = build_model(o2m_cfg(variant))
    cfg = o2m_cfg(variant)
    cfg.MODEL.DEFORMABLE_DETR.ONE_TO_MANY.ENABLED = False
    plain = build_model(cfg)
    with_group.train()
    inputs = make_inputs([(64, 96), (80, 64)], [3, 2], torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(with_group.parameters(), lr=0.1)
    sum(with_group(inputs).values()).backward()
    opt.step()
    state = with_group.state_dict()
    extra = [k for k in state if k.startswith("training_groups.")]
    assert extra == [
        "training_groups.one_to_many." + ("query_embed.weight" if variant == "refine" else "content.weight")
    ]
    plain.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)
    with_group.eval()
    plain.eval()
    images = [{"image": x["image"]} for x in inputs]
    with torch.no_grad():
        a, b = with_group(images), plain(images)
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)


def test_config_errors():
    cfg = o2m_cfg("refine")
    cfg.MODEL.DEFORMABLE_DETR.ONE_TO_MANY.K = 0
    with pytest.raises(ConfigError, match="ONE_TO_MANY"):
        build_model(cfg)
    cfg = o2m_cfg("refine", num_queries=0)
    with pytest.raises(ConfigError, match="NUM_QUERIES"):
        build_model(cfg)


def test_short_training_run():
    """A few iterations on an overfit batch with the group (and denoising): finite losses that go down."""
    cfg = o2m_cfg("two_stage_mixed", dn=True, NUM_CLASSES=2, NUM_QUERIES=10)
    torch.manual_seed(0)
    model = build_model(cfg)

    def check(losses):
        assert {"loss_ce_o2m", "loss_giou_o2m_0", "loss_ce_dn", "loss_ce_enc"} <= set(losses)

    history = train_on_synthetic(model, 25, check)
    assert np.isfinite(history).all()
    assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), history
