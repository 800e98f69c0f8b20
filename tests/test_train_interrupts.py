"""SIGTERM / SIGINT around the end of training (:class:`InterruptCheckpointer`), on a toy trainer driven by
detectron2's own hook machinery; the signal is sent by the process to itself from inside a hook, so no
test depends on timing. During the final evaluation a signal stops the run (one process: at once; DDP:
once the evaluation's collectives are over) instead of being swallowed; a signal during a step still
saves and stops after that step; evaluation-loader workers leave signals to the main process.
(The subprocess runs of tools/train_net.py with SIGTERM / SIGINT mid-training are in test_train_net.py.)"""

import os
import signal

import pytest
import torch
from detectron2.engine import HookBase, TrainerBase
from detectron2.utils import comm

from ddetr_d2 import engine
from ddetr_d2.engine import EvaluationInterrupted, InterruptCheckpointer, TrainingInterrupted

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")


class FakeCheckpointer:
    save_dir = "/nonexistent/out"

    def __init__(self):
        self.saved = []

    def save(self, name, **extra):
        self.saved.append(name)

    def get_checkpoint_file(self):
        return f"{self.save_dir}/{self.saved[-1]}.pth" if self.saved else ""


class SignalAt(HookBase):
    """Sends ``signum`` to this process in ``after_step`` of iteration ``step`` or, with ``step=None``, in
    ``after_train`` (where detectron2's EvalHook runs the final evaluation); records what ran after it."""

    def __init__(self, signum, step=None):
        self.signum, self.step = signum, step
        self.evaluated = False

    def after_step(self):
        if self.trainer.iter == self.step:
            os.kill(os.getpid(), self.signum)

    def after_train(self):
        if self.step is None and self.trainer.iter >= self.trainer.max_iter:
            os.kill(os.getpid(), self.signum)  # the handler runs before the next line
            self.evaluated = True  # the rest of the "evaluation"


class ToyTrainer(TrainerBase):
    def __init__(self, max_iter, signal_hook):
        super().__init__()
        self.max_iter, self.start_iter = max_iter, 0
        self.checkpointer = FakeCheckpointer()
        self.steps = 0
        self.register_hooks(
            [signal_hook, FinalSave(self.checkpointer), InterruptCheckpointer(self.checkpointer)]
        )

    def run_step(self):
        self.steps += 1


class FinalSave(HookBase):
    """What PeriodicCheckpointer does at the last step: ``model_final``."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def after_step(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.checkpointer.save("model_final")


def _train(trainer):
    before = {s: signal.getsignal(s) for s in InterruptCheckpointer.SIGNALS}
    try:
        engine.train_until_max_iter(trainer)
    finally:
        after = {s: signal.getsignal(s) for s in InterruptCheckpointer.SIGNALS}
        for s, h in before.items():
            signal.signal(s, h)
    assert after == before  # the handlers are restored whichever way the run ends


@pytest.fixture
def two_ranks(monkeypatch):
    """DDP as InterruptCheckpointer sees it: the other rank never received a signal."""
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda x: [x, 0])
    monkeypatch.setattr(comm, "synchronize", lambda: None)


@pytest.mark.parametrize("signum", InterruptCheckpointer.SIGNALS)
def test_a_signal_during_the_final_evaluation_stops_it_at_once(signum):
    hook = SignalAt(signum)
    trainer = ToyTrainer(5, hook)
    with pytest.raises(EvaluationInterrupted) as e:
        _train(trainer)
    assert not hook.evaluated and trainer.steps == 5
    assert e.value.exit_code == 128 + signum and e.value.iteration == 4
    assert e.value.path == "/nonexistent/out/model_final.pth" and "--eval-only" in str(e.value)
    assert trainer.checkpointer.saved == ["model_final"]  # nothing more to save


def test_under_ddp_the_final_evaluation_ends_first(two_ranks):
    hook = SignalAt(signal.SIGTERM)
    with pytest.raises(EvaluationInterrupted) as e:
        _train(ToyTrainer(5, hook))
    assert hook.evaluated and e.value.exit_code == 128 + signal.SIGTERM


@pytest.mark.parametrize("ranks", ["one", "two"])
def test_a_signal_during_a_step_still_saves_after_it(ranks, request):
    if ranks == "two":
        request.getfixturevalue("two_ranks")
    for step in (2, 4):  # mid-run, and the last step itself
        trainer = ToyTrainer(5, SignalAt(signal.SIGINT, step=step))
        with pytest.raises(TrainingInterrupted) as e:
            _train(trainer)
        assert type(e.value) is TrainingInterrupted and e.value.iteration == step
        assert trainer.checkpointer.saved[-1] == f"model_{step:07d}" and trainer.steps == step + 1


def test_no_signal_no_interruption(two_ranks):
    trainer = ToyTrainer(3, SignalAt(signal.SIGTERM, step=-1))
    _train(trainer)
    assert trainer.steps == 3 and trainer.checkpointer.saved == ["model_final"]


class _HandlerInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return [signal.getsignal(s) == signal.SIG_IGN for s in InterruptCheckpointer.SIGNALS]


def test_evaluation_loader_workers_leave_signals_to_the_main_process(monkeypatch):
    """The trainer's test loader (what EvalHook and --eval-only iterate): its workers ignore SIGTERM /
    SIGINT, so a signal to the process group does not kill them under the main process's evaluation."""
    from model_testing import tiny_cfg

    def fake_d2_loader(cfg, dataset_name, mapper):
        return torch.utils.data.DataLoader(_HandlerInWorker(), num_workers=1, collate_fn=lambda b: b)

    monkeypatch.setattr(engine, "build_detection_test_loader", fake_d2_loader)
    in_main = [signal.getsignal(s) for s in InterruptCheckpointer.SIGNALS]
    loader = engine.DeformableDetrTrainer.build_test_loader(tiny_cfg(), "any")
    assert [item for batch in loader for item in batch] == [[True, True], [True, True]]
    assert [signal.getsignal(s) for s in InterruptCheckpointer.SIGNALS] == in_main  # untouched here
