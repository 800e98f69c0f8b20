#!/usr/bin/env python
"""
Convert Deformable DETR / ResNet weights into ddetr-d2 checkpoints.

  --from hf           Hugging Face DeformableDetrForObjectDetection: a save_pretrained folder,
                      a .safetensors file or a .bin/.pth state dict -> .pth detector checkpoint
  --from official     fundamentalvision/Deformable-DETR checkpoint (.pth with "model") -> .pth
  --from torchvision  torchvision ImageNet ResNet state dict -> Detectron2 backbone .pkl
                      (as detectron2://ImageNetPretrained/torchvision/R-50.pkl), usable as MODEL.WEIGHTS

Examples:
  python tools/convert_weights.py --from official r50_deformable_detr-checkpoint.pth ddetr_r50.pth \\
      --coco-91-to-80
  python tools/convert_weights.py --from torchvision resnet50-0676ba61.pth R-50.pkl
  python tools/convert_weights.py --from hf ./deformable-detr ddetr_r50_hf.pth \\
      --coco-91-to-80 --config-file configs/ddetr_r50.yaml   # also checks keys/shapes against the model

Nothing is downloaded. The detector outputs are {"model": state_dict, "__author__": ...,
"matching_heuristics": False} and load with DetectionCheckpointer / MODEL.WEIGHTS.
"""

import argparse
import os
import pickle
import sys
from collections import OrderedDict

import torch

from ddetr_d2.conversion import (
    BACKBONE_PREFIX,
    ConversionError,
    check_state_dict,
    convert_hf_state_dict,
    convert_official_state_dict,
    convert_torchvision_resnet,
    infer_variant,
)


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001  (name the file in every failure)
        raise ConversionError(
            f"cannot read '{path}' as a torch checkpoint: {type(e).__name__}: {e}"
        ) from None


def _load_safetensors(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConversionError(
            f"'{path}' is a .safetensors file but the safetensors package is not installed"
        ) from None
    return load_file(path, device="cpu")


def _unwrap(obj, path, keys=("model", "state_dict")):
    """A checkpoint may hold its state dict under "model" / "state_dict"; tensors must be values."""
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], dict):
                return obj[k]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ConversionError(
        f"'{path}' is not a state dict: expected a mapping of names to tensors (or one under "
        f"{' / '.join(repr(k) for k in keys)}), got {type(obj).__name__}"
        + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else "")
    )


def load_hf(path):
    """Read an HF state dict from a save_pretrained folder or a single weights file."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                path = f
                break
        else:
            raise ConversionError(
                f"'{path}' is a folder without model.safetensors or pytorch_model.bin "
                "(sharded checkpoints are not supported; pass a single weights file)"
            )
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return _unwrap(_torch_load(path), path)


def build_model_state(config_file, opts):
    """state_dict() of the model a config builds (CPU, random init), to check a conversion against."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from ddetr_d2.config import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu"])
    return build_model(cfg).state_dict()


def save_detector(sd, output, author):
    ckpt = {"model": sd, "__author__": author, "matching_heuristics": False}
    if output.endswith(".pkl"):
        ckpt["model"] = OrderedDict((k, v.detach().cpu().numpy()) for k, v in sd.items())
        with open(output, "wb") as f:
            pickle.dump(ckpt, f)
    else:
        torch.save(ckpt, output)


def save_backbone(sd, output):
    """Detectron2's ImageNet convention: a pickle of numpy arrays with unprefixed ResNet names."""
    ckpt = {
        "model": OrderedDict((k, v.detach().cpu().numpy()) for k, v in sd.items()),
        "__author__": "torchvision",
        "matching_heuristics": True,
    }
    if not output.endswith(".pkl"):
        raise ConversionError(f"output '{output}' must end with .pkl (Detectron2 backbone weights format)")
    with open(output, "wb") as f:
        pickle.dump(ckpt, f)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=["hf", "official", "torchvision"])
    p.add_argument("input", help="input checkpoint (file, or HF save_pretrained folder)")
    p.add_argument("output", help="output file (.pth for detectors, .pkl for a torchvision backbone)")
    p.add_argument(
        "--coco-91-to-80",
        action="store_true",
        help="keep the 80 COCO classes of a 91-way classifier (official/HF COCO models), contiguous order",
    )
    p.add_argument(
        "--backbone-prefix", default=BACKBONE_PREFIX, help="module path of the D2 ResNet in our model"
    )
    p.add_argument(
        "--config-file", default="", help="check the converted keys and shapes against this config's model"
    )
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides for --config-file (last option: KEY VALUE pairs)",
    )
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if not os.path.exists(args.input):
        raise ConversionError(f"input '{args.input}' does not exist")
    if args.source == "torchvision":
        if not args.output.endswith(".pkl"):
            raise ConversionError(
                f"output '{args.output}' must end with .pkl (Detectron2 backbone weights format)"
            )
        sd = convert_torchvision_resnet(_unwrap(_torch_load(args.input), args.input))
        if args.config_file:
            expected = build_model_state(args.config_file, args.opts)
            expected = {
                k[len(args.backbone_prefix) :]: v
                for k, v in expected.items()
                if k.startswith(args.backbone_prefix)
            }
            check_state_dict(sd, expected)
        save_backbone(sd, args.output)
    else:
        if args.source == "hf":
            sd = convert_hf_state_dict(
                load_hf(args.input),
                backbone_prefix=args.backbone_prefix,
                coco_91_to_80_classes=args.coco_91_to_80,
            )
        else:
            raw = _torch_load(args.input)
            sd = convert_official_state_dict(
                _unwrap(raw, args.input),
                backbone_prefix=args.backbone_prefix,
                coco_91_to_80_classes=args.coco_91_to_80,
            )
        if args.config_file:
            try:
                check_state_dict(sd, build_model_state(args.config_file, args.opts))
            except ConversionError as e:
                raise ConversionError(
                    f"{e}. The weights are {infer_variant(sd)}; does '{args.config_file}' (+ --opts) match?"
                ) from None
        save_detector(sd, args.output, author=f"ddetr-d2 convert_weights.py --from {args.source}")
    print(f"wrote {len(sd)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
