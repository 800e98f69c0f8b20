"""Keeping freed memory in the process for CPU inference (glibc malloc).

A CPU forward of the R-50 detector at 800x1066 allocates and frees tensors of up to tens of MB (the
encoder's 17,821-token activations: 18 MB per 256-channel float32 tensor, 73 MB for the FFN's 1024
channels). glibc's malloc serves every block above its mmap threshold (dynamic, at most 32 MB) with a
fresh ``mmap`` and gives it back with ``munmap`` when it is freed, so each forward faults the same
pages in again and the kernel zeroes them: ~150-200k minor page faults and 0.4-0.6 s of system time
per forward on a 2-core AVX2 CPU (docs/benchmarks.md, "Freed memory kept").

:func:`retain_freed_memory` tells malloc (``mallopt``) to serve every block from its heap and not to
give freed memory back to the operating system, so after the first few forwards the same pages are reused
without faults. Process-wide, one way (the process keeps its peak heap), glibc only; applied to
inference-only models on the CPU (``build_demo_model``) by ``MODEL.DEFORMABLE_DETR.
INFERENCE_RETAIN_FREED_MEMORY``. This module needs the standard library only.
"""

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["retain_freed_memory", "freed_memory_retained", "M_TRIM_THRESHOLD", "M_MMAP_MAX"]

logger = logging.getLogger(__name__)

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1  # free heap top above this is returned to the OS (default 128 KiB, dynamic)
M_MMAP_MAX = -4  # most blocks served by mmap at once; 0: none (every block from the heap)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB, i.e. never in practice

_state = {"retained": False}


def _libc():
    if platform.system() != "Linux":
        return None, f"not Linux ({platform.system()})"
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError as e:
        return None, f"cannot load the C library {name}: {e}"
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None, f"the C library {name} is not glibc (no mallopt / gnu_get_libc_version)"
    return libc, None


def retain_freed_memory():
    """
    Make glibc's malloc keep freed memory for reuse (no ``mmap`` per large block, no trimming).

    Returns:
        True if the setting is in effect (now or from an earlier call), False where it cannot be
        applied (not Linux / not glibc, or ``mallopt`` refused); the reason is logged once at INFO.
    """
    if _state["retained"]:
        return True
    libc, reason = _libc()
    if libc is None:
        if not _state.get("logged"):
            _state["logged"] = True
            logger.info("freed memory not retained: %s", reason)
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        logger.info("freed memory not retained: mallopt refused the settings")
        return False
    _state["retained"] = True
    return True


def freed_memory_retained():
    """Whether :func:`retain_freed_memory` has put the setting in effect in this process."""
    return _state["retained"]
