"""
Hugging Face DeformableDetrForObjectDetection -> ddetr-d2: converted weights give the same outputs.

Small random models (timm ResNet-18 backbone, d=64, 2 encoder + 2 decoder layers, 20 queries),
every weight perturbed so that a wrong mapping shows; a batch of two normalised images, the second
one padded, goes through both models in eval mode on CPU (float32).
"""

import copy
import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in here may download
transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

from ddetr_d2.config import build_cfg  # noqa: E402
from ddetr_d2.conversion import (  # noqa: E402
    ConversionError,
    convert_checkpoint,
    convert_hf_state_dict,
    hf_to_official_state_dict,
    to_official_state_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


NUM_CLASSES = 7
VARIANTS = {"plain": (False, False), "box_refine": (True, False), "two_stage": (True, True)}
# (H, W) of the two images; the batch is padded to the first one
SIZES = [(64, 96), (48, 72)]


def _hf_model(refine, two_stage, seed, backbone="timm", num_queries=20):
    """A fresh copy of a cached randomly initialised (and perturbed) HF model, in eval mode."""
    return copy.deepcopy(_build_hf_model(refine, two_stage, seed, backbone, num_queries))


def _our_model(refine, two_stage, num_queries=20):
    """A fresh copy of a cached ddetr-d2 model matching ``_hf_model``'s architecture, in eval mode."""
    return copy.deepcopy(_build_our_model(refine, two_stage, num_queries))


@functools.cache
def _build_hf_model(refine, two_stage, seed, backbone, num_queries):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    kwargs = {}
    if backbone == "timm":
        kwargs.update(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False)
    else:  # transformers' own ResNet (basic blocks), randomly initialised
        from transformers import ResNetConfig

        kwargs.update(
            use_timm_backbone=False,
            backbone=None,
            use_pretrained_backbone=False,
            backbone_config=ResNetConfig(
                layer_type="basic",
                depths=[2, 2, 2, 2],
                hidden_sizes=[64, 128, 256, 512],
                out_features=["stage2", "stage3", "stage4"],
            ),
        )
    config = DeformableDetrConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=num_queries,
        two_stage_num_proposals=num_queries,
        encoder_n_points=2,
        decoder_n_points=2,
        num_feature_levels=4,
        num_labels=NUM_CLASSES,
        with_box_refine=refine,
        two_stage=two_stage,
        disable_custom_kernels=True,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # perturb everything: zero/constant inits (attention weights, box head, biases) would hide mistakes
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "backbone" in name and name.endswith("weight") and p.dim() == 1:  # BN scale
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@functools.cache
def _build_our_model(refine, two_stage, num_queries):
    cfg = build_cfg(
        os.path.join(REPO, "configs", "tiny_test.yaml"),
        [
            "MODEL.DEFORMABLE_DETR.NUM_CLASSES",
            NUM_CLASSES,
            "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
            num_queries,
            "MODEL.DEFORMABLE_DETR.ENC_LAYERS",
            2,
            "MODEL.DEFORMABLE_DETR.DEC_LAYERS",
            2,
            "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
            refine,
            "MODEL.DEFORMABLE_DETR.TWO_STAGE",
            two_stage,
            # official/HF behaviour for padded batches: one backbone pass, nearest-resized masks
            "MODEL.DEFORMABLE_DETR.PER_IMAGE_FEATURES",
            False,
        ],
    )
    return build_model(cfg).eval()


def _batch(seed):
    """Normalised images, zero-padded (as both ImageList and the HF processor pad), and HF's pixel_mask."""
    gen = torch.Generator().manual_seed(seed)
    H, W = SIZES[0]
    x = torch.zeros(len(SIZES), 3, H, W)
    pixel_mask = torch.zeros(len(SIZES), H, W, dtype=torch.long)  # HF: 1 = valid
    for i, (h, w) in enumerate(SIZES):
        x[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        pixel_mask[i, :h, :w] = 1
    return x, pixel_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_parity(variant):
    refine, two_stage = VARIANTS[variant]
    seed = list(VARIANTS).index(variant)
    hf = _hf_model(refine, two_stage, seed)
    ours = _our_model(refine, two_stage)
    ours.load_state_dict(convert_hf_state_dict(hf.state_dict()), strict=True)

    x, pixel_mask = _batch(seed)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=pixel_mask)
        out = ours.forward_outputs(ImageList(x, SIZES))
    if two_stage:
        # the decoder queries are the top-k encoder proposals: make sure no near-tie makes the
        # selection fragile, then compare the proposal scores and boxes too
        scores = ref.enc_outputs_class[..., 0].sort(dim=1, descending=True).values[:, :21]
        assert (scores[:, :-1] - scores[:, 1:]).min() > 1e-4, (
            "near-tie in the top-k proposals: change the seed"
        )
        torch.testing.assert_close(
            out["enc_outputs"]["pred_logits"], ref.enc_outputs_class, rtol=0, atol=1e-4
        )
        valid = torch.isfinite(ref.enc_outputs_coord_logits)
        torch.testing.assert_close(
            out["enc_outputs"]["pred_boxes"][valid],
            ref.enc_outputs_coord_logits.sigmoid()[valid],
            rtol=0,
            atol=1e-4,
        )
    diff_logits = (out["pred_logits"] - ref.logits).abs().max().item()
    diff_boxes = (out["pred_boxes"] - ref.pred_boxes).abs().max().item()
    print(f"{variant}: max |logits diff| {diff_logits:.2e}, max |boxes diff| {diff_boxes:.2e}")
    assert out["pred_logits"].shape == ref.logits.shape == (2, 20, NUM_CLASSES)
    assert diff_logits <= 1e-4 and diff_boxes <= 1e-4
    # the padded image is not a copy of the other one (a mask bug would often collapse them)
    assert (ref.logits[0] - ref.logits[1]).abs().max() > 1e-2


def test_hf_parity_two_stage_padding_in_topk():
    """
    More queries (100) than valid encoder positions in the padded image: padded positions enter the
    official top-k. They all carry the same zeroed memory and +inf proposal (their order is irrelevant).
    With PER_IMAGE_FEATURES False our model ranks them too (official behaviour).
    """
    hf = _hf_model(True, True, seed=5, num_queries=100)
    ours = _our_model(True, True, num_queries=100)
    ours.load_state_dict(convert_hf_state_dict(hf.state_dict()), strict=True)
    x, pixel_mask = _batch(5)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=pixel_mask)
        out = ours.forward_outputs(ImageList(x, SIZES))
    torch.testing.assert_close(out["pred_logits"], ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, rtol=0, atol=1e-4)


def test_hf_resnet_backbone_parity():
    """transformers' own ResNet backbone (use_timm_backbone=False) maps too."""
    hf = _hf_model(False, False, seed=7, backbone="hf")
    ours = _our_model(False, False)
    ours.load_state_dict(convert_hf_state_dict(hf.state_dict()), strict=True)
    x, pixel_mask = _batch(7)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=pixel_mask)
        out = ours.forward_outputs(ImageList(x, SIZES))
    torch.testing.assert_close(out["pred_logits"], ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, rtol=0, atol=1e-4)


def _official_to_hf(sd):
    """
    Official names -> HF names, written from the rules of HF's own conversion script
    (convert_deformable_detr_to_pytorch.py), independently of ddetr_d2.conversion.
    """
    out = {}
    for k, v in sd.items():
        k2 = k.replace("backbone.0.body", "backbone.conv_encoder.model").replace("transformer.", "")
        if "encoder" in k2:
            k2 = k2.replace("norm1", "self_attn_layer_norm").replace("norm2", "final_layer_norm")
        else:
            k2 = k2.replace("norm1", "encoder_attn_layer_norm").replace("norm2", "self_attn_layer_norm")
        k2 = k2.replace("norm3", "final_layer_norm").replace("linear1", "fc1").replace("linear2", "fc2")
        k2 = k2.replace("query_embed", "query_position_embeddings").replace("cross_attn", "encoder_attn")
        if "in_proj_" in k2:
            c = v.shape[0] // 3
            p = "weight" if k2.endswith("weight") else "bias"
            base = k2.rsplit(".", 1)[0]
            for i, name in enumerate("qkv"):
                out[f"model.{base}.{name}_proj.{p}"] = v[i * c : (i + 1) * c]
            continue
        out[k2 if k2.startswith(("class_embed", "bbox_embed")) else "model." + k2] = v
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_round_trip_through_official_names(variant):
    """ours -> official -> HF (HF's own rules) loads strictly into HF, and converts back to ours exactly."""
    refine, two_stage = VARIANTS[variant]
    ours = _our_model(refine, two_stage)
    sd = ours.state_dict()
    official = to_official_state_dict(sd)
    assert not any(k.startswith("backbone.stem") or ".res2." in k for k in official)
    hf = _hf_model(refine, two_stage, seed=0)
    hf_sd = _official_to_hf(official)
    hf.load_state_dict(hf_sd, strict=True)
    assert set(hf_to_official_state_dict(hf_sd)) == set(official)
    back = convert_hf_state_dict(hf.state_dict())
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_hf_tied_heads_missing_and_errors():
    """A save_pretrained-style dict without the tied head copies still converts; bad keys are named."""
    hf = _hf_model(False, False, seed=3)
    full = hf.state_dict()
    pruned = {k: v for k, v in full.items() if not k.startswith(("class_embed.1.", "bbox_embed.1."))}
    a, b = convert_hf_state_dict(full), convert_hf_state_dict(pruned)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(b["class_embed.1.weight"], full["class_embed.0.weight"])

    bad = dict(full)
    bad["model.decoder.layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="model.decoder.layers.0.mystery.weight"):
        convert_hf_state_dict(bad)
    incomplete = {k: v for k, v in full.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ConversionError, match="decoder.layers.1.self_attn.in_proj"):
        convert_hf_state_dict(incomplete)
    with pytest.raises(ConversionError, match="not a Hugging Face"):
        convert_hf_state_dict(to_official_state_dict(_our_model(False, False).state_dict()))

    refine = _hf_model(True, False, seed=4).state_dict()
    no_layer1 = {
        k: v for k, v in refine.items() if not k.startswith(("class_embed.1.", "model.decoder.class_embed"))
    }
    with pytest.raises(ConversionError, match="class_embed.1"):
        convert_hf_state_dict(no_layer1)


def test_cli_hf_save_pretrained_folder(tmp_path):
    """save_pretrained folder (safetensors, tied head copies dropped) -> convert_checkpoint ->
    checkpointer -> parity."""
    hf = _hf_model(False, False, seed=11)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    out = tmp_path / "ddetr_from_hf.pth"
    opts = ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", str(NUM_CLASSES), "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "2"]
    opts += ["MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2"]
    config = os.path.join(REPO, "configs", "tiny_test.yaml")
    assert convert_checkpoint("hf", str(tmp_path / "hf"), str(out), config_file=config, opts=opts) > 0

    ours = _our_model(False, False)
    DetectionCheckpointer(ours).load(str(out))
    x, pixel_mask = _batch(11)
    with torch.no_grad():
        ref = hf(pixel_values=x, pixel_mask=pixel_mask)
        got = ours.forward_outputs(ImageList(x, SIZES))
    torch.testing.assert_close(got["pred_logits"], ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes"], ref.pred_boxes, rtol=0, atol=1e-4)
