"""``retain_freed_memory`` (glibc malloc keeps freed memory) and ``INFERENCE_RETAIN_FREED_MEMORY``.

Each case runs in a fresh interpreter: the setting is process-wide and one way, and the page faults are
counted from a clean start."""

import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="mallopt is glibc's (Linux); elsewhere the setting is a no-op",
)

FAULTS = """
import json, resource, sys
import torch
from ddetr_d2.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
nbytes = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)
for _ in range(2):  # first uses: the heap grows to fit an aligned block of this size
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    t = torch.empty(nbytes, dtype=torch.uint8)
    t.fill_(1)  # touch every page
    del t
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pages = 5 * nbytes // resource.getpagesize()
print(json.dumps({"applied": applied, "faults": after - before, "pages": pages}))
"""


def run_python(code, *argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
    retained = run_python(FAULTS, "retain")
    if not retained["applied"]:
        pytest.skip("this C library is not glibc: no mallopt (the setting is then a no-op)")
    default = run_python(FAULTS, "default")
    assert not default["applied"]
    # 5 x 64 MiB touched: with the setting the same heap pages come back (a handful of faults at most);
    # by default each block is a fresh mapping, faulted in again (per 4 KiB page, or per 2 MiB huge page
    # where transparent huge pages are always on: 160 faults)
    assert retained["faults"] < 32, retained
    assert default["faults"] > 10 * max(retained["faults"], 1), (default, retained)


BUILD = """
import json, sys, tempfile
from model_testing import demo_model_with_random_weights, tiny_cfg
from ddetr_d2.allocator import freed_memory_retained, retain_freed_memory
cfg = tiny_cfg(INFERENCE_RETAIN_FREED_MEMORY=sys.argv[1] == "on")
cfg.MODEL.DEVICE = "cpu"
with tempfile.TemporaryDirectory() as d:
    demo_model_with_random_weights(cfg, d)
retained = freed_memory_retained()
again = retain_freed_memory()  # a second call: still in effect, nothing applied twice
print(json.dumps({"retained": retained, "again": again}))
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_build_demo_model_applies_the_setting_only_when_asked(setting):
    out = run_python(BUILD, setting)
    if not out["again"]:
        pytest.skip("this C library is not glibc: no mallopt (the setting is then a no-op)")
    assert out["retained"] == (setting == "on")
