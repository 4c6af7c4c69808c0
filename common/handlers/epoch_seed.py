"""Per-epoch reseeding, so that the randomness of an epoch depends only on the seed and the epoch number.

A run resumed from the training state saved after epoch ``e`` (:class:`~common.handlers.training_state.
TrainingStateCheckpoint`) restores the weights and optimiser but not the random generators: python ``random``,
numpy, torch, the ``RandomState`` of every MONAI ``Randomizable`` transform (seeded once by ``monai.data.DataLoader``
when it is built with ``num_workers=0``), and the sampler and worker seeds of the data loaders. :class:`EpochSeed`
resets all of them at the start of every epoch, so epoch ``e + 1`` of a resumed run draws exactly what the
uninterrupted run drew (same device, same ``num_workers``, deterministic kernels).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from torch.utils.data import DistributedSampler

__all__ = ["EpochSeed", "RANK_STRIDE", "seed_everything"]

RANK_STRIDE = 1 << 20
"""Offset between the seeds of two ranks of a multi-process run (distinct streams for up to 2**20 epochs)."""


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every CUDA device) with ``seed``.

    Unlike ``monai.utils.set_determinism`` the cuDNN flags are left as they are.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators as well


class EpochSeed:
    """At every ``EPOCH_STARTED``, reseed everything random with ``seed + epoch`` and restart the data iterator.

    With ``e = engine.state.epoch`` (1-based, the epoch about to run) and ``r`` the process rank (0 without
    ``torch.distributed``), in this order:

    1. :func:`seed_everything` ``(seed + e + r * RANK_STRIDE)`` (each rank its own stream, as the multi-process
       configs' ``set_determinism(seed=rank)``);
    2. for the engine's loader (``engine.state.dataloader``) and each of ``loaders`` (index ``i`` = 0, 1, ...):
       the ``Randomizable`` transforms of its dataset get ``monai.data.utils.set_rnd(dataset, s_i)`` with
       ``s_i = SeedSequence((seed, e, r, i)).generate_state(1)[0]`` (distinct streams per loader), its
       ``generator`` (if any) is seeded with ``s_i``, and a sampler with a ``set_epoch`` method other than a
       ``DistributedSampler`` (whose epoch MONAI's workflow and the co-training engine set) gets
       ``set_epoch(e - 1)``;
    3. ``engine.set_data(engine.state.dataloader)``: a new iterator, so its shuffle order and worker seeds are drawn
       from the generators just seeded (ignite otherwise keeps the previous epoch's iterator until it is exhausted).

    Attach it before any handler that draws random numbers or creates an iterator at ``EPOCH_STARTED``
    (``train_handlers`` are attached before the engines' own handlers, e.g. the unlabelled iterator of
    :class:`~common.engines.co_training.CoTrainingTrainer`). Checkpoints must be taken at epoch ends: a run resumed
    in the middle of an epoch restarts that epoch's data.

    Args:
        seed: base seed ``s`` (a non-negative integer).
        loaders: further loaders the engine draws from besides its own (the co-training unlabelled loader); the
            engine creates their iterators itself, after this handler.
    """

    def __init__(self, seed: int = 0, loaders: Sequence[Iterable] = ()) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"EpochSeed: seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.loaders = list(loaders)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def loader_seed(self, epoch: int, rank: int, index: int) -> int:
        """Seed ``s_i`` of loader ``index`` in ``epoch`` on ``rank`` (class docstring)."""
        return int(np.random.SeedSequence((self.seed, epoch, rank, index)).generate_state(1)[0])

    def __call__(self, engine: Engine) -> None:
        epoch, rank = engine.state.epoch, idist.get_rank()
        seed_everything(self.seed + epoch + rank * RANK_STRIDE)
        main = engine.state.dataloader
        for index, loader in enumerate([main, *self.loaders]):
            loader_seed = self.loader_seed(epoch, rank, index)
            dataset = getattr(loader, "dataset", None)
            if dataset is not None:
                set_rnd(dataset, loader_seed)
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(loader_seed)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch") and not isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch - 1)
        if main is not None:
            engine.set_data(main)
