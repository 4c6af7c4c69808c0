"""Helpers of the bundle configs: a guard against command-line overrides that name no id, and the ``compile`` switch.

``python -m monai.bundle run --config_file ... --epoch 3`` silently *adds* a top-level id ``epoch`` next to the
real ``epochs`` and trains for the default number of epochs (MONAI's ``ConfigParser.update`` creates missing
keys). The bundles call :func:`check_cli_overrides` in ``initialize`` to turn such typos into an error.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

from torch import nn

__all__ = ["check_cli_overrides", "cli_overrides", "compiled", "choose"]

# keyword arguments of monai.bundle.scripts.run itself: not config ids
RUN_ARGUMENTS = {"config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "tracking",
                 "args_file", "workflow_type", "workflow_name"}


def cli_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs of a ``monai.bundle`` command line (flags without value map to "")."""
    pairs: dict[str, str] = {}
    args = list(argv)
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        pairs[key] = value
    return pairs


def _config_files(value: str) -> list[Path]:
    text = value.strip()
    if text.startswith("["):
        names = json.loads(text.replace("'", '"'))
    else:
        names = [name for name in text.split(",") if name]
    return [Path(name) for name in names]


def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """Raise ``KeyError`` when a ``monai.bundle run`` override names a top-level id that no config file defines.

    Only the top-level part of an id is checked (``network_def#dropout`` may add a constructor argument; MONAI
    itself refuses ``a#b`` when ``a`` is missing). Does nothing unless the process is the ``monai.bundle``
    command line (``argv`` defaults to ``sys.argv``), so in-process workflows (tests, MONAI Label) are not affected.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py"):
        return
    overrides = cli_overrides(argv[1:])
    if "config_file" not in overrides:
        return
    known: set[str] = set()
    files = _config_files(overrides["config_file"])
    for path in files:
        if path.suffix == ".json" and path.is_file():
            known.update(json.loads(path.read_text()))
    for key in overrides:
        top = key.replace("::", "#").split("#")[0].lstrip("+")
        if key in RUN_ARGUMENTS or top == "_meta_" or top in known:
            continue
        close = difflib.get_close_matches(top, sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"override --{key} names no id of {', '.join(map(str, files))}{hint}")


def compiled(module: nn.Module, enabled: bool = True, submodules: Sequence[str] = ()) -> nn.Module:
    """``module`` itself, compiled in place with ``nn.Module.compile()`` when ``enabled`` (the bundles' ``compile`` id).

    In-place compilation keeps the object, its parameters and its ``state_dict`` keys (no ``_orig_mod.`` prefix,
    unlike ``torch.compile(module)``), so optimisers, EMA teachers and checkpoints are unaffected; the first forward
    of each input shape pays the compilation. Shapes are static (``dynamic=False``): Polyp-PVT's three training
    scales and DINO's two view sizes each get their own graph (with automatic dynamic shapes, inductor of torch
    2.14.1 failed on the second Polyp-PVT scale on CPU: "cannot determine truth value of Relational").

    Args:
        module: the network.
        enabled: compile (False returns ``module`` untouched).
        submodules: names of child modules to compile instead of ``module`` itself, for engines that call the
            children directly (the co-training branches ``branch_a``, ``branch_b``).

    Returns:
        ``module``.
    """
    if not enabled:
        return module
    for name in submodules:
        child = getattr(module, name, None)
        if not isinstance(child, nn.Module):
            raise ValueError(f"compiled: {type(module).__name__} has no submodule {name!r} to compile")
    for target in [getattr(module, name) for name in submodules] or [module]:
        target.compile(dynamic=False)
    return module


def choose(options: Mapping[str, Any], key: str, name: str) -> Any:
    """``options[key]``, or a ValueError naming the config id ``name``, the value given and the choices (configs
    use it for string switches such as ``--export_bags train|val|all``)."""
    if key not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {key!r}")
    return options[key]
