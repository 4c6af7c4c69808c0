"""Masked average pooling by hand (specs/cdtg.md §4.2)."""

import pytest
import torch

from common.networks.prototypes import foreground_background_prototypes, masked_average_pool, resize_mask


def test_masked_average_pool_by_hand():
    # one channel, 2x2 grid: f = [[1, 2], [3, 4]], m = [[1, 0], [0.5, 0]]
    # p^f = (1*1 + 3*0.5) / (1.5 + 1e-6) = 2.5 / 1.5 = 1.6666...
    # p^b = (2*1 + 3*0.5 + 4*1) / (2.5 + 1e-6) = 7.5 / 2.5 = 3.0
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    m = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert masked_average_pool(f, m).item() == pytest.approx(2.5 / 1.5, rel=1e-5)
    fg, bg = foreground_background_prototypes(f, m[:, 0])
    assert fg.item() == pytest.approx(2.5 / 1.5, rel=1e-5)
    assert bg.item() == pytest.approx(3.0, rel=1e-5)


def test_empty_mask_gives_zero_prototype():
    # sum f*m = 0 and sum m = 0: 0 / (0 + 1e-6) = 0; the background prototype is the plain mean (1+2+3+4)/4 = 2.5
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    fg, bg = foreground_background_prototypes(f, torch.zeros(1, 2, 2))
    assert fg.item() == 0.0
    assert bg.item() == pytest.approx(2.5, rel=1e-5)


def test_mask_is_resized_with_aligned_corners():
    # a 3x3 mask with a 1 in the centre, resized to 2x2 with align_corners=True, samples the four corners: all 0
    mask = torch.zeros(1, 3, 3)
    mask[0, 1, 1] = 1
    assert resize_mask(mask, (2, 2)).sum().item() == 0.0
    # resized to 5x5 the corners map onto corners and the centre onto the centre: (2, 2) -> 1, (1, 1) -> 0.25
    up = resize_mask(mask, (5, 5))[0, 0]
    assert up[2, 2].item() == 1.0 and up[1, 1].item() == pytest.approx(0.25)


def test_wrong_mask_shape_is_refused():
    with pytest.raises(ValueError, match="does not match features"):
        masked_average_pool(torch.ones(1, 2, 4, 4), torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        resize_mask(torch.ones(4, 4), (2, 2))
