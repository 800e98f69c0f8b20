"""`import ddetr_d2` chooses the OpenMP wait policy (auto: PASSIVE on a busy CPU, a short spin on an idle
one; a user's choice wins) before torch loads; scripts import it first."""

import ast
import json
import os
import subprocess
import sys

import pytest

from ddetr_d2 import _threads as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICE_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DDETR_THREAD_POLICY")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def short_spin():
    return {"GOMP_SPINCOUNT": str(T.SHORT_SPINCOUNT)}


def never_probe():
    raise AssertionError("the probe must not run")


def decide(env, busy=None, probe=None):
    return T.decide_thread_policy(env, probe or (lambda: busy), cores=2)


# --- the decision, with injected readings ---


def test_idle_cpu_gives_a_short_spin_and_a_busy_one_passive():
    idle = decide({}, busy=T.BUSY_CORES_THRESHOLD / 2)
    assert (idle.mode, idle.origin, idle.env) == ("short-spin", "probe", short_spin())
    for busy in (T.BUSY_CORES_THRESHOLD, 1.7):
        p = decide({}, busy=busy)
        assert (p.mode, p.origin, p.env, p.busy_cores) == ("passive", "probe", PASSIVE, busy)


def test_no_proc_gives_passive():
    p = decide({}, busy=None)
    assert (p.mode, p.origin, p.env) == ("passive", "no-proc", PASSIVE)


@pytest.mark.parametrize(
    "given", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": ""}, {"GOMP_SPINCOUNT": "300"}, PASSIVE]
)
def test_a_user_setting_wins_without_a_probe(given):
    env = dict(given, PATH="/bin")
    p = decide(env, probe=never_probe)
    assert (p.mode, p.origin, p.env) == ("user", "user", given)
    assert T.apply_thread_policy(env, probe=never_probe) == p and env == dict(given, PATH="/bin")


@pytest.mark.parametrize("mode", ["passive", "short-spin", "Short-Spin "])
def test_forced_choice_without_a_probe(mode):
    env = {"DDETR_THREAD_POLICY": mode}
    p = T.apply_thread_policy(env, probe=never_probe)
    want = PASSIVE if mode == "passive" else short_spin()
    assert (p.mode, p.origin, p.env) == (mode.strip().lower(), "forced", want)
    assert env == dict(want, DDETR_THREAD_POLICY=mode)
    assert decide(env, probe=never_probe) == p  # a child process sees the same forced choice


@pytest.mark.parametrize("busy", [0.0, 1.5])
def test_child_inherits_the_parents_auto_choice(busy):
    parent = {"PATH": "/bin"}
    p = T.apply_thread_policy(parent, probe=lambda: busy)
    assert parent["DDETR_THREAD_POLICY"] == f"auto:{p.mode}" and p.origin == "probe"
    child = T.apply_thread_policy(dict(parent), probe=never_probe)
    assert (child.mode, child.origin, child.env) == (p.mode, "inherited", p.env)  # not 'user'


def test_auto_request_and_stripped_inherited_choice_probe_again():
    assert decide({"DDETR_THREAD_POLICY": "auto"}, busy=2.0).origin == "probe"
    # the OpenMP variable was removed (e.g. by a benchmark's clean environment): decide afresh
    assert decide({"DDETR_THREAD_POLICY": "auto:passive"}, busy=0.0).mode == "short-spin"
    # a user's OpenMP setting that differs from the inherited choice is the user's
    assert decide({"DDETR_THREAD_POLICY": "auto:passive", "OMP_WAIT_POLICY": "ACTIVE"}).mode == "user"


def test_unknown_request_warns_and_probes(caplog):
    env = {"DDETR_THREAD_POLICY": "fast"}
    assert T.apply_thread_policy(env, probe=lambda: 0.0).mode == "short-spin"
    assert "DDETR_THREAD_POLICY='fast'" in caplog.text


def test_busy_cores_are_other_processes_time_over_the_window():
    # readings: (non-idle jiffies of the CPUs, own utime+stime jiffies)
    hz = os.sysconf("SC_CLK_TCK")
    readings = iter([(1000, 50), (1000 + hz, 50 + hz // 4)])  # 1 core-second busy, 1/4 of it ours
    clock = iter([10.0, 12.0])
    busy = T.measure_busy_cores(lambda: next(readings), sleep=lambda s: None, clock=lambda: next(clock))
    assert busy == pytest.approx((hz - hz // 4) / hz / 2.0)
    assert T.measure_busy_cores(lambda: None, sleep=never_probe) is None


def test_proc_readings_parse_on_linux():
    r = T.read_cpu_times()
    if r is None:
        pytest.skip("no /proc here")
    assert r[0] >= r[1] >= 0
    per_cpu = T.read_cpu_times(T.usable_cores()[:1])
    assert per_cpu is not None and per_cpu[0] <= T.read_cpu_times()[0]


def test_policy_line_names_mode_and_origin():
    line = T.policy_line(decide({}, busy=0.1))
    assert "short-spin" in line and "GOMP_SPINCOUNT" in line and "0.10 cores busy elsewhere" in line
    assert "user" in T.policy_line(decide({"OMP_WAIT_POLICY": "ACTIVE"}))


# --- in fresh interpreters ---


def _python(code, stop_at, **env_changes):
    """Run ``code`` in a fresh interpreter (without the OpenMP / policy variables unless given) that
    prints them and exits as soon as module ``stop_at`` is first imported (keeps the test fast)."""
    spy = (
        "import builtins, os, sys\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        f"    if name == {stop_at!r} and name not in sys.modules:\n"
        f"        seen = [os.environ.get(v) for v in {CHOICE_VARS!r}]\n"
        f"        print('policy at {stop_at} import:', *seen, flush=True)\n"
        "        sys.stderr.flush()\n"
        "        os._exit(0)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in CHOICE_VARS}
    env.update(env_changes)
    p = subprocess.run(
        [sys.executable, "-c", spy + code], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_policy_is_set_before_torch_and_a_user_choice_wins():
    # ddetr_d2's first statement runs before it imports torch (libgomp reads the variables once, at load)
    out = _python("import ddetr_d2", "torch").stdout
    assert out.strip() in (
        "policy at torch import: PASSIVE None auto:passive",
        f"policy at torch import: None {T.SHORT_SPINCOUNT} auto:short-spin",
    ), out
    assert (
        "policy at torch import: ACTIVE None None"
        in _python("import ddetr_d2", "torch", OMP_WAIT_POLICY="ACTIVE").stdout
    )
    spin = _python("import ddetr_d2", "torch", GOMP_SPINCOUNT="500").stdout
    assert "policy at torch import: None 500 None" in spin
    assert (
        "policy at torch import: PASSIVE None passive"
        in _python("import ddetr_d2", "torch", DDETR_THREAD_POLICY="passive").stdout
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


# --- pinning every thread (tools/benchmark_inference.py --pin-cpus: compile on all cores, time on a few) ---


@pytest.mark.parametrize(
    "text, cpus",
    [("0", [0]), ("0,1", [0, 1]), ("3-5", [3, 4, 5]), ("1, 0-2,7", [0, 1, 2, 7]), ("4-4", [4])],
)
def test_cpu_list_parses_taskset_form(text, cpus):
    assert T.parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1,", "3-1", "-2", "0;1", "1-2-3"])
def test_bad_cpu_list_names_the_text(text):
    with pytest.raises(ValueError, match="CPU list"):
        T.parse_cpu_list(text)


PIN_SCRIPT = """
import json, os, threading
from ddetr_d2 import _threads as T
def mask(tid):
    return sorted(os.sched_getaffinity(tid))
before = T.usable_cores()
release = threading.Event()
olds = [threading.Thread(target=release.wait) for _ in range(3)]
for t in olds:
    t.start()
target = before[-1:]
n = T.pin_all_threads(target)
tids = [int(t) for t in os.listdir("/proc/self/task")]
seen = []
later = threading.Thread(target=lambda: seen.append(mask(threading.get_native_id())))
later.start(); later.join()
release.set()
print("PINNED", json.dumps([n, len(tids), before, target, [mask(t) for t in tids], seen]))
try:
    T.pin_all_threads([max(before) + 1000])
except ValueError as e:
    print("REFUSED", e)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc/self/task")
def test_pin_all_threads_moves_every_thread_and_later_ones_inherit():
    # in a child process: pinning the test process would slow every later test
    out = subprocess.run(
        [sys.executable, "-c", PIN_SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("PINNED"))
    n, ntids, before, target, masks, seen = json.loads(line[len("PINNED ") :])
    assert n == ntids >= 4  # the main thread and the three waiting ones, at least
    assert all(m == target for m in masks), (before, masks)
    assert seen == [target]  # a thread started afterwards inherits the mask
    refused = next(ln for ln in out.stdout.splitlines() if ln.startswith("REFUSED"))
    assert "not available to this process" in refused
