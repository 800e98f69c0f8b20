"""Deformable DETR meta-architecture on the tiny config: training losses, gradients, inference outputs."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from model_testing import VARIANTS, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_inputs(sizes, n_boxes, gen, num_classes=80):
    inputs = []
    for (h, w), n in zip(sizes, n_boxes):
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = 4 + torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.4 - 4, h * 0.4 - 4])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=gen)
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        inputs.append({"image": image, "instances": inst, "height": 2 * h, "width": 2 * w})
    return inputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_forward_backward(variant):
    torch.manual_seed(0)
    cfg = tiny_cfg(DEC_LAYERS=2, **VARIANTS[variant])
    model = build_model(cfg)
    model.train()
    gen = torch.Generator().manual_seed(1)
    losses = model(make_inputs([(64, 96), (80, 64)], [3, 1], gen))

    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    if variant == "two_stage":
        expected |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(losses) == expected
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
        assert v.item() > 0, k
    sum(losses.values()).backward()

    # frozen stem / res2 (FREEZE_AT 2), trainable res3..res5
    assert not model.get_parameter("backbone.stem.conv1.weight").requires_grad
    # (level_embed only enters the encoder queries, which act through sampling_offsets /
    # attention_weights: both zero-initialised, so its gradient is exactly 0 at init, as in the official code)
    must_have_grad = [
        "backbone.res3.0.conv1.weight",
        "backbone.res5.1.conv2.weight",
        "input_proj.0.0.weight",
        "input_proj.3.0.weight",
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.self_attn.value_proj.weight",
        "transformer.decoder.layers.1.cross_attn.attention_weights.weight",
        "transformer.decoder.layers.1.self_attn.in_proj_weight",
        "transformer.decoder.layers.1.linear2.weight",
        "class_embed.0.weight",
        "bbox_embed.0.layers.2.weight",
    ]
    if variant == "two_stage":
        must_have_grad += [
            "transformer.enc_output.weight",
            "transformer.pos_trans.weight",
            "class_embed.2.weight",
        ]
    else:
        must_have_grad += ["query_embed.weight", "transformer.reference_points.weight"]
    for name in must_have_grad:
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_heads_shared_or_copied_and_official_init():
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(DEC_LAYERS=3))
    assert all(m is plain.class_embed[0] for m in plain.class_embed)
    assert all(m is plain.bbox_embed[0] for m in plain.bbox_embed)
    assert plain.transformer.decoder.bbox_embed is None
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    torch.testing.assert_close(plain.class_embed[0].bias, prior.expand(80))
    last = plain.bbox_embed[0].layers[-1]
    assert last.weight.abs().sum() == 0
    torch.testing.assert_close(last.bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert plain.transformer.reference_points.bias.abs().sum() == 0
    # MSDeformAttn init survives the blanket xavier init
    attn = plain.transformer.encoder.layers[0].self_attn
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    assert attn.sampling_offsets.bias.abs().max() == attn.n_points

    refine = build_model(tiny_cfg(DEC_LAYERS=3, WITH_BOX_REFINE=True))
    assert len({id(m) for m in refine.bbox_embed}) == 3
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    torch.testing.assert_close(refine.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert refine.bbox_embed[1].layers[-1].bias.abs().sum() == 0
    # deep copies start identical
    torch.testing.assert_close(refine.class_embed[1].weight, refine.class_embed[2].weight)

    two = build_model(tiny_cfg(DEC_LAYERS=3, WITH_BOX_REFINE=True, TWO_STAGE=True))
    assert len(two.bbox_embed) == 4 and two.transformer.decoder.class_embed is two.class_embed
    assert all(b.layers[-1].bias.abs().sum() == 0 for b in two.bbox_embed)
    assert not hasattr(two, "query_embed") and not hasattr(two.transformer, "reference_points")

    with pytest.raises(ValueError, match="WITH_BOX_REFINE"):
        build_model(tiny_cfg(TWO_STAGE=True))


def test_images_without_boxes_train():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DEC_LAYERS=2, WITH_BOX_REFINE=True, TWO_STAGE=True))
    gen = torch.Generator().manual_seed(2)
    for n_boxes in ([0, 0], [0, 2]):
        model.zero_grad()
        losses = model(make_inputs([(64, 64), (64, 80)], n_boxes, gen))
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
        if n_boxes == [0, 0]:
            assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_ce"] > 0


def test_inference_outputs():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DETECTIONS_PER_IMAGE=15))
    model.eval()
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs([(64, 96), (80, 64)], [1, 1], gen)
    with torch.no_grad():
        outs = model(inputs)
        raw = model.forward_outputs(model.preprocess_image(inputs))
    assert len(outs) == 2
    for i, (o, x) in enumerate(zip(outs, inputs)):
        inst = o["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert {"pred_boxes", "scores", "pred_classes", "query_indices"} <= set(inst.get_fields())
        assert len(inst) <= 15 and inst.query_indices.dtype == torch.int64
        # scores are the top-k sigmoid scores over all (query, class) pairs
        prob = raw["pred_logits"][i].sigmoid()
        top = prob.flatten().topk(15).values
        assert torch.allclose(inst.scores.sort(descending=True).values, top[: len(inst)])
        torch.testing.assert_close(inst.scores, prob[inst.query_indices, inst.pred_classes])
        # boxes: normalised cxcywh of the query, scaled to the original size
        b = raw["pred_boxes"][i][inst.query_indices]
        h, w = x["height"], x["width"]
        xyxy = torch.stack(
            [b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1
        )
        xyxy = (xyxy * torch.tensor([w, h, w, h])).clamp(min=0)
        xyxy = torch.minimum(xyxy, torch.tensor([w, h, w, h], dtype=xyxy.dtype))
        torch.testing.assert_close(inst.pred_boxes.tensor, xyxy, rtol=1e-4, atol=1e-3)


def test_bad_input_raises():
    model = build_model(tiny_cfg(NUM_CLASSES=5))
    model.eval()
    with pytest.raises(ValueError, match="image"):
        model([{"image": torch.zeros(64, 64, dtype=torch.uint8)}])
    model.train()
    inputs = make_inputs([(64, 64)], [2], torch.Generator().manual_seed(0), num_classes=5)
    inputs[0]["instances"].gt_classes[1] = 5
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        model(inputs)
    del inputs[0]["instances"]
    with pytest.raises(ValueError, match="instances"):
        model(inputs)


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_transformer_stage_api(variant):
    """forward == forward_encoder -> prepare_queries -> forward_decoder, with the documented shapes."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DEC_LAYERS=2, **VARIANTS[variant]))
    model.eval()
    gen = torch.Generator().manual_seed(4)
    images = model.preprocess_image(make_inputs([(64, 96), (96, 64)], [0, 0], gen))
    with torch.no_grad():
        srcs, masks, pos = model.prepare_features(images)
        query = None if model.two_stage else model.query_embed.weight
        full = model.transformer(srcs, masks, pos, query)
        enc = model.transformer.forward_encoder(srcs, masks, pos)
        tgt, ref, query_pos, enc_cls, _ = model.transformer.prepare_queries(enc, query)
        hs, init_ref, inter_refs = model.transformer.forward_decoder(tgt, ref, query_pos, enc)
    n, d, q = 2, 64, 20
    s = sum(h * w for h, w in enc["spatial_shapes"].tolist())
    assert enc["memory"].shape == (n, s, d) and enc["mask_flatten"].shape == (n, s)
    assert enc["valid_ratios"].shape == (n, 4, 2) and enc["level_start_index"].tolist()[0] == 0
    assert [tuple(m.shape[-2:]) for m in masks] == [tuple(x) for x in enc["spatial_shapes"].tolist()]
    assert tgt.shape == query_pos.shape == (n, q, d)
    assert ref.shape == (n, q, 4 if model.two_stage else 2) and ((ref >= 0) & (ref <= 1)).all()
    assert hs.shape == (2, n, q, d) and inter_refs.shape == (2, n, q, 4 if model.with_box_refine else 2)
    assert (enc_cls is not None) == model.two_stage
    torch.testing.assert_close(hs, full[0])
    torch.testing.assert_close(init_ref, full[1])
    torch.testing.assert_close(inter_refs, full[2])


def test_in_features_config():
    """MODEL.DEFORMABLE_DETR.IN_FEATURES picks the backbone outputs; a missing one is a ConfigError."""
    from ddetr_d2.errors import ConfigError

    torch.manual_seed(0)
    model = build_model(tiny_cfg(IN_FEATURES=["res4", "res5"], NUM_FEATURE_LEVELS=3))
    assert model.in_features == ["res4", "res5"]
    assert [p[0].in_channels for p in model.input_proj] == [256, 512, 512]
    single = build_model(tiny_cfg(NUM_FEATURE_LEVELS=1))
    assert single.in_features == ["res5"]
    with pytest.raises(ConfigError, match=r"\['res6'\] not produced .*'res3', 'res4', 'res5'"):
        build_model(tiny_cfg(IN_FEATURES=["res4", "res5", "res6"]))


@pytest.mark.parametrize("aux", [True, False])
def test_two_stage_proposal_losses_follow_aux_loss(aux):
    """As the official code: without auxiliary losses the proposal (_enc) losses are not trained either."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DEC_LAYERS=2, AUX_LOSS=aux, **VARIANTS["two_stage"]))
    model.train()
    losses = model(make_inputs([(64, 64)], [2], torch.Generator().manual_seed(1)))
    expected = {"loss_ce", "loss_bbox", "loss_giou"}
    if aux:
        expected |= {
            "loss_ce_0",
            "loss_bbox_0",
            "loss_giou_0",
            "loss_ce_enc",
            "loss_bbox_enc",
            "loss_giou_enc",
        }
    assert set(losses) == expected
