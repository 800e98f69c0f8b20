"""SOLVER.TIME_BUDGET_SECONDS (ddetr_d2/time_budget.py): the decision, the scaled lr schedule, the final
checkpoint, resume. A fake clock drives :class:`TimeBudget` (no test here depends on real time): a toy
trainer runs the same loop as DeformableDetrTrainer (:func:`train_until_max_iter`) with detectron2's own
lr scheduler, LRScheduler hook, PeriodicCheckpointer and CommonMetricPrinter."""

import warnings

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import TrainerBase, hooks
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.file_io import PathManager

from ddetr_d2.engine import train_until_max_iter
from ddetr_d2.time_budget import TimeBudget


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class RecordingCheckpointer:
    path_manager = PathManager

    def __init__(self):
        self.saved = []

    def save(self, name, **extra):
        self.saved.append(name)


class ToyTrainer(TrainerBase):
    """One SGD parameter; each step records the lr it ran with and advances the clock by
    ``step_seconds(iteration)``."""

    def __init__(self, max_iter, steps, clock, step_seconds, budget=None, start_iter=0):
        super().__init__()
        cfg = get_cfg()
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = max_iter, steps, 0
        cfg.SOLVER.BASE_LR, cfg.SOLVER.GAMMA = 1.0, 0.1
        self.cfg = cfg
        self.param = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([self.param], lr=1.0)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.start_iter, self.max_iter = start_iter, max_iter
        if start_iter:  # as a resumed scheduler state would set it
            self.scheduler.last_epoch = start_iter - 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                self.scheduler.step()
        self.clock, self.step_seconds = clock, step_seconds
        self.lrs = {}
        self.checkpointer = RecordingCheckpointer()
        self.printer = CommonMetricPrinter(max_iter)
        hook_list = [budget] if budget is not None else []
        hook_list += [
            hooks.LRScheduler(),
            hooks.PeriodicCheckpointer(self.checkpointer, period=10**9),
            hooks.PeriodicWriter([self.printer], period=10**9),
        ]
        self.register_hooks(hook_list)

    def run_step(self):
        self.lrs[self.iter] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.clock.now += self.step_seconds(self.iter)


def _slow_start(it):
    return 5.0 if it < 20 else 1.0  # start-up iterations cost more; the median ignores them


def test_a_fast_machine_trains_the_configured_schedule_unchanged():
    ref = ToyTrainer(400, (320,), FakeClock(), _slow_start)
    train_until_max_iter(ref)
    clock = FakeClock()
    budget = TimeBudget(1000.0, clock=clock)  # 20 * 5 + 380 * 1 = 480 s fit
    run = ToyTrainer(400, (320,), clock, _slow_start, budget=budget)
    train_until_max_iter(run)
    assert run.iter == 400 and budget.decided_max_iter == 400
    assert run.lrs == ref.lrs
    assert run.checkpointer.saved == ref.checkpointer.saved == ["model_final"]


def test_a_slow_machine_stops_in_time_with_the_schedule_scaled():
    clock = FakeClock()
    budget = TimeBudget(300.0, clock=clock)
    run = ToyTrainer(400, (320,), clock, _slow_start, budget=budget)
    train_until_max_iter(run)
    # by brute force: the longest run of this machine that fits 300 s
    spent, fits = 0.0, 0
    while spent + _slow_start(fits) <= 300.0:
        spent += _slow_start(fits)
        fits += 1
    assert fits == 220
    assert run.iter == fits == budget.decided_max_iter == run.max_iter
    assert sorted(run.lrs) == list(range(fits))
    assert clock.now - 1000.0 <= 300.0
    drop = round(320 * fits / 400)  # the lr step keeps its fraction of the run: 176
    assert all(run.lrs[i] == pytest.approx(1.0) for i in range(drop))
    assert all(run.lrs[i] == pytest.approx(0.1) for i in range(drop, fits))
    assert run.checkpointer.saved == ["model_final"]  # at the new last iteration
    assert run.printer._max_iter == fits  # the ETA of the log
    assert budget.state_dict() == {"max_iter": fits, "configured_max_iter": 400}


def test_resume_continues_the_shortened_schedule_without_measuring_again():
    clock = FakeClock()
    first = ToyTrainer(400, (320,), clock, _slow_start, budget=TimeBudget(300.0, clock=clock))
    train_until_max_iter(first)
    state = first._hooks[0].state_dict()

    # "killed" after iteration 149, resumed on a machine 10x faster: the decision of the first run holds
    clock = FakeClock()
    budget = TimeBudget(300.0, clock=clock)
    budget.load_state_dict(state)
    resumed = ToyTrainer(400, (320,), clock, lambda it: 0.1, budget=budget, start_iter=150)
    train_until_max_iter(resumed)
    assert resumed.iter == 220 and sorted(resumed.lrs) == list(range(150, 220))
    assert {i: resumed.lrs[i] for i in resumed.lrs} == {i: first.lrs[i] for i in range(150, 220)}
    assert resumed.checkpointer.saved == ["model_final"]


def test_a_run_resumed_before_the_decision_measures_its_own_iterations():
    clock = FakeClock()
    budget = TimeBudget(300.0, clock=clock)
    run = ToyTrainer(400, (320,), clock, lambda it: 2.0, budget=budget, start_iter=50)
    train_until_max_iter(run)
    # 100 iterations of this process measured (2 s each, 200 s), then 100 s left: 50 more
    assert budget.decided_max_iter == run.iter == 50 + 100 + 50


@pytest.mark.parametrize("seconds", [0, -1])
def test_the_budget_must_be_positive(seconds):
    with pytest.raises(ValueError, match="seconds > 0"):
        TimeBudget(seconds)


def test_under_ddp_every_process_takes_the_slowest_ones_figures(monkeypatch):
    # this process runs at 1 s/it; a peer reports 2 s/it and 250 s spent: both stop at the peer's count
    import ddetr_d2.time_budget as tb

    monkeypatch.setattr(tb.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(tb.comm, "all_gather", lambda mine: [mine, (2.0, 250.0)])
    clock = FakeClock()
    budget = TimeBudget(400.0, clock=clock)
    run = ToyTrainer(400, (320,), clock, lambda it: 1.0, budget=budget)
    train_until_max_iter(run)
    assert budget.decided_max_iter == run.iter == 100 + (400 - 250) // 2
