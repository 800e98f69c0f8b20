#!/usr/bin/env python
"""
Convert Deformable DETR / ResNet weights into ddetr-d2 checkpoints (``ddetr_d2.conversion``).

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
"matching_heuristics": False} and load with DetectionCheckpointer / MODEL.WEIGHTS. The output is
written atomically (a temporary file renamed into place). Errors: one line, exit status 2.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import sys

from ddetr_d2.conversion import BACKBONE_PREFIX, convert_checkpoint
from ddetr_d2.errors import UserError


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
        "--backbone-prefix",
        default=BACKBONE_PREFIX,
        help="module path of the D2 ResNet in our model (a missing trailing '.' is added)",
    )
    p.add_argument(
        "--config-file", default="", help="check the converted keys and shapes against this config's model"
    )
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="config overrides for --config-file, which they need (last option: KEY VALUE pairs)",
    )
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    n = convert_checkpoint(
        args.source,
        args.input,
        args.output,
        coco_91_to_80_classes=args.coco_91_to_80,
        backbone_prefix=args.backbone_prefix,
        config_file=args.config_file,
        opts=args.opts,
    )
    print(f"wrote {n} tensors to {args.output}")
    if not args.config_file:
        print(
            "warning: no --config-file: only the names were converted, the keys and shapes were not checked "
            "against a model; pass the config you will use the weights with to check them",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
