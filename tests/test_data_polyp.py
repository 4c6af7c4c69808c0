"""Tests of the polyp folder readers, the polyp loading transforms and the demo polyp dataset generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from common.data import demo_polyps
from common.data.demo_polyps import ensure_demo_polyp_dataset, make_demo_polyp_dataset
from common.data.polyp_folders import (
    check_pair,
    find_polyp_sets,
    list_pairs,
    polyp_datalist,
    resolve_roles,
    split_train_val,
)
from common.transforms.io import CheckPolypPaird, LoadPolypImaged
from conftest import require_data

# ---------------------------------------------------------------------------------------------------- helpers


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (16, 16), value=None) -> Path:
    """Write a PIL image of ``mode`` and ``size`` (width, height) to ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        value = {"RGB": (200, 80, 70), "RGBA": (200, 80, 70, 255), "LA": (255, 255)}.get(mode, 255)
    Image.new(mode, size, value).save(path)
    return path


def make_set(folder: Path, stems=("a", "b"), image_ext=".jpg", mask_ext=".png") -> Path:
    for stem in stems:
        write_image(folder / "images" / f"{stem}{image_ext}")
        write_image(folder / "masks" / f"{stem}{mask_ext}", mode="L")
    return folder


# ---------------------------------------------------------------------------------------------------- layouts


def test_pranet_layout(tmp_path):
    make_set(tmp_path / "TrainDataset")
    make_set(tmp_path / "TestDataset" / "SetB")
    make_set(tmp_path / "TestDataset" / "SetA")
    sets = find_polyp_sets(tmp_path)
    assert list(sets) == ["SetA", "SetB", "TrainDataset"]  # sorted by name
    assert sets["SetA"] == tmp_path / "TestDataset" / "SetA"
    assert sets["TrainDataset"] == tmp_path / "TrainDataset"


def test_pranet_layout_without_train_or_test(tmp_path):
    make_set(tmp_path / "only_test" / "TestDataset" / "Kvasir")
    assert list(find_polyp_sets(tmp_path / "only_test")) == ["Kvasir"]
    make_set(tmp_path / "only_train" / "TrainDataset")
    assert list(find_polyp_sets(tmp_path / "only_train")) == ["TrainDataset"]


def test_flat_root_of_sets(tmp_path):
    make_set(tmp_path / "Kvasir")
    make_set(tmp_path / "CVC-ClinicDB")
    (tmp_path / "notes").mkdir()  # a folder without images/ is not a set
    assert find_polyp_sets(tmp_path) == {"CVC-ClinicDB": tmp_path / "CVC-ClinicDB", "Kvasir": tmp_path / "Kvasir"}


def test_kvasir_seg_layout(tmp_path):
    root = make_set(tmp_path / "Kvasir-SEG")
    (root / "kavsir_bboxes.json").write_text("{}")
    assert find_polyp_sets(root) == {"Kvasir-SEG": root}
    assert [p["set"] for p in polyp_datalist(root)] == ["Kvasir-SEG", "Kvasir-SEG"]


def test_missing_root_and_no_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_polyp_sets(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as err:
        find_polyp_sets(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    assert "PraNet" in str(err.value) and "Kvasir-SEG" in str(err.value)


def test_images_without_masks_folder(tmp_path):
    write_image(tmp_path / "SetA" / "images" / "a.jpg")
    with pytest.raises(ValueError, match="no masks/") as err:
        find_polyp_sets(tmp_path)
    assert str(tmp_path / "SetA") in str(err.value)


def test_duplicate_set_names(tmp_path):
    make_set(tmp_path / "Kvasir")
    make_set(tmp_path / "TestDataset" / "Kvasir")
    with pytest.raises(ValueError, match="same name"):
        find_polyp_sets(tmp_path)


# ---------------------------------------------------------------------------------------------------- pairing


def test_list_pairs_by_stem(tmp_path):
    folder = tmp_path / "SetA"
    write_image(folder / "images" / "b.png")
    write_image(folder / "masks" / "b.PNG", mode="L")
    write_image(folder / "images" / "a.JPEG")
    write_image(folder / "masks" / "a.tif", mode="L")
    (folder / "images" / "Thumbs.db").write_bytes(b"x")  # not an image extension: ignored
    pairs = list_pairs(folder)
    images, masks = folder / "images", folder / "masks"
    assert pairs == [
        {"image": str(images / "a.JPEG"), "label": str(masks / "a.tif"), "name": "a", "set": "SetA"},
        {"image": str(images / "b.png"), "label": str(masks / "b.PNG"), "name": "b", "set": "SetA"},
    ]


def test_image_without_mask(tmp_path):
    folder = make_set(tmp_path / "SetA")
    lonely = write_image(folder / "images" / "c.jpg")
    with pytest.raises(ValueError, match="no mask") as err:
        list_pairs(folder)
    assert str(lonely) in str(err.value)


def test_mask_without_image(tmp_path):
    folder = make_set(tmp_path / "SetA")
    lonely = write_image(folder / "masks" / "z.png", mode="L")
    with pytest.raises(ValueError, match="no image") as err:
        list_pairs(folder)
    assert str(lonely) in str(err.value)


def test_empty_images_folder(tmp_path):
    folder = tmp_path / "SetA"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    with pytest.raises(ValueError, match="holds no image") as err:
        list_pairs(folder)
    assert str(folder / "images") in str(err.value)


def test_two_images_with_one_stem(tmp_path):
    folder = make_set(tmp_path / "SetA", stems=("a",))
    write_image(folder / "images" / "a.png")
    with pytest.raises(ValueError, match="share the base name"):
        list_pairs(folder)


# ---------------------------------------------------------------------------------------------------- check_pair


def test_check_pair_accepts_rgb_image_with_grey_or_rgb_mask(tmp_path):
    image = write_image(tmp_path / "i.jpg")
    check_pair(image, write_image(tmp_path / "m.png", mode="L"))
    check_pair(image, write_image(tmp_path / "m.jpg", mode="RGB", value=(255, 255, 255)))  # Kvasir-SEG style
    check_pair(image, write_image(tmp_path / "p.png", mode="P", value=1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK"])
def test_check_pair_rejects_non_rgb_image(tmp_path, mode):
    image = write_image(tmp_path / ("i.jpg" if mode == "CMYK" else "i.png"), mode=mode)
    mask = write_image(tmp_path / "m.png", mode="L")
    with pytest.raises(ValueError, match="expected an RGB image with 3 channels") as err:
        check_pair(image, mask)
    assert str(image) in str(err.value) and repr(mode) in str(err.value)


def test_check_pair_rejects_two_channel_mask(tmp_path):
    mask = write_image(tmp_path / "m.png", mode="LA")
    with pytest.raises(ValueError, match="single-channel") as err:
        check_pair(write_image(tmp_path / "i.png"), mask)
    assert str(mask) in str(err.value)


def test_check_pair_size_mismatch(tmp_path):
    image = write_image(tmp_path / "i.png", size=(16, 16))
    mask = write_image(tmp_path / "m.png", mode="L", size=(16, 12))
    with pytest.raises(ValueError) as err:
        check_pair(image, mask)
    message = str(err.value)
    assert str(image) in message and str(mask) in message
    assert "16x16" in message and "16x12" in message  # width x height of each file


def test_check_pair_corrupt_header(tmp_path):
    image = tmp_path / "i.png"
    image.write_bytes(b"this is not a png file" * 8)
    with pytest.raises(ValueError, match="cannot be read as an image") as err:
        check_pair(image, write_image(tmp_path / "m.png", mode="L"))
    assert str(image) in str(err.value)


def test_check_pair_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.png"):
        check_pair(write_image(tmp_path / "i.png"), tmp_path / "gone.png")


# ---------------------------------------------------------------------------------------------------- datalists


def test_polyp_datalist_sets_and_errors(tmp_path):
    make_set(tmp_path / "A", stems=("x",))
    make_set(tmp_path / "B", stems=("y", "z"))
    assert [(p["set"], p["name"]) for p in polyp_datalist(tmp_path, "B")] == [("B", "y"), ("B", "z")]
    assert [p["name"] for p in polyp_datalist(tmp_path, ["B", "A"])] == ["y", "z", "x"]  # sets in the order given
    assert len(polyp_datalist(tmp_path)) == 3  # all sets: 1 + 2
    with pytest.raises(ValueError, match=r"available sets: \['A', 'B'\]"):
        polyp_datalist(tmp_path, ["C"])
    with pytest.raises(ValueError, match="more than once"):
        polyp_datalist(tmp_path, ["A", "A"])
    with pytest.raises(ValueError, match="no image/mask pair"):
        polyp_datalist(tmp_path, [])
    bad = write_image(tmp_path / "B" / "masks" / "z.png", mode="L", size=(8, 8))  # overwrite with a smaller mask
    with pytest.raises(ValueError, match="1 bad image/mask pair") as err:
        polyp_datalist(tmp_path)
    assert str(bad) in str(err.value)
    assert len(polyp_datalist(tmp_path, check=False)) == 3


def _pairs(n: int) -> list[dict]:
    return [{"image": f"{i}.jpg", "label": f"{i}.png", "name": f"{i:02d}", "set": "S"} for i in range(n)]


@pytest.mark.parametrize(
    "n, fraction, n_val",
    [
        (10, 0.25, 3),  # 10 * 0.25 = 2.5, rounded half up -> 3
        (10, 0.2, 2),  # 10 * 0.2 = 2
        (47, 0.2, 9),  # 47 * 0.2 = 9.4 -> 9
        (3, 0.1, 1),  # 3 * 0.1 = 0.3 -> 0, raised to 1 (fraction > 0 and n >= 2)
        (2, 0.9, 1),  # 2 * 0.9 = 1.8 -> 2, capped at n - 1 = 1 so training keeps a pair
        (1, 0.5, 0),  # one pair: capped at n - 1 = 0
        (10, 0.0, 0),
    ],
)
def test_split_train_val_sizes(n, fraction, n_val):
    pairs = _pairs(n)
    train, val = split_train_val(pairs[::-1], fraction, seed=3)
    assert len(val) == n_val and len(train) == n - n_val
    names = [p["name"] for p in train + val]
    assert sorted(names) == [p["name"] for p in pairs]  # disjoint and complete
    assert [p["name"] for p in train] == sorted(p["name"] for p in train)  # both parts sorted


def test_split_train_val_is_deterministic_and_seeded():
    pairs = _pairs(20)
    a = split_train_val(pairs, 0.25, seed=0)
    assert split_train_val(list(reversed(pairs)), 0.25, seed=0) == a  # input order does not matter
    vals = {tuple(p["name"] for p in split_train_val(pairs, 0.25, seed=s)[1]) for s in range(5)}
    assert len(vals) > 1  # C(20, 5) = 15504 possible validation sets; 5 seeds do not all pick the same one
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(pairs, 1.0)


def test_resolve_roles_flat_layout(tmp_path):
    make_set(tmp_path / "A", stems=("a1", "a2", "a3", "a4"))
    make_set(tmp_path / "B", stems=("b1",))
    make_set(tmp_path / "C", stems=("c1", "c2"))
    with pytest.raises(ValueError, match=r"name the training sets.*\['A', 'B', 'C'\]"):
        resolve_roles(tmp_path)
    roles = resolve_roles(tmp_path, train_sets=["A"], val_sets="B")
    assert [p["name"] for p in roles["train"]] == ["a1", "a2", "a3", "a4"]  # named val sets: no split
    assert [p["name"] for p in roles["val"]] == ["b1"]
    assert [p["name"] for p in roles["test"]] == ["c1", "c2"]  # the set not used for train/val
    roles = resolve_roles(tmp_path, train_sets="A", val_fraction=0.5, test_sets=[])
    assert len(roles["train"]) == 2 and len(roles["val"]) == 2 and roles["test"] == []  # 4 * 0.5 = 2
    with pytest.raises(ValueError, match="'A' is named in both"):
        resolve_roles(tmp_path, train_sets=["A"], test_sets=["C", "A"])


def test_resolve_roles_single_kvasir_seg_set(tmp_path):
    root = make_set(tmp_path / "Kvasir-SEG", stems=("a", "b", "c", "d", "e"))
    roles = resolve_roles(root, val_fraction=0.2)
    assert len(roles["train"]) == 4 and len(roles["val"]) == 1 and roles["test"] == []  # 5 * 0.2 = 1


# ---------------------------------------------------------------------------------------------------- demo data

DEMO = {"n_train": 6, "n_test": (2, 3), "size": (64, 96), "seed": 0}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return make_demo_polyp_dataset(tmp_path_factory.mktemp("demo") / "demo", **DEMO)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_layout_and_content(demo_root):
    assert find_polyp_sets(demo_root) == {
        "SynthA": demo_root / "TestDataset" / "SynthA",
        "SynthB": demo_root / "TestDataset" / "SynthB",
        "TrainDataset": demo_root / "TrainDataset",
    }
    pairs = polyp_datalist(demo_root)  # every pair passes check_pair
    assert len(pairs) == 6 + 2 + 3
    for pair in pairs:
        image, mask = Image.open(pair["image"]), Image.open(pair["label"])
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (96, 64)  # (width, height)
        assert mask.format == "PNG" and mask.mode == "L" and mask.size == (96, 64)
        values = np.asarray(mask)
        assert set(np.unique(values).tolist()) == {0, 255}  # binary, with a non-empty polyp
        assert 0 < (values > 0).mean() < 0.5


def test_demo_resolve_roles_defaults(demo_root):
    roles = resolve_roles(demo_root)
    # train = TrainDataset minus the default 20 % split: 6 * 0.2 = 1.2 -> 1 val, 5 train
    assert len(roles["train"]) == 5 and len(roles["val"]) == 1
    assert {p["set"] for p in roles["train"] + roles["val"]} == {"TrainDataset"}
    assert [p["set"] for p in roles["test"]] == ["SynthA"] * 2 + ["SynthB"] * 3


def test_demo_is_deterministic(tmp_path, demo_root):
    again = make_demo_polyp_dataset(tmp_path / "again", **DEMO)
    assert _tree(again) == _tree(demo_root)
    other = make_demo_polyp_dataset(tmp_path / "other", **{**DEMO, "seed": 1})
    assert _tree(other)["TrainDataset/images/0000.jpg"] != _tree(demo_root)["TrainDataset/images/0000.jpg"]


def test_demo_is_idempotent_and_regenerates(tmp_path):
    root = tmp_path / "data" / "demo"
    assert ensure_demo_polyp_dataset(root, **DEMO) == str(root)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert make_demo_polyp_dataset(root, **DEMO) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps  # nothing rewritten
    (root / "TrainDataset" / "masks" / "0003.png").unlink()  # incomplete -> regenerated
    make_demo_polyp_dataset(root, **DEMO)
    assert (root / "TrainDataset" / "masks" / "0003.png").is_file()
    make_demo_polyp_dataset(root, **{**DEMO, "n_train": 3})  # other parameters -> regenerated
    assert len(list((root / "TrainDataset" / "images").iterdir())) == 3
    # no temporary folder left beside it (only the generator's lock file, ".demo.lock")
    assert sorted(p.name for p in root.parent.iterdir() if p.suffix != ".lock") == ["demo"]


def test_demo_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write_set(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted while writing the second set
        return real_write_set(*args, **kwargs)

    real_write_set = demo_polyps._write_set
    monkeypatch.setattr(demo_polyps, "_write_set", failing_write_set)
    with pytest.raises(KeyboardInterrupt):
        make_demo_polyp_dataset(tmp_path / "demo", **DEMO)
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # neither <root> nor a temporary folder


def test_demo_refuses_foreign_folder_and_bad_arguments(tmp_path):
    foreign = tmp_path / "mydata"
    (foreign / "images").mkdir(parents=True)
    keep = write_image(foreign / "images" / "keep.jpg")
    with pytest.raises(FileExistsError, match="mydata"):
        make_demo_polyp_dataset(foreign, **DEMO)
    assert keep.is_file()
    with pytest.raises(ValueError, match="size"):
        make_demo_polyp_dataset(tmp_path / "x", size=(16, 16))
    with pytest.raises(ValueError, match="n_train"):
        make_demo_polyp_dataset(tmp_path / "x", n_train=0)


def test_demo_zero_test_frames_omits_the_set(tmp_path):
    root = make_demo_polyp_dataset(tmp_path / "demo", n_train=2, n_test=(1, 0), size=(48, 48))
    assert list(find_polyp_sets(root)) == ["SynthA", "TrainDataset"]


# ---------------------------------------------------------------------------------------------------- transforms


def _noise_jpeg(path: Path, size=(64, 48)) -> Path:
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)
    return path


def test_load_polyp_imaged_truncated_jpeg(tmp_path):
    data = _noise_jpeg(tmp_path / "full.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert Image.open(cut).size == (64, 48)  # the header is intact: only decoding fails
    loader = LoadPolypImaged(keys=["image"])
    assert isinstance(loader, LoadImaged)
    with pytest.raises(ValueError, match="truncated") as err:
        loader({"image": str(cut)})
    assert str(cut) in str(err.value)


def test_load_polyp_imaged_corrupt_and_missing(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image" * 16)
    with pytest.raises(ValueError) as err:
        LoadPolypImaged(keys=["image"])({"image": str(garbage)})
    assert str(garbage) in str(err.value)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        LoadPolypImaged(keys=["image"])({"image": str(tmp_path / "gone.jpg")})


def test_load_and_check_pair(tmp_path):
    image = _noise_jpeg(tmp_path / "i.jpg", size=(20, 12))  # width 20, height 12
    mask = np.zeros((12, 20), np.uint8)
    mask[2:5, 3:9] = 255  # 3 rows x 6 columns
    Image.fromarray(mask).save(tmp_path / "m.png")
    chain = Compose(
        [LoadPolypImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), CheckPolypPaird()]
    )
    out = chain({"image": str(image), "label": str(tmp_path / "m.png")})
    # PILReader swaps the spatial axes: (C, width, height)
    assert tuple(out["image"].shape) == (3, 20, 12) and tuple(out["label"].shape) == (1, 20, 12)
    assert out["label"].dtype == torch.float32
    assert torch.equal(out["label"][0], torch.from_numpy(mask.T / 255.0).float())  # 255 / 255 = 1
    assert out["label"].sum().item() == 18  # 3 * 6 ones


def _meta(array, filename: str) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32), meta={"filename_or_obj": filename})


def test_check_polyp_pair_one_channel_image():
    with pytest.raises(ValueError, match="1 channel") as err:
        CheckPolypPaird()({"image": _meta(np.zeros((1, 4, 4)), "/d/grey.png")})
    assert "/d/grey.png" in str(err.value)


def test_check_polyp_pair_rgb_mask_reduced():
    label = np.zeros((3, 2, 2))
    label[:, 0, 0] = 255  # white: 0.299 * 255 + 0.587 * 255 + 0.114 * 255 = 255
    label[:, 1, 1] = (100, 200, 0)  # 0.299 * 100 + 0.587 * 200 + 0.114 * 0 = 29.9 + 117.4 = 147.3
    out = CheckPolypPaird()({"image": _meta(np.zeros((3, 2, 2)), "i.jpg"), "label": _meta(label, "m.jpg")})
    assert tuple(out["label"].shape) == (1, 2, 2)
    expected = torch.tensor([[[1.0, 0.0], [0.0, 147.3 / 255.0]]])  # divided by the max, 255
    assert torch.allclose(out["label"], expected, atol=1e-6)


def test_check_polyp_pair_mask_scaled_to_unit():
    image = _meta(np.zeros((3, 2, 3)), "i.jpg")
    out = CheckPolypPaird()({"image": image, "label": _meta([[[0, 1, 1], [0, 0, 1]]], "m.png")})
    assert torch.equal(out["label"], torch.tensor([[[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]]))  # max 1: unchanged
    out = CheckPolypPaird()({"image": image, "label": _meta([[[0, 128, 255], [0, 0, 255]]], "m.png")})
    assert torch.allclose(out["label"], torch.tensor([[[0.0, 128 / 255, 1.0], [0.0, 0.0, 1.0]]]))  # / 255
    out = CheckPolypPaird()({"image": image, "label": _meta(np.zeros((1, 2, 3)), "m.png")})
    assert torch.equal(out["label"], torch.zeros(1, 2, 3))  # max 0: stays zero
    assert "label" not in CheckPolypPaird()({"image": image})  # inference: image only


def test_check_polyp_pair_shape_mismatch_and_bad_mask():
    image = _meta(np.zeros((3, 4, 5)), "/d/i.jpg")
    with pytest.raises(ValueError) as err:
        CheckPolypPaird()({"image": image, "label": _meta(np.zeros((1, 4, 6)), "/d/m.png")})
    message = str(err.value)
    assert "/d/i.jpg" in message and "/d/m.png" in message and "(4, 5)" in message and "(4, 6)" in message
    with pytest.raises(ValueError, match="expected one channel") as err:
        CheckPolypPaird()({"image": image, "label": _meta(np.zeros((2, 4, 5)), "/d/la.png")})
    assert "/d/la.png" in str(err.value)


# ---------------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_polyp_roles():
    root = require_data("polyp")
    pairs = polyp_datalist(root, ["Kvasir", "CVC-ClinicDB"])  # check_pair on each
    assert len(pairs) == 47  # 27 Kvasir + 20 CVC-ClinicDB
    roles = resolve_roles(root, train_sets=["Kvasir", "CVC-ClinicDB"], val_fraction=0.2, seed=0)
    assert len(roles["train"]) == 38 and len(roles["val"]) == 9  # 47 * 0.2 = 9.4 -> 9; 47 - 9 = 38
    assert [p["set"] for p in roles["test"]] == ["EndoScene"] * 24 + ["Kvasir-Sessile"] * 6
    for pair in roles["test"]:
        check_pair(pair["image"], pair["label"])


@pytest.mark.realdata
def test_real_polyp_pairs_load():
    root = require_data("polyp")
    chain = Compose([LoadPolypImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), CheckPolypPaird()])
    for pair in polyp_datalist(root):
        out = chain(pair)
        assert out["image"].shape[0] == 3 and set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}


def test_demo_concurrent_generators_agree(tmp_path):
    """Several processes asking for the same demo at the same moment (the ranks of a torchrun job) all get a
    complete dataset that stays in place while they read it."""
    import subprocess
    import sys
    import time

    # each process imports, signals it is ready, waits for "go" (so the generators really overlap), generates, then
    # keeps reading its dataset as a training rank would: without the generator's lock a late process moves the
    # early one's finished folder aside under its readers
    code = ("import sys, time; from pathlib import Path; from common.data.demo_polyps import make_demo_polyp_dataset"
            " as m\nPath(sys.argv[2]).touch()\nwhile not Path(sys.argv[3]).exists(): time.sleep(0.01)\n"
            "root = m(sys.argv[1], n_train=6, n_test=(2, 2), size=(64, 96)); end = time.time() + 2\n"
            "while time.time() < end: [p.read_bytes() for p in sorted(Path(root, 'TrainDataset', 'images').iterdir())]")
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "demo"), str(r), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert len(list((tmp_path / "demo" / "TrainDataset" / "images").iterdir())) == 6
