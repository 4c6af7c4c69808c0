"""Reading checkpoint files with clear errors, and strict state-dict loading that names what differs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["load_checkpoint", "read_state_dict", "load_state_dict_strict", "checkpointed_networks"]

logger = logging.getLogger(__name__)

# Training scripts often store numpy scalars beside the weights (the official FCBFormer train.py saves np.float64
# losses and metrics): torch's weights-only unpickler may rebuild those scalars and their dtype, under numpy 2 and
# numpy 1 module names (``numpy._core.multiarray.scalar`` / ``numpy.core.multiarray.scalar``), and nothing else.
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_NUMPY_SAFE_GLOBALS = [
    _NUMPY_SCALAR, (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.float64))
]


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    Besides tensors and plain containers, the weights-only unpickler accepts numpy scalars (numpy 2 and numpy 1
    module names) and the float64 dtype, as training scripts store them beside the weights (e.g. ``"loss":
    np.float64(0.25)``); any other object still makes the file unreadable.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read (damaged, not a torch file, or holding non-tensor objects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: '{path}'.")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise ValueError(f"could not read {what} '{path}' (corrupt or not a torch file): {err}") from err


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict saved with :func:`torch.save` (read by :func:`load_checkpoint`: weights only, on CPU).

    Accepts a plain ``{key: tensor}`` mapping or one wrapped as ``{"model_state_dict": sd}`` (the official FCBFormer
    ``train.py`` file: ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss", ...}`` with numpy scalars),
    ``{"model": sd}`` or ``{"state_dict": sd}`` (the first of these keys holding a mapping is taken); a leading
    ``module.`` (DataParallel / DistributedDataParallel) is stripped from every key that has it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read, or it does not hold a mapping of names to tensors.
    """
    obj = load_checkpoint(path)
    for wrapper in ("model_state_dict", "model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint '{path}' does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, max_listed: int = 5
) -> None:
    """Load ``state_dict`` into ``module`` requiring exactly the same keys and shapes.

    Raises:
        ValueError: naming ``path`` and listing up to ``max_listed`` missing, unexpected and
            shape-mismatched keys.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {kind} key(s), e.g. {keys[:max_listed]}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(
            f"checkpoint '{path}' does not match {type(module).__name__}: " + "; ".join(problems) + "."
        )
    module.load_state_dict(state_dict, strict=True)


def checkpointed_networks(candidates: Mapping[str, tuple[nn.Module, str | os.PathLike]],
                          device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """``{name: network}`` for every ``name: (network, checkpoint)`` whose checkpoint file exists, loaded strictly
    (:func:`load_state_dict_strict`) and moved to ``device``; the others are left out with a log line.

    Raises:
        FileNotFoundError: naming every checkpoint when none exists.
    """
    loaded = {}
    for name, (network, path) in candidates.items():
        if not Path(path).is_file():
            logger.info("no checkpoint %s: %s is not evaluated", path, name)
            continue
        load_state_dict_strict(network, read_state_dict(path), path)
        loaded[name] = network.to(device)
    if not loaded:
        raise FileNotFoundError("none of the checkpoints exists (train first): "
                                + ", ".join(str(path) for _, path in candidates.values()))
    return loaded
