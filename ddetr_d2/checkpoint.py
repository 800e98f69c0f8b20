"""Checkpointing that never leaves a truncated file behind and names the file it cannot read."""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CheckpointError", "AtomicDetectionCheckpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, not a checkpoint)."""


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and whose load errors name the file.

    fvcore's ``Checkpointer.save`` writes ``model_XXX.pth`` and ``last_checkpoint`` in place, so a
    kill during the write leaves a truncated file that ``--resume`` would then pick up. Here both
    are written to a temporary file in the same folder and moved into place with ``os.replace``.
    """

    def _atomic_write(self, path, write_fn, mode):
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
