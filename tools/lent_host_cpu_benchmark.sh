#!/bin/bash
# End-to-end CPU inference benchmark (tools/benchmark_inference.py) on the host CPU of a lent GPU machine
# (an AMX Xeon so far: the bf16 / fp32 goals of docs/benchmarks.md, "On a CPU with AMX"). That machine has
# its own Python 3.12 + torch and no package index, so the packages it lacks travel with the working tree.
#
#   sh tools/lent_host_cpu_benchmark.sh prepare      # here: .whl/ (wheels) and .d2/ (pure-Python packages)
#   device run, carry [".whl", ".d2"], timeout_s 600:
#       IMPLS="hf ours_compile" sh tools/lent_host_cpu_benchmark.sh run
#   (OPTS="KEY VALUE ..." passes config options to our rows; SIZE, REPEATS, OUT as below)
#
# `run` installs the wheels, builds ddetr_d2._C for that torch (CPU only, the system compiler: the image's
# wrapper links libstdc++ statically, docs/cuda.md), then times IMPLS at SIZE on 2 cores, 2 threads (each
# implementation in its own subprocess, HF first). Output: $OUT/bench.log, $OUT/bench.json, $OUT/build.log,
# $OUT/lscpu.txt. Measured there (2026-11-27): the build takes ~85 s, HF ~1 minute, and a compiled row took
# 2-4 minutes when the whole benchmark ran under `taskset -c 0,1` (Inductor compiled on those 2 cores too).
# Now each row builds, compiles and warms up on every core and only its timed runs are pinned to CPUs 0,1
# (`--pin-cpus`, all threads): keep to two or three implementations per 10-minute call all the same, HF
# among them so that each call has its own reference.
set -u
MODE=${1:-}
VENV_SP=${VENV_SP:-.venv/lib/python3.10/site-packages}

prepare() {
    set -e
    for p in /.whl/ /.d2/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
    mkdir -p .whl .d2
    # what the benchmark imports that the lent image lacks (versions as in our .venv); --no-deps: the
    # image has the rest (numpy, torch, safetensors, regex, ...)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl transformers==4.57.6 huggingface_hub==0.36.0 tokenizers==0.22.1 \
        pycocotools==2.0.11 termcolor==3.3.0 yacs==0.1.8 omegaconf==2.3.0
    # sdist-only packages and detectron2 (its compiled _C is bound to CPython 3.10; our model uses none of
    # its compiled ops): the Python code alone
    for pkg in detectron2 fvcore iopath antlr4; do
        rm -rf ".d2/$pkg"
        cp -r "$VENV_SP/$pkg" .d2/
    done
    find .d2 -name "*.so" -delete
    find .d2 -name __pycache__ -prune -exec rm -rf {} +
    du -sh .whl .d2
}

run() {
    OUT=${OUT:-/tmp/lent_host_out}
    SIZE=${SIZE:-800x1066}
    REPEATS=${REPEATS:-5}
    IMPLS=${IMPLS:-hf ours_compile}
    OPTS=${OPTS:-}  # config KEY VALUE pairs for our rows, e.g. MODEL.DEFORMABLE_DETR.INFERENCE_LINEAR_BACKEND onednn
    mkdir -p "$OUT"
    start=$(date +%s)
    grep -m1 "model name" /proc/cpuinfo
    echo "cpus $(nproc); $(grep -o -E 'amx_\w+|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    lscpu > "$OUT/lscpu.txt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/.d2:$PWD" PYTHONUNBUFFERED=1
    CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDA_HOME=/nonexistent MAX_JOBS=$(nproc) \
        python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    echo "built in $(( $(date +%s) - start )) s"
    python3 -c "import torch, ddetr_d2._C, transformers; print('torch', torch.__version__, \
torch.backends.cpu.get_cpu_capability(), 'transformers', transformers.__version__)" || exit 1
    # shellcheck disable=SC2086
    python3 tools/benchmark_inference.py --variants plain --sizes "$SIZE" --impls $IMPLS \
        --repeats "$REPEATS" --threads 2 --pin-cpus 0,1 ${OPTS:+--opts $OPTS} --json "$OUT/bench.json" \
        > "$OUT/bench.log" 2>&1
    grep -v -E '^\{|Warning|warnings.warn' "$OUT/bench.log"
    echo "done in $(( $(date +%s) - start )) s"
}

case "$MODE" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: sh tools/lent_host_cpu_benchmark.sh prepare|run" >&2; exit 2 ;;
esac
