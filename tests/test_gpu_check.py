"""tools/gpu_check.py --dry-run on a CPU machine: exit 0, one summary (json + markdown) listing every step,
the CUDA steps skipped with their reason, the CPU kernel benchmark row computed."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_summary(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--dry-run", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["build", "cuda_tests", "kernel_benchmark", "amp_training", "fp16_inference"]
    for name in ("build", "cuda_tests", "amp_training", "fp16_inference"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], steps[name]
    bench = steps["kernel_benchmark"]
    assert bench["status"] == "ok", bench
    rows = bench["result"]["rows"]
    assert rows and all(r["kernel_ms"] > 0 and r["grid_sample_ms"] > 0 for r in rows)
    assert "pending" in bench["result"]["note"]
    md = (tmp_path / "summary.md").read_text()
    assert "| fp32 / fp16 / bf16 end-to-end inference, R-50, 800x1066 | skipped |" in md
