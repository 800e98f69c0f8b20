"""``SOLVER.TIME_BUDGET_SECONDS``: fit a training run into a wall-clock budget on a slower machine.

:class:`TimeBudget` times the first iterations, and if ``SOLVER.MAX_ITER`` iterations would not fit
into the budget at that speed, it shortens the run once: ``MAX_ITER`` becomes what fits, and the
learning-rate schedule is scaled with it (``SOLVER.STEPS`` and the warm-up keep their fractions of the
run: 1275 of 1500 becomes 1105 of 1300). A machine fast enough for ``MAX_ITER`` trains exactly the
configured schedule, bit for bit as without a budget: the budget only ever lowers ``MAX_ITER``.

The decision is made once, after ``MEASURE_UNTIL`` iterations of this process (median time of the
iterations after the first ``MEASURE_FROM``, which pay for start-up); under DDP all processes take the
slowest one's figures, so they stop together. It is saved in the checkpoints (the hook's state), so
``--resume`` continues the shortened schedule instead of measuring again. What the budget covers: the
training loop (from the first iteration to the last, periodic checkpoints included), not the set-up
before it nor a final evaluation after it.
"""

import logging
import math
import statistics
import time

from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

__all__ = ["TimeBudget"]

logger = logging.getLogger(__name__)


class TimeBudget(HookBase):
    """Shorten ``trainer.max_iter`` (and scale the lr schedule) so the run fits ``seconds``.

    Runs first among the trainer's hooks, so that the lr of the next iteration, the final checkpoint and
    the final evaluation all follow the new ``max_iter`` from the iteration of the decision on.
    """

    MEASURE_FROM = 20
    MEASURE_UNTIL = 100

    def __init__(
        self, seconds, measure_from=MEASURE_FROM, measure_until=MEASURE_UNTIL, clock=time.perf_counter
    ):
        if seconds <= 0:
            raise ValueError(f"TimeBudget needs seconds > 0, got {seconds}")
        if not 0 <= measure_from < measure_until:
            raise ValueError(f"need 0 <= measure_from < measure_until, got {measure_from}, {measure_until}")
        self.seconds = float(seconds)
        self.measure_from, self.measure_until = measure_from, measure_until
        self.clock = clock  # tests pass a fake one
        self.decided_max_iter = None  # set once; saved in checkpoints
        self.configured_max_iter = None

    # ----------------------------------------------------------------------------------- checkpoint state
    def state_dict(self):
        if self.decided_max_iter is None:
            return {}
        return {"max_iter": self.decided_max_iter, "configured_max_iter": self.configured_max_iter}

    def load_state_dict(self, state):
        self.decided_max_iter = state.get("max_iter")
        self.configured_max_iter = state.get("configured_max_iter")

    # ------------------------------------------------------------------------------------------- hooks
    def before_train(self):
        self._t0 = self.clock()
        self._last = self._t0
        self._step_times = []
        if self.configured_max_iter is None:
            self.configured_max_iter = self.trainer.max_iter
        if self.decided_max_iter is not None and self.decided_max_iter < self.trainer.max_iter:
            logger.info(
                f"SOLVER.TIME_BUDGET_SECONDS: resuming the shortened schedule ({self.decided_max_iter} of "
                f"{self.configured_max_iter} iterations, decided in the first run)"
            )
            self._apply(self.decided_max_iter)

    def after_step(self):
        now = self.clock()
        done = self.trainer.iter + 1 - self.trainer.start_iter  # iterations of this process so far
        if done > self.measure_from:
            self._step_times.append(now - self._last)
        self._last = now
        if self.decided_max_iter is None and done == self.measure_until:
            self._decide(elapsed=now - self._t0)

    # --------------------------------------------------------------------------------------- decision
    def _decide(self, elapsed):
        per_iter = statistics.median(self._step_times)
        if comm.get_world_size() > 1:  # every process the same decision: the slowest one's figures
            per_iter, elapsed = (max(v) for v in zip(*comm.all_gather((per_iter, elapsed))))
        it = self.trainer.iter  # the iteration just finished
        max_iter = self.trainer.max_iter
        projected = elapsed + (max_iter - it - 1) * per_iter
        fits = it + 1 + math.floor(max(0.0, self.seconds - elapsed) / per_iter)
        if fits >= max_iter:
            self.decided_max_iter = max_iter
            logger.info(
                f"SOLVER.TIME_BUDGET_SECONDS {self.seconds:.0f}: {per_iter:.3f} s/it over iterations "
                f"{self.trainer.start_iter + self.measure_from + 1}-{it}; {max_iter} iterations take "
                f"~{projected:.0f} s: they fit, the schedule is unchanged"
            )
            return
        new_max = max(fits, it + 1)  # it + 1: stop after this step (the hooks after this one see it)
        self.decided_max_iter = new_max
        logger.warning(
            f"SOLVER.TIME_BUDGET_SECONDS {self.seconds:.0f}: {per_iter:.3f} s/it over iterations "
            f"{self.trainer.start_iter + self.measure_from + 1}-{it}; {max_iter} iterations would take "
            f"~{projected:.0f} s: training stops after {new_max} iterations, the lr schedule scaled by "
            f"{new_max / max_iter:.3f} ({self._steps_text(new_max)})"
        )
        self._apply(new_max)

    def _steps_text(self, new_max):
        solver = self.trainer.cfg.SOLVER if hasattr(self.trainer, "cfg") else None
        if solver is None or solver.get("LR_SCHEDULER_NAME", "WarmupMultiStepLR") != "WarmupMultiStepLR":
            return "the schedule is a function of iteration / max_iter"
        steps = solver.get("STEPS", ())
        if not steps:
            return "no lr steps"
        scale = new_max / self.configured_max_iter
        return "lr steps " + ", ".join(f"{s} -> {round(s * scale)}" for s in steps)

    def _apply(self, new_max):
        """Set ``new_max`` as the run's end where the trainer and its hooks read it."""
        trainer = self.trainer
        trainer.max_iter = new_max
        scheduler = getattr(trainer, "scheduler", None)
        if isinstance(scheduler, LRMultiplier):
            # the fvcore schedule is a function of iteration / max_iter: steps, warm-up keep their fractions
            scheduler._max_iter = new_max
        elif scheduler is not None:
            logger.warning(
                f"SOLVER.TIME_BUDGET_SECONDS: the lr scheduler is a {type(scheduler).__name__}, not "
                "detectron2's LRMultiplier: its schedule is not scaled to the shortened run"
            )
        for h in trainer._hooks:
            if isinstance(h, PeriodicCheckpointer):
                h.max_iter = new_max  # model_final at the new last iteration
            for w in getattr(h, "_writers", ()):
                if isinstance(w, CommonMetricPrinter):
                    w._max_iter = new_max  # the ETA in the log
