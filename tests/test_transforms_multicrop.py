"""Tests of Sparsam's DINO multi-crop augmentation and evaluation transform (common/transforms/multicrop.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, Lambdad
from PIL import Image
from torch.utils.data import DataLoader as TorchDataLoader
from torchvision.transforms import v2

from common.transforms.multicrop import (
    EvalTransform,
    EvalTransformd,
    MultiCropAugmentation,
    MultiCropd,
    as_rgb_pil,
    as_uint8_rgb,
    to_minus_one_one,
)

SMALL = {"global_size": 32, "local_size": 16, "n_local": 2, "image_resolution": 48}


def random_image(height: int = 120, width: int = 110, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)


def write_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


# ---------------------------------------------------------------------------------------------------- views


def test_default_views_sizes_count_and_range():
    torch.manual_seed(0)
    views = MultiCropAugmentation()(random_image(120, 88))  # a WBC-sized image, spec defaults
    assert len(views) == 2 + 5
    assert [tuple(v.shape) for v in views] == [(3, 256, 256)] * 2 + [(3, 96, 96)] * 5
    for v in views:
        assert v.dtype == torch.float32
        assert v.min() >= -1.0 and v.max() <= 1.0


@pytest.mark.parametrize("n_local", [0, 3])
def test_view_count_and_sizes_follow_the_arguments(n_local):
    views = MultiCropAugmentation(global_size=40, local_size=24, n_local=n_local, image_resolution=64)(random_image())
    assert [tuple(v.shape) for v in views] == [(3, 40, 40)] * 2 + [(3, 24, 24)] * n_local


def test_views_span_the_range():
    # a random image keeps dark and bright pixels in most crops: over the 7 views both ends of [-1, 1] are reached
    # (0 -> 2*0/255-1 = -1, 255 -> 2*255/255-1 = 1) and not everything is squeezed into a sub-range
    torch.manual_seed(1)
    views = MultiCropAugmentation(**SMALL)(random_image())
    values = torch.cat([v.flatten() for v in views])
    assert values.min() == -1.0 and values.max() == 1.0


def test_seeded_reproducibility_and_pil_input():
    image = random_image(40, 30)
    aug = MultiCropAugmentation(**SMALL)
    torch.manual_seed(7)
    first = aug(image)
    torch.manual_seed(7)
    again = aug(image)
    torch.manual_seed(7)
    from_pil = aug(Image.fromarray(image.permute(1, 2, 0).numpy()))
    torch.manual_seed(8)
    other = aug(image)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, from_pil))  # a PIL image and a tensor: the same pixels
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_grey_pil_image_gives_rgb_views():
    grey = Image.fromarray(np.full((20, 20), 77, dtype=np.uint8), mode="L")
    views = MultiCropAugmentation(**SMALL)(grey)
    assert all(v.shape[0] == 3 for v in views)


def test_pipeline_is_the_spec_table():
    """Spec §2.3: per view Perspective(0.5, p) -> Rotation(180) -> RRC -> H/V flips -> jitter p0.8 -> grey 0.2 ->
    blur(11, 0.1-5) with p 1.0/0.1/0.5 -> solarize(128) p0.2 on global 2 only."""
    aug = MultiCropAugmentation()
    expected = {  # view: (size, scale, p_perspective, p_blur, p_solarize or None)
        "global1": (256, (0.5, 1.0), 0.75, 1.0, None),
        "global2": (256, (0.5, 1.0), 0.5, 0.1, 0.2),
        "local": (96, (0.1, 0.5), 0.5, 0.5, None),
    }
    for name, (size, scale, p_persp, p_blur, p_sol) in expected.items():
        steps = getattr(aug, name).transforms
        kinds = [type(t) for t in steps]
        assert kinds[:9] == [v2.RandomPerspective, v2.RandomRotation, v2.RandomResizedCrop, v2.RandomHorizontalFlip,
                             v2.RandomVerticalFlip, v2.RandomApply, v2.RandomGrayscale, v2.PILToTensor,
                             v2.RandomApply], name
        persp, rot, rrc, hflip, vflip, jitter, grey, _, blur = steps[:9]
        assert persp.distortion_scale == 0.5 and persp.p == p_persp
        assert list(rot.degrees) == [-180.0, 180.0]
        assert list(rrc.size) == [size, size] and tuple(rrc.scale) == scale
        assert tuple(rrc.ratio) == pytest.approx((3 / 4, 4 / 3))  # torchvision default
        assert hflip.p == 0.5 and vflip.p == 0.5
        cj = jitter.transforms[0]
        assert jitter.p == 0.8 and isinstance(cj, v2.ColorJitter)
        # brightness 0.4 -> factor range (1-0.4, 1+0.4); contrast the same; saturation 0.2 -> (0.8, 1.2); hue +-0.1
        assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.contrast == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.8, 1.2)) and cj.hue == pytest.approx((-0.1, 0.1))
        assert grey.p == 0.2
        gb = blur.transforms[0]
        assert blur.p == p_blur and list(gb.kernel_size) == [11, 11] and list(gb.sigma) == [0.1, 5.0]
        if p_sol is None:
            assert len(steps) == 9
        else:
            assert isinstance(steps[9], v2.RandomSolarize) and steps[9].threshold == 128 and steps[9].p == p_sol


def test_to_minus_one_one_by_hand():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(3, 1, 1)
    # 0/255*2-1 = -1 ; 51/255 = 0.2 -> 0.4-1 = -0.6 ; 255/255*2-1 = 1
    assert to_minus_one_one(x).flatten().tolist() == pytest.approx([-1.0, -0.6, 1.0])


# ---------------------------------------------------------------------------------------------------- evaluation


def test_eval_transform_nearest_resize_by_hand():
    # channel values 0,10,...,80 on a 3x3 grid; PIL NEAREST to 2x2 takes src = floor((dst+0.5)*3/2) = 0, 2
    grid = torch.arange(9, dtype=torch.uint8).reshape(3, 3) * 10
    image = grid.expand(3, 3, 3).clone()
    out = EvalTransform(image_resolution=2)(image)
    picked = torch.tensor([[0.0, 20.0], [60.0, 80.0]])  # grid[0,0], grid[0,2], grid[2,0], grid[2,2]
    assert out.shape == (3, 2, 2)
    assert torch.allclose(out[1], picked / 255 * 2 - 1)
    # upsampling 2x2 -> 4x4 repeats each pixel in a 2x2 block
    small = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).expand(3, 2, 2).clone()
    up = EvalTransform(image_resolution=4)(small)[0]
    assert up.tolist() == [[-1, -1, 1, 1], [-1, -1, 1, 1], [1, 1, -1, -1], [1, 1, -1, -1]]


def test_eval_transform_ignores_aspect_and_is_deterministic(tmp_path):
    path = write_png(tmp_path / "cell.png", random_image(120, 88))
    a, b = EvalTransform()(str(path)), EvalTransform()(path)
    assert a.shape == (3, 256, 256) and torch.equal(a, b)
    assert EvalTransform(image_resolution=None)(random_image(5, 7)).shape == (3, 5, 7)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    aug = MultiCropAugmentation(**SMALL)
    with pytest.raises(ValueError, match=r"uint8 of shape \[3, H, W\].*float32"):
        aug(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \[1, 8, 8\]"):
        aug(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="ndarray"):
        aug(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        aug(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        aug(broken)
    good = write_png(tmp_path / "cut.png", random_image(64, 64))
    cut = tmp_path / "truncated.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        as_rgb_pil(cut)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"n_local": -1}, "n_local"), ({"global_size": 0}, "global_size"), ({"local_scale": (0.6, 0.5)}, "local_scale"),
     ({"global_scale": (0.0, 1.0)}, "global_scale"), ({"image_resolution": 0}, "image_resolution")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiCropAugmentation(**kwargs)


# ---------------------------------------------------------------------------------------------------- MONAI


def test_dictionary_versions(tmp_path):
    path = write_png(tmp_path / "001.png", random_image(30, 20))
    d = MultiCropd(keys="image", **SMALL)({"image": str(path), "label": 3})
    assert d["label"] == 3 and len(d["image"]) == 4
    e = EvalTransformd(keys="image", image_resolution=16)({"image": str(path)})
    assert e["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"key 'image': image tensor must be uint8"):
        MultiCropd(keys="image", **SMALL)({"image": torch.rand(3, 4, 4)})
    with pytest.raises(FileNotFoundError, match="missing.png"):
        EvalTransformd(keys="image")({"image": str(tmp_path / "missing.png")})


@pytest.mark.parametrize("loader", [DataLoader, TorchDataLoader])
def test_default_collate_gives_one_batch_tensor_per_view(tmp_path, loader):
    data = [{"image": str(write_png(tmp_path / f"{i}.png", random_image(30, 20, seed=i))), "label": i, "id": f"{i:03d}"}
            for i in range(3)]
    dataset = Dataset(data, transform=MultiCropd(keys="image", global_size=24, local_size=8, n_local=3,
                                                 image_resolution=32))
    batch = next(iter(loader(dataset, batch_size=3, shuffle=False, num_workers=0)))
    # 2 global + 3 local views -> a list of 5 tensors, each [B=3, 3, h, w]
    assert isinstance(batch["image"], list)
    assert [tuple(v.shape) for v in batch["image"]] == [(3, 3, 24, 24)] * 2 + [(3, 3, 8, 8)] * 3
    assert batch["label"].tolist() == [0, 1, 2] and batch["id"] == ["000", "001", "002"]


def test_decode_once_then_crop(tmp_path):
    image = random_image(30, 20)
    path = write_png(tmp_path / "a.png", image)
    assert torch.equal(as_uint8_rgb(path), image)  # PNG is lossless: the same uint8 pixels back
    grey = Image.fromarray(np.full((2, 3), 9, dtype=np.uint8), mode="L")
    assert as_uint8_rgb(grey).tolist() == [[[9, 9, 9], [9, 9, 9]]] * 3  # [3, H=2, W=3]
    # the bundle's pattern: decode in the cached part, crop in the random part
    transform = Compose([Lambdad(keys="image", func=as_uint8_rgb), MultiCropd(keys="image", **SMALL)])
    dataset = CacheDataset([{"image": str(path), "label": 0}] * 2, transform=transform, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert [tuple(v.shape) for v in batch["image"]] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2


def test_cache_dataset_redraws_views_every_time(tmp_path):
    path = write_png(tmp_path / "a.png", random_image(30, 20))
    transform = Compose([MultiCropd(keys="image", **SMALL)])
    dataset = CacheDataset([{"image": str(path)}], transform=transform, cache_rate=1.0, progress=False)
    torch.manual_seed(0)
    first, second = dataset[0]["image"], dataset[0]["image"]
    # a cached (non-random) transform would return the same views twice
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
