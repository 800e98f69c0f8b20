"""Checkpointing that never leaves a truncated file behind and names the file it cannot read, and
loading of inference weights that must fit the model (``load_weights_checked``)."""

import logging
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .errors import UserError, WeightsError

__all__ = [
    "CheckpointError",
    "AtomicDetectionCheckpointer",
    "atomic_write",
    "load_weights_checked",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, not a checkpoint)."""


_TMP_RE = re.compile(r"^(?:.+\.pth|last_checkpoint)\.tmp(\d+)$")


def _is_local(path):
    return "://" not in path or path.startswith("file://")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(save_dir, log=logger):
    """Remove ``*.pth.tmp<PID>`` / ``last_checkpoint.tmp<PID>`` left in ``save_dir`` by processes
    that no longer run (a kill during a save); returns the removed paths. Temporaries of live
    processes (another run writing to the same folder) are kept."""
    removed = []
    if not save_dir or not _is_local(save_dir) or not os.path.isdir(save_dir):
        return removed
    for name in sorted(os.listdir(save_dir)):
        m = _TMP_RE.match(name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(save_dir, name)
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except FileNotFoundError:  # another process cleaned it up first
            continue
        log.info(f"Removed stale temporary {path} ({size} bytes) of dead process {m.group(1)}")
        removed.append(path)
    return removed


def atomic_write(path, write_fn, mode="wb"):
    """Write a local file atomically: ``write_fn(f)`` into ``<path>.tmp<PID>`` in the same folder,
    fsync, then ``os.replace``; a failure leaves ``path`` as it was and no temporary behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and whose load errors name the file.

    fvcore's ``Checkpointer.save`` writes ``model_XXX.pth`` and ``last_checkpoint`` in place, so a
    kill during the write leaves a truncated file that ``--resume`` would then pick up. Here both
    are written to ``<name>.tmp<PID>`` in the same folder through Detectron2's ``PathManager`` and
    renamed into place (``os.replace`` on a local disk; ``PathManager.mv`` elsewhere). A backend
    that cannot rename gets a direct, non-atomic write, with a warning in the log. Temporaries left
    by dead processes (a kill during a save) are removed when a saving checkpointer is created.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if self.save_dir and self.save_to_disk:
            remove_stale_temporaries(self.save_dir, self.logger)

    def _atomic_write(self, path, write_fn, mode):
        if _is_local(path):
            atomic_write(path[len("file://") :] if path.startswith("file://") else path, write_fn, mode)
            return
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with PathManager.open(tmp, mode) as f:
                write_fn(f)
            if PathManager.exists(path):
                PathManager.rm(path)
            if not PathManager.mv(tmp, path):
                raise OSError(f"PathManager.mv({tmp}, {path}) failed")
        except NotImplementedError:
            try:
                PathManager.rm(tmp)
            except Exception:  # noqa: BLE001  (a backend without rm: the temporary stays, say so)
                self.logger.warning(f"Could not remove {tmp}")
            self.logger.warning(
                f"The storage of {path} cannot rename files: writing it in place (not atomic; a kill "
                "during this write leaves a truncated file)"
            )
            with PathManager.open(path, mode) as f:
                write_fn(f)

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._atomic_write(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._atomic_write(path, lambda f: f.write(last_filename_basename), "w")

    def resume_or_load(self, path, *, resume=True):
        """fvcore's ``resume_or_load``; a ``last_checkpoint`` naming a file that is gone (deleted to save
        space, a partial copy of the folder) raises :class:`CheckpointError` listing the checkpoints there."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if not PathManager.isfile(last):
                folder = os.path.dirname(last)
                names = sorted(n for n in PathManager.ls(folder) if n.endswith(".pth"))
                what = (
                    f"checkpoints in {folder}: {', '.join(names)}. Write the name of one of them into "
                    "last_checkpoint, or start without --resume."
                    if names
                    else f"no checkpoint is left in {folder}: start without --resume."
                )
                raise CheckpointError(
                    f"--resume: {os.path.join(self.save_dir, 'last_checkpoint')} names "
                    f"{os.path.basename(last)}, which does not exist; {what}"
                )
        return super().resume_or_load(path, resume=resume)

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:
            size = os.path.getsize(filename) if os.path.isfile(filename) else "missing"
            raise CheckpointError(
                f"Cannot load checkpoint '{filename}' (size: {size} bytes): {type(e).__name__}: {e}. "
                "The file is probably truncated or corrupt (e.g. the job was killed while writing it); "
                "delete it, or point OUTPUT_DIR/last_checkpoint / MODEL.WEIGHTS at an intact checkpoint."
            ) from e


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the incompatible keys instead of logging them
    (``load_weights_checked`` reports them itself, in one message)."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def _log_incompatible_keys(self, incompatible):
        pass


def _format_keys(keys, limit=8):
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# Parameters that exist in training only (the denoising groups' label embedding, the one-to-many
# group's queries): a model trained with them loads into one built without them, and the other way
# round, for inference.
TRAINING_ONLY_PREFIXES = ("training_groups.",)


def _training_only(key):
    return key.startswith(TRAINING_ONLY_PREFIXES)


# Other codebases' layouts that tools/convert_weights.py converts: (--from, what, output suffix, key test).
_UNCONVERTED = (
    (
        "official",
        "an official Deformable-DETR checkpoint",
        ".pth",
        lambda k: k.startswith("backbone.0.body."),
    ),
    (
        "hf",
        "a Hugging Face DeformableDetrForObjectDetection state dict",
        ".pth",
        lambda k: k.startswith(("model.backbone.", "model.encoder.", "model.decoder.")),
    ),
    (
        "torchvision",
        "a torchvision ResNet (an ImageNet backbone, no detector)",
        ".pkl",
        lambda k: k.startswith("layer1.") or k == "conv1.weight",
    ),
)
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _convert_hint(weights, source, what, suffix):
    out = os.path.splitext(os.path.basename(weights.rstrip("/")))[0] + f"_ddetr_d2{suffix}"
    run = f"{weights} is {what}, not converted: run tools/convert_weights.py --from {source} {weights} {out}"
    if source == "torchvision":
        return f"{run} and train from it (MODEL.WEIGHTS {out}); inference needs trained detector weights"
    return f"{run} (add --coco-91-to-80 for a 91-class COCO model) and set MODEL.WEIGHTS to {out}"


def _unconverted(weights, keys):
    """The conversion hint when the checkpoint's keys are another codebase's names, else None."""
    keys = list(keys)
    for source, what, suffix, test in _UNCONVERTED:
        if any(test(k) for k in keys):
            return _convert_hint(weights, source, what, suffix)
    return None


def _looks_like_safetensors(path):
    """A .safetensors file: 8-byte little-endian header size, then the JSON header."""
    if path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_weights_checked(model, weights, allow_mismatch=False):
    """
    Load inference weights ``weights`` into ``model`` and check that they fit it.

    Missing keys, unexpected keys and shape mismatches (key, checkpoint shape, model shape) raise
    :class:`WeightsError` naming them (training-only parameters, ``TRAINING_ONLY_PREFIXES``, may be
    missing or extra) (``allow_mismatch=True`` logs them instead); a missing or
    unreadable file raises :class:`WeightsError` naming the path. An empty path keeps the random
    initialisation with a warning. Returns the incompatible-keys record (or None).
    """
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")
        return None
    if "://" not in weights and os.path.isdir(weights):
        hf = [n for n in _HF_FILES if os.path.isfile(os.path.join(weights, n))]
        if hf:
            raise WeightsError(
                f"MODEL.WEIGHTS {weights} is a directory: "
                + _convert_hint(weights, "hf", f"a Hugging Face save_pretrained folder ({hf[0]})", ".pth")
            )
        raise WeightsError(f"MODEL.WEIGHTS {weights} is a directory: give a file (e.g. its model_final.pth)")
    if "://" not in weights and not os.path.isfile(weights):
        raise WeightsError(f"weights file not found: {weights} (set MODEL.WEIGHTS)")
    checkpointer = _RecordingCheckpointer(model)
    try:
        checkpointer.load(weights)
    except Exception as e:
        if "://" in weights:  # a URL (e.g. the base config's ImageNet R-50): fetched by PathManager
            raise WeightsError(
                f"cannot fetch or load weights {weights}: {type(e).__name__}: {e} (no network? download the "
                "file where there is one and set MODEL.WEIGHTS to the local copy)"
            ) from e
        size = os.path.getsize(weights) if os.path.isfile(weights) else "?"
        if _looks_like_safetensors(weights):
            hint = _convert_hint(weights, "hf", "a safetensors file (Hugging Face)", ".pth")
            raise WeightsError(f"cannot load weights {weights} ({size} bytes) as a checkpoint: {hint}") from e
        raise WeightsError(
            f"cannot load weights {weights} ({size} bytes): {type(e).__name__}: {e} "
            "(truncated or not a checkpoint?)"
        ) from e
    inc = checkpointer.incompatible
    if inc is None:
        return None
    bad_shape_keys = {k for k, _, _ in inc.incorrect_shapes}
    missing = [k for k in inc.missing_keys if k not in bad_shape_keys and not _training_only(k)]
    unexpected = [k for k in inc.unexpected_keys if not _training_only(k)]
    problems = []
    if inc.incorrect_shapes:
        problems.append(
            "shape mismatch (key: checkpoint vs model): "
            + _format_keys(f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in inc.incorrect_shapes)
        )
    if missing:
        problems.append("missing in checkpoint: " + _format_keys(missing))
    if unexpected:
        problems.append("unexpected in checkpoint: " + _format_keys(unexpected))
    if problems:
        msg = f"weights {weights} do not match the config's model; " + "; ".join(problems)
        hint = _unconverted(weights, inc.unexpected_keys)
        if hint:  # --allow-mismatch would run with a random backbone / transformer: say how to convert
            msg = f"{hint} (its keys do not match the config's model; " + "; ".join(problems) + ")"
            if not allow_mismatch:
                raise WeightsError(msg)
        elif not allow_mismatch:
            raise WeightsError(msg + " (check --config-file / MODEL.* options, or pass --allow-mismatch)")
        logger.warning(msg)
    return inc
