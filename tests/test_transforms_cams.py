"""CAM utilities of ToCo / EndoKED-WSSS (common/transforms/cams.py) against hand-worked values (specs §3.3-§3.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.par import PAR
from common.transforms.cams import (
    cam_to_label,
    cam_to_roi_mask,
    crop_from_roi,
    label_to_affinity_mask,
    multi_scale_cam,
    refine_cams_with_par,
    valid_cam,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class RampCAM(nn.Module):
    """CAM double at input resolution: ``cam = x_0 + j`` (``j`` the column index: not flip-equivariant),
    ``cam_aux = -x_0``; records the input sizes."""

    def __init__(self, ramp: bool = True) -> None:
        super().__init__()
        self.ramp = ramp
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, cam_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        assert cam_only
        self.sizes.append(tuple(x.shape))
        cam = x[:, :1]
        if self.ramp:
            cam = cam + torch.arange(x.shape[-1], dtype=x.dtype)
        return -x[:, :1], cam


# ------------------------------------------------------------------------------------------------ multi_scale_cam


def test_multi_scale_cam_one_scale_flip_max_relu_and_min_max_by_hand():
    x0 = torch.tensor([[1.0, -5.0], [0.0, 2.0]])
    images = torch.stack([x0, torch.zeros(2, 2), torch.zeros(2, 2)])[None]  # [1, 3, 2, 2]
    model = RampCAM()
    cam, cam_aux = multi_scale_cam(model, images, scales=(1.0,))
    assert model.sizes == [(2, 3, 2, 2)]  # one pass over [x; hflip x]
    # original pass: x0 + j = [[1, -4], [0, 3]]; flipped pass flipped back: x0 + (1 - j) = [[2, -5], [1, 2]]
    # max = [[2, -4], [1, 3]] -> ReLU [[2, 0], [1, 3]] -> min 0, / (3 + 1e-5)
    expected = torch.tensor([[2.0, 0.0], [1.0, 3.0]]) / (3 + 1e-5)
    assert torch.allclose(cam[0, 0], expected, atol=1e-6)
    # aux: -x0 both ways = [[-1, 5], [0, -2]] -> ReLU [[0, 5], [0, 0]] -> / (5 + 1e-5)
    assert torch.allclose(cam_aux[0, 0], torch.tensor([[0.0, 5.0], [0.0, 0.0]]) / (5 + 1e-5), atol=1e-6)
    # without the flip: ReLU([[1, -4], [0, 3]]) = [[1, 0], [0, 3]] -> / 3.00001
    cam, _ = multi_scale_cam(RampCAM(), images, scales=(1.0,), flip=False)
    assert torch.allclose(cam[0, 0], torch.tensor([[1.0, 0.0], [0.0, 3.0]]) / (3 + 1e-5), atol=1e-6)


def test_multi_scale_cam_sums_scales_after_upsampling_by_hand():
    # columns [0, 0, 4, 4] in every row of a 4x4 image (channel 0), no flip, no ramp:
    #   scale 1   -> [0, 0, 4, 4]
    #   scale 0.5 -> bilinear 4 -> 2 gives column means [0, 4]; 2 -> 4 (align_corners=False) samples at
    #               x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped): [0, 0.25*4, 0.75*4, 4] = [0, 1, 3, 4]
    #   sum = [0, 1, 7, 8] -> / (8 + 1e-5)
    images = torch.zeros(1, 3, 4, 4)
    images[:, 0, :, 2:] = 4.0
    model = RampCAM(ramp=False)
    cam, _ = multi_scale_cam(model, images, scales=(1.0, 0.5), flip=False)
    assert model.sizes == [(1, 3, 4, 4), (1, 3, 2, 2)]
    expected = torch.tensor([0.0, 1.0, 7.0, 8.0]).expand(4, 4) / (8 + 1e-5)
    assert torch.allclose(cam[0, 0], expected, atol=1e-6)
    # sizes are floor(s * H): 0.75 * 5 = 3.75 -> 3
    model = RampCAM()
    multi_scale_cam(model, torch.rand(2, 3, 5, 6), scales=(1.0, 0.75))
    assert model.sizes == [(4, 3, 5, 6), (4, 3, 3, 4)]


def test_multi_scale_cam_refuses_bad_input():
    with pytest.raises(ValueError, match="images must be"):
        multi_scale_cam(RampCAM(), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="scales"):
        multi_scale_cam(RampCAM(), torch.zeros(1, 3, 4, 4), scales=())


# ------------------------------------------------------------------------------------------------ thresholds

# one row of 5 pixels; image 0 positive, image 1 negative (same CAM)
CAM = torch.tensor([0.2, 0.25, 0.5, 0.75, 0.8]).view(1, 1, 1, 5).repeat(2, 1, 1, 1)
CLS = torch.tensor([[1.0], [0.0]])


def test_valid_cam_zeroes_absent_classes():
    out = valid_cam(CAM, CLS)
    assert torch.equal(out[0], CAM[0]) and out[1].abs().sum() == 0
    with pytest.raises(ValueError, match="cls_label must be"):
        valid_cam(CAM, torch.ones(2, 2))


def test_cam_to_roi_mask_by_hand():
    roi = cam_to_roi_mask(CAM, CLS, low=0.25, high=0.75)
    # 0.2 <= 0.25 -> 0; 0.25 <= 0.25 -> 0; 0.5 -> 1; 0.75 >= 0.75 -> 2; 0.8 -> 2; the negative image is all 0
    assert roi.tolist() == [[[0, 0, 1, 2, 2]], [[0, 0, 0, 0, 0]]]
    with pytest.raises(ValueError, match="low <= high"):
        cam_to_roi_mask(CAM, CLS, low=0.8, high=0.2)


def test_cam_to_label_by_hand():
    label = cam_to_label(CAM, CLS, low=0.25, high=0.75)
    # > 0.75 -> 1; (0.25, 0.75] -> 255; <= 0.25 -> 0 (note 0.75 itself is uncertain here, but ROI 2 above)
    assert label.tolist() == [[[0, 0, 255, 255, 1]], [[0, 0, 0, 0, 0]]]
    label = cam_to_label(CAM, CLS, low=0.25, high=0.75, ignore_mid=False, bkg=0.45)
    # > 0.45 -> 1 else 0
    assert label.tolist() == [[[0, 0, 1, 1, 1]], [[0, 0, 0, 0, 0]]]
    # two classes: the label is 1 + argmax over the present classes
    cam2 = torch.tensor([[0.9, 0.95], [0.1, 0.3]]).view(1, 2, 1, 2)  # pixel 0: (0.9, 0.1); pixel 1: (0.95, 0.3)
    assert cam_to_label(cam2, torch.tensor([[1.0, 1.0]]), 0.25, 0.75).tolist() == [[[1, 1]]]
    # class 0 absent: pixel 0 -> 0.1 <= 0.25 -> 0; pixel 1 -> 0.3 in the band -> 255
    assert cam_to_label(cam2, torch.tensor([[0.0, 1.0]]), 0.25, 0.75, ignore_index=99).tolist() == [[[0, 99]]]


def test_label_to_affinity_mask_by_hand():
    tokens = torch.tensor([[0, 1, 255, 1]])
    expected = [[255, 0, 255, 0],   # token 0: differs from 1 and 3, token 2 ignored, diagonal ignored
                [0, 255, 255, 1],   # token 1: same label as token 3
                [255, 255, 255, 255],  # token 2 is ignored
                [0, 1, 255, 255]]
    assert label_to_affinity_mask(tokens).tolist() == [expected]
    assert label_to_affinity_mask(tokens.view(1, 2, 2)).tolist() == [expected]  # [B, h, w] is flattened row-major
    with pytest.raises(ValueError, match="label_tokens"):
        label_to_affinity_mask(torch.zeros(1, 2, 2, 2))


# ------------------------------------------------------------------------------------------------ crops


def _local_images() -> torch.Tensor:
    """[2, 2, 6, 6]: channel 0 = pixel index 0..35, channel 1 = -index."""
    index = torch.arange(36.0).view(6, 6)
    return torch.stack([index, -index])[None].repeat(2, 1, 1, 1)


def test_crop_from_roi_centres_and_flags_by_hand():
    # 6x6, crop 2, margin 1: centres in rows/cols 1..4, the crop at centre (i, j) is rows i-1..i, cols j-1..j.
    # Image 0: ROI 2 everywhere except the 2x2 corner block (0, but 1 at pixel (0, 0), not a centre) and (4, 4) = 1,
    # so the only centres with ROI <= 1 are (1, 1) and (4, 4):
    #   crop (1, 1): pixels 0, 1, 6, 7, ROI sum 1 -> 1 / 4 = 0.25 <= 0.25 -> negative (the boundary case)
    #   crop (4, 4): pixels 21, 22, 27, 28, ROI 2 + 2 + 2 + 1 = 7 -> 7 / 4 > 0.25 -> positive
    # Image 1: ROI 2 everywhere: no candidate, fall back to any centre; every crop has ROI sum 8 -> positive.
    roi = torch.full((2, 6, 6), 2, dtype=torch.long)
    roi[0, :2, :2] = 0
    roi[0, 0, 0] = 1
    roi[0, 4, 4] = 1
    crops, flags = crop_from_roi(_local_images(), roi, crop_num=2, crop_size=2, margin=1,
                                 generator=torch.Generator().manual_seed(0))
    assert len(crops) == 2 and all(c.shape == (2, 2, 2, 2) for c in crops)
    assert flags.shape == (2, 4) and flags[:, :2].tolist() == [[1, 1], [1, 1]]  # global views always positive
    found = {(tuple(crops[k][0, 0].flatten().tolist()), flags[0, 2 + k].item()) for k in range(2)}
    assert found == {((0.0, 1.0, 6.0, 7.0), 0.0), ((21.0, 22.0, 27.0, 28.0), 1.0)}
    for k in range(2):
        assert torch.equal(crops[k][0, 1], -crops[k][0, 0])  # channels travel together
        window = crops[k][1, 0]
        top_left = int(window[0, 0])
        row, col = divmod(top_left, 6)
        assert 0 <= row <= 3 and 0 <= col <= 3  # a 2x2 window inside the image
        assert window.flatten().tolist() == [top_left, top_left + 1, top_left + 6, top_left + 7]
    assert flags[1, 2:].tolist() == [1.0, 1.0]
    # the fallback draws uniformly among all 16 centres: over 10 seeds image 1 gets more than 2 distinct crops
    corners = set()
    for seed in range(10):
        seeded, _ = crop_from_roi(_local_images(), roi, 2, 2, 1, generator=torch.Generator().manual_seed(seed))
        corners |= {int(crop[1, 0, 0, 0]) for crop in seeded}
    assert len(corners) > 2


def test_crop_from_roi_is_seeded_and_checks_arguments():
    roi = torch.zeros(2, 6, 6, dtype=torch.long)
    a, fa = crop_from_roi(_local_images(), roi, 3, 2, 1, generator=torch.Generator().manual_seed(5))
    b, fb = crop_from_roi(_local_images(), roi, 3, 2, 1, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(fa, fb)
    assert fa[:, 2:].sum() == 0  # ROI 0 everywhere: every local crop is negative
    with pytest.raises(ValueError, match="margin >= crop_size // 2"):
        crop_from_roi(_local_images(), roi, crop_num=2, crop_size=4, margin=1)
    with pytest.raises(ValueError, match="fewer than crop_num"):
        crop_from_roi(_local_images(), roi, crop_num=5, crop_size=4, margin=2)  # 2x2 = 4 centres < 5
    with pytest.raises(ValueError, match="same B, H, W"):
        crop_from_roi(_local_images(), roi[:, :4], crop_num=2, crop_size=2, margin=1)


# ------------------------------------------------------------------------------------------------ PAR refinement


class IdentityPAR(nn.Module):
    """PAR double returning the masks unchanged; records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        self.calls.append((imgs, masks))
        return masks


def test_refine_cams_with_par_combination_by_hand():
    # identity PAR at full resolution: L_kappa = 1 where cam > kappa (softmax([kappa, c]) picks the larger)
    #   cam     [0.9, 0.5, 0.1, 0.3]
    #   L_high  [1,   0,   0,   0  ]   (kappa 0.75)
    #   L_low   [1,   1,   0,   1  ]   (kappa 0.25)
    #   label   [1, 255,   0, 255  ]   1 where L_high = 1, 0 where both 0, else 255
    cams = torch.tensor([0.9, 0.5, 0.1, 0.3]).view(1, 1, 1, 4).repeat(2, 1, 1, 1)
    par = IdentityPAR()
    label = refine_cams_with_par(par, torch.rand(2, 3, 1, 4), cams, CLS, high=0.75, low=0.25, down_scale=1)
    assert label.dtype == torch.long
    assert label.tolist() == [[[1, 255, 0, 255]], [[0, 0, 0, 0]]]  # the negative image is background everywhere
    imgs, masks = par.calls[0]
    assert imgs.shape == (4, 3, 1, 4) and masks.shape == (4, 2, 1, 4)  # both kappas in one call: [high; low]
    # background probability of pixel 0 of image 0 with kappa 0.75: 1 / (1 + e^(0.9 - 0.75))
    assert masks[0, 0, 0, 0].item() == pytest.approx(1 / (1 + torch.e ** 0.15), rel=1e-6)
    assert masks[1, :, 0, 0].tolist() == [1.0, 0.0]  # negative image: the CAM channel is dropped


class SwapPAR(nn.Module):
    """PAR double giving the high-threshold maps the low-threshold ones and vice versa (non-monotone refinement)."""

    def forward(self, imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return masks.roll(masks.shape[0] // 2, dims=0)


def test_refine_cams_with_par_takes_the_high_label_wherever_it_is_foreground():
    # swapped: L_high = [cam > 0.25] = [1, 1, 0], L_low = [cam > 0.75] = [1, 0, 0] for cam [0.9, 0.5, 0.1]
    # label = L_high where L_high > 0 -> [1, 1, .]; both 0 -> 0: [1, 1, 0] (pixel 1 has L_low = 0 but stays 1)
    cams = torch.tensor([0.9, 0.5, 0.1]).view(1, 1, 1, 3)
    label = refine_cams_with_par(SwapPAR(), torch.rand(1, 3, 1, 3), cams, torch.ones(1, 1), 0.75, 0.25, down_scale=1)
    assert label.tolist() == [[[1, 1, 0]]]


def test_refine_cams_with_par_works_at_half_resolution():
    par = IdentityPAR()
    label = refine_cams_with_par(par, torch.rand(1, 3, 8, 6), torch.rand(1, 1, 8, 6), torch.ones(1, 1), 0.75, 0.25)
    assert label.shape == (1, 8, 6)
    assert par.calls[0][0].shape == (2, 3, 4, 3) and par.calls[0][1].shape == (2, 2, 4, 3)
    with pytest.raises(ValueError, match="images01 must be"):
        refine_cams_with_par(par, torch.rand(1, 3, 4, 4), torch.rand(1, 1, 8, 6), torch.ones(1, 1), 0.75, 0.25)


def test_refine_cams_with_real_par_keeps_a_flat_square():
    # A bright 8x8 square on a dark 16x16 image with the CAM = 1 on it and 0 elsewhere. Inside flat regions the
    # neighbour std is 0, so the appearance affinity only links pixels of equal intensity: the refined maps stay
    # 1 on the square and 0 off it, and both thresholds agree -> label 1 on the square, 0 elsewhere (no 255).
    square = torch.zeros(16, 16)
    square[4:12, 4:12] = 1.0
    images = square.expand(1, 3, 16, 16).clone()
    label = refine_cams_with_par(PAR(), images, square.view(1, 1, 16, 16), torch.ones(1, 1), 0.75, 0.25,
                                 down_scale=1)
    assert torch.equal(label[0], square.long())
