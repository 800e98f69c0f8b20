"""ddetr-d2: Deformable DETR as a Detectron2 project.

``ddetr_d2.ops`` needs torch only. Importing ``ddetr_d2`` with detectron2 installed also
registers the meta-architecture, the config function and the built-in datasets.

Importing ``ddetr_d2`` first (before torch) also chooses the OpenMP wait policy unless the user set
one (auto: ``OMP_WAIT_POLICY=PASSIVE`` on a busy CPU, a short ``GOMP_SPINCOUNT`` on an idle one):
see :mod:`ddetr_d2._threads` and docs/training.md ("Thread policy").
"""

# This must stay the first statement that runs: libgomp (torch's OpenMP runtime) reads
# OMP_WAIT_POLICY once, when it is loaded, i.e. when torch is first imported. With the default
# policy, idle OpenMP workers spin for a while after every parallel region; on a CPU shared with
# another process they spin on cores the other process needs, and a 2-core machine slows down 3-4x
# with 30x stalls (docs/benchmarks.md, "Shared CPU"). PASSIVE workers sleep at once (flat under
# contention, slower when idle); a short spin count keeps the idle speed.
from ._threads import apply_thread_policy as _apply_thread_policy

_apply_thread_policy()

__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError:  # torch-only install: the ops still work
    pass
else:
    from . import data, modeling  # noqa: F401  (registration side effects)
    from .config import add_deformable_detr_config  # noqa: F401
