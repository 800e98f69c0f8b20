"""torchvision ResNet -> Detectron2 backbone .pkl: keys, the CLI (errors, output folder, atomic
write), and a numerical forward check."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone

from ddetr_d2.config import build_cfg
from ddetr_d2.conversion import (
    ConversionError,
    convert_checkpoint,
    convert_torchvision_resnet,
    d2_resnet_to_torchvision,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOOL = os.path.join(REPO, "tools", "convert_weights.py")


def _randomize_bn(model, gen):
    """Random BN statistics/affine so that a wrong BN mapping changes the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen) * 0.1
            m.running_mean = torch.randn(n, generator=gen) * 0.1
            m.running_var = torch.rand(n, generator=gen) + 0.5
    return model


def _d2_resnet(depth):
    opts = ["MODEL.RESNETS.DEPTH", depth] + (["MODEL.RESNETS.RES2_OUT_CHANNELS", 64] if depth < 50 else [])
    cfg = build_cfg(os.path.join(REPO, "configs", "ddetr_r50.yaml"), opts)
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


@pytest.mark.parametrize("arch,depth", [("resnet50", 50), ("resnet18", 18)])
def test_torchvision_pkl_loads_and_matches(tmp_path, arch, depth):
    gen = torch.Generator().manual_seed(depth)
    tv = _randomize_bn(getattr(torchvision.models, arch)(), gen).eval()
    src = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), src)
    out = tmp_path / f"{arch}.pkl"
    assert convert_checkpoint("torchvision", str(src), str(out)) > 0
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert "stem.conv1.weight" in data["model"] and not any(k.startswith("fc") for k in data["model"])

    d2 = _d2_resnet(depth)
    # every parameter and buffer of the D2 ResNet is written by the checkpoint
    for p in d2.state_dict().values():
        p.data.fill_(float("nan"))
    DetectionCheckpointer(d2).load(str(out))
    assert all(torch.isfinite(v).all() for v in d2.state_dict().values())

    x = torch.randn(1, 3, 96, 128, generator=gen)
    with torch.no_grad():
        ours = d2(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        ref = {}
        for name, layer in [
            ("res2", tv.layer1),
            ("res3", tv.layer2),
            ("res4", tv.layer3),
            ("res5", tv.layer4),
        ]:
            y = layer(y)
            ref[name] = y
    assert set(ours) == {"res3", "res4", "res5"}
    for name in ("res3", "res4", "res5"):
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-4)


def test_round_trip_and_errors():
    sd = torchvision.models.resnet18().state_dict()
    d2 = convert_torchvision_resnet(sd)
    assert "res2.0.conv1.norm.running_var" in d2 and "res3.0.shortcut.norm.weight" in d2
    assert "res3.0.shortcut.weight" in d2 and "stem.conv1.norm.bias" in d2
    back = d2_resnet_to_torchvision(d2)
    expected = {k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(back) == expected
    for k in expected:
        assert back[k] is sd[k]

    bad = dict(sd)
    bad["head.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="head.weight"):
        convert_torchvision_resnet(bad)
    with pytest.raises(ConversionError, match="backbone.0.body.conv1.weight"):
        convert_torchvision_resnet({"backbone.0.body.conv1.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="state dict"):
        convert_torchvision_resnet([1, 2])


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_names_bad_input(tmp_path):
    src = tmp_path / "notes.pth"
    torch.save({"epoch": 3}, src)
    with pytest.raises(ConversionError, match="notes.pth.*not a state dict"):
        convert_checkpoint("torchvision", str(src), str(tmp_path / "o.pkl"))
    # the script: exit status 2 and one line on stderr, no traceback
    p = _cli("--from", "official", str(tmp_path / "nope.pth"), str(tmp_path / "o.pth"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [f"error: input '{tmp_path / 'nope.pth'}' does not exist"]


def test_cli_output_folder_must_exist(tmp_path):
    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    out = tmp_path / "no" / "such" / "dir" / "R-18.pkl"
    p = _cli("--from", "torchvision", str(src), str(out))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "output folder" in lines[0] and "does not exist" in lines[0], p.stderr
    assert str(tmp_path / "no" / "such" / "dir") in lines[0]
    assert not (tmp_path / "no").exists()


def test_conversion_writes_atomically(tmp_path, monkeypatch):
    """A failure while writing leaves the previous output intact and no temporary file."""
    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    out = tmp_path / "R-18.pkl"
    convert_checkpoint("torchvision", str(src), str(out))
    before = out.read_bytes()

    def dying_dump(obj, f):  # a crash half way through the write
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pickle, "dump", dying_dump)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint("torchvision", str(src), str(out))
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["R-18.pkl", "r18.pth"]


def test_pkl_as_model_weights_of_the_detector(tmp_path):
    """The .pkl is a valid MODEL.WEIGHTS for the whole detector: every backbone tensor comes from it."""
    gen = torch.Generator().manual_seed(3)
    tv = _randomize_bn(torchvision.models.resnet18(), gen)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    assert convert_checkpoint("torchvision", str(tmp_path / "r18.pth"), str(tmp_path / "R-18.pkl")) > 0
    model = build_model(build_cfg(os.path.join(REPO, "configs", "tiny_test.yaml")))
    DetectionCheckpointer(model).load(str(tmp_path / "R-18.pkl"))
    expected = convert_torchvision_resnet(tv.state_dict())
    got = {k[len("backbone.") :]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
