"""Periodic full training-state checkpoints, and resuming from the latest one.

MONAI's ``CheckpointSaver`` and ``CheckpointLoader`` need the trainer in their ``save_dict``/``load_dict`` to
save and restore the epoch counter; in a bundle config that reference is circular when the handler sits in
``train#handlers`` (the trainer references its handlers). This handler receives the trainer in ``attach`` instead,
so a config names only the model and optimiser.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader

from common.handlers.checkpoint_saver import AtomicDiskSaver

__all__ = ["TrainingStateCheckpoint", "latest_training_state", "training_states"]

logger = logging.getLogger(__name__)


def training_states(save_dir: str | Path, prefix: str = "training_state") -> list[Path]:
    """The ``<prefix>_epoch=<n>.pt`` files in ``save_dir``, oldest epoch first."""
    pattern = re.compile(rf"{re.escape(prefix)}_epoch=(\d+)\.pt$")
    found = sorted((int(m.group(1)), p) for p in Path(save_dir).glob(f"{prefix}_*.pt") if (m := pattern.search(p.name)))
    return [path for _, path in found]


def latest_training_state(save_dir: str | Path, prefix: str = "training_state") -> Path | None:
    """The ``<prefix>_epoch=<n>.pt`` file with the largest ``n`` in ``save_dir``, or None."""
    states = training_states(save_dir, prefix)
    return states[-1] if states else None


class TrainingStateCheckpoint:
    """Save ``{model, optimizer, ..., trainer}`` every ``save_interval`` epochs; optionally resume at start.

    Files are written atomically (``<save_dir>/<prefix>_epoch=<n>.pt``, :class:`~common.handlers.checkpoint_saver.
    AtomicDiskSaver`: temporary file, fsync, rename; mode ``0o666 & ~umask``); after each
    save only the newest ``n_saved`` files of this run are kept (files of earlier runs in ``save_dir`` are removed
    then, not before, so a run that fails in its first epoch leaves them in place). With ``resume=True`` the newest
    file is loaded when the trainer starts (through MONAI's ``CheckpointLoader``, ``weights_only`` loading), so
    training continues at the next epoch up to the current ``max_epochs``; with no file yet, training starts from
    scratch and says so. The engine's ``GradScaler`` (``engine.scaler``, which MONAI trainers create when the run
    starts, under AMP) is saved and restored as ``"scaler"`` besides ``save_dict``.

    For a resumed run to end with the same weights as an uninterrupted one, ``save_dict`` must hold every object
    with training state (optimisers, schedulers, EMA teachers, loss buffers, the best-model saver's
    bookkeeping: :class:`~common.handlers.checkpoint_saver.AtomicCheckpointSaver`), and the random generators must
    be reseeded per epoch (:class:`~common.handlers.epoch_seed.EpochSeed`).

    Args:
        save_dir: folder of the state files (created when missing).
        save_dict: objects with a ``state_dict`` to save besides the trainer, e.g. ``{"model": net, "optimizer": opt}``;
            None values are left out (a config can name an object that only some settings build, e.g. a second
            optimiser).
        resume: load the newest state file when the trainer starts.
        save_interval: epochs between two saves.
        n_saved: how many state files to keep.
        prefix: file name prefix.
        map_location: device the loaded tensors go to.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: dict,
        resume: bool = False,
        save_interval: int = 1,
        n_saved: int = 1,
        prefix: str = "training_state",
        map_location: str | torch.device | None = None,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"TrainingStateCheckpoint: save_interval must be >= 1, got {save_interval}")
        self.save_dir = Path(save_dir)
        self.save_dict = {key: value for key, value in save_dict.items() if value is not None}
        self.resume = resume
        self.save_interval = save_interval
        self.n_saved = n_saved
        self.prefix = prefix
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        saver = AtomicDiskSaver(self.save_dir)
        checkpoint = Checkpoint(
            objects, saver, filename_prefix=self.prefix, n_saved=None,
            filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
            global_step_transform=lambda eng, _: eng.state.epoch,
        )
        written: list[Path] = []

        def prune(_: Engine) -> None:
            """Keep the newest ``n_saved`` files of this run; remove every other state file in ``save_dir`` (older
            runs', and the one this run resumed from), so a later resume cannot pick a stale file."""
            if idist.get_rank() != 0:  # only rank 0 writes (ignite's DiskSaver), so only rank 0 prunes
                return
            written.append(self.save_dir / Path(checkpoint.last_checkpoint).name)
            keep = set(written[-self.n_saved:])
            for path in training_states(self.save_dir, self.prefix):
                if path not in keep:
                    path.unlink(missing_ok=True)

        def add_scaler(_: Engine) -> None:
            """The scaler exists only once the run has started; the saver and the loader share ``objects``."""
            if getattr(engine, "scaler", None) is not None:
                objects["scaler"] = engine.scaler

        engine.add_event_handler(Events.STARTED, add_scaler)  # before the CheckpointLoader's STARTED handler
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), checkpoint)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), prune)
        if not self.resume:
            return
        latest = latest_training_state(self.save_dir, self.prefix)
        if latest is None:
            logger.warning(f"resume requested but no {self.prefix}_epoch=*.pt in {self.save_dir}: starting afresh")
            return
        logger.info(f"resuming from {latest}")
        CheckpointLoader(load_path=str(latest), load_dict=objects, map_location=self.map_location).attach(engine)
