"""DHC sliding-window inference: clamped window starts, averaged logits of the branches, uniform blending.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023; ``code/test.py`` and ``code/utils/__init__.py`` (specs/dhc.md §6, §11.3).
For a volume of size ``S`` along an axis, a window (= training patch) of size ``p`` and a stride ``s`` the windows
start at ``min(k·s, S − p)`` for ``k = 0 … ⌈(S − p)/s⌉``. Every window is scored by

    probs = softmax((z_A + z_B) / 2)          (mean of the branches' logits, then softmax over classes)

(a single branch gives ``softmax(z_A)``); the window probabilities are summed into the volume and divided by the
count map of windows covering each voxel (uniform weighting), and ``probs.argmax(1)`` is the label map. No
post-processing follows.

MONAI equivalent: ``sliding_window_inference(x, roi_size=patch, sw_batch_size=…, predictor=
EnsembleLogitsPredictor([net_a, net_b]), overlap=monai_overlap(patch, strides), mode="constant")`` visits the
same windows and returns the same probabilities (its scan interval is ``int(p · (1 − overlap))`` and it also
clamps the last window to ``S − p``). Volumes smaller than the patch are padded as MONAI pads them: zeros
(``cval = 0``, i.e. the minimum of a min–max normalised volume), ``⌊(p − S)/2⌋`` before and the rest after, and the
output is cropped back — DHC itself would fail on such volumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DHC_STRIDES", "window_starts", "monai_overlap", "EnsembleLogitsPredictor", "dhc_sliding_window"]

DHC_STRIDES = (16, 32, 32)


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis: ``[min(k·s, S − p) for k in range(⌈(S − p)/s⌉ + 1)]``.

    Args:
        size: volume size ``S`` along the axis (at least ``patch``).
        patch: window size ``p``.
        stride: step ``s`` between windows.
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"window_starts: patch ({patch}) and stride ({stride}) must be positive")
    if size < patch:
        raise ValueError(f"window_starts: size {size} is smaller than the patch {patch} (pad the volume first)")
    return [min(k * stride, size - patch) for k in range(math.ceil((size - patch) / stride) + 1)]


def monai_overlap(patch: Sequence[int], strides: Sequence[int]) -> tuple[float, ...]:
    """Per-axis ``overlap`` for MONAI's ``sliding_window_inference`` whose scan interval is exactly ``strides``.

    MONAI's interval is ``int(p · (1 − overlap))``. ``overlap = 1 − s/p`` is returned where that truncates back to
    ``s`` (DHC's (64,128,128)/(16,32,32): 0.75 on every axis), otherwise ``1 − (s + ½)/p``, for which the
    truncation ``int(s + ½) = s`` is safe from floating-point error.
    """
    if len(patch) != len(strides):
        raise ValueError(f"monai_overlap: patch {tuple(patch)} and strides {tuple(strides)} differ in length")
    if any(s < 1 or s > p for p, s in zip(patch, strides)):
        raise ValueError(f"monai_overlap: every stride must be in [1, patch], got {tuple(strides)} for {tuple(patch)}")
    overlaps = []
    for p, s in zip(patch, strides):
        o = 1.0 - s / p
        overlaps.append(o if int(p * (1.0 - o)) == s else 1.0 - (s + 0.5) / p)
    return tuple(overlaps)


class EnsembleLogitsPredictor(nn.Module):
    """``softmax(mean_i net_i(x))`` over the class axis: DHC's two-branch (or single-branch) window predictor.

    Args:
        nets: the networks, each mapping ``[B, 1, d, h, w]`` to logits ``[B, C, d, h, w]``.

    Call ``.eval()`` on the predictor (it recurses into the networks) before inference: DHC tests with
    dropout off and BatchNorm running statistics.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(nets) == 0:
            raise ValueError("EnsembleLogitsPredictor: needs at least one network")
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, d, h, w]`` → class probabilities ``[B, C, d, h, w]``."""
        logits = []
        for i, net in enumerate(self.nets):
            out = net(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"EnsembleLogitsPredictor: network {i} returned {type(out).__name__}, not a tensor")
            logits.append(out)
        return torch.softmax(torch.stack(logits).mean(dim=0), dim=1)


def dhc_sliding_window(
    volume: torch.Tensor,
    predictors: nn.Module | Sequence[nn.Module] | Callable[[torch.Tensor], torch.Tensor],
    patch: Sequence[int],
    strides: Sequence[int] = DHC_STRIDES,
) -> torch.Tensor:
    """Class probabilities of a whole volume by DHC's sliding window (uniform average of window probabilities).

    Args:
        volume: ``[B, 1, D, H, W]`` normalised intensities.
        predictors: one network or a sequence of networks returning logits (combined by
            :class:`EnsembleLogitsPredictor`), or an :class:`EnsembleLogitsPredictor` itself.
        patch: window size ``(d, h, w)`` (DHC: the training patch (64, 128, 128)).
        strides: window steps per axis (DHC: (16, 32, 32)).

    Returns:
        ``[B, C, D, H, W]`` float32 probabilities on the volume's device; ``argmax(1)`` gives the label map.
    """
    if volume.ndim != 5 or volume.shape[1] != 1:
        raise ValueError(f"dhc_sliding_window: volume must be [B, 1, D, H, W], got {tuple(volume.shape)}")
    if len(patch) != 3 or len(strides) != 3:
        raise ValueError(f"dhc_sliding_window: patch {tuple(patch)} and strides {tuple(strides)} must have 3 entries")
    if any(s < 1 or s > p for p, s in zip(patch, strides)):
        raise ValueError(f"dhc_sliding_window: strides {tuple(strides)} must be in [1, patch] (patch {tuple(patch)}),"
                         " or some voxels are covered by no window")
    if isinstance(predictors, EnsembleLogitsPredictor):
        predictor = predictors
    elif isinstance(predictors, nn.Module) or not isinstance(predictors, Sequence):
        predictor = EnsembleLogitsPredictor([predictors])
    else:
        predictor = EnsembleLogitsPredictor(list(predictors))

    size = tuple(volume.shape[2:])
    diffs = [max(p - s, 0) for p, s in zip(patch, size)]
    pad = [(d // 2, d - d // 2) for d in diffs]
    if any(diffs):  # F.pad lists the last axis first
        volume = F.pad(volume, [v for lo_hi in reversed(pad) for v in lo_hi], mode="constant", value=0.0)
    padded = tuple(volume.shape[2:])
    starts = [window_starts(n, p, s) for n, p, s in zip(padded, patch, strides)]

    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, *padded), dtype=torch.float32, device=volume.device)
    with torch.no_grad():
        for z, y, x in product(*starts):
            window = (slice(None), slice(None), slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
            probs = predictor(volume[window]).float()
            if total is None:
                total = torch.zeros((volume.shape[0], probs.shape[1], *padded), dtype=torch.float32,
                                    device=volume.device)
            total[window] += probs
            count[window] += 1.0
    out = total / count
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pad, size))
    return out[(slice(None), slice(None), *crop)]
