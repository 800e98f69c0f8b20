#!/usr/bin/env python
"""Kill -9 a small training run at random moments, resume it each time, and check the continuation.

    python tools/kill_resume_soak.py --kills 10 --max-iter 30 --seed 0

On a tiny config (configs/tiny_test.yaml with a slim ResNet-18, 64-96 px synthetic images,
SOLVER.CHECKPOINT_PERIOD 1 so that many kills land during a save), it

1. trains an uninterrupted reference run to SOLVER.MAX_ITER;
2. starts the same run, SIGKILLs it at a random moment (half of the kills right after a
   "Saving checkpoint" log line, i.e. during the write; half at a random time), restarts it with
   ``--resume``, ``--kills`` times, then lets it finish;
3. checks for each resume: it starts at ``last_checkpoint``'s iteration + 1, the train sampler keeps
   the first run's seed and starts at ``iteration * batch`` of its stream, stale temporaries of the
   killed process are gone; and at the end: the optimizer made exactly MAX_ITER steps, the scheduler
   stepped MAX_ITER times, and the final weights equal the reference run's bit for bit (which needs
   the optimizer, scheduler, data order and random state to have continued exactly);
4. prints a summary (and exits 1 if any check failed).
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from ddetr_d2.data import make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 2
OPTS = [
    "MODEL.BACKBONE.NAME", "build_slim_resnet_backbone",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "6",
    "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.CROP.SIZE", "(48, 64)",
    "SOLVER.IMS_PER_BATCH", str(BATCH), "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1",
    "DATALOADER.NUM_WORKERS", "0", "DATALOADER.ASPECT_RATIO_GROUPING", "False", "SEED", "7",
    "MODEL.DEFORMABLE_DETR.DROPOUT", "0.1",
]  # fmt: skip


def _cmd(data_root, out_dir, max_iter, resume):
    return [
        sys.executable, os.path.join(REPO, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO, "configs", "tiny_test.yaml"),
        *(["--resume"] if resume else []),
        "--dataset", f"soak_train={data_root}/train/annotations.json:{data_root}/train/images",
        *OPTS, "DATASETS.TRAIN", '("soak_train",)', "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", f"({max_iter // 2},)", "OUTPUT_DIR", out_dir,
    ]  # fmt: skip


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Run:
    """A training subprocess whose output lines are collected by a reader thread."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO
        )
        self.lines = []
        self.saving = threading.Event()
        self.training = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Starting training from iteration" in line:
                self.training.set()
            if "Saving checkpoint to" in line and self.training.is_set():
                self.saving.set()

    def text(self):
        self.thread.join(timeout=30)
        return "".join(self.lines)


def _last_checkpoint(out_dir):
    """(file name, loaded checkpoint), or (None, None) before the first complete save."""
    path = os.path.join(out_dir, "last_checkpoint")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        name = f.read().strip()
    return name, torch.load(os.path.join(out_dir, name), map_location="cpu")


def _strays(out_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*.tmp*")))


def _prune(out_dir, keep):
    """Delete checkpoints other than ``keep`` (disk space: one per iteration is written)."""
    for p in glob.glob(os.path.join(out_dir, "model_*.pth")):
        if os.path.basename(p) != keep:
            os.remove(p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="keep files here (default: a temporary folder)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="kill_resume_soak-")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    if not os.path.isfile(os.path.join(data, "train", "annotations.json")):
        make_synthetic_coco(data, "train", 8, seed=0, image_size=80)
    ref_dir, out = os.path.join(work, "reference"), os.path.join(work, "soak")
    shutil.rmtree(ref_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)

    t0 = time.time()
    ref = subprocess.run(
        _cmd(data, ref_dir, args.max_iter, False), capture_output=True, text=True, env=_env()
    )
    if ref.returncode != 0:
        sys.exit(f"reference run failed:\n{ref.stdout[-3000:]}\n{ref.stderr[-3000:]}")
    reference = torch.load(os.path.join(ref_dir, "model_final.pth"), map_location="cpu")["model"]
    _prune(ref_dir, "model_final.pth")

    results, seed0, during_save, finished_early = [], None, 0, 0
    for k in range(args.kills + 1):
        resume = k > 0
        expect = None
        if resume:
            name, ckpt = _last_checkpoint(out)
            expect = 0 if ckpt is None else ckpt["iteration"] + 1
            if seed0 is None and ckpt is not None:
                seed0 = ckpt["data_state"]["sampler"]["seed"]
            _prune(out, name)
        strays_before = _strays(out)
        run = Run(_cmd(data, out, args.max_iter, resume))
        if k < args.kills:
            if not run.training.wait(timeout=300):
                run.proc.kill()
                sys.exit("training did not start:\n" + run.text()[-3000:])
            if k % 2 == 0:  # during a save
                run.saving.clear()
                run.saving.wait(timeout=60)
                time.sleep(rng.uniform(0.0, 0.05))
            else:  # any moment
                time.sleep(rng.uniform(0.0, 3.0))
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGKILL)
            else:
                finished_early += 1
            run.proc.wait()
            during_save += bool(_strays(out))
        else:
            run.proc.wait(timeout=600)
        text = run.text()
        if not resume:
            continue
        m = re.search(r"Train sampler: seed (\d+), starting at index (\d+)", text)
        started = re.search(r"Starting training from iteration (\d+)", text)
        checks = {
            "iteration": bool(started) and int(started.group(1)) == expect,
            "sampler seed": bool(m) and (seed0 is None or int(m.group(1)) == seed0),
            "sampler position": bool(m) and int(m.group(2)) == expect * BATCH,
            "stale temporaries removed": all(f"Removed stale temporary {os.path.join(out, s)}" in text
                                             for s in strays_before),
        }  # fmt: skip
        results.append((k, expect, strays_before, checks))
        if k == args.kills and run.proc.returncode != 0:
            sys.exit(f"final run failed:\n{text[-3000:]}")

    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")
    optim = final["trainer"]["_trainer"]["optimizer"]
    end_checks = {
        "optimizer steps == MAX_ITER": {int(s["step"]) for s in optim["state"].values()} == {args.max_iter},
        "scheduler steps == MAX_ITER": final["trainer"]["hooks"]["LRScheduler"]["last_epoch"]
        == args.max_iter,
        "final weights == uninterrupted run (bit for bit)": all(
            torch.equal(final["model"][key], v) for key, v in reference.items()
        ),
    }
    strays_end = _strays(out)

    print(f"\nkill/resume soak: {args.kills} kills (-9), MAX_ITER {args.max_iter}, CHECKPOINT_PERIOD 1, "
          f"seed {args.seed}, {time.time() - t0:.0f} s")  # fmt: skip
    print("| resume | from iteration | stray temporaries before | " + " | ".join(results[0][3]) + " |")
    print("|---|---|---|" + "---|" * len(results[0][3]))
    for k, expect, strays, checks in results:
        cells = " | ".join("ok" if v else "FAIL" for v in checks.values())
        print(f"| {k} | {expect} | {len(strays)} | {cells} |")
    ok = sum(all(c.values()) for *_, c in results)
    print(f"\nresumes with every check ok: {ok}/{len(results)}")
    print(f"kills that left a temporary (killed during a save): {during_save}/{args.kills}")
    if finished_early:
        print(f"runs that ended before their kill: {finished_early}")
    for name, v in end_checks.items():
        print(f"{name}: {'ok' if v else 'FAIL'}")
    print(f"stray files at the end: {len(strays_end)} {strays_end if strays_end else ''}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    good = ok == len(results) and all(end_checks.values()) and not strays_end
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
