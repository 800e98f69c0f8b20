"""
Parity with an independent implementation: HF transformers' DeformableDetr (whose own tests match the
official checkpoints' logits) loaded with our weights gives the same outputs as our model.
Both run on the features of our Detectron2 backbone (HF's backbone is replaced by a stub).
"""

import re

import pytest
import torch
from detectron2.modeling import build_model
from model_testing import VARIANTS, tiny_cfg
from torch import nn

from ddetr_d2.modeling.backbone import image_padding_mask, interpolate_mask

transformers = pytest.importorskip("transformers")



pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _D2Features(nn.Module):
    """Stands in for HF's conv encoder: our backbone's features with HF-convention masks (True = valid)."""

    def __init__(self, backbone, in_features):
        super().__init__()
        self.backbone = backbone
        self.in_features = in_features

    def forward(self, pixel_values, pixel_mask):
        feats = self.backbone(pixel_values)
        out = []
        for f in self.in_features:
            mask = interpolate_mask(pixel_mask.bool(), feats[f].shape[-2:])
            out.append((feats[f], mask))
        return out


def _our_key(hf_key, hf_value, ours):
    """Our state-dict key(s) for an HF key, or None for keys without a counterpart (HF backbone)."""
    k = hf_key
    if k.startswith("model.backbone."):
        return None
    if k.startswith("model.decoder.class_embed") or k.startswith("model.decoder.bbox_embed"):
        return ours[k[len("model.decoder.") :]]  # HF's decoder shares the detector's heads
    k = re.sub(r"^model\.", "", k)
    k = k.replace("query_position_embeddings", "query_embed")
    for name in ("level_embed", "enc_output", "pos_trans", "reference_points"):
        if k.startswith(name):
            k = "transformer." + k
    if k.startswith("encoder.") or k.startswith("decoder."):
        k = "transformer." + k
        enc = k.startswith("transformer.encoder.")
        k = k.replace("self_attn_layer_norm", "norm1" if enc else "norm2")
        k = k.replace("encoder_attn_layer_norm", "norm1").replace("encoder_attn.", "cross_attn.")
        k = k.replace("final_layer_norm", "norm2" if enc else "norm3")
        k = k.replace("fc1", "linear1").replace("fc2", "linear2")
        m = re.match(r"(.*self_attn)\.([qkv])_proj\.(weight|bias)$", k)
        if m and not enc:
            full = ours[f"{m.group(1)}.in_proj_{m.group(3)}"]
            d = full.shape[0] // 3
            i = "qkv".index(m.group(2))
            return full[i * d : (i + 1) * d]
    return ours[k]


def _hf_model(cfg, ours_sd):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    c = cfg.MODEL.DEFORMABLE_DETR
    bc = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    hf_cfg = DeformableDetrConfig(
        use_timm_backbone=False, backbone=None, backbone_config=bc, use_pretrained_backbone=False,
        d_model=c.HIDDEN_DIM, encoder_layers=c.ENC_LAYERS, decoder_layers=c.DEC_LAYERS,
        encoder_attention_heads=c.NHEADS, decoder_attention_heads=c.NHEADS,
        encoder_ffn_dim=c.DIM_FEEDFORWARD, decoder_ffn_dim=c.DIM_FEEDFORWARD,
        num_feature_levels=c.NUM_FEATURE_LEVELS,
        encoder_n_points=c.ENC_N_POINTS, decoder_n_points=c.DEC_N_POINTS,
        num_queries=c.NUM_QUERIES, two_stage_num_proposals=c.NUM_QUERIES, num_labels=c.NUM_CLASSES,
        with_box_refine=c.WITH_BOX_REFINE, two_stage=c.TWO_STAGE, auxiliary_loss=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, disable_custom_kernels=True,
    )  # fmt: skip
    hf = DeformableDetrForObjectDetection(hf_cfg)
    new_sd = {}
    for k, v in hf.state_dict().items():
        val = _our_key(k, v, ours_sd)
        if val is not None:
            new_sd[k] = val
    return hf, new_sd


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_match_hf_transformers(variant):
    # official behaviour: one padded-batch pass, padded two-stage proposals ranked too
    cfg = tiny_cfg(DEC_LAYERS=2, PER_IMAGE_FEATURES=False, **VARIANTS[variant])
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    # randomise everything so that zero-initialised parts do not hide mistakes
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn_like(p) * 0.1)
    sd = ours.state_dict()

    hf, hf_sd = _hf_model(cfg, sd)
    hf.model.input_proj = ours.input_proj  # the stub feeds our ResNet's channel counts
    hf.model.backbone.conv_encoder = _D2Features(ours.backbone, ours.in_features)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    assert all(k.startswith("model.backbone.") for k in missing), [k for k in missing if "backbone" not in k]
    hf.eval()

    gen = torch.Generator().manual_seed(1)
    sizes = [(128, 64), (96, 128)]
    inputs = [{"image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)} for h, w in sizes]
    with torch.no_grad():
        images = ours.preprocess_image(inputs)
        out = ours.forward_outputs(images)
        pad = image_padding_mask(images.image_sizes, images.tensor.shape[-2:], images.tensor.device)
        ref = hf(pixel_values=images.tensor, pixel_mask=(~pad).long())
    torch.testing.assert_close(out["pred_logits"], ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, rtol=1e-4, atol=1e-5)
    # first decoder layer (HF returns aux outputs only with labels): boxes from its hidden state
    hs0 = ref.intermediate_hidden_states[:, 0]
    torch.testing.assert_close(
        ours.class_embed[0](hs0), out["aux_outputs"][0]["pred_logits"], rtol=1e-4, atol=1e-4
    )
    if ours.with_box_refine:  # refined (detached) references after layer 0 = layer 0's boxes
        torch.testing.assert_close(
            ref.intermediate_reference_points[:, 0],
            out["aux_outputs"][0]["pred_boxes"],
            rtol=1e-4,
            atol=1e-5,
        )
    if variant == "two_stage":
        torch.testing.assert_close(
            out["enc_outputs"]["pred_logits"], ref.enc_outputs_class, rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            out["enc_outputs"]["pred_boxes"], ref.enc_outputs_coord_logits.sigmoid(), rtol=1e-4, atol=1e-5
        )
