"""OpenMP wait policy for a CPU that may be shared (applied by ``import ddetr_d2``).

Importing torch loads libgomp, which reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` exactly once, at
load time; setting them afterwards changes nothing. ``import ddetr_d2`` therefore chooses before
anything imports torch (every entry point under ``tools/`` and ``video/`` imports ``ddetr_d2`` first):

1. ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` already set (by the user): nothing changes (``user``);
2. ``DDETR_THREAD_POLICY=passive`` or ``short-spin``: that choice, no probe (``forced``);
3. otherwise a probe of :data:`PROBE_SECONDS` measures the CPU time that other processes use on the
   cores this process may run on: at least :data:`BUSY_CORES_THRESHOLD` cores ->
   ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep at once: no spinning on a core another
   process needs); less -> ``GOMP_SPINCOUNT=SHORT_SPINCOUNT`` (a short spin keeps most of the idle
   machine's speed). No readable ``/proc`` (e.g. macOS): PASSIVE.

The outcome is exported as ``DDETR_THREAD_POLICY=auto:<mode>`` next to the OpenMP variable, so child
processes (data-loader workers, subprocesses) inherit the parent's choice without probing again and
report it as ``inherited``. :func:`thread_policy` returns the decision, :func:`policy_line` the line the
trainers log. This module must not import torch, numpy or detectron2.
"""

import logging
import os
import sys
import time
from collections import namedtuple

__all__ = [
    "apply_thread_policy", "thread_policy", "policy_line", "decide_thread_policy", "measure_busy_cores",
    "read_cpu_times", "ThreadPolicy", "BUSY_CORES_THRESHOLD", "SHORT_SPINCOUNT", "PROBE_SECONDS",
    "POLICY_ENV", "DEFAULT_WAIT_POLICY", "pin_all_threads", "parse_cpu_list", "require_usable",
]  # fmt: skip

DEFAULT_WAIT_POLICY = "PASSIVE"  # busy CPU, or no /proc to tell
SHORT_SPINCOUNT = 10000  # GOMP_SPINCOUNT on an idle CPU (provisional: docs/benchmarks.md, "Shared CPU")
BUSY_CORES_THRESHOLD = 0.5  # cores used by other processes at or above which PASSIVE is chosen
PROBE_SECONDS = 0.05  # probe window (import-time cost)
POLICY_ENV = "DDETR_THREAD_POLICY"  # passive | short-spin (forced), auto (probe), auto:<mode> (exported)
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
MODES = ("passive", "short-spin")


class ThreadPolicy(namedtuple("ThreadPolicy", "mode origin env busy_cores cores")):
    """``mode``: 'user' | 'passive' | 'short-spin'; ``origin``: 'user' | 'forced' | 'inherited' |
    'probe' | 'no-proc'; ``env``: the OpenMP variables in force; ``busy_cores``: cores used by other
    processes (probe only, else None); ``cores``: cores this process may use."""

    __slots__ = ()


_policy = None
_noted = False


def _mode_env(mode):
    if mode == "passive":
        return {"OMP_WAIT_POLICY": DEFAULT_WAIT_POLICY}
    return {"GOMP_SPINCOUNT": str(SHORT_SPINCOUNT)}


def usable_cores():
    """The CPUs this process may run on (all of ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def parse_cpu_list(text):
    """``"0,1"`` / ``"0-3,8"`` (taskset's list form) -> a sorted list of CPU numbers; ValueError naming
    the text where it is not such a list."""
    cpus = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"CPU list {text!r}: expected numbers and ranges such as 0,1 or 0-3") from None
    return sorted(cpus)


def require_usable(cpus):
    """``cpus``, or ValueError naming those this process may not run on."""
    unusable = sorted(set(cpus) - set(usable_cores()))
    if unusable:
        raise ValueError(f"CPUs {unusable} are not available to this process ({usable_cores()})")
    return cpus


def pin_all_threads(cpus):
    """Restrict every thread of this process to ``cpus`` (``os.sched_setaffinity(0, ...)`` moves the
    calling thread only; OpenMP's and onnxruntime's pool threads keep their own mask). Threads started
    later inherit the mask of the thread that starts them. Linux only (``/proc/self/task``); returns the
    number of threads pinned."""
    cpus = set(require_usable(cpus))
    pinned = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            pinned += 1
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return pinned


def read_cpu_times(cpus=None):
    """``(non-idle jiffies, this process's utime+stime jiffies)`` from ``/proc``, or None where it is
    missing or unreadable. ``cpus``: sum the ``cpuN`` lines of these CPUs only (else the ``cpu`` total)."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu")]
        with open("/proc/self/stat") as f:
            own = f.read()
        wanted = {f"cpu{c}" for c in cpus} if cpus is not None else {"cpu"}
        busy = 0
        for fields in lines:
            if fields[0] in wanted:
                # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
                v = [int(x) for x in fields[1:9]] + [0] * (9 - len(fields))
                busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        rest = own[own.rindex(")") + 2 :].split()  # fields from 3 (state) on; utime, stime are 14, 15
        return busy, int(rest[11]) + int(rest[12])
    except (OSError, ValueError, IndexError):
        return None


def measure_busy_cores(read=read_cpu_times, seconds=PROBE_SECONDS, sleep=time.sleep, clock=time.monotonic):
    """Cores' worth of CPU time that OTHER processes used over ``seconds`` (non-idle time of the CPUs
    minus this process's own), or None where ``read`` returns None."""
    a, t0 = read(), clock()
    if a is None:
        return None
    sleep(seconds)
    b, t1 = read(), clock()
    if b is None or t1 <= t0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (b[0] - a[0]) - (b[1] - a[1])
    return max(0.0, others / hz / (t1 - t0))


def _probe():
    cpus = usable_cores()
    restrict = cpus if len(cpus) < (os.cpu_count() or len(cpus)) else None  # e.g. taskset / cpuset
    return measure_busy_cores(lambda: read_cpu_times(restrict))


def decide_thread_policy(env, probe=_probe, cores=None):
    """The :class:`ThreadPolicy` for environment ``env`` (a mapping; not modified). ``probe()``
    returns the cores busy elsewhere or None (called only when the environment leaves the choice)."""
    cores = len(usable_cores()) if cores is None else cores
    given = {k: env[k] for k in OMP_VARS if k in env}
    requested = env.get(POLICY_ENV, "").strip().lower()
    inherited = requested.startswith("auto:")
    mode = requested[len("auto:") :] if inherited else requested
    if given:
        if mode in MODES and given == _mode_env(mode):  # set by ddetr_d2 in a parent process
            return ThreadPolicy(mode, "inherited" if inherited else "forced", given, None, cores)
        return ThreadPolicy("user", "user", given, None, cores)
    if mode in MODES and not inherited:
        return ThreadPolicy(mode, "forced", _mode_env(mode), None, cores)
    busy = probe()
    if busy is None:
        return ThreadPolicy("passive", "no-proc", _mode_env("passive"), None, cores)
    mode = "passive" if busy >= BUSY_CORES_THRESHOLD else "short-spin"
    return ThreadPolicy(mode, "probe", _mode_env(mode), busy, cores)


def apply_thread_policy(env=None, probe=_probe):
    """Decide (:func:`decide_thread_policy`) and set the variables in ``env`` (``os.environ``), once
    per process. If torch was imported before us, the running process keeps what libgomp read: log a
    one-time debug note."""
    global _policy, _noted
    if _policy is not None and env is None:
        return _policy
    target = os.environ if env is None else env
    requested = target.get(POLICY_ENV, "").strip().lower()
    if requested and requested != "auto" and requested.split(":")[-1] not in MODES:
        logging.getLogger(__name__).warning(
            "%s=%r is not one of auto, passive, short-spin: using auto", POLICY_ENV, requested
        )
    policy = decide_thread_policy(target, probe)
    if policy.origin in ("probe", "no-proc"):
        target.update(policy.env)
        target[POLICY_ENV] = f"auto:{policy.mode}"
    elif policy.origin == "forced":
        target.update(policy.env)
    if env is None:
        _policy = policy
        if policy.origin in ("probe", "no-proc", "forced") and "torch" in sys.modules and not _noted:
            _noted = True
            logging.getLogger(__name__).debug(
                "torch was imported before ddetr_d2: the thread policy (%s) applies to child processes "
                "only; import ddetr_d2 first (or export OMP_WAIT_POLICY=PASSIVE) for this process",
                _env_str(policy.env),
            )
    return policy


def thread_policy():
    """This process's :class:`ThreadPolicy` (decided by ``import ddetr_d2``)."""
    return apply_thread_policy()


def _env_str(env):
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "-"


def policy_line(policy=None):
    """One log line describing ``policy`` (this process's by default)."""
    p = thread_policy() if policy is None else policy
    how = {
        "user": "set before start, kept",
        "forced": f"set by {POLICY_ENV}",
        "inherited": "chosen by the parent process",
        "no-proc": "no /proc to measure the load",
    }.get(p.origin)
    if p.origin == "probe":
        how = f"probe: {p.busy_cores:.2f} cores busy elsewhere, threshold {BUSY_CORES_THRESHOLD}"
    return f"OpenMP thread policy: {p.mode} ({_env_str(p.env)}; {how}; {p.cores} usable cores)"
