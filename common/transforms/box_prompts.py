"""Binary map -> one box prompt, with EndoKED's geometric filter.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports/Records
Leveraging Large Language and Vision Models", arXiv 2310.11173: the pseudo masks of the weakly supervised stage
are produced by prompting Segment Anything with one box drawn around the thresholded class activation map (or,
in later rounds, around the thresholded Polyp-PVT prediction). The box and the decision whether the image is
used at all come from the released helper ``from_mask2box_singlebox`` (specs/endoked.md §3.6 step 3, §4.4),
re-implemented here as :func:`mask_to_box`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["BoxDecision", "mask_to_box"]

_X, _Y, _W, _H, _AREA = cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT, cv2.CC_STAT_AREA


@dataclass(frozen=True)
class BoxDecision:
    """Outcome of :func:`mask_to_box`.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels (``x1 = x + w``, ``y1 = y + h``: exclusive ends) when accepted, else None.
        reason: ``"ok"`` when accepted, otherwise every failed rule joined by ``"; "``, e.g.
            ``"touches border; box area ratio 0.42 outside (0.01, 0.35)"``.
        n_components: components left after dropping the largest one (the count rule (d) compares).
        area_ratio: ``w * h / (H * W)`` of the chosen box (None when no component is left).
    """

    box: tuple[int, int, int, int] | None
    reason: str
    n_components: int
    area_ratio: float | None

    @property
    def accepted(self) -> bool:
        """True when the image passed every rule and ``box`` is set."""
        return self.box is not None


def _validate(mask: np.ndarray, area_range: tuple[float, float], max_components: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or min(mask.shape) == 0:
        raise ValueError(f"mask_to_box: mask must be a non-empty 2-D (H, W) array, got shape {mask.shape}")
    if len(area_range) != 2 or not 0.0 <= area_range[0] < area_range[1]:
        raise ValueError(f"mask_to_box: area_range must be (low, high) with 0 <= low < high, got {area_range}")
    if max_components < 1:
        raise ValueError(f"mask_to_box: max_components must be >= 1, got {max_components}")
    return (mask != 0).astype(np.uint8)


def mask_to_box(
    mask: np.ndarray,
    area_range: tuple[float, float] = (0.01, 0.35),
    max_components: int = 3,
    faithful_box_choice: bool = False,
) -> BoxDecision:
    """Pick one box prompt from a binary map ``M`` of shape ``(H, W)``, or reject the image.

    Steps (``from_mask2box_singlebox``, specs/endoked.md §3.6 step 3):

    1. 8-connected components of ``M`` with their statistics, as ``cv2.connectedComponentsWithStats`` returns them:
       the list **includes the background** (label 0, the box and pixel count of all zero pixels), so cv2's count
       is ``1 + number of foreground blobs``.
    2. Sort the components by pixel count, ascending (stable), and drop the last one, assumed to be the background.
       Components with zero pixels are ignored (cv2 reports an empty label 0 when ``M`` has no zero pixel).
    3. Choose the remaining component with the largest bounding-box area ``w * h`` (on ties the later one, i.e.
       the one with more pixels); ``box = (x, y, x + w, y + h)``.
    4. Accept only if all hold:

       (a) at least one component is left;
       (b) ``M`` has no foreground pixel on any of the four image borders;
       (c) ``area_range[0] < w * h / (H * W) < area_range[1]`` (strict on both sides; 0.01 and 0.35 in EndoKED);
       (d) ``n < max_components`` with ``n`` the number of components left after step 2. With the background
           dropped, ``n`` is the number of foreground blobs, so the released "fewer than 3" keeps images with at
           most 2 blobs (cv2's own count, background included, at most 3).

    When the foreground has more pixels than the background, step 2 drops the *polyp* and keeps the background,
    whose box is the box of all zero pixels. If the foreground does not touch the border (rule b), the zero pixels
    include the whole border, so that box is the whole image (ratio 1) and rule (c) rejects the image; if it
    does, rule (b) rejects it. Such images are therefore always rejected, as in the original.

    Args:
        mask: ``(H, W)`` binary map (bool or any numeric dtype; non-zero is foreground).
        area_range: open interval for the box area ratio of rule (c).
        max_components: rule (d) limit; the image is rejected when ``n >= max_components``.
        faithful_box_choice: reproduce a quirk of the released helper, which overwrites its "largest box" variable
            on every loop step and so returns the box of the *last* remaining component (the one with the most
            pixels), while rule (c) still tests the largest bounding-box area. The two differ only when two blobs
            are left and the one with fewer pixels has the larger box. Default False: the box that rule (c) tests.

    Returns:
        :class:`BoxDecision`; ``box`` holds Python ints.

    Raises:
        ValueError: ``mask`` is not a non-empty 2-D array, or the limits are invalid.
    """
    binary = _validate(mask, area_range, max_components)
    height, width = binary.shape
    if not binary.any():
        return BoxDecision(None, "no foreground", 0, None)

    _, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    stats = stats[stats[:, _AREA] > 0]
    stats = stats[np.argsort(stats[:, _AREA], kind="stable")][:-1]
    n_components = len(stats)

    reasons: list[str] = []
    box: tuple[int, int, int, int] | None = None
    area_ratio: float | None = None
    if n_components == 0:
        reasons.append("no component left after dropping the largest (taken as background)")
    else:
        box_areas = stats[:, _W].astype(np.int64) * stats[:, _H]
        best = n_components - 1 - int(np.argmax(box_areas[::-1]))  # largest box; ties -> later component
        area_ratio = float(box_areas[best]) / (height * width)
        chosen = stats[n_components - 1] if faithful_box_choice else stats[best]
        x, y, w, h = (int(v) for v in chosen[[_X, _Y, _W, _H]])
        box = (x, y, x + w, y + h)
    if binary[0].any() or binary[-1].any() or binary[:, 0].any() or binary[:, -1].any():
        reasons.append("touches border")
    if area_ratio is not None and not area_range[0] < area_ratio < area_range[1]:
        reasons.append(f"box area ratio {area_ratio:.4g} outside ({area_range[0]:g}, {area_range[1]:g})")
    if n_components >= max_components:
        reasons.append(f"{n_components} components (limit: fewer than {max_components})")
    if reasons:
        return BoxDecision(None, "; ".join(reasons), n_components, area_ratio)
    return BoxDecision(box, "ok", n_components, area_ratio)
