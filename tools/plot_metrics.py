#!/usr/bin/env python
"""Plot the training losses (and lr) of a detectron2 run from OUTPUT_DIR/metrics.json.

python tools/plot_metrics.py output/quickstart            # -> output/quickstart/loss_curve.png
python tools/plot_metrics.py output/quickstart --out curve.png --keys loss_ce loss_bbox
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".pdf", ".svg")


def read_metrics(path):
    """List of dicts, one per logged iteration; later entries win when a run was resumed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (is this a detectron2 OUTPUT_DIR?)")
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a half-written last line of a killed run
                print(f"warning: skipping unreadable line {n} of {path}", file=sys.stderr)
                continue
            if not isinstance(row, dict):
                print(f"warning: skipping line {n} of {path}: not a JSON object", file=sys.stderr)
                continue
            if "iteration" in row:
                rows.setdefault(row["iteration"], {}).update(row)
    return [rows[k] for k in sorted(rows)]


def plot(rows, out_file, keys=None):
    loss_rows = [r for r in rows if "total_loss" in r]
    if not loss_rows:
        raise ValueError("metrics.json has no 'total_loss' entries to plot")
    logged = sorted({k for r in loss_rows for k in r})
    if keys:
        unknown = [k for k in keys if k not in logged]
        if len(unknown) == len(keys):
            raise ValueError(f"none of --keys {keys} is in metrics.json; it has {logged}")
        for k in unknown:
            print(f"warning: --keys {k} is not in metrics.json", file=sys.stderr)
    keys = keys or ["total_loss", "loss_ce", "loss_bbox", "loss_giou"]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k in keys:
        pts = [(r["iteration"], r[k]) for r in loss_rows if k in r]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_ylabel("weighted loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    lr = [(r["iteration"], r["lr"]) for r in loss_rows if "lr" in r]
    if lr:
        ax_lr.plot(*zip(*lr), color="k")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    ap = [(r["iteration"], r[k]) for r in rows for k in r if k.endswith("bbox/AP")]
    if ap:
        ax.set_title("bbox AP: " + ", ".join(f"{v:.1f} @ {i}" for i, v in ap))
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir")
    parser.add_argument("--out", default="", help="PNG path (default OUTPUT_DIR/loss_curve.png)")
    parser.add_argument("--keys", nargs="*", default=None, help="metrics to plot (default: the main losses)")
    args = parser.parse_args(argv)
    if args.out:
        if os.path.isdir(args.out):
            parser.error(f"--out {args.out} is a folder: give a file name such as {args.out}/loss_curve.png")
        if os.path.splitext(args.out)[1].lower() not in IMAGE_SUFFIXES:
            parser.error(f"--out {args.out}: the file name must end in one of {', '.join(IMAGE_SUFFIXES)}")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            parser.error(f"--out {args.out}: folder {folder} does not exist")
    out = plot(
        read_metrics(os.path.join(args.output_dir, "metrics.json")),
        args.out or os.path.join(args.output_dir, "loss_curve.png"),
        args.keys,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # no metrics.json / nothing to plot: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
