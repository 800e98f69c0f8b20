#!/usr/bin/env python
"""Training throughput on an idle and on a shared CPU, for OpenMP wait policies and thread counts.

    python tools/benchmark_threads.py                       # 100 iterations per run, all cases
    python tools/benchmark_threads.py --iters 40 --scenarios idle matmul

Each case trains ``configs/quickstart.yaml`` for ``--iters`` iterations (``SOLVER.MAX_ITER N
DATASETS.TEST "()"``) in a subprocess and reads the seconds per iteration of each 20-iteration
window from its ``metrics.json`` (Detectron2's ``time``: the median iteration time of the window).
Scenarios: ``idle``; ``matmul``: beside another PyTorch process doing matrix products on 2 threads;
``busy``: beside a single-threaded Python busy loop (the competitors run with the libgomp default
policy, like any other user's process). Variants of the training process's environment:

* ``unset``: ``OMP_WAIT_POLICY=""`` -- libgomp ignores the empty value (it prints one "Invalid
  value" line) and uses its default, i.e. what ddetr-d2 did before it set the policy;
* ``ACTIVE``: ``OMP_WAIT_POLICY=ACTIVE`` (idle threads always spin);
* ``PASSIVE``: ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once);
* ``threads1``: ``OMP_NUM_THREADS=1`` (no OpenMP worker threads at all);
* ``spin3k`` / ``spin10k`` / ``spin30k``: ``GOMP_SPINCOUNT=3000`` / ``10000`` / ``30000`` with the policy
  left to libgomp (idle threads spin that many times, then sleep);
* ``auto``: no OpenMP variable at all: ``import ddetr_d2`` probes the load at start-up and chooses
  (PASSIVE or ``GOMP_SPINCOUNT=SHORT_SPINCOUNT``; docs/training.md, "Thread policy"); the choice is
  printed when the training log names it.

The synthetic dataset is generated first (not timed). Prints a markdown table.
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPETITORS = {
    "idle": None,
    "matmul": "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n",
    "busy": "while True:\n    pass\n",
}
COMPETITOR_HEAD_START = 3.0  # seconds (the matmul competitor imports torch first)
VARIANTS = {
    "unset": {"OMP_WAIT_POLICY": ""},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
    "spin3k": {"GOMP_SPINCOUNT": "3000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin30k": {"GOMP_SPINCOUNT": "30000"},
    "auto": {},
}
# variables that set the OpenMP behaviour (or ddetr_d2's choice of it): removed from every case's env
OMP_ENV = (
    "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DDETR_THREAD_POLICY",
)  # fmt: skip


def _env(extra):
    env = {k: v for k, v in os.environ.items() if k not in OMP_ENV}
    env.update(extra)
    return env


def window_times(metrics_file):
    """Seconds per iteration of each logged window (``time`` rows of metrics.json)."""
    rows = []
    with open(metrics_file) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "time" in row:
                rows.append(row["time"])
    return rows


def run_case(config, iters, scenario, variant, work):
    out = os.path.join(work, f"{scenario}-{variant}")
    competitor = None
    if COMPETITORS[scenario]:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[scenario]], env=_env({}))
    try:
        if competitor is not None:  # running before training starts (and `auto` probes), like a user's job
            time.sleep(COMPETITOR_HEAD_START)
        cmd = [
            sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config,
            "SOLVER.MAX_ITER", str(iters), "DATASETS.TEST", "()", "OUTPUT_DIR", out,
        ]  # fmt: skip
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(VARIANTS[variant]), cwd=REPO)
        wall = time.time() - t0
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{scenario}/{variant} failed:\n{p.stderr[-3000:]}")
    policy = [ln for ln in (p.stdout + p.stderr).splitlines() if "OpenMP thread policy:" in ln]
    if policy:
        print(f"{scenario:7s} {variant:9s} {policy[0].split('OpenMP thread policy:')[1].strip()}", flush=True)
    return window_times(os.path.join(out, "metrics.json")), wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--scenarios", nargs="+", default=list(COMPETITORS), choices=list(COMPETITORS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from `timeout`): unwind, so that the competitor is killed and the folder removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from detectron2.data import DatasetCatalog  # generate the synthetic training split first (untimed)

    DatasetCatalog.get("synthetic_shapes_train")
    print(f"cpus: {os.cpu_count()}, usable: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_threads-") as work:
        for scenario in args.scenarios:
            for variant in args.variants:
                times, wall = run_case(args.config, args.iters, scenario, variant, work)
                rows.append((scenario, variant, times, wall))
                print(f"{scenario:7s} {variant:9s} s/it per window: {' '.join(f'{t:.3f}' for t in times)}",
                      flush=True)  # fmt: skip
    print(f"\n{args.iters} iterations of {os.path.relpath(args.config, REPO)}; s/it = Detectron2's `time` "
          "(median of each 20-iteration window)\n")  # fmt: skip
    print("| beside | OMP env | s/it per window | median | run wall time (s) |")
    print("|---|---|---|---|---|")
    for scenario, variant, times, wall in rows:
        med = statistics.median(times) if times else float("nan")
        print(f"| {scenario} | {variant} | {', '.join(f'{t:.2f}' for t in times)} | {med:.2f} | {wall:.0f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
