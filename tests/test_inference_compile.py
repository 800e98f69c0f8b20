"""``MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE``: the backbone and the encoder / decoder layers of an
inference-only model compiled with ``torch.compile`` (Inductor) give the eager model's detections, on two
image sizes (the second is compiled with dynamic shapes), with and without weight freezing; with freezing
the weights are those of the first call and Dynamo traces with Inductor's global freezing flag on; only when
asked; never for a model in training mode; export turns it off."""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from model_testing import demo_model_with_random_weights, export_cli_model_cfg, tiny_cfg

from ddetr_d2.modeling.inference_compile import compile_for_inference, inference_compiled_modules


def compiled_layers(model):
    return [m for m in inference_compiled_modules(model) if m._compiled_call_impl is not None]


@pytest.mark.parametrize("freezing", [True, False])
def test_compiled_model_gives_the_eager_detections_on_two_sizes(freezing, one_torch_thread):
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    eager = build_model(tiny_cfg(TWO_STAGE=True, WITH_BOX_REFINE=True)).eval()
    compiled = copy.deepcopy(eager)
    t = compiled.transformer
    n = compile_for_inference(compiled, freezing=freezing)
    assert n == 1 + len(t.encoder.layers) + len(t.decoder.layers)
    for h, w in ((64, 96), (80, 72)):
        inputs = [{"image": torch.rand(3, h, w) * 255, "height": h, "width": w}]
        with torch.no_grad():
            want = eager.forward_outputs(eager.preprocess_image(inputs))
            got = compiled.forward_outputs(compiled.preprocess_image(inputs))
        # fused element-wise loops round differently: same values to float32 noise
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    assert len(compiled_layers(compiled)) == 1 + len(t.encoder.layers) + len(t.decoder.layers)
    assert compiled_layers(eager) == []


@pytest.mark.parametrize("freezing", [True, False])
def test_frozen_weights_are_those_of_the_first_call(freezing, one_torch_thread):
    # the documented contract of freezing: weights changed after the first call are not seen (without
    # freezing they are); a model from build_demo_model has its weights loaded before
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    model = build_model(tiny_cfg()).eval()
    compile_for_inference(model, freezing=freezing)
    inputs = [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}]
    with torch.no_grad():
        before = model.forward_outputs(model.preprocess_image(inputs))["pred_logits"]
        linear1 = model.transformer.encoder.layers[0].linear1
        linear1.weight.mul_(3.0)  # in place: no recompilation
        after = model.forward_outputs(model.preprocess_image(inputs))["pred_logits"]
    assert torch.equal(after, before) == freezing
    if not freezing:
        assert (after - before).abs().max() > 1e-3


def test_compile_refuses_a_training_model():
    model = build_model(tiny_cfg()).train()
    with pytest.raises(ValueError, match="inference-only"):
        compile_for_inference(model)
    assert compiled_layers(model) == []


@pytest.mark.parametrize("on", [True, False])
def test_build_demo_model_compiles_only_when_asked(on, tmp_path):
    # compiling happens at the first call: not run here
    model = demo_model_with_random_weights(tiny_cfg(INFERENCE_COMPILE=on), tmp_path)
    assert bool(compiled_layers(model)) == on


@pytest.mark.parametrize("freezing", [True, False])
def test_build_demo_model_passes_the_freezing_key(freezing, tmp_path, monkeypatch):
    import ddetr_d2.demo.predictor as predictor

    seen = []
    monkeypatch.setattr(predictor, "compile_for_inference", lambda model, freezing: seen.append(freezing))
    cfg = tiny_cfg(INFERENCE_COMPILE=True, INFERENCE_COMPILE_FREEZING=freezing)
    demo_model_with_random_weights(cfg, tmp_path)
    assert seen == [freezing]


def test_export_builds_the_plain_model_when_compile_is_set(tmp_path, monkeypatch):
    cfg = export_cli_model_cfg(tmp_path, monkeypatch, ["MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE", "True"])
    assert cfg.MODEL.DEFORMABLE_DETR.INFERENCE_COMPILE is False


@pytest.mark.parametrize("freezing", [True, False])
def test_freezing_is_global_while_dynamo_traces(freezing, monkeypatch):
    # Dynamo (torch >= 2.5) freezes parameters only if the *global* Inductor flag is on while it traces: the
    # compile option reaches Inductor alone. A stand-in for Inductor records the flag Dynamo saw and runs the
    # graph eagerly (fast); the flag must be back to its old value after the call.
    import torch._dynamo
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor_config

    seen = []

    def inductor_stand_in(gm, example_inputs, config_patches=None, **kwargs):
        seen.append((inductor_config.freezing, (config_patches or {}).get("freezing")))
        return gm.forward

    monkeypatch.setattr(compile_fx, "compile_fx", inductor_stand_in)
    torch._dynamo.reset()
    before = inductor_config.freezing
    model = build_model(tiny_cfg()).eval()
    compile_for_inference(model, freezing=freezing)
    inputs = [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}]
    with torch.no_grad():
        model.forward_outputs(model.preprocess_image(inputs))
    torch._dynamo.reset()
    assert seen, "nothing was compiled"
    assert all(flag == freezing and option == freezing for flag, option in seen), seen
    assert inductor_config.freezing == before
