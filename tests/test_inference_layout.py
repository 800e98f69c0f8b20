"""Inference-only speed-ups of the eval forward that keep its values: channels-last backbone input on the
CPU (``MODEL.DEFORMABLE_DETR.INFERENCE_CHANNELS_LAST``) and batch norms folded into the convolutions of
inference-only models (``INFERENCE_FUSE_BATCHNORM``, ``fuse_batchnorm``). Each is compared with the
plain model on fresh random weights and statistics."""

import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.wrappers import Conv2d
from detectron2.modeling import build_model
from model_testing import demo_model_with_random_weights, tiny_cfg
from torch import nn

from ddetr_d2.modeling.fuse_batchnorm import fuse_batchnorm
from ddetr_d2.modeling.inference_precision import use_channels_last


def randomise_norms(model, seed):
    """Non-trivial affine parameters and running statistics in every batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                c = m.running_mean.numel()
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def norm_convs(model):
    return [m for m in model.modules() if isinstance(m, Conv2d) and m.norm is not None]


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_fuse_batchnorm_keeps_backbone_outputs(norm, one_torch_thread):
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = norm
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomise_norms(model, seed=int(torch.randint(0, 10**6, ())))
    want_fused = len(norm_convs(model.backbone))
    assert want_fused > 0
    fused = copy.deepcopy(model)
    assert fuse_batchnorm(fused.backbone) == want_fused
    assert norm_convs(fused.backbone) == []
    # float64 reference of the unfused backbone
    ref_model = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = ref_model.backbone(x.double())
        got = fused.backbone(x)
        plain = model.backbone(x)
    for k in ref:
        scale = ref[k].abs().max()
        assert (got[k].double() - ref[k]).abs().max() <= 1e-5 * scale, k
        assert (plain[k].double() - ref[k]).abs().max() <= 1e-5 * scale, k
    # the whole eval forward gives the same detections
    inputs = [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}]
    with torch.no_grad():
        a, b = model(inputs)[0]["instances"], fused(inputs)[0]["instances"]
    assert torch.allclose(a.scores, b.scores, atol=1e-4)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-2)


def test_fuse_batchnorm_refuses_a_training_model():
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg).train()
    before = len(norm_convs(model.backbone))
    with pytest.raises(ValueError, match="inference only"):
        fuse_batchnorm(model.backbone)
    assert len(norm_convs(model.backbone)) == before > 0


@pytest.mark.parametrize("fuse", [True, False])
def test_build_demo_model_fuses_only_when_asked(fuse, tmp_path):
    model = demo_model_with_random_weights(tiny_cfg(INFERENCE_FUSE_BATCHNORM=fuse), tmp_path)
    assert not model.training
    assert (len(norm_convs(model.backbone)) == 0) == fuse


def first_conv_input_layouts(model, inputs):
    seen = []
    conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    handle = conv.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    try:
        with torch.no_grad():
            out = model(inputs)
    finally:
        handle.remove()
    return seen, out


@pytest.mark.parametrize("per_image", [True, False])
def test_channels_last_eval_input_same_detections(per_image, one_torch_thread):
    torch.manual_seed(0)
    on = build_model(tiny_cfg(INFERENCE_CHANNELS_LAST=True, PER_IMAGE_FEATURES=per_image)).eval()
    off = copy.deepcopy(on)
    off.inference_channels_last = False
    randomise_norms(on, seed=3)
    off.load_state_dict(on.state_dict())
    # one image, and two of different sizes (the per-image path slices the NHWC batch)
    for sizes in ([(64, 96)], [(64, 96), (48, 80)]):
        inputs = [{"image": torch.rand(3, h, w) * 255, "height": h, "width": w} for h, w in sizes]
        seen_on, out_on = first_conv_input_layouts(on, inputs)
        seen_off, out_off = first_conv_input_layouts(off, inputs)
        # every backbone call (one per image size on the per-image path) got an NHWC batch
        assert len(seen_on) == (len(sizes) if per_image else 1) and all(seen_on)
        assert len(seen_off) == len(seen_on) and not any(seen_off)
        for a, b in zip(out_on, out_off):
            a, b = a["instances"], b["instances"]
            assert torch.allclose(a.scores, b.scores, atol=1e-4)
            assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-2)


def test_channels_last_not_in_training_nor_tracing():
    x = torch.rand(1, 3, 8, 8)
    assert use_channels_last(True, False, x)
    assert not use_channels_last(False, False, x)
    assert not use_channels_last(True, True, x)
    traced = torch.jit.trace(lambda t: t * float(use_channels_last(True, False, t)), x)
    assert torch.equal(traced(x), torch.zeros_like(x))
