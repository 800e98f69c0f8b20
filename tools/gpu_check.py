#!/usr/bin/env python
"""
GPU check in one call (``make gpu-check``): on a machine with a CUDA GPU,

  1. build ``ddetr_d2._C`` with the CUDA kernel for this GPU (``TORCH_CUDA_ARCH_LIST`` = its capability);
  2. run the CUDA tests (``pytest -m cuda``: kernel vs float64 reference, fp16/bf16, gradients, determinism);
  3. benchmark the deformable-attention kernel vs the ``grid_sample`` reference, fp32, fp16 and bf16
     (encoder and decoder shapes of an 800x1066 image, forward and forward+backward);
  4. train ``configs/ddetr_r50.yaml`` for 50 iterations with AMP on the synthetic shapes data,
     ``--num-gpus 1``, random weights;
  5. time fp32, fp16 and bf16 (autocast) end-to-end inference of the R-50 model at 800x1066
     (median of 10 after 3 warm-ups);

and write one summary, ``summary.json`` + ``summary.md``, into ``--output``. Every step reports ``ok``,
``failed`` (with the tail of its log) or ``skipped`` (with the reason: no CUDA device, ``--dry-run``, ...).
Budget: under 8 minutes on one H100 (the build is most of it).

Without a GPU the CUDA steps are reported as skipped (the CUDA tests are still collected, the kernel
benchmark runs one CPU repeat). ``--dry-run`` is the cheap form of that run (no test collection either);
tests/test_gpu_check.py runs it.

Usage: python tools/gpu_check.py [--output output/gpu_check] [--dry-run] [--skip-build]
"""

# first: sets the OpenMP wait policy before torch loads
import ddetr_d2  # noqa: F401, I001
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]  # an 800x1066 image after a ResNet


class Skip(Exception):
    """A step that cannot run here; the message is the reason."""


def run_cmd(cmd, log_path, timeout, env=None):
    """Run ``cmd`` in the repository, logging to ``log_path``; RuntimeError with the log tail on failure."""
    start = time.time()
    with open(log_path, "w") as log:
        res = subprocess.run(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=dict(os.environ, **(env or {})),
        )
    with open(log_path) as f:
        text = f.read()
    if res.returncode != 0:
        raise RuntimeError(f"exit code {res.returncode} after {time.time() - start:.0f} s:\n" + text[-2500:])
    return text


def need_cuda(args):
    if args.dry_run:
        raise Skip("--dry-run")
    if not torch.cuda.is_available():
        raise Skip("no CUDA device: torch.cuda.is_available() is False")


# ------------------------------------------------------------------------------------------------ steps
def step_build(args):
    need_cuda(args)
    if args.skip_build:
        raise Skip("--skip-build")
    major, minor = torch.cuda.get_device_capability()
    env = {
        "FORCE_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
        "DDETR_REQUIRE_EXTENSION": "1",
        "MAX_JOBS": str(os.cpu_count() or 4),
    }
    run_cmd(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        os.path.join(args.output, "build.log"),
        600,
        env,
    )
    out = subprocess.run(
        [sys.executable, "-c", "import ddetr_d2._C as c; print(c.has_cuda())"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out.stdout.strip() != "True":
        raise RuntimeError(f"built ddetr_d2._C has no CUDA kernel: {out.stdout} {out.stderr[-1000:]}")
    check_error_path()
    return {"arch": f"sm_{major}{minor}", "device": torch.cuda.get_device_name()}


ERROR_PATH_PROBE = """
import torch, ddetr_d2._C as c
v = torch.zeros(1, 4, 1, 4, device="cuda")
shapes = torch.tensor([[2, 2]], device="cuda")
start = torch.zeros(1, dtype=torch.long, device="cuda")
loc, attn = torch.zeros(1, 1, 1, 1, 1, 2, device="cuda"), torch.ones(1, 1, 1, 1, 1, device="cuda")
try:
    c.ms_deform_attn_backward(v, shapes, start, loc, attn, torch.zeros(1, 2, 7, device="cuda"), 64)
except RuntimeError as e:
    print("raised", "grad_output" in str(e))
"""


def check_error_path():
    """The built kernel must raise a readable RuntimeError on bad input. Seen on one GPU image: its
    compiler wrapper (``CC``/``CXX`` = /opt/gcc/...) linked libstdc++ statically into the extension,
    and every error message with a number in it crashed the process (SIGSEGV in ``ostream``)."""
    res = subprocess.run(
        [sys.executable, "-c", ERROR_PATH_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    if res.returncode != 0 or res.stdout.strip() != "raised True":
        raise RuntimeError(
            f"ddetr_d2._C crashed or did not raise on a bad input (exit code {res.returncode}, "
            f"output {res.stdout.strip()!r}). If `nm -DC ddetr_d2/_C*.so | grep ' T std::'` lists symbols, "
            "the compiler linked libstdc++ statically: rebuild with the system compiler, e.g. "
            "CC=/usr/bin/gcc CXX=/usr/bin/g++ (docs/cuda.md, 'GPU check').\n" + res.stderr[-1500:]
        )


def cuda_test_files():
    """The test files that hold ``@pytest.mark.cuda`` tests (only those are collected: faster, and the
    rest of the suite's imports, e.g. onnxruntime or Hugging Face, need not exist on a GPU machine)."""
    files = []
    for folder in ("tests", os.path.join("video", "tests")):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            path = os.path.join(folder, name)
            if name.startswith("test_") and name.endswith(".py"):
                with open(os.path.join(REPO, path)) as f:
                    if "mark.cuda" in f.read():
                        files.append(path)
    return files


def need_detectron2():
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise Skip(f"detectron2 is not importable ({e}): the detector steps need it") from None


def step_cuda_tests(args):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
    ] + cuda_test_files()
    if args.dry_run:
        raise Skip("--dry-run")
    if not torch.cuda.is_available():
        # collection only: the CUDA tests exist and import; they are skipped without a device
        text = run_cmd(cmd + ["--collect-only"], os.path.join(args.output, "cuda_tests.log"), 300)
        count = sum(1 for line in text.splitlines() if "::" in line)
        raise Skip(f"no CUDA device: torch.cuda.is_available() is False ({count} CUDA tests collected)")
    text = run_cmd(cmd, os.path.join(args.output, "cuda_tests.log"), 300)
    return {"result": text.strip().splitlines()[-1]}


def _msda_inputs(kind, dtype, device):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(SPATIAL_SHAPES, device=device)
    start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    Q = S if kind == "encoder" else 300
    value = torch.randn(1, S, 8, 32, generator=g)
    loc = torch.rand(1, Q, 8, 4, 4, 2, generator=g) * 1.1 - 0.05
    attn = torch.rand(1, Q, 8, 4, 4, generator=g).softmax(-1)
    return (
        [t.to(device=device, dtype=dtype) for t in (value,)]
        + [shapes, start]
        + [t.to(device=device, dtype=dtype) for t in (loc, attn)]
    )


def _time(fn, repeats, cuda):
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_kernel_benchmark(args):
    from ddetr_d2.ops import ms_deform_attn, ms_deform_attn_pytorch

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if cuda else (torch.float32,)
    kinds = ("encoder", "decoder") if cuda else ("decoder",)
    repeats = 20 if cuda else 1
    rows = []
    for dtype in dtypes:
        for kind in kinds:
            inputs = _msda_inputs(kind, dtype, device)
            for backward in (False, True):

                def make(fn, inputs=inputs, backward=backward):
                    def call():
                        leaves = [
                            t.detach().requires_grad_(backward) if t.is_floating_point() else t
                            for t in inputs
                        ]
                        out = fn(*leaves)
                        if backward:
                            out.sum().backward()

                    return call

                t_k = _time(make(ms_deform_attn), repeats, cuda)
                t_p = _time(make(ms_deform_attn_pytorch), max(1, repeats // 2), cuda)
                rows.append(
                    {
                        "dtype": str(dtype).replace("torch.", ""),
                        "case": kind,
                        "pass": "fwd+bwd" if backward else "fwd",
                        "kernel_ms": t_k * 1e3,
                        "grid_sample_ms": t_p * 1e3,
                        "speedup": t_p / t_k,
                    }
                )
    result = {"device": device, "rows": rows}
    if not cuda:
        result["note"] = (
            "CPU only ("
            + ("--dry-run" if args.dry_run else "no CUDA device")
            + "): decoder shape, fp32, one repeat; the CUDA figures are pending"
        )
    return result


def step_amp_training(args):
    need_cuda(args)
    need_detectron2()
    out_dir = os.path.join(args.output, "amp_train")
    opts = [
        "DATASETS.TRAIN",
        "('synthetic_shapes_train',)",
        "DATASETS.TEST",
        "()",
        "MODEL.WEIGHTS",
        "",
        "MODEL.DEFORMABLE_DETR.NUM_CLASSES",
        "6",
        "SOLVER.MAX_ITER",
        "50",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.AMP.ENABLED",
        "True",
        "SOLVER.CHECKPOINT_PERIOD",
        "1000000",
        "TEST.EVAL_PERIOD",
        "0",
        "SOLVER.WARMUP_ITERS",
        "0",
        "SOLVER.STEPS",
        "()",
        "DATALOADER.NUM_WORKERS",
        "4",
        "OUTPUT_DIR",
        out_dir,
    ]
    start = time.time()
    run_cmd(
        [sys.executable, "tools/train_net.py", "--config-file", "configs/ddetr_r50.yaml", "--num-gpus", "1"]
        + opts,
        os.path.join(args.output, "amp_train.log"),
        420,
    )
    metrics = os.path.join(out_dir, "metrics.json")
    last = {}
    if os.path.isfile(metrics):
        with open(metrics) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        last = next((m for m in reversed(lines) if "total_loss" in m), {})
    return {
        "seconds": time.time() - start,
        "iterations": 50,
        "last_total_loss": last.get("total_loss"),
        "last_time_per_iter_s": last.get("time"),
    }


def step_fp16_inference(args):
    need_cuda(args)
    need_detectron2()
    from detectron2.modeling import build_model

    from ddetr_d2.config import build_cfg

    cfg = build_cfg(
        os.path.join(REPO, "configs", "ddetr_r50.yaml"), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cuda"]
    )
    model = build_model(cfg).eval()
    image = torch.rand(3, 800, 1066, device="cuda") * 255
    results = {}
    for name, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):

        def call(dtype=dtype):
            with (
                torch.no_grad(),
                torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                model([{"image": image}])

        for _ in range(2):
            call()
        results[f"{name}_ms"] = _time(call, 10, True) * 1e3
    results["size"] = "800x1066"
    results["device"] = torch.cuda.get_device_name()
    return results


STEPS = [
    ("build", "build ddetr_d2._C for this GPU", step_build),
    ("cuda_tests", "CUDA tests (pytest -m cuda)", step_cuda_tests),
    ("kernel_benchmark", "MSDA kernel vs grid_sample, fp32 + fp16 + bf16", step_kernel_benchmark),
    (
        "amp_training",
        "50-iteration AMP training, configs/ddetr_r50.yaml, synthetic data, 1 GPU",
        step_amp_training,
    ),
    ("fp16_inference", "fp32 / fp16 / bf16 end-to-end inference, R-50, 800x1066", step_fp16_inference),
]


def write_summary(summary, output):
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [
        "# GPU check",
        "",
        f"- {summary['machine']}",
        f"- started {summary['started']}, took {summary['seconds']:.0f} s",
        "",
        "| step | status | seconds | details |",
        "|---|---|---|---|",
    ]
    for s in summary["steps"]:
        details = s.get("reason") or s.get("error", "").splitlines()[0:1] or ""
        if isinstance(details, list):
            details = details[0] if details else ""
        if s["status"] == "ok":
            details = json.dumps({k: v for k, v in s["result"].items() if k != "rows"})[:300]
        lines.append(f"| {s['title']} | {s['status']} | {s['seconds']:.1f} | {details} |")
    bench = next(
        (s for s in summary["steps"] if s["name"] == "kernel_benchmark" and s["status"] == "ok"), None
    )
    if bench:
        lines += [
            "",
            f"Kernel benchmark ({bench['result']['device']}):",
            "",
            "| dtype | case | pass | kernel ms | grid_sample ms | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for r in bench["result"]["rows"]:
            lines.append(
                f"| {r['dtype']} | {r['case']} | {r['pass']} | {r['kernel_ms']:.2f} | "
                f"{r['grid_sample_ms']:.2f} | {r['speedup']:.1f}x |"
            )
    with open(os.path.join(output, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=os.path.join(REPO, "output", "gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="cheap CPU run: CUDA and heavy steps skipped")
    parser.add_argument("--skip-build", action="store_true", help="use the ddetr_d2._C already built")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    start = time.time()
    cuda = torch.cuda.is_available()
    summary = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        + (f"GPU {torch.cuda.get_device_name()}" if cuda else "no CUDA device"),
        "dry_run": args.dry_run,
        "steps": [],
    }
    failed = False
    for name, title, fn in STEPS:
        t0 = time.time()
        entry = {"name": name, "title": title}
        try:
            entry.update(status="ok", result=fn(args))
        except Skip as e:
            entry.update(status="skipped", reason=str(e))
        except Exception as e:  # a failed step is reported; the others still run
            failed = True
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
        entry["seconds"] = time.time() - t0
        print(
            f"[{entry['status']:>7}] {title} ({entry['seconds']:.1f} s)"
            + (f": {entry.get('reason') or entry.get('error', '')[:300]}" if entry["status"] != "ok" else ""),
            flush=True,
        )
        summary["steps"].append(entry)
        summary["seconds"] = time.time() - start
        write_summary(summary, args.output)  # after every step: a run stopped early keeps what it measured
    print(f"summary: {os.path.join(args.output, 'summary.md')} and summary.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
