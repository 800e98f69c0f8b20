"""Pytest setup for tests/ and video/tests/: CUDA-marked tests skip, with the reason, without a GPU."""

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# as `import ddetr_d2` does on a busy CPU (tests run beside others), before any test imports torch:
# idle OpenMP threads sleep instead of spinning on a core that a parallel test process needs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one intra-op thread (tiny models: OpenMP start-up and spinning on a
    shared 2-core machine cost more than the second thread gains). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _project_logs_reach_caplog():
    """Every test starts with the project's loggers enabled and propagating to the root logger (where
    ``caplog`` listens); their previous state is restored afterwards. Code run in the test process can
    change them for the rest of the process: Detectron2's ``setup_logger`` (any in-process entry point)
    sets ``propagate = False``, and a ``logging.config`` call with ``disable_existing_loggers`` disables
    every logger that exists. pytest-xdist deals files to processes in any order, so no test may depend on
    which files ran before it in its process."""
    import logging

    prefixes = ("ddetr_d2", "ddetr_video", "detectron2", "d2", "fvcore")
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in prefixes] + list(prefixes)
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    saved = [(lg.propagate, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.propagate, lg.disabled = True, False
    yield
    for lg, (propagate, disabled) in zip(loggers, saved):
        lg.propagate, lg.disabled = propagate, disabled
