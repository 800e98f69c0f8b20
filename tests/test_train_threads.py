"""`import ddetr_d2` sets OMP_WAIT_POLICY=PASSIVE (unless set) before torch loads; scripts import it first."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, stop_at, **env_changes):
    """Run ``code`` in a fresh interpreter (without OMP_WAIT_POLICY unless given) that prints the
    policy and exits as soon as module ``stop_at`` is first imported (keeps the test fast)."""
    spy = (
        "import builtins, os, sys\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        f"    if name == {stop_at!r} and name not in sys.modules:\n"
        f"        print('policy at {stop_at} import:', os.environ.get('OMP_WAIT_POLICY'), flush=True)\n"
        "        sys.stderr.flush()\n"
        "        os._exit(0)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_changes)
    p = subprocess.run(
        [sys.executable, "-c", spy + code], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_policy_is_set_before_torch_and_a_user_choice_wins():
    # ddetr_d2's first statement runs before it imports torch (libgomp reads the variable once, at load)
    assert "policy at torch import: PASSIVE" in _python("import ddetr_d2", "torch").stdout
    assert (
        "policy at torch import: ACTIVE"
        in _python("import ddetr_d2", "torch", OMP_WAIT_POLICY="ACTIVE").stdout
    )


def test_torch_imported_first_gives_a_debug_note_only():
    code = "import logging; logging.basicConfig(level=logging.DEBUG); import torch; import ddetr_d2"
    err = _python(code, "detectron2").stderr
    assert err.count("torch was imported before ddetr_d2") == 1 and "DEBUG" in err
    assert "torch was imported" not in _python("import torch; import ddetr_d2", "detectron2").stderr


ENTRY_POINTS = [
    "tools/train_net.py", "video/train_net.py", "tools/convert_weights.py", "tools/make_synthetic_coco.py",
    "tools/make_synthetic_mot.py", "tools/plot_metrics.py", "tools/kill_resume_soak.py",
    "tools/benchmark_threads.py",
]  # fmt: skip


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_point_imports_ddetr_d2_first(script):
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    first = imports[0]
    assert isinstance(first, ast.Import) and first.names[0].name == "ddetr_d2", script
