"""End-to-end runs of tools/train_net.py as a subprocess on CPU (tiny model, tiny synthetic data).

Covers: the three variants (train, then --eval-only / final COCO evaluation), 2-process DDP on
CPU (gloo) with identical replicas afterwards, SIGKILL + --resume restoring iteration, optimizer
and scheduler state, atomic checkpoint writes and a clear error for a truncated checkpoint.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

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


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_replicas(data, tmp_path):
    out = tmp_path / "ddp"
    dump = tmp_path / "ranks"
    p = _run(
        _cmd(
            data,
            out,
            "--num-gpus",
            "2",
            "--dist-url",
            "auto",
            "--dump-rank-weights",
            str(dump),
            opts=["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4"],
        ),
        timeout=300,
    )
    assert "Rank of current process: 0. World size: 2" in p.stdout + p.stderr
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    w0 = torch.load(dump / "rank0.pth")
    w1 = torch.load(dump / "rank1.pth")
    final = torch.load(out / "model_final.pth", map_location="cpu")["model"]
    assert w0.keys() == w1.keys() and len(w0) > 10
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=f"replicas differ at {k}")
        torch.testing.assert_close(w0[k], final[k], rtol=0, atol=0)
    # all 3 optimizer steps happened (the replicas are not just both untouched)
    state = torch.load(out / "model_final.pth", map_location="cpu")["trainer"]["_trainer"]["optimizer"][
        "state"
    ]
    assert len(state) > 0 and all(int(s["step"]) == 3 for s in state.values())


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net_under_test", TRAIN_NET)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_kill_and_resume(data, tmp_path):
    out = tmp_path / "resume"
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.STEPS", "(3,)", "SOLVER.GAMMA", "0.1"]
    proc = subprocess.Popen(
        _cmd(data, out, opts=[*opts, "SOLVER.MAX_ITER", "200"]),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 200
        while not (out / "model_0000003.pth").exists():
            assert proc.poll() is None, "training exited before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = (out / "last_checkpoint").read_text().strip()
    saved = torch.load(out / last, map_location="cpu")  # loads: the file is complete (atomic write)
    start = saved["iteration"] + 1
    assert start >= 4 and not any(
        f.name.endswith(tuple(f".tmp{i}" for i in range(10))) for f in out.iterdir()
    )
    total = start + 2
    p = _run(_cmd(data, out, "--resume", opts=[*opts, "SOLVER.MAX_ITER", str(total)]))
    assert f"Starting training from iteration {start}" in p.stdout + p.stderr
    final = torch.load(out / "model_final.pth", map_location="cpu")
    assert final["iteration"] == total - 1
    # optimizer and scheduler continued from the checkpoint instead of restarting
    optim = final["trainer"]["_trainer"]["optimizer"]
    assert {int(s["step"]) for s in optim["state"].values()} == {total}
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == total
    assert max(g["lr"] for g in optim["param_groups"]) == pytest.approx(2e-4 * 0.1)  # decayed at iteration 3


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    tn = _load_train_net()
    model = torch.nn.Linear(3, 2)
    ck = tn.AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_0000001")
    good = tmp_path / "model_0000001.pth"
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    raw = good.read_bytes()
    bad = tmp_path / "model_truncated.pth"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(tn.CheckpointError, match=r"model_truncated\.pth.*truncated or corrupt"):
        tn.AtomicDetectionCheckpointer(torch.nn.Linear(3, 2)).load(str(bad))
    # resume path: last_checkpoint pointing to a truncated file names that file
    (tmp_path / "last_checkpoint").write_text("model_truncated.pth")
    with pytest.raises(tn.CheckpointError, match="model_truncated.pth"):
        tn.AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path)).resume_or_load(
            "", resume=True
        )


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    tn = _load_train_net()
    model = torch.nn.Linear(3, 2)
    ck = tn.AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)

    def dying_save(obj, f):  # simulates a crash half way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tn.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_amp_on_cpu_is_rejected_clearly(tmp_path):
    tn = _load_train_net()
    args = tn.build_parser().parse_args(
        [
            "--config-file",
            os.path.join(REPO, "configs", "tiny_test.yaml"),
            "SOLVER.AMP.ENABLED",
            "True",
            "OUTPUT_DIR",
            str(tmp_path),
        ]
    )
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED=True needs a CUDA device"):
        tn.setup(args)
