"""convert_weights: bad input is one clear error naming the file / option, checked before the conversion runs.

Unreadable .safetensors files (also in a save_pretrained folder); outputs that cannot be written (a directory,
a folder where no file can be created, a failing write); --opts without --config-file and odd --opts;
--backbone-prefix without its '.'; hints that name the --from that reads a file, or say that a file already in
ddetr-d2's layout needs no conversion; the warning of the script when nothing was checked against a model.
"""

import functools
import os
import pickle
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from detectron2.modeling import build_model

from ddetr_d2.config import build_cfg
from ddetr_d2.conversion import (
    ConversionError,
    convert_checkpoint,
    convert_official_state_dict,
    convert_torchvision_resnet,
    d2_resnet_to_torchvision,
    hf_to_official_state_dict,
    load_hf,
    save_backbone,
    save_detector,
    to_official_state_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny_test.yaml")
TOOL = os.path.join(REPO, "tools", "convert_weights.py")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _ours():
    torch.manual_seed(0)
    return OrderedDict(build_model(build_cfg(CONFIG, ["MODEL.DEVICE", "cpu"])).state_dict())


def _official_file(folder):
    path = folder / "official.pth"
    torch.save({"model": to_official_state_dict(_ours()), "epoch": 3}, path)
    return path


def _safetensors(path, data):
    from safetensors.torch import save_file

    save_file(data, str(path))
    return path


# --- finding 4: empty / truncated / corrupt .safetensors --------------------------------------------------
def test_unreadable_safetensors_names_the_file_and_the_reason(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    good = _safetensors(tmp_path / "good.safetensors", {"model.level_embed": torch.zeros(4, 8)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:40])
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(good.read_bytes()[:-10])
    for bad in (empty, truncated, folder / "model.safetensors"):
        with pytest.raises(
            ConversionError, match=rf"cannot read '{re.escape(str(bad))}' .*as a safetensors file: .*header"
        ):
            load_hf(str(bad if bad.parent != folder else folder))
    with pytest.raises(
        ConversionError, match=rf"'{re.escape(str(empty))}' \(0 bytes\) as a safetensors file"
    ):
        convert_checkpoint("hf", str(empty), str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()


# --- finding 5: the output is checked before anything is read; write errors are named ----------------------
def test_output_that_is_a_directory_is_refused_before_reading(tmp_path):
    corrupt = tmp_path / "corrupt.pth"  # reading it would fail: the output error must come first
    corrupt.write_bytes(b"not a checkpoint")
    (tmp_path / "dir.pth").mkdir()
    (tmp_path / "dir.pkl").mkdir()
    with pytest.raises(
        ConversionError, match=rf"output '{re.escape(str(tmp_path / 'dir.pth'))}' is a directory"
    ):
        convert_checkpoint("official", str(corrupt), str(tmp_path / "dir.pth"))
    with pytest.raises(
        ConversionError, match=rf"output '{re.escape(str(tmp_path / 'dir.pkl'))}' is a directory"
    ):
        convert_checkpoint("torchvision", str(corrupt), str(tmp_path / "dir.pkl"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ConversionError, match=rf"output folder '{re.escape(str(afile))}' is not a folder"):
        convert_checkpoint("official", str(corrupt), str(afile / "x.pth"))
    assert sorted(os.listdir(tmp_path)) == ["afile", "corrupt.pth", "dir.pkl", "dir.pth"]
    assert not os.listdir(tmp_path / "dir.pth")


def _unwritable_folder(tmp_path, kind):
    if kind == "read-only folder":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):  # root writes anyway
            folder.chmod(0o755)
            pytest.skip("this user can write into a read-only folder (root)")
        return folder
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux /proc (no file can be created in it)")
    return "/proc"


@pytest.mark.parametrize("kind", ["read-only folder", "/proc"])
def test_output_folder_without_write_access_is_refused_before_reading(tmp_path, kind):
    folder = _unwritable_folder(tmp_path, kind)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    try:
        for source, name in (("official", "x.pth"), ("torchvision", "x.pkl")):
            out = os.path.join(folder, name)
            with pytest.raises(
                ConversionError, match=rf"cannot write output '{re.escape(out)}': cannot create a file in"
            ):
                convert_checkpoint(source, str(corrupt), out)
            assert not os.path.exists(out)
    finally:
        if kind == "read-only folder":
            os.chmod(folder, 0o755)


def test_write_error_is_a_conversion_error_naming_the_output(tmp_path, monkeypatch):
    """A disk that fills up during the write: one error naming the output, the earlier output intact,
    no temporary file left."""
    sd = OrderedDict((k, v) for k, v in _ours().items() if k.startswith("backbone."))
    backbone = OrderedDict((k[len("backbone.") :], v) for k, v in sd.items())
    out = tmp_path / "R.pkl"
    save_backbone(backbone, str(out))
    before = out.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pickle, "dump", full_disk)
    with pytest.raises(
        ConversionError, match=rf"cannot write output '{re.escape(str(out))}': OSError: .*No space left"
    ):
        save_backbone(backbone, str(out))
    with pytest.raises(ConversionError, match=rf"cannot write output '{re.escape(str(tmp_path / 'd.pkl'))}'"):
        save_detector(sd, str(tmp_path / "d.pkl"), author="test")
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["R.pkl"]


# --- finding 13: --opts, --backbone-prefix ----------------------------------------------------------------
def test_opts_need_a_config_file_and_pairs(tmp_path):
    src = _official_file(tmp_path)
    out = tmp_path / "out.pth"
    with pytest.raises(ConversionError, match=r"--opts MODEL.DEFORMABLE_DETR.NUM_CLASSES 3 given without "):
        convert_checkpoint("official", str(src), str(out), opts=["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"])
    odd = r"odd number of items: \['MODEL.DEFORMABLE_DETR.NUM_CLASSES'\]$"  # not the MODEL.DEVICE cpu added
    with pytest.raises(ConversionError, match=odd):
        convert_checkpoint(
            "official", str(src), str(out), config_file=CONFIG, opts=["MODEL.DEFORMABLE_DETR.NUM_CLASSES"]
        )
    assert not out.exists()


def test_backbone_prefix_gets_its_dot(tmp_path):
    official = to_official_state_dict(_ours())
    dotted = convert_official_state_dict(official, backbone_prefix="backbone.")
    assert list(convert_official_state_dict(official, backbone_prefix="backbone")) == list(dotted)
    assert "backbone.stem.conv1.weight" in dotted
    assert set(to_official_state_dict(dotted, backbone_prefix="backbone")) == set(official)
    src = _official_file(tmp_path)
    convert_checkpoint("official", str(src), str(tmp_path / "o.pth"), backbone_prefix="backbone")
    assert "backbone.stem.conv1.weight" in torch.load(tmp_path / "o.pth")["model"]
    with pytest.raises(ConversionError, match=r"backbone prefix 'back bone\.' is not a module path"):
        convert_official_state_dict(official, backbone_prefix="back bone")


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


def test_cli_warns_that_nothing_was_checked_and_refuses_lone_opts(tmp_path):
    src = _official_file(tmp_path)
    p = _cli("--from", "official", str(src), str(tmp_path / "o.pth"))
    assert p.returncode == 0 and "wrote 166 tensors" in p.stdout, p.stderr
    assert p.stderr.strip().splitlines() == [
        "warning: no --config-file: only the names were converted, the keys and shapes were not checked "
        "against a model; pass the config you will use the weights with to check them"
    ]
    p = _cli("--from", "official", str(src), str(tmp_path / "p.pth"), "--opts", "MODEL.DEVICE", "cpu")
    assert p.returncode == 2 and not (tmp_path / "p.pth").exists()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --opts MODEL.DEVICE cpu given without --config-file"
    )


# --- finding 14: hints that name the right --from, or no conversion at all --------------------------------
def test_hf_on_a_torchvision_resnet_says_from_torchvision():
    backbone = {k[len("backbone.") :]: v for k, v in _ours().items() if k.startswith("backbone.")}
    tv = d2_resnet_to_torchvision(backbone)
    with pytest.raises(ConversionError, match=r"a torchvision ResNet\? use --from torchvision") as e:
        hf_to_official_state_dict(tv)
    assert "--from official" not in str(e.value)
    with pytest.raises(
        ConversionError, match=r"an official Deformable-DETR checkpoint\? use --from official"
    ):
        hf_to_official_state_dict(to_official_state_dict(_ours()))
    with pytest.raises(
        ConversionError, match=r"an official Deformable-DETR checkpoint\? use --from official"
    ):
        convert_torchvision_resnet(to_official_state_dict(_ours()))


def test_a_ddetr_d2_checkpoint_needs_no_conversion_with_any_source(tmp_path):
    sd = _ours()
    model_final = tmp_path / "model_final.pth"
    torch.save({"model": sd, "iteration": 9, "optimizer": {}}, model_final)
    save_detector(sd, str(tmp_path / "converted.pth"), author="test")
    save_detector(sd, str(tmp_path / "converted.pkl"), author="test")
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    save_backbone(backbone, str(tmp_path / "R.pkl"))
    for name in ("model_final.pth", "converted.pth", "converted.pkl", "R.pkl"):
        src = tmp_path / name
        for source, out in (("hf", "x.pth"), ("official", "x.pth"), ("torchvision", "x.pkl")):
            done = rf"'{re.escape(str(src))}' is already in ddetr-d2's layout .*no conversion is needed"
            with pytest.raises(ConversionError, match=done + ": use the file as MODEL.WEIGHTS"):
                convert_checkpoint(source, str(src), str(tmp_path / out))
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.pkl").exists()
    # the pure converters say so too
    for convert in (convert_official_state_dict, convert_torchvision_resnet, hf_to_official_state_dict):
        with pytest.raises(ConversionError, match="no conversion is needed"):
            convert(sd)
    # a training output folder given as a save_pretrained folder
    with pytest.raises(ConversionError, match="model_final.pth there looks like a ddetr-d2 training output"):
        load_hf(str(tmp_path))
