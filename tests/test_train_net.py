"""End-to-end runs of tools/train_net.py as a subprocess on CPU (tiny model, tiny synthetic data).

Covers: the three variants (train, then --eval-only / final COCO evaluation), 2-process DDP on
CPU (gloo) with identical replicas afterwards, SIGKILL + --resume restoring iteration, optimizer
and scheduler state, SIGTERM / SIGINT saving a checkpoint and resuming from it, --eval-only refusing
weights that do not fit, user errors as one line with exit code 2.

Nothing here waits on wall-clock time: a test waits for a line the run prints or for the
checkpoint ``last_checkpoint`` names; timeouts are failure guards only.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from detectron2.modeling import build_model

from ddetr_d2.config import build_cfg
from ddetr_d2.data import make_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")

# a tiny model on 64-96 px images; 2 images per batch
TINY_OPTS = [
    "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "6",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "INPUT.CROP.SIZE", "(48, 64)",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train_json = make_synthetic_coco(str(root), "train", 6, seed=0, image_size=80)
    # images 1-3 lose their annotations: any 4 distinct training images include one without objects
    d = json.load(open(train_json))
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] > 3]
    assert d["annotations"]
    json.dump(d, open(train_json, "w"))
    make_synthetic_coco(str(root), "val", 3, seed=1, image_size=80)
    return [
        "--dataset", f"tiny_train={root}/train/annotations.json:{root}/train/images",
        "--dataset", f"tiny_val={root}/val/annotations.json:{root}/val/images",
    ]  # fmt: skip


def _cmd(data, out_dir, *extra_args, opts=()):
    return [
        sys.executable, TRAIN_NET, "--config-file", os.path.join(REPO, "configs", "tiny_test.yaml"), *data,
        *extra_args, *TINY_OPTS, "DATASETS.TRAIN", '("tiny_train",)', "OUTPUT_DIR", str(out_dir), *opts,
    ]  # fmt: skip


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd, timeout=240):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _check_ap(out_dir, dataset="tiny_val"):
    res = json.load(open(os.path.join(out_dir, "eval_results.json")))
    bbox = res[dataset]["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(bbox)
    assert all(v is None or 0.0 <= v <= 100.0 for v in bbox.values())  # null: empty size range
    return bbox


VARIANTS = {
    "plain": [],
    "box_refine": ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", "True"],
    "two_stage": ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", "True", "MODEL.DEFORMABLE_DETR.TWO_STAGE", "True"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_then_evaluate(variant, data, tmp_path):
    out = tmp_path / variant
    if variant == "plain":
        # train only, then a separate --eval-only run on the saved weights
        _run(_cmd(data, out, opts=["SOLVER.MAX_ITER", "2", *VARIANTS[variant]]))
        ckpt = torch.load(out / "model_final.pth", map_location="cpu")
        assert ckpt["iteration"] == 1 and "optimizer" in ckpt["trainer"]["_trainer"]
        assert ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2
        assert not (out / "eval_results.json").exists()
        p = _run(
            _cmd(
                data,
                out,
                "--eval-only",
                opts=["DATASETS.TEST", '("tiny_val",)', "MODEL.WEIGHTS", str(out / "model_final.pth")],
            )
        )
        assert "copypaste: AP,AP50,AP75,APs,APm,APl" in p.stdout + p.stderr
    else:
        # train, and the final evaluation happens in the same run (TEST.EVAL_PERIOD 0, DATASETS.TEST set)
        _run(
            _cmd(
                data, out, opts=["SOLVER.MAX_ITER", "2", "DATASETS.TEST", '("tiny_val",)', *VARIANTS[variant]]
            )
        )
    _check_ap(out)
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    losses = [m for m in metrics if "total_loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in losses)
    if variant == "two_stage":
        assert any("loss_ce_enc" in m for m in losses)


# Runs DeformableDetrTrainer in 2 gloo processes and lets every rank save its own replica, so the
# test compares the ranks' weights (no test-only flag in tools/train_net.py).
DDP_SCRIPT = textwrap.dedent(
    """
    import ddetr_d2  # first: sets the OpenMP wait policy before torch loads
    import os, sys
    import torch
    from detectron2.engine import default_argument_parser, default_setup
    from detectron2.utils import comm
    from ddetr_d2.config import setup_cfg
    from ddetr_d2.data import parse_dataset_spec, register_coco_folder
    from ddetr_d2.engine import DeformableDetrTrainer, launch_processes

    def main(args):
        cfg = setup_cfg(args)
        for spec in args.dataset:
            register_coco_folder(*parse_dataset_spec(spec))
        default_setup(cfg, args)
        trainer = DeformableDetrTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(cfg.OUTPUT_DIR, f"replica_rank{comm.get_rank()}.pth"))

    if __name__ == "__main__":
        parser = default_argument_parser()
        parser.add_argument("--dataset", action="append", default=[])
        args = parser.parse_args()
        launch_processes(main, args, cpu=True)
    """
)


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_replicas(data, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_replicas.py"
    script.write_text(DDP_SCRIPT)
    cmd = _cmd(data, out, "--num-gpus", "2", "--dist-url", "auto",
               opts=["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4"])  # fmt: skip
    cmd[1] = str(script)
    p = _run(cmd, timeout=300)
    assert "Rank of current process: 0. World size: 2" in p.stdout + p.stderr
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    w0 = torch.load(out / "replica_rank0.pth")
    w1 = torch.load(out / "replica_rank1.pth")
    final = torch.load(out / "model_final.pth", map_location="cpu")
    assert w0.keys() == w1.keys() and len(w0) > 10
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=f"replicas differ at {k}")
        torch.testing.assert_close(w0[k], final["model"][k], rtol=0, atol=0)
    # all 3 optimizer steps happened (the replicas are not just both untouched)
    state = final["trainer"]["_trainer"]["optimizer"]["state"]
    assert len(state) > 0 and all(int(s["step"]) == 3 for s in state.values())


class _Training:
    """A training subprocess whose output lines are read by a thread; ``wait_for(pattern)`` blocks
    until a line matches (the timeout is a failure guard, not a measurement)."""

    def __init__(self, cmd, **popen_kwargs):
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO,
            **popen_kwargs,
        )
        self.lines, self._cond = [], threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # end of output
            self._cond.notify_all()

    def wait_for(self, pattern, guard_s=240):
        def found():
            return any(line is None or re.search(pattern, line) for line in self.lines)

        with self._cond:
            assert self._cond.wait_for(found, timeout=guard_s), f"no line matching {pattern!r}"
            hit = [m for line in self.lines if line is not None for m in [re.search(pattern, line)] if m]
        assert hit, f"the run ended without a line matching {pattern!r}:\n{self.text()[-4000:]}"
        return hit[0]

    def text(self):
        return "".join(line for line in list(self.lines) if line is not None)

    def finish(self, guard_s=240):
        self.proc.wait(timeout=guard_s)
        self._reader.join(timeout=guard_s)
        return self.proc.returncode, self.text()


@pytest.mark.slow
def test_kill_and_resume(data, tmp_path):
    out = tmp_path / "resume"
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.STEPS", "(3,)", "SOLVER.GAMMA", "0.1"]
    run = _Training(_cmd(data, out, opts=[*opts, "SOLVER.MAX_ITER", "200"]))
    try:
        # saves are sequential and each is logged before it starts: once the save of iteration 5 is
        # announced, model_0000003.pth is complete and last_checkpoint names it (or a later one)
        run.wait_for(r"Saving checkpoint to \S*model_0000005\.pth")
    finally:
        run.proc.send_signal(signal.SIGKILL)
        run.finish()
    last = (out / "last_checkpoint").read_text().strip()
    saved = torch.load(out / last, map_location="cpu")  # loads: the file is complete (atomic write)
    start = saved["iteration"] + 1
    assert start >= 4
    total = start + 2
    p = _run(_cmd(data, out, "--resume", opts=[*opts, "SOLVER.MAX_ITER", str(total)]))
    assert f"Starting training from iteration {start}" in p.stdout + p.stderr
    # a temporary of a save the kill interrupted is removed by the next run
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]
    final = torch.load(out / "model_final.pth", map_location="cpu")
    assert final["iteration"] == total - 1
    # optimizer and scheduler continued from the checkpoint instead of restarting
    optim = final["trainer"]["_trainer"]["optimizer"]
    assert {int(s["step"]) for s in optim["state"].values()} == {total}
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == total
    assert max(g["lr"] for g in optim["param_groups"]) == pytest.approx(2e-4 * 0.1)  # decayed at iteration 3
    # the data sampler kept its seed and continued its stream
    assert final["data_state"]["sampler"]["seed"] == saved["data_state"]["sampler"]["seed"]
    assert f"starting at index {start * 2} of this process's stream" in p.stdout + p.stderr


@pytest.mark.slow
def test_a_time_budget_shortens_the_run_and_resume_keeps_it(data, tmp_path):
    # a 1 s budget: the run stops soon after the 100 measured iterations (any CPU needs more than the
    # 7 ms per iteration that 150 iterations in 1 s would take: the run is shortened on every machine)
    out = tmp_path / "budget"
    opts = ["SOLVER.MAX_ITER", "150", "SOLVER.STEPS", "(120,)", "SOLVER.GAMMA", "0.1",
            "SOLVER.TIME_BUDGET_SECONDS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000"]  # fmt: skip
    p = _run(_cmd(data, out, opts=opts))
    m = re.search(r"training stops after (\d+) iterations.*lr steps 120 -> (\d+)", p.stdout + p.stderr)
    assert m, (p.stdout + p.stderr)[-3000:]
    n, step = int(m.group(1)), int(m.group(2))
    assert 100 <= n < 150 and step == round(120 * n / 150)
    final = torch.load(out / "model_final.pth", map_location="cpu")
    assert final["iteration"] == n - 1
    assert final["trainer"]["hooks"]["TimeBudget"] == {"max_iter": n, "configured_max_iter": 150}
    optim = final["trainer"]["_trainer"]["optimizer"]
    assert {int(s["step"]) for s in optim["state"].values()} == {n}
    assert max(g["lr"] for g in optim["param_groups"]) == pytest.approx(2e-4 * 0.1)  # the step moved inside
    # --resume: the run is complete at its shortened length; it does not go on to SOLVER.MAX_ITER
    p = _run(_cmd(data, out, "--resume", opts=opts))
    assert f"resuming the shortened schedule ({n} of 150 iterations" in p.stdout + p.stderr
    again = torch.load(out / "model_final.pth", map_location="cpu")
    assert again["iteration"] == n - 1
    assert not list(out.glob("model_00*.pth"))


def _check_interrupted(out, code, text, signum):
    """The run stopped by ``signum``: exit 128 + signum, one last line naming the checkpoint saved at the
    current iteration, which ``last_checkpoint`` names; no traceback. Returns the checkpoint."""
    name = signal.Signals(signum).name
    assert code == 128 + signum, text[-3000:]
    m = re.search(rf"interrupted by {name} after iteration (\d+): checkpoint saved to (\S+); "
                  "continue with --resume",
                  text)  # fmt: skip
    assert m, text[-3000:]
    it, path = int(m.group(1)), m.group(2)
    assert path == str(out / f"model_{it:07d}.pth")
    assert text.strip().splitlines()[-1] == m.group(0)  # the last line says where the checkpoint is
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    assert (out / "last_checkpoint").read_text() == f"model_{it:07d}.pth"
    saved = torch.load(path, map_location="cpu")
    assert saved["iteration"] == it
    return saved


@pytest.mark.slow
def test_signals_save_a_checkpoint_and_resume_continues(data, tmp_path):
    """SIGTERM to the whole process group (SLURM / Kubernetes signal every process of the job, data-loader
    workers included: the workers must not die of it, as torch's worker handler would make them), then
    --resume and SIGINT to the main process as soon as the handler is installed: each run saves a
    checkpoint at the current iteration and exits 128 + signum; the resumed run continued the optimizer."""
    out = tmp_path / "sig"
    opts = ["SOLVER.MAX_ITER", "500", "DATALOADER.NUM_WORKERS", "1"]
    run = _Training(_cmd(data, out, opts=opts), start_new_session=True)  # its own process group
    try:
        run.wait_for(r"iter: \d+")  # training runs, so the loader worker exists
        os.killpg(run.proc.pid, signal.SIGTERM)
        code, text = run.finish()
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    it = _check_interrupted(out, code, text, signal.SIGTERM)["iteration"]

    run = _Training(_cmd(data, out, "--resume", opts=opts))
    try:
        run.wait_for(r"SIGTERM / SIGINT save a checkpoint")  # the handler is installed
        run.proc.send_signal(signal.SIGINT)
        code, text = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert f"Starting training from iteration {it + 1}" in text
    saved = _check_interrupted(out, code, text, signal.SIGINT)
    assert saved["iteration"] > it
    # the optimizer continued from the SIGTERM checkpoint (one step per iteration since iteration 0)
    optim = saved["trainer"]["_trainer"]["optimizer"]
    assert {int(s["step"]) for s in optim["state"].values()} == {saved["iteration"] + 1}


_FAILING_RUN = """
import runpy, sys
from ddetr_d2.modeling.meta_arch import DeformableDETR
forward, calls = DeformableDETR.forward, []
def failing_forward(self, *args, **kwargs):
    if self.training:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure at training call 3")
    return forward(self, *args, **kwargs)
DeformableDETR.forward = failing_forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_failing_run_exits_with_its_traceback(data, tmp_path):
    """An exception in training (injected into the model's forward) ends the process with exit 1 and the
    traceback, with a data-loader worker running. The train workers ignore SIGTERM (previous test), which
    multiprocessing's exit handler sends its daemonic children before joining them: the process used to
    hang there forever."""
    cmd = _cmd(data, tmp_path / "fail", opts=["SOLVER.MAX_ITER", "50", "DATALOADER.NUM_WORKERS", "1"])
    cmd = [sys.executable, "-c", _FAILING_RUN, *cmd[1:]]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        cmd, stdout=pipe, stderr=pipe, text=True, env=_env(), cwd=REPO, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=240)  # a failure guard: the run fails at its 3rd iteration
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the failed run did not exit (hung at exit)")
    assert proc.returncode == 1, err[-3000:]
    assert "RuntimeError: injected failure at training call 3" in err.splitlines(), err[-3000:]
    assert "Traceback" in err, err[-3000:]
    assert "killed by signal" not in err and "Exception ignored" not in err, err[-3000:]


@pytest.mark.slow
def test_eval_only_refuses_weights_that_do_not_fit(data, tmp_path):
    """Weights of another model (3 classes) into the 6-class config: exit 2, the keys named, no
    eval_results.json; with --allow-mismatch the evaluation runs."""
    cfg = build_cfg(
        os.path.join(REPO, "configs", "tiny_test.yaml"), ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"]
    )
    weights = tmp_path / "three_classes.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    out = tmp_path / "eval"
    opts = ["DATASETS.TEST", '("tiny_val",)', "MODEL.WEIGHTS", str(weights)]
    p = subprocess.run(_cmd(data, out, "--eval-only", opts=opts), capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=240)  # fmt: skip
    assert p.returncode == 2, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr
    assert str(weights) in err[0] and "shape mismatch" in err[0] and "class_embed.0.weight" in err[0]
    assert "(3, 64) vs (6, 64)" in err[0] and "--allow-mismatch" in err[0]
    assert not (out / "eval_results.json").exists()
    p = _run(_cmd(data, out, "--eval-only", "--allow-mismatch", opts=opts))
    assert "class_embed.0.weight" in p.stdout + p.stderr
    _check_ap(out)


@pytest.mark.slow
def test_bad_dataset_stops_before_the_model_is_built(tmp_path):
    """A dataset with a negative-width box and a missing image: exit 2, one line per problem, no
    traceback, no model built."""
    root = tmp_path / "bad"
    j = make_synthetic_coco(str(root), "train", 3, seed=0, image_size=64)
    d = json.load(open(j))
    d["annotations"][0]["bbox"] = [47, 13, -20, 42]
    os.remove(root / "train" / "images" / d["images"][1]["file_name"])
    json.dump(d, open(j, "w"))
    data = ["--dataset", f"bad_train={j}:{root}/train/images"]
    cmd = _cmd(data, tmp_path / "out", opts=["SOLVER.MAX_ITER", "2"])
    cmd[cmd.index('("tiny_train",)')] = '("bad_train",)'
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Model:" not in p.stdout + p.stderr
    err = p.stderr[p.stderr.index("error: dataset bad_train: 2 problem(s)") :].strip().splitlines()
    aid = d["annotations"][0]["id"]
    assert re.fullmatch(rf"{re.escape(j)}: image id={d['images'][1]['id']}: missing image: .*", err[1])
    assert re.fullmatch(
        rf"{re.escape(j)}: annotation id={aid} .*: invalid box: bbox=\[47, 13, -20, 42\].*", err[2]
    )
    assert err[3] == "counts: invalid box 1, missing image 1"
    assert "DATASETS.INVALID_BOXES drop" in err[4]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.AMP.ENABLED", "True"], "error: SOLVER.AMP.ENABLED=True needs a CUDA device"),
        (["SOLVER.TIME_BUDGET_SECONDS", "-5"], "error: SOLVER.TIME_BUDGET_SECONDS must be >= 0"),
        (["MODEL.DEFORMABLE_DETR.NHEADS", "5"], "error: MODEL.DEFORMABLE_DETR.NHEADS (5) must divide"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "error: SOLVER.CHECKPOINT_PERIOD must be an integer >= 1"),
        (["MODEL.WEIGHTS", "{tmp}/missing.pth"], "error: MODEL.WEIGHTS {tmp}/missing.pth not found"),
        (["OUTPUT_DIR", "{tmp}/a_file"], "error: OUTPUT_DIR {tmp}/a_file is a file"),
        (["OUTPUT_DIR", "{tmp}/a_file/out"], "error: OUTPUT_DIR {tmp}/a_file/out cannot be created"),
    ],
)
def test_user_errors_are_one_line(opts, message, data, tmp_path):
    """A config error (AMP on CPU, a negative time budget, heads that do not divide the width, missing
    weights, an OUTPUT_DIR that cannot be a folder): exit 2 and one error line, no traceback."""
    (tmp_path / "a_file").write_text("not a folder")
    opts = [o.format(tmp=tmp_path) for o in opts]
    message = message.format(tmp=tmp_path)
    cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(REPO, "configs", "tiny_test.yaml"), *data,
           "DATASETS.TRAIN", '("tiny_train",)', "OUTPUT_DIR", str(tmp_path), *opts]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), errors
