#!/usr/bin/env python
"""Write a synthetic shapes split in COCO format (images + annotations.json).

    python tools/make_synthetic_coco.py --root datasets/my_shapes --split train --num-images 500 --seed 0

Use it with ``tools/train_net.py --dataset NAME=ROOT/SPLIT/annotations.json:ROOT/SPLIT/images``.
The built-in ``synthetic_shapes_{train,val}`` datasets are generated automatically on first use instead.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import os
import sys

from ddetr_d2.data.synthetic import MIN_IMAGE_SIZE, SHAPE_CLASSES, make_synthetic_coco


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="output folder; the split goes to ROOT/SPLIT/")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size", type=int, default=256, help="longest image side (sides vary in [0.75, 1]x)"
    )
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    args = parser.parse_args(argv)
    for name, value, low in (
        ("--num-images", args.num_images, 0),
        ("--image-size", args.image_size, MIN_IMAGE_SIZE),
        ("--max-objects", args.max_objects, 0),
    ):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if not args.split or os.sep in args.split or args.split in (".", ".."):
        parser.error(f"--split must be a folder name, got {args.split!r}")
    try:
        json_file = make_synthetic_coco(
            args.root, args.split, args.num_images, args.seed, image_size=args.image_size,
            max_objects=args.max_objects, image_format=args.format,
        )  # fmt: skip
    except OSError as e:
        print(f"error: cannot write {os.path.join(args.root, args.split)}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_images} images with classes {SHAPE_CLASSES}; annotations: {json_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
