"""timm image backbones for the collection's bundles, with local checkpoints in the formats methods release.

Sparsam (specs/sparsam.md §3.1, §6.1) uses timm's XCiT-S12/8 with ``num_classes=0``: the forward pass returns the
class-token embedding ``[B, 384]`` after the final norm. Its released weights (``models/pretrained_<ds>.pt``) are a
state dict of the DINO teacher whose keys start with ``backbone.``; DINO checkpoints hold ``{"teacher": ...,
"student": ...}``. :func:`create_backbone` reads any of these from a local path (nothing is downloaded unless
``pretrained=True`` is asked for explicitly).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from common.utils.checkpoints import load_checkpoint

__all__ = ["create_backbone", "backbone_state_dict"]

_NESTED_KEYS = ("teacher", "student", "state_dict", "model")


def backbone_state_dict(checkpoint: Mapping[str, Any], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The backbone's tensors of a checkpoint, keys without ``prefix`` (and without DDP's ``module.``).

    A checkpoint nesting its weights under ``teacher``, ``student``, ``state_dict`` or ``model`` is unwrapped first
    (the teacher is preferred: it is the network Sparsam evaluates). When no key starts with ``prefix``, the
    state dict is taken to be the backbone's own. Keys of other parts (e.g. ``projection_head.``) are dropped.
    """
    for key in _NESTED_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return backbone_state_dict(checkpoint[key], prefix)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def create_backbone(
    name: str = "xcit_small_12_p8_224",
    num_classes: int = 0,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    prefix: str = "backbone.",
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model(name, num_classes=num_classes, **kwargs)``, loading ``checkpoint`` strictly when given.

    Args:
        name: a timm model name (any ViT / XCiT / CNN); e.g. ``xcit_small_12_p8_224`` (Sparsam, 384-d features).
        num_classes: 0 gives the pooled features ``[B, D]`` (D = ``model.num_features``); ``C`` adds a linear
            classifier (the supervised baseline).
        pretrained: let timm fetch its ImageNet weights (needs internet; off by default).
        checkpoint: a local file: a Sparsam / DINO checkpoint or a plain state dict of the backbone (see
            :func:`backbone_state_dict`). With ``num_classes > 0`` the classifier is left at its initialisation.
        prefix: key prefix of the backbone in the checkpoint.
        kwargs: further timm model arguments (e.g. ``{"embed_dim": 48, "depth": 2}`` for a tiny XCiT).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: the checkpoint cannot be read, or its keys do not match the network (names the file and keys).
    """
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **dict(kwargs or {}))
    if checkpoint is None:
        return model
    path = Path(checkpoint)
    loaded = load_checkpoint(path, "backbone checkpoint")
    if not isinstance(loaded, Mapping):
        raise ValueError(f"backbone checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
    state = backbone_state_dict(loaded, prefix)
    head = {k for k, _ in model.named_parameters() if num_classes and k.startswith(model.default_cfg.get(
        "classifier", "head"))}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k])}" for k, v in state.items() if k in shapes and v.shape != shapes[k]]
    if wrong:
        raise ValueError(f"backbone checkpoint {path} does not fit timm '{name}' {dict(kwargs or {})}: "
                         f"{len(wrong)} tensors of another shape (checkpoint vs network), e.g. {wrong[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ValueError(f"backbone checkpoint {path} does not fit timm '{name}': missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return model
