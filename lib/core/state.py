"""What a training run carries across steps, epochs and restarts: :class:`TrainState`, the
seeded :class:`ResumableSampler` that can start an epoch at a batch, and the data loaders built
so that a resumed run sees the same batches in the same order with the same random numbers."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..utils.distributed import DistInfo, ShardSampler


@dataclass
class TrainState:
    """The loop's counters. ``global_step``, ``bad_steps``, ``skipped_steps``, ``batch_in_epoch`` and
    ``epoch_partial`` are saved in checkpoints; ``stop`` and ``interrupted`` are not (they end the run
    that sets them, and a resumed run starts with both False).

    Attributes:
        global_step: batches trained on so far, skipped ones included; drives the warm-up /
            equilibrium switch, the LR schedule and the logs.
        bad_steps: the current run of consecutive skipped steps.
        skipped_steps: skipped steps in total.
        batch_in_epoch: batches of the current epoch consumed so far (the resume position).
        stop: set when TRAIN.MAX_ITERS is reached.
        interrupted: set when a stop signal ended the epoch early (a checkpoint is due).
        epoch_partial: what the part of an interrupted epoch measured, for the resumed run to go on
            from (so that the epoch's means and time in ``history.jsonl`` cover the whole epoch):
            ``{"totals": Totals.state() of the training sums over every process, "seconds": its time}``.
    """

    global_step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    batch_in_epoch: int = 0
    stop: bool = False
    interrupted: bool = False
    epoch_partial: Optional[Dict[str, Any]] = None


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded by ``seed`` and the epoch, also with one process) that can
    start the epoch at a given sample (:meth:`set_start`), so a resumed run skips the batches it
    already consumed in the same shuffle order without loading them."""

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this process's share of the current epoch."""
        self.start = max(0, int(start))

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint records about the shuffling."""
        return {"seed": int(self.seed), "epoch": int(self.epoch), "shuffle": bool(self.shuffle),
                "num_replicas": int(self.num_replicas)}


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """A private generator for a DataLoader: its worker seeds no longer draw from (and advance) the
    global torch RNG, so creating the loader iterator of a resumed epoch changes no random number."""
    return torch.Generator().manual_seed(int(seed) * 1000 + int(rank) + 12345)


def start_epoch(loader: DataLoader, epoch: int, start_batch: int, seed: int, rank: int) -> None:
    """Set the training sampler's epoch and start position and reseed the loader's generator for ``epoch``."""
    sampler = loader.sampler
    assert isinstance(sampler, ResumableSampler), "training loaders come from make_loader(train=True)"
    sampler.set_epoch(epoch)
    sampler.set_start(start_batch * int(loader.batch_size or 1))
    if loader.generator is not None:
        loader.generator.manual_seed((int(seed) + 1) * 1_000_003 + epoch * 1009 + rank)


def _worker_init(worker_id: int) -> None:
    # Python's and NumPy's RNGs drive some augmentations: every worker of every rank gets its own stream
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, cfg, info: DistInfo, train: bool, drop_last: bool = False) -> DataLoader:
    """Training: a :class:`ResumableSampler` (shuffled by SEED and the epoch, one process or many),
    TRAIN.BATCH_SIZE_PER_GPU, a private generator (exact resumption). Evaluation: each rank its
    shard in order (:class:`ShardSampler`, every sample once), TEST.BATCH_SIZE_PER_GPU."""
    if train:
        sampler: Any = ResumableSampler(dataset, info.world_size, info.rank, shuffle=bool(cfg.TRAIN.SHUFFLE),
                                        seed=cfg.SEED, drop_last=drop_last)
        batch = cfg.TRAIN.BATCH_SIZE_PER_GPU
    else:
        sampler, batch, drop_last = ShardSampler(len(dataset), info.rank, info.world_size), cfg.TEST.BATCH_SIZE_PER_GPU, False
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=max(0, int(cfg.WORKERS)),
                      pin_memory=bool(cfg.PIN_MEMORY) and info.device.type == "cuda", drop_last=drop_last,
                      worker_init_fn=_worker_init, persistent_workers=False,
                      generator=loader_generator(cfg.SEED, info.rank) if train else None)
