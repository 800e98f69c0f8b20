"""Padding masks: an image's outputs do not depend on the padding or on the other images of the batch."""


import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from model_testing import VARIANTS, tiny_cfg

from ddetr_d2.modeling.backbone import image_padding_mask, interpolate_mask, multi_scale_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(**overrides):
    cfg = tiny_cfg(**{"DEC_LAYERS": 2, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    return model


def image(h, w, seed):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformer_ignores_padded_positions(variant):
    """Random values at padded feature positions (and their pos embeds) leave the decoder output unchanged."""
    model = tiny_model(**VARIANTS[variant])
    images = model.preprocess_image([{"image": image(64, 128, 0)}, {"image": image(128, 64, 1)}])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        srcs, masks, pos = model.prepare_features(images)
        assert any(m.any() for m in masks)
        query = None if model.two_stage else model.query_embed.weight
        ref = model.transformer(srcs, masks, pos, query)
        noisy_srcs = [
            s.masked_fill(m[:, None], 0) + torch.randn(s.shape, generator=gen) * m[:, None]
            for s, m in zip(srcs, masks)
        ]
        noisy_pos = [p + torch.randn(p.shape, generator=gen) * m[:, None] for p, m in zip(pos, masks)]
        out = model.transformer(noisy_srcs, masks, noisy_pos, query)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)  # hs
    torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=1e-5)  # references


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_equals_alone(variant):
    model = tiny_model(**VARIANTS[variant])
    a, b, c = image(72, 100, 2), image(128, 96, 3), image(64, 160, 4)
    with torch.no_grad():
        alone = model.forward_outputs(model.preprocess_image([{"image": a}]))
        batch = model.forward_outputs(model.preprocess_image([{"image": b}, {"image": a}, {"image": c}]))
        # D2 post-processing end to end as well
        res_alone = model([{"image": a}])[0]["instances"]
        res_batch = model([{"image": c}, {"image": a}])[1]["instances"]
    torch.testing.assert_close(batch["pred_logits"][1], alone["pred_logits"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch["pred_boxes"][1], alone["pred_boxes"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res_batch.scores, res_alone.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res_batch.pred_boxes.tensor, res_alone.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    if variant != "plain":
        aux_a, aux_b = alone["aux_outputs"][0], batch["aux_outputs"][0]
        torch.testing.assert_close(aux_b["pred_boxes"][1], aux_a["pred_boxes"][0], rtol=1e-4, atol=1e-5)


def test_per_image_features_match_official_masks():
    """Per-image features: masks equal the official nearest-resized masks when padding is stride-aligned,
    and a same-size batch takes the single-pass (official) path."""
    model = tiny_model()
    imgs = [image(128, 64, 6), image(64, 192, 7)]
    images = model.preprocess_image([{"image": x} for x in imgs])
    with torch.no_grad():
        srcs, masks = multi_scale_features(
            model.backbone, model.input_proj, model.in_features, images, per_image=True
        )
        full = image_padding_mask(images.image_sizes, images.tensor.shape[-2:], images.tensor.device)
        for s, m in zip(srcs, masks):
            assert torch.equal(m, interpolate_mask(full, s.shape[-2:]))
            assert (s.masked_select(m[:, None]) == 0).all()
        # each image's features equal a single-image pass
        for i, x in enumerate(imgs):
            one = model.preprocess_image([{"image": x}])
            s1, _ = multi_scale_features(
                model.backbone, model.input_proj, model.in_features, one, per_image=False
            )
            for s, t in zip(srcs, s1):
                h, w = t.shape[-2:]
                torch.testing.assert_close(s[i, :, :h, :w], t[0], rtol=1e-5, atol=1e-5)
        same = ImageList(images.tensor[:, :, :64, :64].contiguous(), [(64, 64), (64, 64)])
        a, _ = multi_scale_features(model.backbone, model.input_proj, model.in_features, same, per_image=True)
        b, _ = multi_scale_features(
            model.backbone, model.input_proj, model.in_features, same, per_image=False
        )
        for s, t in zip(a, b):
            assert torch.equal(s, t)


def test_official_two_stage_can_pick_padded_proposals():
    """With PER_IMAGE_FEATURES False (official behaviour) padded positions compete in the top-k;
    with the default they never do."""
    picked = {}
    for flag in (True, False):
        model = tiny_model(WITH_BOX_REFINE=True, TWO_STAGE=True, PER_IMAGE_FEATURES=flag)
        with torch.no_grad():
            # padded positions all carry the memory v = enc_output_norm(enc_output(0)); scoring class 0
            # by <v, .> makes them the strict maxima (LayerNorm outputs share one norm)
            t = model.transformer
            v = t.enc_output_norm(t.enc_output(torch.zeros(t.d_model)))
            model.class_embed[-1].weight[0] = v
            model.class_embed[-1].bias.zero_()
            images = model.preprocess_image([{"image": image(64, 128, 8)}, {"image": image(128, 64, 9)}])
            srcs, masks, pos = model.prepare_features(images)
            enc = model.transformer.forward_encoder(srcs, masks, pos)
            _, ref, _, enc_cls, _ = model.transformer.prepare_queries(enc)
        # a padded proposal has +inf coordinates -> reference box (1, 1, 1, 1)
        picked[flag] = bool((ref == 1).all(-1).any())
    assert picked == {True: False, False: True}
