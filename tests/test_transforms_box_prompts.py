"""mask_to_box: EndoKED's box filter (specs/endoked.md §3.6 step 3), every rule on hand-made masks."""

import numpy as np
import pytest

from common.transforms.box_prompts import BoxDecision, mask_to_box


def canvas(h: int = 10, w: int = 10) -> np.ndarray:
    return np.zeros((h, w), dtype=bool)


def test_single_blob_box_has_exclusive_ends():
    m = canvas()
    m[2:5, 3:6] = True  # rows 2..4, cols 3..5: x=3, y=2, w=h=3
    d = mask_to_box(m)
    assert d == BoxDecision(box=(3, 2, 6, 5), reason="ok", n_components=1, area_ratio=pytest.approx(0.09))
    assert d.accepted  # ratio 3*3/(10*10) = 0.09 inside (0.01, 0.35)
    assert all(type(v) is int for v in d.box)


def test_numeric_masks_are_binarised():
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 3:6] = 255
    assert mask_to_box(m).box == (3, 2, 6, 5)


def test_no_foreground():
    d = mask_to_box(canvas())
    assert (d.box, d.reason, d.n_components, d.area_ratio) == (None, "no foreground", 0, None)
    assert not d.accepted


@pytest.mark.parametrize("border", ["top", "bottom", "left", "right"])
def test_each_border_rejects(border):
    m = canvas()
    rows_cols = {"top": (slice(0, 3), slice(4, 6)), "bottom": (slice(7, 10), slice(4, 6)),
                 "left": (slice(4, 6), slice(0, 3)), "right": (slice(4, 6), slice(7, 10))}
    m[rows_cols[border]] = True  # a 3x2 / 2x3 blob touching one border: ratio 6/100 = 0.06, 1 component
    d = mask_to_box(m)
    assert d.box is None and d.reason == "touches border" and d.n_components == 1


@pytest.mark.parametrize(
    "h, w, accepted",
    [
        (10, 10, False),  # 100 / 10000 = 0.01: not > 0.01
        (3, 34, True),  # 102 / 10000 = 0.0102
        (53, 66, True),  # 3498 / 10000 = 0.3498
        (50, 70, False),  # 3500 / 10000 = 0.35: not < 0.35
    ],
)
def test_area_ratio_limits_are_strict(h, w, accepted):
    m = canvas(100, 100)
    m[10:10 + h, 10:10 + w] = True
    d = mask_to_box(m)
    assert d.accepted is accepted
    assert d.area_ratio == pytest.approx(h * w / 10000)
    if not accepted:
        assert d.reason == f"box area ratio {h * w / 10000:.4g} outside (0.01, 0.35)"


def test_custom_area_range():
    m = canvas()
    m[2:5, 3:6] = True  # ratio 0.09
    assert mask_to_box(m, area_range=(0.1, 0.5)).reason == "box area ratio 0.09 outside (0.1, 0.5)"


def three_blobs() -> np.ndarray:
    m = canvas()
    m[1:3, 1:3] = m[1:3, 5:7] = m[5:7, 1:3] = True  # three separate 2x2 squares, each box 4/100 = 0.04
    return m


def test_three_components_rejected_two_accepted():
    # cv2 counts background + 3 blobs = 4 labels; after dropping the largest (background) 3 remain: 3 >= 3.
    d = mask_to_box(three_blobs())
    assert d.box is None and d.n_components == 3
    assert d.reason == "3 components (limit: fewer than 3)"
    m = three_blobs()
    m[5:7, 1:3] = False  # 2 blobs left ...
    m[1:4, 5:8] = True  # ... the second grown to rows 1..3, cols 5..7: largest box 9/100 = 0.09 at x=5, y=1
    d = mask_to_box(m)
    assert d.accepted and d.n_components == 2 and d.box == (5, 1, 8, 4)


def test_max_components_limit_is_exclusive():
    m = canvas()
    m[1:4, 1:4] = True
    m[6, 6] = True  # 2 blobs
    assert mask_to_box(m, max_components=3).accepted
    assert mask_to_box(m, max_components=2).reason == "2 components (limit: fewer than 2)"


def test_diagonal_neighbours_are_one_component():
    m = canvas()
    m[1:3, 1:3] = True  # A: rows/cols 1..2
    m[3:5, 3:5] = True  # B: rows/cols 3..4, touching A only at the corner (2,2)-(3,3)
    m[1:4, 6:9] = True  # C: 3x3
    # 8-connectivity: A+B is one component (box 4x4 = 16 > 9), C another -> 2 components, accepted.
    # (4-connectivity would give 3 components and a rejection.)
    d = mask_to_box(m)
    assert d.n_components == 2 and d.box == (1, 1, 5, 5)


def diagonal_and_square() -> np.ndarray:
    m = canvas(20, 20)
    for i in range(6):
        m[2 + i, 2 + i] = True  # diagonal line: 6 px, box 6x6 = 36 at x=y=2
    m[12:16, 12:16] = True  # square: 16 px, box 4x4 = 16 at x=y=12
    return m


def test_box_is_the_largest_bounding_box_not_the_most_pixels():
    d = mask_to_box(diagonal_and_square())
    assert d.box == (2, 2, 8, 8)  # the line: box area 36 > 16
    assert d.area_ratio == pytest.approx(36 / 400)  # 0.09


def test_faithful_box_choice_returns_the_component_with_most_pixels():
    # The released loop ends with the box of the last component in ascending pixel order (the 16-px square),
    # while its area rule still tests the largest box (36 / 400 = 0.09).
    d = mask_to_box(diagonal_and_square(), faithful_box_choice=True)
    assert d.box == (12, 12, 16, 16)
    assert d.area_ratio == pytest.approx(0.09)


def test_equal_box_areas_choose_the_component_with_more_pixels():
    m = canvas()
    m[1:4, 1:4] = True  # full 3x3: 9 px
    m[5:8, 5:8] = True
    m[6, 6] = False  # 3x3 ring: 8 px; both boxes 3x3 = 9
    assert mask_to_box(m).box == (1, 1, 4, 4)


def test_foreground_larger_than_background_is_rejected():
    # 8x8 block (64 px) inside a 10x10 image: the background ring has 36 px, so the *block* is dropped as
    # "largest"; the kept background's box is the whole image: ratio 100/100 = 1.
    m = canvas()
    m[1:9, 1:9] = True
    d = mask_to_box(m)
    assert d.box is None and d.n_components == 1
    assert d.reason == "box area ratio 1 outside (0.01, 0.35)"


def test_all_foreground_lists_every_failed_rule():
    d = mask_to_box(np.ones((10, 10), bool))
    assert d.reason == "no component left after dropping the largest (taken as background); touches border"
    assert d.n_components == 0 and d.area_ratio is None


def test_several_failures_are_joined():
    m = canvas()
    m[0, 0] = m[4, 4] = m[8, 8] = True  # 3 single pixels, one on the border; largest box 1/100 = 0.01
    assert mask_to_box(m).reason == (
        "touches border; box area ratio 0.01 outside (0.01, 0.35); 3 components (limit: fewer than 3)"
    )


@pytest.mark.parametrize(
    "mask, kwargs, message",
    [
        (np.zeros((2, 3, 4)), {}, "2-D"),
        (np.zeros((0, 4)), {}, "non-empty"),
        (np.zeros((4, 4)), {"area_range": (0.4, 0.3)}, "area_range"),
        (np.zeros((4, 4)), {"max_components": 0}, "max_components"),
    ],
)
def test_bad_arguments(mask, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mask_to_box(mask, **kwargs)
