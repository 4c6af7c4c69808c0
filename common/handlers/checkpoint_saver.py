"""Checkpoint files that a crash can never leave truncated, and a best-model saver whose best score survives a resume.

MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)`` (ignite's atomic mode makes the file with
``mkstemp``, mode ``0o600``): a process killed while ``torch.save`` streams ``model.pt`` leaves a truncated file,
and a fixed-name file (``key_metric_filename="model.pt"``) is even deleted before it is written again. Here every
file is written to a temporary file in the same folder, flushed to disk, and renamed over the target with
``os.replace`` (atomic on POSIX and Windows within one file system), so a reader sees the old file or the new one.
The file mode is that of a plain ``open(path, "w")``: ``0o666 & ~umask`` (``0o644`` with the usual umask ``022``).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "atomic_write"]

logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a new temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    The temporary file ``.<name>.<random>.tmp`` is created with mode ``0o666`` minus the umask (what ``open`` gives),
    fsynced after ``write`` returns, and removed if ``write`` raises; ``path`` is then either untouched or
    completely replaced.

    Args:
        path: the destination file; its folder must exist.
        write: writes the content to a binary file object, e.g. ``lambda f: torch.save(obj, f)``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"atomic_write: folder of '{path}' does not exist")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing each checkpoint with :func:`atomic_write` (module docstring).

    Args:
        dirname: folder of the checkpoint files (created when missing).
        filename: a fixed file name replacing the one ignite generates (MONAI's ``final_filename`` /
            ``key_metric_filename``); ``remove`` then does nothing, since the next write replaces the file anyway
            and removing it first would leave no file for a moment.
        require_empty: refuse a folder already holding ``.pt`` files.
        save_on_rank: the rank that writes in a distributed run.
        kwargs: keyword arguments of ``torch.save``.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, require_empty: bool = False,
                 save_on_rank: int = 0, **kwargs: Any) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=require_empty,
                         save_on_rank=save_on_rank, **kwargs)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_write(path, lambda f: func(checkpoint, f, **self.kwargs))

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) whose files are written atomically (:class:`AtomicDiskSaver`), and
    whose key-metric bookkeeping is saved and restored with ``state_dict``/``load_state_dict``.

    Put it in the ``save_dict`` of :class:`~common.handlers.training_state.TrainingStateCheckpoint`: a resumed run
    then knows the best score so far, and a worse validation score after the resume does not overwrite the best
    ``model.pt``. The state is ignite's ``Checkpoint`` state of the key-metric saver (``{"_saved": [(score,
    filename), ...]}`` in ignite 0.5, scores as Python floats so that ``weights_only`` loading accepts them), the
    format MONAI's ``load_state_dict`` and ``key_metric_save_state=True`` use.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                old = checkpoint.save_handler
                checkpoint.save_handler = AtomicDiskSaver(old.dirname, filename=getattr(old, "filename", None))

    def state_dict(self) -> dict[str, list[tuple[float, str]]]:
        """ignite's ``Checkpoint.state_dict()`` of the key-metric saver, ``[(score, filename), ...]`` best last, with
        the scores as Python floats (an empty list without a key-metric saver)."""
        if self._key_metric_checkpoint is None:
            return {key: [] for key in Checkpoint._state_dict_all_req_keys}
        return {key: [(float(priority), str(filename)) for priority, filename in items]
                for key, items in self._key_metric_checkpoint.state_dict().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (ignite raises ``ValueError`` naming a missing entry); without a
        key-metric saver, scores in ``state_dict`` are ignored with a warning."""
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict(state_dict)
        elif any(state_dict.values()):
            logger.warning("AtomicCheckpointSaver: the state holds key-metric scores but this saver has no key-metric "
                           "checkpoint (save_key_metric=False); they are ignored")
