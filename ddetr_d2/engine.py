"""Training loop pieces: the DefaultTrainer subclass, interruption and resume, CPU (gloo) data
parallelism.

``DeformableDetrTrainer`` is what ``tools/train_net.py`` trains with; the tracking add-on subclasses
it and swaps the data mapper and the test loader (the evaluator follows the dataset's
``evaluator_type``, see :mod:`ddetr_d2.evaluation`).

Interruption (docs/training.md): SIGTERM / SIGINT only set a flag; after the current iteration
:class:`InterruptCheckpointer` saves ``model_<iter>.pth`` (atomically, rank 0) and the run stops
with :class:`TrainingInterrupted` (exit code 128 + signal). ``--resume`` continues from it: the
iteration, optimizer, scheduler, the data sampler's seed and position, and (single process) the
python / numpy / torch random states.
"""

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.util
import os
import random
import signal
import sys
import threading
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase, launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import AtomicDetectionCheckpointer, load_weights_checked
from .data import DetrDatasetMapper
from .errors import ConfigError, UserError, WeightsError
from .evaluation import build_evaluator
from .solver import build_optimizer
from .time_budget import TimeBudget

__all__ = [
    "DeformableDetrTrainer",
    "EvaluationInterrupted",
    "InterruptCheckpointer",
    "ResumableTrainingSampler",
    "TrainingInterrupted",
    "check_output_dir",
    "check_run_datasets",
    "check_training_config",
    "check_training_weights",
    "create_ddp_model",
    "is_cpu",
    "launch_processes",
    "load_eval_weights",
    "run_entry_point",
    "train_or_evaluate",
    "train_until_max_iter",
]

logger = logging.getLogger(__name__)


def is_cpu(cfg):
    return str(cfg.MODEL.DEVICE).startswith("cpu")


def create_ddp_model(model, cfg):
    """DDP when world size > 1: on CPU (gloo) without ``device_ids``, on GPU with the local rank."""
    if comm.get_world_size() == 1:
        return model
    device_ids = None if is_cpu(cfg) else [comm.get_local_rank()]
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class TrainingInterrupted(BaseException):
    """Training stopped by a signal after saving ``path`` at ``iteration``. A ``BaseException`` (like
    ``KeyboardInterrupt``) so that the training loop does not log it as a crash."""

    def __init__(self, signum, path, iteration):
        self.signum, self.path, self.iteration = signum, path, iteration
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after iteration {iteration}: checkpoint saved to {path}; "
            "continue with --resume"
        )


class EvaluationInterrupted(TrainingInterrupted):
    """A signal during what runs after the last training step (the final evaluation, the writers): the
    training is complete and its last checkpoint ``path`` saved; the run stops with exit code 128 + N."""

    def __init__(self, signum, path, iteration):
        BaseException.__init__(
            self,
            f"interrupted by {signal.Signals(signum).name} after training ended (iteration {iteration}), "
            f"during the final evaluation: the trained weights are saved in {path}; evaluate them with "
            "--eval-only MODEL.WEIGHTS <that file>",
        )
        self.signum, self.path, self.iteration = signum, path, iteration
        self.exit_code = 128 + signum


class InterruptCheckpointer(HookBase):
    """SIGTERM / SIGINT during training: save a checkpoint after the current iteration, then stop.

    The signal handler only records the signal (installed in ``before_train``, so forked data-loader
    workers inherit it and keep running instead of dying mid-batch). ``after_step`` (this hook runs
    last) saves ``model_{iter:07d}.pth`` with the atomic checkpointer and raises
    :class:`TrainingInterrupted`. Under DDP the flag is gathered every iteration, so all ranks stop
    after the same iteration; only rank 0 writes. A repeated signal is ignored (use SIGKILL to abort).

    After the last step (the final checkpoint is written by then) nothing is left to save: a signal
    during the final evaluation stops the run with :class:`EvaluationInterrupted` instead of being
    swallowed; in one process at once (the handler raises), under DDP once the evaluation's collective
    calls are over (``after_train``, the flag gathered as above, so that no rank waits in one).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self._received = 0
        self._old_handlers = {}

    def _handler(self, signum, frame):
        if not self._received:
            self._received = signum

    def _stop_now(self, signum, frame):
        self._restore_handlers()
        raise EvaluationInterrupted(signum, self._final_checkpoint(), self.trainer.iter - 1)

    def _final_checkpoint(self):
        return self.checkpointer.get_checkpoint_file() or self.checkpointer.save_dir

    def _install(self, handler):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                old = signal.signal(s, handler)
                self._old_handlers.setdefault(s, old)

    def _restore_handlers(self):
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}

    def before_train(self):
        self._received = 0
        self._install(self._handler)
        if self._old_handlers:
            logger.info("SIGTERM / SIGINT save a checkpoint after the current iteration and stop")

    def after_step(self):
        got = self._received
        if comm.get_world_size() > 1:
            got = max(comm.all_gather(got))
        if not got:
            if self.trainer.iter + 1 >= self.trainer.max_iter and comm.get_world_size() == 1:
                self._install(self._stop_now)  # the loop ends after this step
            return
        it = self.trainer.iter
        name = f"model_{it:07d}"
        self.checkpointer.save(name, iteration=it)
        comm.synchronize()  # rank 0 has written the file before any rank exits
        raise TrainingInterrupted(got, os.path.join(self.checkpointer.save_dir, name + ".pth"), it)

    def after_train(self):
        self._restore_handlers()
        if self.trainer.iter < self.trainer.max_iter or comm.get_world_size() == 1:
            return  # stopped early (an exception is on its way), or one process (handled at once)
        got = max(comm.all_gather(self._received))
        if got:
            raise EvaluationInterrupted(got, self._final_checkpoint(), self.trainer.iter - 1)


def _leave_interrupts_to_the_main_process():
    """In a data-loader worker, ignore SIGTERM / SIGINT. A scheduler (SLURM, Kubernetes) or Ctrl-C signals
    the whole process group; torch's worker handler would die on an outside SIGTERM, and the main
    process would then crash on its next batch instead of saving a checkpoint
    (:class:`InterruptCheckpointer`).
    The main process ends its workers itself (and they exit when it dies). No-op outside a worker.
    The train sampler is iterated inside each worker (Detectron2's ``ToIterableDataset``), so this runs
    there for the detector's and the tracker's loaders alike."""
    if torch.utils.data.get_worker_info() is None:
        return
    for s in InterruptCheckpointer.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _ignore_interrupts_in_worker(worker_id):
    """``worker_init_fn`` of the evaluation loaders: :func:`_leave_interrupts_to_the_main_process`."""
    _leave_interrupts_to_the_main_process()


def _kill_daemonic_children(grace_seconds=1.0):
    """At exit, before ``multiprocessing``'s own exit handler: end the daemonic children still alive
    (data-loader workers). ``multiprocessing`` terminates daemonic children with SIGTERM and then joins
    them; train-loader workers ignore SIGTERM (:func:`_leave_interrupts_to_the_main_process`), so a run
    that ends with an exception while its loader is still referenced (a bug, a NaN loss) would otherwise
    wait for them forever instead of exiting with its traceback. Here: SIGTERM, then SIGKILL for those
    still alive after ``grace_seconds``. PyTorch's SIGCHLD handler, which would report the ended workers
    as a second error, is reset first (the process is exiting)."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_seconds
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(timeout=10)


_worker_cleanup_registered = False


def _register_worker_cleanup():
    """Register :func:`_kill_daemonic_children` once, after ``multiprocessing.util``'s exit handler
    (imported above), so that it runs first (atexit runs handlers last-in, first-out)."""
    global _worker_cleanup_registered
    if not _worker_cleanup_registered:
        atexit.register(_kill_daemonic_children)
        _worker_cleanup_registered = True


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's ``TrainingSampler`` (an infinite, seeded stream of shuffled indices, split among
    processes) that can start part-way: a run resumed at iteration ``i`` sets ``start_index`` to the
    ``i * batch_per_process`` indices this process consumed, and its seed is saved in the checkpoint
    (``state_dict``), so the resumed run continues the same stream instead of restarting it."""

    def __init__(self, size, shuffle=True, seed=None):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.start_index = 0
        _register_worker_cleanup()  # its workers ignore SIGTERM: see _kill_daemonic_children

    def __iter__(self):
        _leave_interrupts_to_the_main_process()
        yield from itertools.islice(super().__iter__(), self.start_index, None)

    @property
    def seed(self):
        return self._seed

    def state_dict(self):
        return {"seed": self._seed}

    def load_state_dict(self, state):
        self._seed = int(state["seed"])


class TrainingRandomState:
    """Checkpointable ``data_state``: the train sampler's seed and, in a single process, the python,
    numpy and torch (CPU and CUDA) random states, so a resumed run draws the same augmentations and
    dropout masks as an uninterrupted one (exactly so with DATALOADER.NUM_WORKERS 0).

    Loading keeps the random states pending; :class:`RestoreRandomState` applies them just before
    the first iteration, after creating the data-loader iterator (which draws a seed from torch's
    generator: an uninterrupted run drew it at iteration 0)."""

    def __init__(self, sampler=None):
        self.sampler = sampler
        self.pending_rng = None

    def state_dict(self):
        state = {"world_size": comm.get_world_size()}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        if comm.get_world_size() == 1:
            state["rng"] = {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
        return state

    def load_state_dict(self, state):
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        rng = state.get("rng")
        if rng is not None and comm.get_world_size() == 1 and state.get("world_size") == 1:
            self.pending_rng = rng

    def apply_pending(self):
        """Set the random states loaded from the checkpoint (once)."""
        rng, self.pending_rng = self.pending_rng, None
        if rng is not None:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


class RestoreRandomState(HookBase):
    """After resuming: create the data-loader iterator, then restore the checkpoint's random states
    (runs after :class:`InterruptCheckpointer` has installed its handlers, which forked data-loader
    workers inherit)."""

    def __init__(self, data_state):
        self.data_state = data_state

    def before_train(self):
        if self.data_state.pending_rng is not None:
            self.trainer._trainer._data_loader_iter  # noqa: B018  (created now, as at iteration 0)
            self.data_state.apply_pending()


def train_until_max_iter(trainer):
    """``TrainerBase.train``'s loop from ``trainer.start_iter``, except that it ends at ``trainer.max_iter``
    as it stands after each step: :class:`~ddetr_d2.time_budget.TimeBudget` may lower it during the run."""
    from detectron2.utils.events import EventStorage

    logger.info(f"Starting training from iteration {trainer.start_iter}")
    trainer.iter = trainer.start_iter
    with EventStorage(trainer.start_iter) as trainer.storage:
        try:
            trainer.before_train()
            while trainer.iter < trainer.max_iter:
                trainer.before_step()
                trainer.run_step()
                trainer.after_step()
                trainer.iter += 1
            # trainer.iter == trainer.max_iter: after_train hooks read it as a finished run
        except Exception:
            logger.exception("Exception during training:")
            raise
        finally:
            trainer.after_train()


class DeformableDetrTrainer(DefaultTrainer):
    """DefaultTrainer with the DETR mapper, the Deformable DETR optimizer, evaluation by the dataset's
    ``evaluator_type``, atomic checkpoints, save-on-signal, exact resume and CPU (gloo) DDP."""

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, but with our DDP wrapper and checkpointer.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, cfg)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.train_sampler = getattr(data_loader, "resumable_sampler", None)
        self.data_state = TrainingRandomState(self.train_sampler)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), data_state=self.data_state
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def build_hooks(self):
        # TimeBudget first: a shortened run must reach the lr scheduler and the checkpointer in the same step
        seconds = self.cfg.SOLVER.TIME_BUDGET_SECONDS
        if seconds < 0:
            raise ConfigError(f"SOLVER.TIME_BUDGET_SECONDS must be >= 0 (0: no budget), got {seconds}")
        budget = [TimeBudget(seconds)] if seconds > 0 else []
        return (
            budget
            + super().build_hooks()
            + [
                InterruptCheckpointer(self.checkpointer),
                RestoreRandomState(self.data_state),
            ]
        )

    def train(self):
        """``DefaultTrainer.train`` with :func:`train_until_max_iter` as its loop."""
        from detectron2.evaluation import verify_results

        train_until_max_iter(self)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert hasattr(self, "_last_eval_results"), "No evaluation results obtained during training!"
            verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.train_sampler is not None:
            per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            self.train_sampler.start_index = self.start_iter * per_process
            logger.info(
                f"Train sampler: seed {self.train_sampler.seed}, starting at index "
                f"{self.train_sampler.start_index} of this process's stream (iteration {self.start_iter})"
            )

    @classmethod
    def build_train_mapper(cls, cfg):
        return DetrDatasetMapper(cfg, is_train=True)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader with ``build_train_mapper``; for DATALOADER.SAMPLER_TRAIN
        "TrainingSampler" the sampler is a :class:`ResumableTrainingSampler`
        (``loader.resumable_sampler``)."""
        mapper = cls.build_train_mapper(cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return build_detection_train_loader(cfg, mapper=mapper)
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        sampler = ResumableTrainingSampler(len(dataset))
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))
        # like the train loader's: a signal to the process group must not kill the workers mid-evaluation
        loader.worker_init_fn = _ignore_interrupts_in_worker
        _register_worker_cleanup()
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


def _cpu_worker(local_rank, main_func, world_size, dist_url, args, timeout):
    """Like detectron2's ``_distributed_worker`` but always gloo and never touching CUDA."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))  # share the cores
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=local_rank, timeout=timeout
    )
    comm.create_local_process_group(world_size)
    comm.synchronize()
    main_func(*args)
    dist.destroy_process_group()


def _forward_signal_to_children(signum, frame):
    """In the launching process: pass SIGTERM / SIGINT on to the training processes, which save a
    checkpoint and exit (a terminal's Ctrl-C reaches them directly too; a repeat is harmless)."""
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass


def exit_code_of(exc):
    """Exit code for the launcher from a child's ``ProcessExitedException`` (signal N -> 128 + N)."""
    code = exc.exit_code
    return code if code > 0 else 128 - code


def launch_processes(main_func, args, cpu):
    """detectron2's ``launch``; for MODEL.DEVICE cpu with --num-gpus N > 1, N gloo CPU processes.
    With several processes, SIGTERM / SIGINT to this process are forwarded to them."""
    if args.num_gpus * args.num_machines > 1 and threading.current_thread() is threading.main_thread():
        for s in InterruptCheckpointer.SIGNALS:
            signal.signal(s, _forward_signal_to_children)
    if cpu and args.num_gpus > 1:
        if args.num_machines != 1:
            raise ValueError("CPU data parallelism (MODEL.DEVICE cpu) supports --num-machines 1 only")
        dist_url = args.dist_url
        if dist_url == "auto":
            dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
        mp.start_processes(
            _cpu_worker,
            nprocs=args.num_gpus,
            args=(main_func, args.num_gpus, dist_url, (args,), DEFAULT_TIMEOUT),
            daemon=False,
        )
        return
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def load_eval_weights(cfg, model, args):
    """``--eval-only``: MODEL.WEIGHTS must fit the model (:func:`load_weights_checked`, unless
    ``args.allow_mismatch``); with ``--resume`` and an OUTPUT_DIR/last_checkpoint, that checkpoint
    is loaded instead (the normal resume path)."""
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    if getattr(args, "resume", False) and checkpointer.has_checkpoint():
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
    else:
        allow_mismatch = getattr(args, "allow_mismatch", False)
        if not cfg.MODEL.WEIGHTS and not allow_mismatch:
            raise WeightsError(
                "--eval-only with an empty MODEL.WEIGHTS would evaluate the random initialisation: pass "
                "MODEL.WEIGHTS <file> (or --allow-mismatch to evaluate it anyway)"
            )
        load_weights_checked(model, cfg.MODEL.WEIGHTS, allow_mismatch=allow_mismatch)


def check_output_dir(cfg):
    """Before ``default_setup`` writes its logs there: a local OUTPUT_DIR is a folder that exists or can be
    made, and can be written to; else :class:`ConfigError` naming it."""
    out = cfg.OUTPUT_DIR
    if not out:
        raise ConfigError("OUTPUT_DIR is empty: name the folder for logs and checkpoints")
    if "://" in out:  # a PathManager URI: its handler decides
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"OUTPUT_DIR {out} is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR {out} cannot be created: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"OUTPUT_DIR {out} is not writable")


def check_run_datasets(cfg, eval_only):
    """There is a dataset to run on: ``DATASETS.TRAIN`` for training (else Detectron2's bare
    ``AssertionError``), ``DATASETS.TEST`` with ``--eval-only`` (else nothing is evaluated and the run
    exits 0); :class:`ConfigError` otherwise."""
    if eval_only and not len(cfg.DATASETS.TEST):
        raise ConfigError("--eval-only needs a dataset in DATASETS.TEST, got none")
    if not eval_only and not len(cfg.DATASETS.TRAIN):
        raise ConfigError("training needs a dataset in DATASETS.TRAIN, got none")


def check_training_config(cfg, world_size=1):
    """Before training: the SOLVER / DATALOADER / TEST values Detectron2's trainer, scheduler and hooks would
    fail on with a traceback (``ZeroDivisionError`` for ``CHECKPOINT_PERIOD 0``, a bare ``AssertionError`` for
    ``IMS_PER_BATCH 0``, "Milestone must be smaller..." for a step at ``MAX_ITER``); :class:`ConfigError`
    naming the key. (The optimizer's own keys are checked where it is built, ``ddetr_d2.solver``.)"""
    s = cfg.SOLVER
    for key, value, low in (
        ("SOLVER.MAX_ITER", s.MAX_ITER, 1),
        ("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, 1),
        ("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD, 1),
        ("SOLVER.WARMUP_ITERS", s.WARMUP_ITERS, 0),
        ("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, 0),
        ("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    if s.IMS_PER_BATCH % world_size:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} is not divisible by the {world_size} processes"
        )
    steps = list(s.STEPS)
    if any(not isinstance(x, int) or x < 1 for x in steps) or steps != sorted(set(steps)):
        raise ConfigError(f"SOLVER.STEPS must be increasing iterations >= 1, got {tuple(steps)}")
    if s.MAX_ITER in steps:
        raise ConfigError(
            f"SOLVER.STEPS {tuple(steps)} has a step at SOLVER.MAX_ITER {s.MAX_ITER}: a step must come "
            "before the last iteration (steps after it are ignored)"
        )


def check_training_weights(cfg, resume):
    """Before anything is built: a local MODEL.WEIGHTS that training starts from is a file (a missing one
    was fvcore's ``AssertionError`` after the data loader was built). Skipped when ``--resume`` finds
    OUTPUT_DIR/last_checkpoint (then MODEL.WEIGHTS is not read) and for URLs (their handler decides)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or ("://" in weights and not weights.startswith("file://")):
        return
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    path = weights[len("file://") :] if weights.startswith("file://") else weights
    if os.path.isdir(path):
        raise WeightsError(f"MODEL.WEIGHTS {weights} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise WeightsError(
            f"MODEL.WEIGHTS {weights} not found (training starts from these weights; leave MODEL.WEIGHTS "
            "empty to start from a random initialisation)"
        )


def train_or_evaluate(cfg, args, trainer_cls):
    """
    The body of a ``train_net.py`` main: pre-flight checks of the datasets and evaluators (before the
    model is built), then ``--eval-only`` (weights that must fit, :func:`load_eval_weights`) or training
    (``--resume`` continues from OUTPUT_DIR/last_checkpoint). Returns the evaluation results (or None).
    """
    from detectron2.evaluation import verify_results

    from ._threads import policy_line
    from .data.validation import check_datasets
    from .evaluation import check_evaluators

    logging.getLogger("ddetr_d2").info(policy_line())
    check_run_datasets(cfg, eval_only=args.eval_only)
    if not args.eval_only:
        check_training_config(cfg, world_size=comm.get_world_size())
        check_training_weights(cfg, resume=args.resume)
    check_datasets(cfg, eval_only=args.eval_only)
    check_evaluators(cfg)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        load_eval_weights(cfg, model, args)
        res = trainer_cls.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    res = getattr(trainer, "_last_eval_results", None)
    if not res and len(cfg.DATASETS.TEST) and cfg.TEST.EVAL_PERIOD == 0:
        res = trainer_cls.test(cfg, trainer.model)  # no evaluation hook ran: evaluate the final model once
    return res


class _EndWithOneLine:
    """``main_func(args)`` in each process; a user error or an interruption ends the process with one
    line on stderr (rank 0) and exit code 2 / 128 + signal. Bugs keep their traceback."""

    def __init__(self, main_func):
        self.main_func = main_func

    def __call__(self, args):
        try:
            return self.main_func(args)
        except UserError as e:
            if comm.is_main_process():
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except TrainingInterrupted as e:
            if comm.is_main_process():
                print(str(e), file=sys.stderr, flush=True)
            if comm.get_world_size() == 1:
                sys.exit(e.exit_code)
            comm.synchronize()
            if comm.is_main_process():
                sys.exit(e.exit_code)
            # the other ranks end at once and with 0, so that the launcher reports rank 0's code (it
            # stops the remaining processes as soon as one exits non-zero)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def run_entry_point(main_func, args, cfg_fn):
    """What a training script's ``__main__`` runs: ``main_func(args)`` in ``args.num_gpus`` processes
    (:func:`launch_processes`; ``cfg_fn(args)`` builds the config that tells CPU or GPU). Returns the
    exit code: 0; 2 for a user error (printed as ``error: ...``); 128 + N after signal N (the line
    naming the saved checkpoint is printed)."""
    try:
        cfg = cfg_fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        launch_processes(_EndWithOneLine(main_func), args, cpu=is_cpu(cfg))
    except mp.ProcessExitedException as e:  # a worker process exited non-zero (it printed why)
        return exit_code_of(e)
    except SystemExit as e:  # single process: _EndWithOneLine's exit
        return e.code
    return 0
