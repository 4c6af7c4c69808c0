"""All-or-nothing outputs: folders written into a staging folder and published with one rename; CSV files
written to a temporary file and renamed into place."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["discard_folder", "publish_folder", "staged_folder", "write_csv"]


def discard_folder(folder: str | os.PathLike) -> None:
    """Remove ``folder`` (a stale staging folder of an interrupted run) if it exists."""
    shutil.rmtree(folder, ignore_errors=True)


def publish_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Replace ``target`` by the finished ``staging`` folder.

    The new folder appears under its final name by a single ``os.replace`` of a folder on the same file system,
    so ``target`` never holds a half-written result: it is either the previous complete output or the new one.

    Raises:
        FileNotFoundError: ``staging`` does not exist (the run wrote nothing).
    """
    staging, target = Path(staging), Path(target)
    if not staging.is_dir():
        raise FileNotFoundError(f"nothing to publish: staging folder {staging} does not exist (no output written)")
    previous = target.with_name(f".{target.name}.previous")
    discard_folder(previous)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    discard_folder(previous)
    return target


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new, empty staging folder beside ``target``; published as ``target`` (:func:`publish_folder`) when the
    ``with`` block completes, removed when it raises, so ``target`` never holds a half-written result::

        with staged_folder(out) as tmp:
            write_everything_into(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        publish_folder(tmp, target)
    finally:
        discard_folder(tmp)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> Path:
    """Write a CSV with a header atomically: a temporary file beside ``path``, renamed into place when complete.

    Rows are mappings (keys outside ``columns`` are ignored) or sequences in the order of ``columns``. On any
    error the temporary file is removed and an existing ``path`` is left as it was. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else row)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
