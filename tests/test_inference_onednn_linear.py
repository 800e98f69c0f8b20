"""Float32 linear layers on oneDNN with packed weights (``PackedLinear``, ``use_onednn_linears``,
``MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND``): values against a float64 reference on fresh random
inputs, the cases that must fall back to ``F.linear``, in-place weight changes, copies, tracing for
export, ``torch.compile`` with freezing, and what ``build_demo_model`` does with each setting."""

import copy

import pytest
import torch
from model_testing import demo_model_with_random_weights, export_cli_model_cfg, tiny_cfg
from torch import nn
from torch.nn import functional as F

import ddetr_d2.modeling.onednn_linear as onednn_linear
from ddetr_d2.errors import ConfigError
from ddetr_d2.modeling.onednn_linear import PackedLinear, resolve_linear_backend, use_onednn_linears

pytestmark = pytest.mark.skipif(
    not onednn_linear.onednn_linear_available(),
    reason="this PyTorch build has no oneDNN (torch.backends.mkldnn): PackedLinear is never used",
)


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()))


def reference(x, linear):
    bias = None if linear.bias is None else linear.bias.double()
    return F.linear(x.double(), linear.weight.double(), bias)


@pytest.mark.parametrize("shape,bias", [((7, 33), True), ((2, 300, 256), True), ((1, 5, 3, 16), False)])
def test_packed_linear_matches_float64(shape, bias):
    torch.manual_seed(fresh_seed())
    linear = nn.Linear(shape[-1], 96, bias=bias).eval()
    packed = PackedLinear.from_linear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias  # parameters shared
    assert list(packed.state_dict()) == list(linear.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        got = packed(x)
    ref = reference(x, linear)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_packed_linear_uses_onednn_only_for_float32_inference(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    torch.manual_seed(fresh_seed())
    packed = PackedLinear.from_linear(nn.Linear(16, 8).eval())
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    x = torch.randn(4, 16)
    with torch.no_grad():
        packed(x)
    assert len(calls) == 1
    # gradients: the plain op, and they flow
    xg = x.clone().requires_grad_(True)
    packed(xg).sum().backward()
    assert xg.grad is not None and packed.weight.grad is not None
    # training mode, autocast, float64: the plain op (autocast's bfloat16 result as F.linear's)
    packed.train()
    with torch.no_grad():
        packed(x)
    packed.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = packed(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        assert packed.double()(x.double()).dtype == torch.float64
    assert len(calls) == 1


def test_packed_linear_follows_in_place_weight_changes_and_copies():
    torch.manual_seed(fresh_seed())
    linear = nn.Linear(24, 12).eval()
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(5, 24)
    with torch.no_grad():
        packed(x)
        new = {k: torch.randn_like(v) for k, v in linear.state_dict().items()}
        packed.load_state_dict(new)  # copies into the parameters in place
        got = packed(x)
    assert torch.allclose(got.double(), reference(x, packed), atol=1e-5)
    twin = copy.deepcopy(packed)  # the opaque packed copy is dropped and re-made
    with torch.no_grad():
        assert torch.allclose(twin(x), got, atol=1e-6)


def test_tracing_records_the_plain_linear():
    torch.manual_seed(fresh_seed())
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    assert use_onednn_linears(model, min_weights=0) == 2
    x = torch.randn(3, 8)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        want = model(x)
    graph = str(traced.inlined_graph)
    assert "mkldnn" not in graph and "aten::linear" in graph
    assert torch.allclose(traced(x), want, atol=1e-6)


def test_use_onednn_linears_swaps_plain_linears_only():
    model = nn.ModuleDict(
        {"mlp": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "attn": nn.MultiheadAttention(8, 2)}
    )
    with pytest.raises(ValueError, match="inference only"):
        use_onednn_linears(model.train())
    before = copy.deepcopy(model.state_dict())
    assert use_onednn_linears(model.eval(), min_weights=0) == 2
    assert all(isinstance(m, PackedLinear) for m in model["mlp"])
    assert type(model["attn"].out_proj) is not PackedLinear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_small_linears_are_left_to_pytorch():
    """By default only layers with at least PACKED_LINEAR_MIN_WEIGHTS weights are swapped (oneDNN's fixed
    cost per call is larger than a small GEMM)."""
    limit = onednn_linear.PACKED_LINEAR_MIN_WEIGHTS
    width = limit // 256
    model = nn.Sequential(nn.Linear(256, width), nn.Linear(width, 255), nn.Linear(64, 128)).eval()
    assert model[0].weight.numel() == limit and model[1].weight.numel() == limit - limit // 256
    assert use_onednn_linears(model) == 1
    assert [type(m) for m in model] == [PackedLinear, nn.Linear, nn.Linear]


def test_packed_linears_compile_with_freezing():
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch.manual_seed(fresh_seed())
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.LayerNorm(32)).eval()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        ref = model.double()(x.double())
    model.float()
    assert use_onednn_linears(model, min_weights=0) == 2
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        got = compiled(x)
    torch._dynamo.reset()
    assert (got.double() - ref).abs().max() < 1e-4


def test_resolve_linear_backend(monkeypatch):
    monkeypatch.setattr(onednn_linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_linear_backend("auto") is True
    monkeypatch.setattr(onednn_linear, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_linear_backend("auto") is False
    assert resolve_linear_backend("onednn") is True
    assert resolve_linear_backend("torch") is False
    with pytest.raises(ValueError, match="INFERENCE_LINEAR_BACKEND must be one of"):
        resolve_linear_backend("mkl")


def test_build_demo_model_per_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn_linear, "PACKED_LINEAR_MIN_WEIGHTS", 0)  # the tiny model's layers too
    models = {}
    for backend in ("onednn", "torch"):
        cfg = tiny_cfg(INFERENCE_LINEAR_BACKEND=backend)
        models[backend] = demo_model_with_random_weights(cfg, tmp_path)
    n_linear = sum(type(m) is nn.Linear for m in models["torch"].modules())
    assert n_linear > 10
    assert not any(isinstance(m, PackedLinear) for m in models["torch"].modules())
    assert sum(isinstance(m, PackedLinear) for m in models["onednn"].modules()) == n_linear
    assert not any(type(m) is nn.Linear for m in models["onednn"].modules())
    inputs = [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}]
    with torch.no_grad():
        a, b = (models[k](inputs)[0]["instances"] for k in ("onednn", "torch"))
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)


def test_build_demo_model_keeps_torch_linears_for_bfloat16(tmp_path):
    cfg = tiny_cfg(INFERENCE_LINEAR_BACKEND="onednn", INFERENCE_DTYPE="bfloat16")
    model = demo_model_with_random_weights(cfg, tmp_path)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_build_demo_model_rejects_an_unknown_backend(tmp_path):
    with pytest.raises(ConfigError, match="INFERENCE_LINEAR_BACKEND"):
        demo_model_with_random_weights(tiny_cfg(INFERENCE_LINEAR_BACKEND="mkl"), tmp_path)


def test_export_builds_torch_linears(tmp_path, monkeypatch):
    opts = ["MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND", "onednn"]
    cfg = export_cli_model_cfg(tmp_path, monkeypatch, opts)
    assert cfg.MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND == "torch"
