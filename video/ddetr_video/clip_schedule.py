"""Clips that grow over training (MOTR's ``sampler_lengths`` / ``sampler_steps``), safe with loader workers.

The clip length at iteration ``i`` is ``INPUT.CLIP_LENGTHS[k]`` where ``k`` = number of
``INPUT.CLIP_LENGTH_STEPS`` that are ``<= i`` (:class:`ClipLengthSchedule`).

How the mapper learns the iteration: DataLoader workers are forked processes, so a value set in the trainer's
process (e.g. by a hook) would not reach them. Instead the iteration travels *with each sample*: the train
sampler (:class:`IterationTaggedSampler`, the project's resumable sampler) yields ``(dataset index,
iteration)`` where ``iteration = position in this process's sample stream // clips per process and
iteration``; :class:`ScheduledClipDataset` passes it to ``ClipDatasetMapper(d, iteration=...)``. The stream
position is a property of the sample, not of the process that maps it, so any ``DATALOADER.NUM_WORKERS``
gives the same lengths, and a resumed run (the sampler starts at ``start_iter * batch``) continues the
schedule where it stopped. (With ``DATALOADER.ASPECT_RATIO_GROUPING`` the main process regroups samples into
batches, so a clip may land a few iterations from its tag; the tracker configs turn grouping off.)
"""

import bisect

import torch.utils.data as torchdata

from ddetr_d2.engine import ResumableTrainingSampler
from ddetr_d2.errors import ConfigError

__all__ = ["ClipLengthSchedule", "IterationTaggedSampler", "ScheduledClipDataset"]


class ClipLengthSchedule:
    """
    Args:
        lengths: clip lengths, each >= 1 (e.g. MOTR's 2, 3, 4, 5).
        steps: ``len(lengths) - 1`` strictly increasing iterations (>= 1) where the next length starts.
    """

    def __init__(self, lengths, steps=()):
        lengths, steps = [int(x) for x in lengths], [int(x) for x in steps]
        if not lengths or min(lengths) < 1:
            raise ConfigError(f"INPUT.CLIP_LENGTHS must be one or more lengths >= 1, got {tuple(lengths)}")
        if len(steps) != len(lengths) - 1:
            raise ConfigError(
                f"INPUT.CLIP_LENGTH_STEPS needs len(INPUT.CLIP_LENGTHS) - 1 = {len(lengths) - 1} iterations, "
                f"got {tuple(steps)}"
            )
        if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(
                f"INPUT.CLIP_LENGTH_STEPS must be strictly increasing iterations >= 1, got {tuple(steps)}"
            )
        self.lengths, self.steps = lengths, steps

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.INPUT.CLIP_LENGTHS, cfg.INPUT.CLIP_LENGTH_STEPS)

    @property
    def fixed(self):
        return len(self.lengths) == 1

    def __call__(self, iteration=None):
        """Clip length at ``iteration`` (None: the first length)."""
        if iteration is None:
            return self.lengths[0]
        return self.lengths[bisect.bisect_right(self.steps, int(iteration))]


class IterationTaggedSampler(ResumableTrainingSampler):
    """The resumable training sampler yielding ``(index, iteration)``; ``batch_per_process`` clips per
    iteration in this process."""

    def __init__(self, size, batch_per_process, shuffle=True, seed=None):
        super().__init__(size, shuffle=shuffle, seed=seed)
        if batch_per_process < 1:
            raise ConfigError(f"clips per process and iteration must be >= 1, got {batch_per_process}")
        self.batch_per_process = int(batch_per_process)

    def __iter__(self):
        for position, index in enumerate(super().__iter__(), start=self.start_index):
            yield index, position // self.batch_per_process


class ScheduledClipDataset(torchdata.Dataset):
    """Map-style dataset over frame dicts, indexed by ``(index, iteration)`` (or a plain index: iteration
    None); returns ``mapper(dicts[index], iteration=iteration)``."""

    def __init__(self, dataset_dicts, mapper):
        self.dicts, self.mapper = list(dataset_dicts), mapper

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, key):
        index, iteration = key if isinstance(key, tuple) else (key, None)
        return self.mapper(self.dicts[int(index)], iteration=iteration)
