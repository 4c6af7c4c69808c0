"""All-or-nothing output folders: write into a staging folder, then publish it with one rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["discard_folder", "publish_folder"]


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
