#!/usr/bin/env python
"""Generate the synthetic MOT set (MOTChallenge layout), check it, or time the renderer.

    python tools/make_synthetic_mot.py --root datasets/synthetic_mot --train 8 --val 3 --frames 40
    python tools/make_synthetic_mot.py --root datasets/synthetic_mot --check   # validate with the MOT loader
    python tools/make_synthetic_mot.py --benchmark                             # numpy vs numba rasteriser
    python tools/make_synthetic_mot.py --eval-splits   # <root>_tune and <root>_hard (hard_val), as registered

Without --root the set goes to ``$DDETR_DATASETS/synthetic_mot`` (default ``./datasets/synthetic_mot``),
the place where the ``synthetic_mot_train`` / ``synthetic_mot_val`` Detectron2 datasets look for
(and lazily create) it. ``--eval-splits`` writes the threshold-tuning split (``synthetic_mot_tune``, at
``<root>_tune``) and the harder split (``synthetic_mot_hard_val``, ``<root>_hard``) instead; the harder
generator's options are ``--extra-crossings``, ``--occlusion-frames`` and ``--camera-motion``.

User errors print one line ``error: ...`` on stderr and exit with status 2: a set of another recipe (seed,
splits, options) already at ``--root`` (pass ``--overwrite`` to replace it), bad generator options, and under
``--check`` a malformed file or a sequence folder without seqinfo.ini.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from ddetr_d2.errors import UserError


def _benchmark(args) -> None:
    import cv2

    from ddetr_video import rasterize as nk
    from ddetr_video.synthetic_video import SyntheticVideo, SyntheticVideoConfig

    for size in [(224, 160, 18, 40, 6), (640, 480, 40, 120, 12)]:
        w, h, smin, smax, n = size
        cfg = SyntheticVideoConfig(
            num_frames=args.frames, width=w, height=h, min_size=smin, max_size=smax, num_objects=n
        )
        video = SyntheticVideo(cfg, seed=1)
        frames = [video.boxes_at(f) for f in range(1, cfg.num_frames + 1)]
        inputs = [
            (
                b,
                np.array([t.shape for t in a], np.int64),
                np.array([t.colour for t in a], np.uint8).reshape(-1, 3),
            )
            for b, a in frames
        ]
        # correctness: both backends draw identical frames
        for b, s, c in inputs:
            i1, s1 = video.background.copy(), np.full((h, w), -1, np.int32)
            i2, s2 = video.background.copy(), np.full((h, w), -1, np.int32)
            e1, a1 = nk.render_objects(i1, s1, b, s, c, backend="numpy")
            e2, a2 = nk.render_objects(i2, s2, b, s, c, backend="numba")
            assert (i1 == i2).all() and (s1 == s2).all() and (e1 == e2).all() and (a1 == a2).all()
        times = {}
        for backend in ("numpy", "numba"):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for b, s, c in inputs:
                    img, slot = video.background.copy(), np.full((h, w), -1, np.int32)
                    nk.render_objects(img, slot, b, s, c, backend=backend)
                best = min(best, time.perf_counter() - t0)
            times[backend] = best / len(inputs) * 1e3
        # the kernel's own source run by the interpreter (no JIT), on a few frames: the "before" of Numba
        t0 = time.perf_counter()
        for b, s, c in inputs[:3]:
            img, slot = video.background.copy(), np.full((h, w), -1, np.int32)
            ext, area = np.full((len(b), 4), -1, np.int64), np.zeros(len(b), np.int64)
            nk._render_kernel_py(img, slot, b, s, c, ext, area)
        times["python"] = (time.perf_counter() - t0) / len(inputs[:3]) * 1e3
        t0 = time.perf_counter()
        for f in range(1, cfg.num_frames + 1):
            video.render(f)
        full = (time.perf_counter() - t0) / cfg.num_frames * 1e3
        img = video.render(cfg.num_frames // 2)[0]
        t0 = time.perf_counter()
        for _ in range(cfg.num_frames):
            cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 95])
        jpg = (time.perf_counter() - t0) / cfg.num_frames * 1e3
        print(
            f"{w}x{h}, {n} objects of {smin}-{smax} px: rasterise pure-python {times['python']:.1f}, "
            f"numpy {times['numpy']:.3f} ms/frame, "
            f"numba {times['numba']:.3f} ms/frame ({times['numpy'] / times['numba']:.1f}x); "
            f"full render() {full:.3f} ms/frame; JPEG encode {jpg:.3f} ms/frame"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="output folder (default $DDETR_DATASETS/synthetic_mot)")
    p.add_argument("--train", type=int, default=8, help="number of train sequences")
    p.add_argument("--val", type=int, default=3, help="number of val sequences")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--objects", type=int, default=6, help="identities per sequence (>= 4)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--extra-crossings", type=int, default=0, help="more look-alike crossing pairs")
    p.add_argument("--occlusion-frames", type=int, default=0, help="look-alike pairs hidden this many frames")
    p.add_argument("--camera-motion", type=float, default=0.0, help="max camera pan, px/frame")
    p.add_argument(
        "--eval-splits", action="store_true", help="write the tune and hard_val splits (registered settings)"
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--check", action="store_true", help="validate an existing set with the MOT loader")
    p.add_argument("--benchmark", action="store_true", help="time the numpy and numba rasterisers")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    if args.benchmark:
        _benchmark(args)
        return 0

    from ddetr_video.datasets import synthetic_mot_root

    root = args.root or synthetic_mot_root()
    if args.eval_splits:
        from detectron2.data import DatasetCatalog

        from ddetr_video.datasets import register_synthetic_eval_splits

        names = register_synthetic_eval_splits(root, prefix="make_synthetic_mot", seed=args.seed)
        for split, name in names.items():
            folder = f"{root}_{split.split('_')[0]}"
            try:
                frames = len(DatasetCatalog.get(name))  # generates the split on first use
            except ValueError as e:  # a set of another recipe (seed) already there
                raise UserError(
                    f"{folder}: {str(e).splitlines()[0]} ({' '.join(str(e).splitlines()[1:3])}): remove "
                    "the folder, or pass the --seed it was made with, or choose another --root"
                ) from None
            print(f"{split}: {frames} frames at {folder}")
        return 0
    if not args.check:
        _generate(root, args)
    _check(root, must_exist=args.check)
    return 0


def _generate(root, args) -> None:
    """Write the set; a different recipe at ``root`` (or a half-written folder) is a UserError."""
    from ddetr_video.synthetic_video import DONE_MARKER, SyntheticVideoConfig, generate_dataset

    try:
        cfg = SyntheticVideoConfig(
            num_frames=args.frames,
            width=args.width,
            height=args.height,
            num_objects=args.objects,
            extra_crossings=args.extra_crossings,
            occlusion_frames=args.occlusion_frames,
            camera_motion=args.camera_motion,
        )
    except ValueError as e:
        raise UserError(f"bad generator options: {e}") from None
    splits = {"train": args.train, "val": args.val}
    marker = os.path.join(root, DONE_MARKER)
    t0 = time.perf_counter()
    try:
        generate_dataset(root, splits, cfg, args.seed, overwrite=args.overwrite)
    except FileExistsError:
        raise UserError(
            f"{root} exists but is not a complete synthetic MOT set: remove it or pass --overwrite"
        ) from None
    except ValueError:
        if args.overwrite or not os.path.isfile(marker):
            raise
        raise UserError(
            f"{root} holds a synthetic MOT set made with a different recipe "
            f"({_recipe_diff(marker, args.seed, splits, cfg)}): pass --overwrite to replace it, "
            "or choose another --root"
        ) from None
    print(f"wrote {root} in {time.perf_counter() - t0:.1f} s")


def _recipe_diff(marker, seed, splits, cfg) -> str:
    """What differs between the recipe in ``marker`` and the requested one, as 'key: disk -> requested'."""
    try:
        with open(marker) as f:
            disk = json.load(f)
        have = {f.name: f.default for f in dataclasses.fields(cfg)}
        have.update(disk.get("config", {}), seed=disk.get("seed"), splits=disk.get("splits"))
    except (OSError, ValueError, AttributeError):
        return f"see {marker}"
    want = dict(dataclasses.asdict(cfg), seed=seed, splits=splits)
    diff = [f"{k}: {have.get(k)} on disk, {v} requested" for k, v in want.items() if have.get(k) != v]
    return "; ".join(diff) or f"see {marker}"


def _check(root, must_exist) -> None:
    """Load every sequence with the MOT loader and print its numbers; a malformed file is a UserError."""
    from ddetr_video.mot_format import MOTFormatError, list_sequences, load_sequence

    splits = [s for s in ("train", "val") if os.path.isdir(os.path.join(root, s))]
    if must_exist and not splits:
        raise UserError(f"--check: {root} has no train/ or val/ folder")
    for split in splits:
        split_dir = os.path.join(root, split)
        for name in list_sequences(split_dir):
            try:
                seq = load_sequence(os.path.join(split_dir, name), "synthetic")
            except MOTFormatError as e:
                raise UserError(str(e)) from None
            gt = seq.gt.data
            print(
                f"{split}/{name}: {seq.info.seq_length} frames, {len(np.unique(gt[:, 1]))} ids, "
                f"{len(gt)} boxes, "
                f"{int((gt[:, 8] < 0.5).sum())} boxes with visibility < 0.5"
            )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
