"""Unconverted weights given as MODEL.WEIGHTS (load_weights_checked): an official Deformable-DETR checkpoint,
a Hugging Face file or folder (safetensors, pytorch_model.bin) and a torchvision ResNet are recognised, and
the error gives the tools/convert_weights.py command to run instead of only advising --allow-mismatch (which
would run with random weights where the names differ)."""

import logging
import re

import pytest
import torch

from ddetr_d2.checkpoint import load_weights_checked
from ddetr_d2.errors import WeightsError


class _Tiny(torch.nn.Module):
    """Stands for the detector: a backbone and a transformer under ddetr-d2's names."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.ModuleDict(
            {"stem": torch.nn.ModuleDict({"conv1": torch.nn.Conv2d(3, 4, 1)})}
        )
        self.transformer = torch.nn.ModuleDict({"level_embed": torch.nn.Linear(4, 4)})


OFFICIAL = {
    "backbone.0.body.conv1.weight": torch.zeros(4, 3, 1, 1),
    "transformer.level_embed.weight": torch.zeros(4, 4),
}
HF = {
    "model.backbone.conv_encoder.model.conv1.weight": torch.zeros(4, 3, 1, 1),
    "model.level_embed": torch.zeros(4, 4),
}
TORCHVISION = {"conv1.weight": torch.zeros(4, 3, 1, 1), "layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}


def _convert_command(path, source, suffix=".pth"):
    return re.escape(f"not converted: run tools/convert_weights.py --from {source} {path} ") + r"\S+" + suffix


@pytest.mark.parametrize(
    "source, state, container",
    [
        ("official", OFFICIAL, lambda sd: {"model": sd, "epoch": 49, "optimizer": {}}),
        ("hf", HF, lambda sd: sd),  # pytorch_model.bin: a flat state dict
    ],
)
def test_unconverted_detector_weights_name_the_conversion(tmp_path, source, state, container):
    path = tmp_path / ("pytorch_model.bin" if source == "hf" else "checkpoint.pth")
    torch.save(container(state), path)
    with pytest.raises(WeightsError, match=_convert_command(path, source)) as e:
        load_weights_checked(_Tiny(), str(path))
    assert "--allow-mismatch" not in str(e.value) and "set MODEL.WEIGHTS to" in str(e.value)
    assert "missing in checkpoint: backbone.stem.conv1.weight" in str(e.value)  # the keys are still named


def test_unconverted_weights_with_allow_mismatch_warn_with_the_command(tmp_path, caplog):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": OFFICIAL}, path)
    with caplog.at_level(logging.WARNING, logger="ddetr_d2"):
        load_weights_checked(_Tiny(), str(path), allow_mismatch=True)
    assert "tools/convert_weights.py --from official" in caplog.text


def test_torchvision_resnet_names_from_torchvision(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(TORCHVISION, path)
    with pytest.raises(
        WeightsError, match=_convert_command(path, "torchvision", ".pkl") + " and train from it"
    ):
        load_weights_checked(_Tiny(), str(path))


def test_hf_safetensors_file_and_folder_name_from_hf(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "deformable-detr"
    folder.mkdir()
    save_file(HF, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=_convert_command(folder / "model.safetensors", "hf")):
        load_weights_checked(_Tiny(), str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="is a directory: .*" + _convert_command(folder, "hf")):
        load_weights_checked(_Tiny(), str(folder))
    # recognised by its header, whatever the file is called
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=_convert_command(renamed, "hf")):
        load_weights_checked(_Tiny(), str(renamed))


def test_other_mismatches_still_advise_allow_mismatch(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(4, 3, 1, 1)}}, path)
    with pytest.raises(WeightsError, match=r"missing in checkpoint: .*--allow-mismatch") as e:
        load_weights_checked(_Tiny(), str(path))
    assert "convert_weights" not in str(e.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=r"truncated or not a checkpoint\?") as e:
        load_weights_checked(_Tiny(), str(garbage))
    assert "convert_weights" not in str(e.value)
