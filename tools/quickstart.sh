#!/bin/sh
# The quickstart job (run by `make quickstart` after set-up): train configs/quickstart.yaml on the
# built-in synthetic shapes dataset (generated on first use), evaluate it with COCOEvaluator,
# plot the loss curve, then run the demo on a synthetic image and a short synthetic video.
set -eu
PY=${PY:-.venv/bin/python}
OUT=${QS_OUT:-output/quickstart}
CFG=configs/quickstart.yaml
mkdir -p "$OUT/demo"

echo "== [1/4] training $CFG on synthetic_shapes_train (CPU), then COCO evaluation on synthetic_shapes_val"
start=$(date +%s)
"$PY" tools/train_net.py --config-file "$CFG" OUTPUT_DIR "$OUT"
echo "== training + evaluation took $(( $(date +%s) - start )) s"

echo "== [2/4] loss curve"
"$PY" tools/plot_metrics.py "$OUT"

echo "== [3/4] demo on a synthetic val image, with the decoder's sampling points"
IMG=$("$PY" -c "import ddetr_d2; from detectron2.data import DatasetCatalog; print(DatasetCatalog.get('synthetic_shapes_val')[0]['file_name'])")
W="MODEL.WEIGHTS $OUT/model_final.pth MODEL.DEVICE cpu"
# shellcheck disable=SC2086
"$PY" tools/demo.py --config-file "$CFG" --input "$IMG" --output "$OUT/demo" --confidence-threshold 0.3 --opts $W
# shellcheck disable=SC2086
"$PY" tools/visualize_sampling.py "$IMG" --config-file "$CFG" --output "$OUT/demo/sampling_grid.png" \
    --confidence-threshold 0.3 --opts $W

echo "== [4/4] demo on a short synthetic video"
# the path it prints is the file written (.avi where OpenCV has no MP4 writer)
CLIP=$("$PY" tools/make_demo_video.py "$OUT/demo/synthetic_clip.mp4")
CLIP=$(printf '%s\n' "$CLIP" | tail -n 1)
# shellcheck disable=SC2086
"$PY" tools/demo.py --config-file "$CFG" --video "$CLIP" \
    --output "$OUT/demo/synthetic_clip_detections.mp4" --confidence-threshold 0.3 --opts $W

cat <<MSG

Quickstart done. Outputs:
  model + metrics:        $OUT/model_final.pth, $OUT/metrics.json, $OUT/log.txt
  COCO AP table:          printed above (also in $OUT/log.txt)
  loss curve:             $OUT/loss_curve.png
  demo image:             $OUT/demo/$(basename "$IMG")
  sampling points:        $OUT/demo/sampling_grid.png
  demo video:             $OUT/demo/synthetic_clip_detections.mp4 (.avi without an MP4 writer; input: $CLIP)
MSG
