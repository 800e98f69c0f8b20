"""OpenMP wait policy for a CPU that may be shared (applied by ``import ddetr_d2``).

Importing torch loads libgomp, which reads ``OMP_WAIT_POLICY`` exactly once, at load time; setting
the variable afterwards changes nothing. ``import ddetr_d2`` therefore sets it (``setdefault``: a
value the user chose wins) before anything imports torch, and every entry point under ``tools/``
and ``video/`` imports ``ddetr_d2`` first. This module must not import torch, numpy or detectron2.
"""

import logging
import os
import sys

__all__ = ["apply_thread_policy", "DEFAULT_WAIT_POLICY"]

DEFAULT_WAIT_POLICY = "PASSIVE"
_noted = False


def apply_thread_policy():
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless already set. If torch was imported before us with the
    variable unset, the running process keeps the spinning default: log a one-time debug note."""
    global _noted
    was_set = "OMP_WAIT_POLICY" in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
    if not was_set and "torch" in sys.modules and not _noted:
        _noted = True
        logging.getLogger(__name__).debug(
            "torch was imported before ddetr_d2: OMP_WAIT_POLICY=%s applies to child processes only; "
            "import ddetr_d2 first (or export OMP_WAIT_POLICY=PASSIVE) for this process",
            DEFAULT_WAIT_POLICY,
        )
