"""Generated datasets (the embedded demos): written once, atomically, safe for concurrent ranks.

A demo dataset is a folder produced by a deterministic ``write(folder) -> [relative file paths]`` function from a
set of parameters. :func:`ensure_generated` writes it into a temporary sibling folder, adds the marker
``<root>/.complete`` (JSON: the parameters and the file list) last, and moves it into place with ``os.replace``,
under a file lock, so that an interrupted run leaves nothing half-written and the ranks of a torchrun job
generate it once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

__all__ = ["ensure_generated", "MARKER"]

logger = logging.getLogger(__name__)

MARKER = ".complete"


def _read_marker(root: Path, generator: str) -> dict | None:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("generator") == generator else None


def _is_complete(root: Path, params: dict) -> bool:
    marker = _read_marker(root, params["generator"])
    if marker is None or {k: marker.get(k) for k in params} != params:
        return False
    return all((root / f).is_file() for f in marker.get("files", [])) and bool(marker.get("files"))


def _move_into_place(tmp: Path, root: Path) -> None:
    """``os.replace`` the finished ``tmp`` onto ``root``; an old ``root`` is first moved aside, then deleted."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / "data")
    try:
        os.replace(tmp, root)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def ensure_generated(root: str | os.PathLike, params: dict, write: Callable[[Path], list[str]], what: str) -> Path:
    """The dataset ``write`` makes from ``params`` at ``root``, generated unless it is already there.

    A second call with the same parameters finds the marker and every listed file and returns at once, rewriting
    nothing. A folder made by the same generator with other parameters, or with files missing, is regenerated;
    an empty folder is filled. Any other existing folder is left alone (FileExistsError), so that a mistyped
    ``root`` never deletes real data.

    Args:
        root: dataset folder.
        params: JSON-able parameters; ``params["generator"]`` names the generator (its module).
        write: writes the dataset into the given (empty, existing) folder and returns the files it wrote,
            relative to that folder.
        what: a few words naming the dataset, for messages.

    Raises:
        FileExistsError: ``root`` exists, is not empty and was not made by this generator.
    """
    root = Path(root).expanduser().absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if _is_complete(root, params):
            return root
        if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_marker(root, params["generator"]) is None)):
            raise FileExistsError(
                f"{root} exists and was not made by {params['generator']}; refusing to overwrite it with the {what}. "
                "Pass an empty or new folder."
            )
        logger.info("generating the %s in %s (%s)", what, root, params)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            files = write(tmp)
            (tmp / MARKER).write_text(json.dumps({**params, "files": files}, indent=1))
            _move_into_place(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
