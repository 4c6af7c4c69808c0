"""ToCoViewsd: outputs, seeding, ImageNet normalisation by hand, crop geometry, faithful local view."""

from __future__ import annotations

import pytest
import torch
from conftest import require_data
from monai.transforms import EnsureChannelFirstd

from common.transforms.io import LoadPolypImaged
from common.transforms.toco_views import ToCoViewsd

pytestmark = pytest.mark.usefixtures("one_thread")

NO_AUG = dict(vflip_prob=0.0, hflip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, global_blur_prob=0.0,
              local_blur_prob=0.0, solarize_prob=0.0)
VIEWS = ("image", "image_raw", "global_view", "local_image")


def _views(image: torch.Tensor, seed: int = 0, **kwargs) -> dict:
    return ToCoViewsd(**kwargs).set_random_state(seed)({"image": image, "label": 1.0})


def test_outputs_shapes_dtypes_and_ranges():
    image = torch.rand(3, 30, 40) * 255
    d = _views(image, crop_size=16, resize=24)
    assert all(d[k].shape == (3, 16, 16) and d[k].dtype == torch.float32 for k in VIEWS)
    assert d["label"] == 1.0
    assert 0.0 <= d["image_raw"].min() and d["image_raw"].max() <= 1.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(d["image"], (d["image_raw"] - mean) / std)  # same crop, normalised
    default = _views(torch.rand(3, 60, 70) * 255)  # defaults: 568 -> 448
    assert all(default[k].shape == (3, 448, 448) for k in VIEWS)


def test_reproducible_under_a_seed():
    image = torch.rand(3, 40, 48) * 255
    a, b = _views(image, seed=5, crop_size=24, resize=32), _views(image, seed=5, crop_size=24, resize=32)
    assert all(torch.equal(a[k], b[k]) for k in VIEWS)
    c = _views(image, seed=6, crop_size=24, resize=32)
    assert not torch.equal(a["global_view"], c["global_view"])
    transform = ToCoViewsd(crop_size=24, resize=32).set_random_state(5)
    first, second = transform({"image": image}), transform({"image": image})  # fresh draws on each call
    assert torch.equal(first["global_view"], a["global_view"])
    assert not torch.equal(first["global_view"], second["global_view"])


def test_imagenet_normalisation_of_a_constant_image():
    d = _views(torch.full((3, 20, 30), 128.0), crop_size=8, resize=12, **NO_AUG)
    # 128 / 255 = 0.501961;  R: (0.501961 - 0.485) / 0.229 = 0.074065
    #                        G: (0.501961 - 0.456) / 0.224 = 0.205182
    #                        B: (0.501961 - 0.406) / 0.225 = 0.426492
    expected = torch.tensor([0.074065, 0.205182, 0.426492]).view(3, 1, 1).expand(3, 8, 8)
    for key in ("image", "global_view", "local_image"):
        assert torch.allclose(d[key], expected, atol=1e-5), key
    assert torch.allclose(d["image_raw"], torch.full((3, 8, 8), 0.501961), atol=1e-6)


def _coordinate_image(size: int) -> torch.Tensor:
    rows = torch.arange(size, dtype=torch.float32).view(size, 1).expand(size, size)
    return torch.stack([10 * rows, 10 * rows.T, torch.zeros(size, size)])  # R = 10 * row, G = 10 * column


@pytest.mark.parametrize("seed", range(6))
def test_main_crop_is_a_window_inside_the_resized_image(seed):
    image = _coordinate_image(24)  # already 24 x 24 = resize: the resize is the identity
    for vflip in (0.0, 1.0):
        raw = _views(image, seed=seed, crop_size=16, resize=24, vflip_prob=vflip)["image_raw"] * 255
        if vflip:
            raw = raw.flip(1)
        top, left = round(raw[0, 0, 0].item() / 10), round(raw[1, 0, 0].item() / 10)
        assert 0 <= top <= 24 - 16 and 0 <= left <= 24 - 16
        assert torch.allclose(raw, image[:, top:top + 16, left:left + 16], atol=1e-3)


def test_global_view_with_full_scale_is_the_whole_image():
    # scale (1, 1) on a square image: w * h must equal the image area with w, h <= 24, i.e. w = h = 24, the
    # whole image (the fallback is the whole image as well); a resized crop to the same size is the identity
    image = _coordinate_image(24)
    d = _views(image, seed=3, crop_size=24, resize=24, global_scale=(1.0, 1.0), **NO_AUG)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(d["global_view"] * std + mean, image / 255, atol=1e-5)


def test_photometric_operations_by_hand():
    red = torch.zeros(3, 16, 16)
    red[0] = 255.0
    d = _views(red, crop_size=8, resize=12, **dict(NO_AUG, grayscale_prob=1.0))
    # grey = 0.2989 R + 0.587 G + 0.114 B = 0.2989 in all channels -> R (0.2989 - 0.485) / 0.229 = -0.812664
    assert d["global_view"][0, 0, 0].item() == pytest.approx(-0.812664, abs=1e-4)
    assert d["local_image"][0, 0, 0].item() == pytest.approx(-0.812664, abs=1e-4)
    assert d["image"][0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)  # main view: no grey
    d = _views(torch.full((3, 16, 16), 200.0), crop_size=8, resize=12, **dict(NO_AUG, solarize_prob=1.0))
    # solarise: 200 >= 128 -> 255 - 200 = 55 -> 55 / 255 = 0.215686 -> R (0.215686 - 0.485) / 0.229 = -1.176043
    assert d["global_view"][0, 0, 0].item() == pytest.approx(-1.176043, abs=1e-4)
    # the local image is never solarised: 200 / 255 = 0.784314 -> (0.784314 - 0.485) / 0.229 = 1.307048
    assert d["local_image"][0, 0, 0].item() == pytest.approx(1.307048, abs=1e-4)
    ramp = _coordinate_image(12)
    d = _views(ramp, crop_size=12, resize=12, **dict(NO_AUG, hflip_prob=1.0))
    # horizontal flip of the local image: its column 0 holds the main crop's column 11 (G = 10 * 11 = 110)
    assert torch.allclose(d["local_image"][1, :, 0], d["image"][1, :, 11])


def test_faithful_local_view_wraps_the_normalised_crop():
    black = torch.zeros(3, 16, 16)
    intended = _views(black, crop_size=8, resize=12, **NO_AUG)["local_image"]
    faithful = _views(black, crop_size=8, resize=12, faithful_local_view=True, **NO_AUG)["local_image"]
    # intended: n(0) = -0.485 / 0.229 = -2.117904, -0.456 / 0.224 = -2.035714, -0.406 / 0.225 = -1.804444
    assert torch.allclose(intended[:, 0, 0], torch.tensor([-2.117904, -2.035714, -1.804444]), atol=1e-5)
    # faithful: uint8 cast of n(0): trunc -> -2, -2, -1 -> mod 256 -> 254, 254, 255 -> / 255 = 0.996078, 0.996078, 1
    # normalised: (0.996078 - 0.485) / 0.229 = 2.231781, (0.996078 - 0.456) / 0.224 = 2.411064,
    #             (1 - 0.406) / 0.225 = 2.64
    assert torch.allclose(faithful[:, 0, 0], torch.tensor([2.231781, 2.411064, 2.64]), atol=1e-5)


def test_bad_inputs_and_arguments():
    with pytest.raises(ValueError, match=r"'image'.*RGB image \[3, H, W\]"):
        _views(torch.zeros(1, 16, 16), crop_size=8, resize=12)
    with pytest.raises(ValueError, match=r"'image'.*\[0, 255\]"):
        _views(torch.full((3, 16, 16), 300.0), crop_size=8, resize=12)
    with pytest.raises(ValueError, match="exactly one image key"):
        ToCoViewsd(keys=["image", "label"])
    with pytest.raises(ValueError, match="crop_size"):
        ToCoViewsd(crop_size=600, resize=568)
    with pytest.raises(ValueError, match="solarize_prob"):
        ToCoViewsd(solarize_prob=1.5)


@pytest.mark.realdata
def test_real_polyp_image():
    folder = require_data("polyp") / "Kvasir" / "images"
    path = sorted(folder.iterdir())[0]
    load = LoadPolypImaged(keys="image", reverse_indexing=False)
    d = EnsureChannelFirstd(keys="image")(load({"image": str(path)}))
    height, width = d["image"].shape[1:]
    out = ToCoViewsd(keys="image").set_random_state(0)(d)
    assert all(out[k].shape == (3, 448, 448) and torch.isfinite(out[k]).all() for k in VIEWS)
    assert 0.0 <= out["image_raw"].min() and out["image_raw"].max() <= 1.0
    assert (height, width) != (448, 448) and out["image_raw"].std() > 0.01  # a real, resized, non-blank crop
