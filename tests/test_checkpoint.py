"""AtomicDetectionCheckpointer: atomic writes (local, and through Detectron2's PathManager), clear
errors for truncated files, removal of temporaries left by dead processes; the resumable sampler
and random state saved with a checkpoint."""

import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.utils.file_io import PathHandler, PathManager

import ddetr_d2.checkpoint as ckpt_module
from ddetr_d2.checkpoint import (
    AtomicDetectionCheckpointer,
    CheckpointError,
    load_weights_checked,
    remove_stale_temporaries,
)
from ddetr_d2.engine import ResumableTrainingSampler, TrainingRandomState
from ddetr_d2.errors import WeightsError


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    ck = AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
    ck.save("model_0000001")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    raw = (tmp_path / "model_0000001.pth").read_bytes()
    bad = tmp_path / "model_truncated.pth"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"model_truncated\.pth.*truncated or corrupt"):
        AtomicDetectionCheckpointer(torch.nn.Linear(3, 2)).load(str(bad))
    # resume path: last_checkpoint pointing to a truncated file names that file
    (tmp_path / "last_checkpoint").write_text("model_truncated.pth")
    with pytest.raises(CheckpointError, match="model_truncated.pth"):
        AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path)).resume_or_load(
            "", resume=True
        )


def test_resume_from_a_missing_checkpoint_names_it(tmp_path):
    ck = AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
    ck.save("model_0000004")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # deleted, or not copied
    gone = r"model_0000009\.pth, which does not exist; .*: model_0000004\.pth"
    with pytest.raises(CheckpointError, match=gone):
        ck.resume_or_load("", resume=True)
    assert ck.resume_or_load("", resume=False) == {}  # without --resume: MODEL.WEIGHTS (empty) as before
    (tmp_path / "model_0000004.pth").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint is left in .*: start without --resume"):
        ck.resume_or_load("", resume=True)


def test_weights_given_as_a_folder_say_so(tmp_path):
    with pytest.raises(WeightsError, match="is a directory"):
        load_weights_checked(torch.nn.Linear(3, 2), str(tmp_path))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    ck = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)

    def dying_save(obj, f):  # simulates a crash half way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # exited and reaped: its PID names no process (unless reused, checked below)
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, caplog):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {
            f"model_0000009.pth.tmp{dead}": True,  # a kill during a save
            f"last_checkpoint.tmp{dead}": True,
            f"model_0000010.pth.tmp{live.pid}": False,  # another process is writing it now
            f"model_0000011.pth.tmp{os.getpid()}": False,  # ours
            f"notes.txt.tmp{dead}": False,  # not a checkpoint temporary
            "model_0000008.pth": False,
        }
        for n in names:
            (tmp_path / n).write_bytes(b"x" * 10)
        try:
            os.kill(dead, 0)
            pytest.skip(f"pid {dead} was reused by another process")
        except ProcessLookupError:
            pass
        with caplog.at_level(logging.INFO):
            AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
        left = set(os.listdir(tmp_path))
        assert left == {n for n, removed in names.items() if not removed}
        assert f"Removed stale temporary {tmp_path / f'last_checkpoint.tmp{dead}'} (10 bytes)" in caplog.text
        # a checkpointer that does not save (other ranks, inference) does not touch the folder
        (tmp_path / f"model_0000012.pth.tmp{dead}").write_bytes(b"x")
        AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path), save_to_disk=False)
        assert (tmp_path / f"model_0000012.pth.tmp{dead}").exists()
        assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / f"model_0000012.pth.tmp{dead}")]
    finally:
        live.stdin.close()
        live.wait()


class _FolderHandler(PathHandler):
    """A PathManager backend ``<prefix>NAME`` -> ``root/NAME`` that may lack ``mv`` (like HTTP)."""

    def __init__(self, prefix, root, can_rename):
        super().__init__()
        self.prefix, self.root, self.can_rename = prefix, root, can_rename
        self.renames = 0

    def _get_supported_prefixes(self):
        return [self.prefix]

    def _local(self, path):
        return os.path.join(self.root, path[len(self.prefix) :])

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        return open(self._local(path), mode)

    def _exists(self, path, **kwargs):
        return os.path.exists(self._local(path))

    def _isfile(self, path, **kwargs):
        return os.path.isfile(self._local(path))

    def _rm(self, path, **kwargs):
        os.remove(self._local(path))

    def _mv(self, src_path, dst_path, **kwargs):
        if not self.can_rename:
            raise NotImplementedError()
        os.rename(self._local(src_path), self._local(dst_path))
        self.renames += 1
        return True


@pytest.mark.parametrize("can_rename", [True, False], ids=["rename", "no-rename"])
def test_writes_go_through_pathmanager(tmp_path, caplog, can_rename):
    prefix = f"ddetrtest{int(can_rename)}://"
    handler = _FolderHandler(prefix, str(tmp_path), can_rename)
    PathManager.register_handler(handler, allow_override=True)
    model = torch.nn.Linear(3, 2)
    ck = AtomicDetectionCheckpointer(model, save_dir=prefix + "run")
    os.makedirs(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        ck.save("model_0000004", iteration=4)
    assert sorted(os.listdir(tmp_path / "run")) == ["last_checkpoint", "model_0000004.pth"]
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000004.pth"
    saved = torch.load(tmp_path / "run" / "model_0000004.pth")
    assert saved["iteration"] == 4 and torch.equal(saved["model"]["weight"], model.weight)
    assert ck.has_checkpoint() and ck.get_checkpoint_file() == prefix + "run/model_0000004.pth"
    if can_rename:
        assert handler.renames == 2 and "cannot rename" not in caplog.text
    else:
        assert "cannot rename files: writing it in place (not atomic" in caplog.text


def test_sampler_resumes_its_stream():
    full = ResumableTrainingSampler(7, seed=123)
    stream = [i for _, i in zip(range(40), iter(full))]
    assert sorted(stream[:7]) == list(range(7))  # a shuffled epoch
    resumed = ResumableTrainingSampler(7, seed=999)  # a new run draws another seed ...
    resumed.load_state_dict(full.state_dict())  # ... and the checkpoint brings the old one back
    resumed.start_index = 13
    assert [i for _, i in zip(range(27), iter(resumed))] == stream[13:]


def test_random_state_round_trip():
    state = TrainingRandomState(ResumableTrainingSampler(5, seed=4)).state_dict()
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # a resumed run re-seeds at start-up
    sampler = ResumableTrainingSampler(5, seed=77)
    data_state = TrainingRandomState(sampler)
    data_state.load_state_dict(state)
    assert sampler.seed == 4
    data_state.apply_pending()  # just before the first iteration
    got = (random.random(), np.random.rand(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_eval_only_without_weights_is_refused_unless_allowed(tmp_path, caplog):
    """--eval-only with an empty MODEL.WEIGHTS would score the random initialisation (AP ~0, exit 0)."""
    from types import SimpleNamespace

    from detectron2.config import get_cfg

    from ddetr_d2.engine import load_eval_weights

    cfg = get_cfg()
    cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR = "", str(tmp_path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(WeightsError, match="empty MODEL.WEIGHTS.*--allow-mismatch"):
        load_eval_weights(cfg, model, SimpleNamespace(resume=False, allow_mismatch=False))
    with caplog.at_level(logging.WARNING, logger="ddetr_d2"):
        load_eval_weights(cfg, model, SimpleNamespace(resume=False, allow_mismatch=True))
    assert "random initialisation" in caplog.text
