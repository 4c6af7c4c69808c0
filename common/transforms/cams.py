"""Class activation map (CAM) utilities of ToCo / EndoKED-WSSS: multi-scale CAMs, thresholds, local crops, PAR.

Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation" (ToCo), CVPR 2023, §3; used unchanged
by EndoKED-WSSS (Wang et al., arXiv 2310.11173; specs/endoked.md §3.3-§3.5). Everything is pure, batched torch.

Shapes: images ``[B, 3, H, W]``; CAMs ``[B, C, H, W]`` with one channel per foreground class (C = 1 for polyps);
image-level labels ``cls_label [B, C]`` in {0, 1}; label maps ``[B, H, W]`` of class indices (0 = background,
``c + 1`` = foreground class ``c``, ``ignore_index`` = uncertain).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "cam_to_label",
    "cam_to_roi_mask",
    "crop_from_roi",
    "label_to_affinity_mask",
    "multi_scale_cam",
    "refine_cams_with_par",
    "valid_cam",
]


def _check_cam_and_label(cam: torch.Tensor, cls_label: torch.Tensor, name: str) -> None:
    if cam.ndim != 4:
        raise ValueError(f"{name}: cam must be [B, C, H, W], got shape {tuple(cam.shape)}")
    if cls_label.shape != cam.shape[:2]:
        raise ValueError(f"{name}: cls_label must be [B, C] = {tuple(cam.shape[:2])} to match the cam, "
                         f"got {tuple(cls_label.shape)}")


def _check_thresholds(low: float, high: float, name: str) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"{name}: thresholds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")


def _min_max(cam: torch.Tensor) -> torch.Tensor:
    """Per image and channel ``cam <- cam - min; cam <- cam / (max + 1e-5)`` (max taken after the shift)."""
    cam = cam - cam.amin(dim=(2, 3), keepdim=True)
    return cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-5)


@torch.no_grad()
def multi_scale_cam(
    model: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale, flip-augmented CAMs (ToCo ``multi_scale_cam2``, specs/endoked.md §3.3).

    For every scale ``s`` the batch is resized bilinearly to ``(floor(sH), floor(sW))`` (``s = 1`` uses it as is),
    ``model([X_s; hflip(X_s)], cam_only=True)`` gives ``(cam_aux, cam)`` at the token grid, each is upsampled
    bilinearly to ``(H, W)`` and the flipped half is flipped back::

        A_s = ReLU(max(A(X_s), hflip(A(hflip(X_s)))))        A = sum_s A_s
        A <- A - min_hw(A);   A <- A / (max_hw(A) + 1e-5)      (per image and channel)

    for the main CAM and the auxiliary CAM alike. The model is used in whatever mode it is in (training calls it
    in ``train()`` mode, as the original does).

    Args:
        model: returns ``(cam_aux [N, C, h, w], cam [N, C, h, w])`` for ``model(x, cam_only=True)``.
        images: ``[B, 3, H, W]`` normalised images.
        scales: resize rates, each one summed once (training: 1.0, 0.5, 0.75, 1.25, 1.5).
        flip: add the horizontally flipped pass (ToCo always does).

    Returns:
        ``(cam, cam_aux)``, float32 ``[B, C, H, W]`` in ``[0, 1)``.
    """
    if images.ndim != 4:
        raise ValueError(f"multi_scale_cam: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"multi_scale_cam: scales must be a non-empty list of positive rates, got {scales}")
    b, _, h, w = images.shape
    cam_sum: torch.Tensor | None = None
    aux_sum: torch.Tensor | None = None
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(
            images, size=(int(scale * h), int(scale * w)), mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cam_aux, cam = model(x, cam_only=True)
        maps = []
        for m in (cam, cam_aux):
            m = F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False)
            if flip:
                m = torch.maximum(m[:b], m[b:].flip(-1))
            maps.append(F.relu(m))
        cam_sum = maps[0] if cam_sum is None else cam_sum + maps[0]
        aux_sum = maps[1] if aux_sum is None else aux_sum + maps[1]
    return _min_max(cam_sum), _min_max(aux_sum)


def valid_cam(cam: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """``cam * y`` per image and channel: the CAMs of classes absent from the image are zeroed.

    Args:
        cam: ``[B, C, H, W]``.
        cls_label: ``[B, C]`` image-level labels in {0, 1}.
    """
    _check_cam_and_label(cam, cls_label, "valid_cam")
    return cam * cls_label.to(cam.dtype)[:, :, None, None]


def cam_to_roi_mask(cam: torch.Tensor, cls_label: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Region-of-interest map of ToCo's local crops (``cam_to_roi_mask2``, specs/endoked.md §3.4 step 2).

    With ``v = max_c(y_c A_c)`` per pixel::

        roi = 0 if v <= low;   2 if v >= high;   1 otherwise   (uncertain)

    Returns:
        int64 ``[B, H, W]`` in {0, 1, 2}; images without any class (negatives) are all 0.
    """
    _check_thresholds(low, high, "cam_to_roi_mask")
    value = valid_cam(cam, cls_label).amax(dim=1)
    roi = torch.ones_like(value, dtype=torch.long)
    roi[value <= low] = 0
    roi[value >= high] = 2
    return roi


def cam_to_label(
    cam: torch.Tensor,
    cls_label: torch.Tensor,
    low: float,
    high: float,
    ignore_mid: bool = True,
    ignore_index: int = 255,
    bkg: float = 0.45,
) -> torch.Tensor:
    """Pseudo label map from CAMs (ToCo ``cam_to_label``, specs/endoked.md §3.4 step 5 PTC).

    With ``v = max_c(y_c A_c)`` and ``k = argmax_c(y_c A_c)`` per pixel, the label is ``k + 1`` if ``v > bkg``
    else 0; with ``ignore_mid`` it is then overwritten so that::

        label = k + 1 if v > high;   ignore_index if low < v <= high;   0 if v <= low

    Args:
        cam: ``[B, C, H, W]`` CAMs in [0, 1].
        cls_label: ``[B, C]`` image-level labels.
        low, high: the uncertain band (0.25, 0.75).
        ignore_mid: mark the band ``(low, high]`` as ``ignore_index``.
        ignore_index: value of uncertain pixels.
        bkg: background threshold used when ``ignore_mid`` is False (0.45).

    Returns:
        int64 ``[B, H, W]``.
    """
    _check_thresholds(low, high, "cam_to_label")
    value, index = valid_cam(cam, cls_label).max(dim=1)
    label = torch.where(value > bkg, index + 1, torch.zeros_like(index))
    if ignore_mid:
        label[value <= high] = ignore_index
        label[value <= low] = 0
    return label


def crop_from_roi(
    local_images: torch.Tensor,
    roi: torch.Tensor,
    crop_num: int = 8,
    crop_size: int = 112,
    margin: int = 56,
    generator: torch.Generator | None = None,
    neg_ratio: float = 0.25,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Local crops for ToCo's class-token contrast (``crop_from_roi_neg``, specs/endoked.md §3.4 step 3).

    For every image, ``crop_num`` distinct centres ``(i, j)`` are drawn uniformly, without replacement, among the
    pixels with ``roi <= 1`` (not confident foreground) inside a ``margin``-pixel border; when fewer than
    ``crop_num`` such pixels exist, among all pixels inside the border. The crop is
    ``[i - crop_size // 2, i - crop_size // 2 + crop_size)`` (same for ``j``). A crop is flagged negative (0) when
    ``sum(roi over the crop) / crop_size^2 <= neg_ratio``, positive (1) otherwise; the two global views that precede
    the local crops are always positive.

    Args:
        local_images: ``[B, C, H, W]`` the (augmented, normalised) local view.
        roi: ``[B, H, W]`` from :func:`cam_to_roi_mask`.
        crop_num: local crops per image (8).
        crop_size: crop side (112).
        margin: centres keep this distance from the border; at least ``crop_size // 2``.
        generator: random source of the centres (CPU generator; None: the global one).
        neg_ratio: flag threshold (0.25 in EndoKED).

    Returns:
        ``(crops, flags)``: ``crop_num`` tensors ``[B, C, crop_size, crop_size]`` and float ``[B, 2 + crop_num]``.
    """
    if local_images.ndim != 4 or roi.shape != (local_images.shape[0], *local_images.shape[2:]):
        raise ValueError(f"crop_from_roi: need local_images [B, C, H, W] and roi [B, H, W] of the same B, H, W; got "
                         f"{tuple(local_images.shape)} and {tuple(roi.shape)}")
    if crop_num < 1 or crop_size < 1 or margin < crop_size // 2:
        raise ValueError(f"crop_from_roi: need crop_num >= 1, crop_size >= 1 and margin >= crop_size // 2; got "
                         f"crop_num={crop_num}, crop_size={crop_size}, margin={margin}")
    b, _, h, w = local_images.shape
    inner_h, inner_w = h - 2 * margin, w - 2 * margin
    if inner_h < 1 or inner_w < 1 or inner_h * inner_w < crop_num:
        raise ValueError(f"crop_from_roi: images of {h}x{w} leave {max(inner_h, 0)}x{max(inner_w, 0)} crop centres "
                         f"inside the margin {margin}, fewer than crop_num={crop_num}")
    candidates = (roi[:, margin:h - margin, margin:w - margin] <= 1).flatten(1)
    too_few = candidates.sum(dim=1) < crop_num
    candidates[too_few] = True
    scores = torch.rand(candidates.shape, generator=generator).to(roi.device)
    centres = scores.masked_fill(~candidates, -1.0).topk(crop_num, dim=1).indices  # [B, K]
    offsets = torch.arange(crop_size, device=roi.device)
    rows = (centres // inner_w + margin - crop_size // 2)[:, :, None] + offsets  # [B, K, S]
    cols = (centres % inner_w + margin - crop_size // 2)[:, :, None] + offsets
    batch = torch.arange(b, device=roi.device)[:, None, None, None]
    rows, cols = rows[:, :, :, None], cols[:, :, None, :]
    crops = local_images[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # [B, K, C, S, S]
    roi_share = roi[batch, rows, cols].flatten(2).sum(dim=2).float() / crop_size ** 2
    flags = torch.ones(b, 2 + crop_num, device=local_images.device)
    flags[:, 2:] = (roi_share > neg_ratio).float()
    return list(crops.unbind(dim=1)), flags


def label_to_affinity_mask(label_tokens: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pairwise token affinity targets of ToCo's PTC loss (``label_to_aff_mask``, specs/endoked.md §3.4).

    ``T_ij = 1`` if tokens ``i`` and ``j`` share a label, 0 if they differ, ``ignore_index`` if either is
    ``ignore_index`` or ``i = j``.

    Args:
        label_tokens: ``[B, h, w]`` (or ``[B, N]``) labels on the token grid.

    Returns:
        int64 ``[B, N, N]`` with ``N = h * w``.
    """
    if label_tokens.ndim not in (2, 3):
        raise ValueError(f"label_to_affinity_mask: label_tokens must be [B, h, w] or [B, N], got shape "
                         f"{tuple(label_tokens.shape)}")
    flat = label_tokens.flatten(1)
    affinity = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = flat == ignore_index
    affinity[ignored[:, :, None] | ignored[:, None, :]] = ignore_index
    affinity.diagonal(dim1=1, dim2=2).fill_(ignore_index)
    return affinity


@torch.no_grad()
def refine_cams_with_par(
    par: nn.Module,
    images01: torch.Tensor,
    cams: torch.Tensor,
    cls_labels: torch.Tensor,
    high: float,
    low: float,
    ignore_index: int = 255,
    down_scale: int = 2,
) -> torch.Tensor:
    """Segmentation pseudo labels from CAMs refined by PAR (ToCo ``refine_cams_with_bkg_v2``, specs §3.5).

    At ``(H // down_scale, W // down_scale)`` (bilinear), for ``kappa`` in {high, low}: a constant background
    channel ``kappa`` is put before the CAMs, classes absent from the image are dropped, ``softmax`` over the
    channels, PAR propagates it over the image, the result is upsampled bilinearly to ``(H, W)`` and
    ``L_kappa = argmax`` (0 = background, ``c + 1`` = class ``c``). Then::

        label = L_high if L_high > 0;   0 if L_high = L_low = 0;   ignore_index otherwise

    The image is the true ``[0, 1]`` image (the EndoKED "ALL" script feeds a collapsed uint8 cast, §3.5).

    Args:
        par: pixel-adaptive refinement, ``par(images [N, 3, h, w] in [0, 1], masks [N, K, h, w]) -> [N, K, h, w]``.
        images01: ``[B, 3, H, W]`` de-normalised images in [0, 1].
        cams: ``[B, C, H, W]`` CAMs in [0, 1] (already masked by the labels or not: absent classes are dropped).
        cls_labels: ``[B, C]`` image-level labels; negatives (no class) get background everywhere.
        high, low: background levels (0.75, 0.25).
        ignore_index: value of the uncertain pixels.
        down_scale: PAR works at ``1 / down_scale`` resolution (2).

    Returns:
        int64 ``[B, H, W]`` in {0, 1..C, ignore_index}.
    """
    _check_cam_and_label(cams, cls_labels, "refine_cams_with_par")
    _check_thresholds(low, high, "refine_cams_with_par")
    b, _, h, w = cams.shape
    if images01.shape != (b, 3, h, w):
        raise ValueError(f"refine_cams_with_par: images01 must be [B, 3, H, W] = {(b, 3, h, w)} to match the cams, "
                         f"got {tuple(images01.shape)}")
    if down_scale < 1 or h // down_scale < 1 or w // down_scale < 1:
        raise ValueError(f"refine_cams_with_par: down_scale={down_scale} does not fit cams of {h}x{w}")
    size = (h // down_scale, w // down_scale)
    small_images = F.interpolate(images01.float(), size=size, mode="bilinear", align_corners=False)
    small_cams = F.interpolate(cams.float(), size=size, mode="bilinear", align_corners=False)
    small_cams = small_cams.masked_fill((cls_labels <= 0)[:, :, None, None], float("-inf"))
    background = torch.ones_like(small_cams[:, :1])
    probs = torch.cat([torch.cat([background * kappa, small_cams], dim=1).softmax(dim=1) for kappa in (high, low)])
    refined = par(small_images.repeat(2, 1, 1, 1), probs)
    labels = F.interpolate(refined.float(), size=(h, w), mode="bilinear", align_corners=False).argmax(dim=1)
    label_high, label_low = labels[:b], labels[b:]
    label = torch.where(label_high > 0, label_high, torch.full_like(label_high, ignore_index))
    label[(label_high == 0) & (label_low == 0)] = 0
    return label
