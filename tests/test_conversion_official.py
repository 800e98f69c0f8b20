"""Official Deformable-DETR checkpoints -> ddetr-d2: names, head aliases, 91 -> 80, the CLI, errors."""

import copy
import functools
import os

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from ddetr_d2.config import build_cfg
from ddetr_d2.conversion import (
    COCO_CATEGORY_IDS,
    ConversionError,
    check_state_dict,
    convert_checkpoint,
    convert_official_state_dict,
    infer_variant,
    to_official_state_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"plain": (False, False), "box_refine": (True, False), "two_stage": (True, True)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(refine=False, two_stage=False, num_classes=80, dec_layers=2):
    cfg = build_cfg(os.path.join(REPO, "configs", "tiny_test.yaml"), freeze=False)
    c = cfg.MODEL.DEFORMABLE_DETR
    c.NUM_CLASSES, c.DEC_LAYERS, c.WITH_BOX_REFINE, c.TWO_STAGE = num_classes, dec_layers, refine, two_stage
    c.PER_IMAGE_FEATURES = False
    return cfg


@functools.cache
def _build(refine, two_stage, num_classes=80, dec_layers=2):
    torch.manual_seed(0)
    model = build_model(_cfg(refine, two_stage, num_classes, dec_layers)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # break constant inits (head biases, zero box layer) so rows are distinguishable
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _model(*args, **kwargs):
    return copy.deepcopy(_build(*args, **kwargs))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_and_official_layout(variant):
    refine, two_stage = VARIANTS[variant]
    sd = _model(refine, two_stage).state_dict()
    official = to_official_state_dict(sd)
    assert (
        "backbone.0.body.conv1.weight" in official and "backbone.0.body.layer1.0.bn2.running_var" in official
    )
    assert "backbone.0.body.layer2.0.downsample.1.weight" in official
    assert infer_variant(official) == {
        "enc_layers": 1,
        "dec_layers": 2,
        "two_stage": int(two_stage),
        "with_box_refine": int(refine),
        "num_classes": 80,
    }
    back = convert_official_state_dict({"model": official, "epoch": 49, "optimizer": {}})
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # DistributedDataParallel-saved ("module.") keys are accepted too
    ddp = convert_official_state_dict({"module." + k: v for k, v in official.items()})
    assert set(ddp) == set(sd)


def test_official_backbone_is_torchvision_resnet():
    """An official-style dict with a real torchvision ResNet body gives our backbone the same function."""
    model = _model(False, False)
    tv = torchvision.models.resnet18().eval()
    gen = torch.Generator().manual_seed(5)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
            m.weight.data.uniform_(0.5, 1.5)
    official = {
        k: v for k, v in to_official_state_dict(model.state_dict()).items() if not k.startswith("backbone.")
    }
    # IntermediateLayerGetter drops fc; the official FrozenBatchNorm2d ignores num_batches_tracked
    official.update(
        {"backbone.0.body." + k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    )
    model.load_state_dict(convert_official_state_dict(official), strict=True)
    x = torch.randn(1, 3, 64, 96, generator=gen)
    with torch.no_grad():
        feats = model.backbone(x)
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(feats["res5"], ref, rtol=1e-4, atol=1e-4)


def test_shared_heads_and_aliases():
    plain = to_official_state_dict(_model(False, False).state_dict())
    # tied copies saved only once still convert, and all indices are written
    pruned = {k: v for k, v in plain.items() if not k.startswith(("class_embed.1.", "bbox_embed.1."))}
    out = convert_official_state_dict(pruned)
    assert torch.equal(out["class_embed.1.weight"], plain["class_embed.0.weight"])
    assert torch.equal(out["bbox_embed.1.layers.2.bias"], plain["bbox_embed.0.layers.2.bias"])
    # box refinement: the decoder alias is rebuilt from the heads if a file lacks it
    refine = to_official_state_dict(_model(True, False).state_dict())
    no_alias = {k: v for k, v in refine.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    assert infer_variant(no_alias)["with_box_refine"] == 1  # the per-layer heads differ
    out = convert_official_state_dict(no_alias)
    assert torch.equal(
        out["transformer.decoder.bbox_embed.1.layers.0.weight"], refine["bbox_embed.1.layers.0.weight"]
    )
    # ... and a refine file missing one layer's head is an error that names it
    missing = {k: v for k, v in refine.items() if not k.startswith("class_embed.1.")}
    with pytest.raises(ConversionError, match=r"class_embed\.1"):
        convert_official_state_dict(missing)


def test_coco_category_ids_match_detectron2():
    ids = tuple(sorted(c["id"] for c in COCO_CATEGORIES if c["isthing"]))
    assert ids == COCO_CATEGORY_IDS and len(ids) == 80


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_coco_91_to_80_keeps_predictions(variant):
    """A 91-way model converted with 91 -> 80 predicts the same boxes and the COCO columns of its logits."""
    refine, two_stage = VARIANTS[variant]
    m91 = _model(refine, two_stage, num_classes=91)
    m80 = _model(refine, two_stage, num_classes=80)
    sd = convert_official_state_dict(to_official_state_dict(m91.state_dict()), coco_91_to_80_classes=True)
    check_state_dict(sd, m80.state_dict())
    m80.load_state_dict(sd, strict=True)
    ids = list(COCO_CATEGORY_IDS)
    assert torch.equal(sd["class_embed.0.weight"], m91.state_dict()["class_embed.0.weight"][ids])
    if two_stage:  # the proposal head keeps class 0 first
        enc = m91.state_dict()["class_embed.2.bias"]
        assert sd["class_embed.2.bias"][0] == enc[0] and torch.equal(
            sd["class_embed.2.bias"][1:], enc[ids[:79]]
        )
    gen = torch.Generator().manual_seed(2)
    x = torch.zeros(2, 3, 64, 96)
    x[0] = torch.randn(3, 64, 96, generator=gen)
    x[1, :, :48, :72] = torch.randn(3, 48, 72, generator=gen)
    images = ImageList(x, [(64, 96), (48, 72)])
    with torch.no_grad():
        a, b = m91.forward_outputs(images), m80.forward_outputs(images)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"][..., ids], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=0, atol=1e-5)

    with pytest.raises(ConversionError, match="91->80 needs 91"):
        convert_official_state_dict(to_official_state_dict(m80.state_dict()), coco_91_to_80_classes=True)


def test_errors_name_the_keys():
    official = to_official_state_dict(_model(False, False).state_dict())
    with pytest.raises(ConversionError, match="criterion.empty_weight"):
        convert_official_state_dict({**official, "criterion.empty_weight": torch.ones(3)})
    with pytest.raises(ConversionError, match=r"backbone \(backbone.0.body.\*\).*layer9.0.conv1.weight"):
        convert_official_state_dict({**official, "backbone.0.body.layer9.0.conv1.weight": torch.ones(1)})
    with pytest.raises(ConversionError, match="no backbone keys"):
        convert_official_state_dict({k: v for k, v in official.items() if not k.startswith("backbone.")})
    with pytest.raises(ConversionError, match="Hugging Face"):
        convert_official_state_dict({"model.level_embed": torch.ones(1), **official})
    with pytest.raises(ConversionError, match="class_embed.0.weight"):
        convert_official_state_dict({k: v for k, v in official.items() if not k.startswith("class_embed")})
    with pytest.raises(ConversionError, match="expected a state dict"):
        convert_official_state_dict("model.pth")
    # a 2-decoder-layer file checked against a 1-decoder-layer model: the extra keys are listed
    one_layer = _model(False, False, dec_layers=1).state_dict()
    with pytest.raises(ConversionError, match=r"unexpected .*transformer.decoder.layers.1.cross_attn"):
        check_state_dict(convert_official_state_dict(official), one_layer)


def test_cli_official_checkpoint_loads(tmp_path):
    model = _model(True, True)
    src = tmp_path / "r50_deformable_detr_plus_iterative_bbox_refinement_plus_two_stage-checkpoint.pth"
    torch.save({"model": to_official_state_dict(model.state_dict()), "epoch": 49}, src)
    out = tmp_path / "converted.pth"
    opts = [
        "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
        "True",
        "MODEL.DEFORMABLE_DETR.TWO_STAGE",
        "True",
    ]
    opts += ["MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2"]
    config = os.path.join(REPO, "configs", "tiny_test.yaml")
    assert convert_checkpoint("official", str(src), str(out), config_file=config, opts=opts) > 0
    ckpt = torch.load(out, map_location="cpu")
    assert ckpt["matching_heuristics"] is False and "official" in ckpt["__author__"]

    fresh = build_model(_cfg(True, True)).eval()
    DetectionCheckpointer(fresh).load(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # the same file against a config it does not fit: named mismatch, nothing written
    bad_out = tmp_path / "bad.pth"
    with pytest.raises(ConversionError, match=r"missing 3 keys \[query_embed.weight.*'two_stage': 1"):
        convert_checkpoint("official", str(src), str(bad_out), config_file=config)
    assert not bad_out.exists()
