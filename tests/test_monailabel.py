"""The collection's bundles served by MONAI Label 0.8.5, driven in-process (no server, no network).

For every bundle under ``bundles/`` that has ``configs/inference.json``, MONAI Label's own tasks run on real frames
(2D) and volumes (3D) of ``../shared/data``: ``BundleInferTask`` (checked against an independent re-computation and
against the bundle's own ``inference.json`` run), ``BundleTrainTask`` on a ``LocalDatastore``, and the
``monaibundle`` sample app shipped inside the monailabel wheel, set up the documented offline way (``monailabel apps
--download --name monaibundle``, the bundle linked into ``model/<name>``, ``zoo_source`` other than
``monaihosting``) with ``EpistemicScoring``. Each bundle is copied to a temporary folder and shrunk by editing
top-level ids in the copy's JSON (MONAI Label passes no overrides of ours), so nothing is written into the
repository.

MONAI Label is an optional extra::

    pip install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
    pip install -r requirements-monailabel.txt

Without it this module is skipped, unless ``FRUGALZOO_REQUIRE_MONAILABEL=1`` (CI), where its absence fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import nibabel as nib
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from conftest import REPO_ROOT, data_root, error_text, require_data

try:
    from monailabel.config import settings
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask
    from monailabel.utils.others import generic
except ImportError as err:
    _REASON = (f"MONAI Label is not importable ({err}); install it with `pip install --no-deps monailabel==0.8.5 "
               "pydicom-seg==0.4.1 && pip install -r requirements-monailabel.txt`")
    if os.environ.get("FRUGALZOO_REQUIRE_MONAILABEL") == "1":
        pytest.fail(_REASON, pytrace=False)
    pytest.skip(_REASON, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.realdata,
              pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")]

BUNDLES = sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if (p / "configs" / "inference.json").is_file())
# MONAI Label's BundleInferTask takes the task type from the folder name (specs/monai_bundles.md §3.2)
# bundles whose name does not say "classification" but which MONAI Label serves as classifiers, under this folder name
SERVED_AS_CLASSIFIER = {"asg_cxr_pretraining": "asg_cxr_finding_classification"}
SEGMENTATION_BUNDLES = [b for b in BUNDLES if "classification" not in b and b not in SERVED_AS_CLASSIFIER]
CLASSIFICATION_BUNDLES = [b for b in BUNDLES if "classification" in b or b in SERVED_AS_CLASSIFIER]
RUNTIME_OUTPUTS = shutil.ignore_patterns("models", "data", "eval", "runs", "cache", "__pycache__")


# ----------------------------------------------------------------------------------------------- per-bundle cases
@dataclass(frozen=True)
class Case:
    """How to shrink a bundle, what MONAI Label must report for it, and which real data to serve it.

    Attributes:
        tiny: config file name -> {top-level id: value} written into the temporary copy.
        labels: the label map MONAI Label must report (name -> value in the result mask).
        dimension: spatial dimensions MONAI Label must report.
        data: folder of the shared data (``conftest.require_data``).
        pairs: ``data folder -> [(image, label), ...]`` real files in MONAI Label's image/label sense.
        saved_scale: factor between MONAI Label's mask values and those of the bundle's own saved masks.
        reference: ``(image, network, tiny inference ids) -> mask``, the bundle's computation written out
            independently of MONAI, in the array order of :attr:`read_mask` (2D: numpy's ``(H, W)``).
        shape: ``image -> shape`` of its mask array (2D: ``(H, W)`` from PIL; 3D: the NIfTI ``(X, Y, Z)``).
        read_mask: ``mask file -> array`` of a saved mask (2D: PIL, 3D: nibabel).
        check_result: ``(MONAI Label's result file, image) -> None``: asserts its format, size (and affine).
        result_extension: the ``result_extension`` requested from MONAI Label (lossless).
        extensions: the ``LocalDatastore`` globs of the images and labels.
        write_bad_label: writes a label of the wrong size at the given path, in the label format.
        score_bounds: ``(low, high)``: MONAI Label's epistemic score must lie in ``(low, high]``.
    """

    tiny: dict[str, dict[str, Any]]
    labels: dict[str, int]
    dimension: int
    data: str
    pairs: Callable[[Path], list[tuple[Path, Path]]]
    saved_scale: int
    reference: Callable[[Path, torch.nn.Module, dict[str, Any]], np.ndarray]
    shape: Callable[[Path], tuple[int, ...]]
    read_mask: Callable[[Path], np.ndarray]
    check_result: Callable[[Path, Path], None]
    result_extension: str
    extensions: list[str]
    write_bad_label: Callable[[Path], None]
    score_bounds: tuple[float, float]


# 2D: PIL images; MONAI Label's masks are PNG ("L"), the image's (width, height)
def pil_shape(image: Path) -> tuple[int, ...]:
    with Image.open(image) as src:
        width, height = src.size
    return height, width


def pil_mask(mask: Path) -> np.ndarray:
    with Image.open(mask) as saved:
        return np.asarray(saved)


def check_png_result(result: Path, image: Path) -> None:
    with Image.open(result) as out, Image.open(image) as src:
        assert (out.format, out.mode, out.size) == ("PNG", "L", src.size)


def write_bad_png(path: Path) -> None:
    Image.new("L", (10, 10)).save(path)


# 3D: NIfTI volumes read with nibabel; MONAI Label's masks must keep the input's voxel grid and affine
def nifti_shape(image: Path) -> tuple[int, ...]:
    return tuple(nib.load(image).shape)


def nifti_mask(mask: Path) -> np.ndarray:
    return np.asarray(nib.load(mask).dataobj)


def check_nifti_result(result: Path, image: Path) -> None:
    out, src = nib.load(result), nib.load(image)
    assert result.name.endswith(".nii.gz") and out.shape == src.shape
    assert np.allclose(out.affine, src.affine, atol=1e-4), f"affine {out.affine} != input {src.affine}"


def write_bad_nifti(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), dtype=np.uint8), np.eye(4)), path)


def kvasir_pairs(root: Path) -> list[tuple[Path, Path]]:
    images = sorted((root / "Kvasir" / "images").glob("*.jpg"))
    return [(image, root / "Kvasir" / "masks" / f"{image.stem}.png") for image in images]


def polyp_reference_mask(image: Path, network: torch.nn.Module, ids: dict[str, Any]) -> np.ndarray:
    """The polyp bundle's inference on a PIL image read as numpy ``(H, W, 3)``, with no MONAI transform.

    ``x = resize(rgb / 255, s x s)`` (bilinear, ``s = image_size``), logits ``z = net(x)`` resized back to
    ``(H, W)`` (bilinear, as ``Invertd`` with ``nearest_interp: false``), ``p = sigmoid(z)``,
    ``p <- (p - min p) / (max p - min p)``, mask ``= p >= 0.5`` (MONAI's ``AsDiscrete`` threshold), as uint8.
    """
    with Image.open(image) as src:
        rgb = np.asarray(src.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = F.interpolate(x, size=(ids["image_size"], ids["image_size"]), mode="bilinear")
    with torch.no_grad():
        logits = network.eval()(x)
    p = torch.sigmoid(F.interpolate(logits, size=rgb.shape[:2], mode="bilinear"))[0, 0]
    p = (p - p.min()) / (p.max() - p.min())
    return (p >= 0.5).numpy().astype(np.uint8)


def btcv_pairs(root: Path) -> list[tuple[Path, Path]]:
    images = sorted((root / "imagesTr").glob("*.nii.gz"))
    return [(image, root / "labelsTr" / image.name) for image in images]


def dhc_reference_labels(image: Path, network: torch.nn.Module, ids: dict[str, Any]) -> np.ndarray:
    """The DHC bundle's inference on a NIfTI volume read with nibabel, with no MONAI transform.

    ``x`` = the voxel array ``(X, Y, Z)`` transposed to ``(Z, Y, X)``, resized to ``spatial_size`` (trilinear,
    ``align_corners=False``), clipped to ``[a_min, a_max]`` and min-max scaled; windows of ``patch_size`` starting at
    ``min(k s, S - p)`` per axis; per window ``softmax(network(window))`` (the mean logits of both branches), summed
    and divided by the window count; arg-max; nearest-resized back to ``(Z, Y, X)`` and transposed to ``(X, Y, Z)``.
    """
    import itertools
    import math

    volume = torch.from_numpy(np.asarray(nib.load(image).dataobj, dtype=np.float32).transpose(2, 1, 0).copy())
    x = F.interpolate(volume[None, None], size=tuple(ids["spatial_size"]), mode="trilinear", align_corners=False)
    x = x.clamp(ids["a_min"], ids["a_max"])
    x = (x - x.min()) / (x.max() - x.min())
    patch, strides, size = ids["patch_size"], ids["strides"], x.shape[2:]
    starts = [[min(k * s, n - p) for k in range(math.ceil((n - p) / s) + 1)] for n, p, s in zip(size, patch, strides)]
    total, count = None, torch.zeros(size)
    with torch.no_grad():
        for z, y, w in itertools.product(*starts):
            window = (slice(None), slice(None), slice(z, z + patch[0]), slice(y, y + patch[1]), slice(w, w + patch[2]))
            probs = torch.softmax(network.eval()(x[window]), dim=1)
            total = torch.zeros((1, probs.shape[1], *size)) if total is None else total
            total[window] += probs
            count[window[2:]] += 1
    labels = (total / count).argmax(dim=1, keepdim=True).float()
    labels = F.interpolate(labels, size=tuple(volume.shape), mode="nearest")[0, 0]
    return labels.numpy().astype(np.uint8).transpose(2, 1, 0)


DHC_TINY = {"n_filters": 4, "num_workers": 0, "spatial_size": [20, 40, 40], "patch_size": [16, 32, 32],
            "strides": [4, 8, 8], "a_min": 0.0, "a_max": 255.0}


def wsss_reference_mask(image: Path, network: torch.nn.Module, ids: dict[str, Any]) -> np.ndarray:
    """The WSSS bundle's inference on a PIL image read as numpy ``(H, W, 3)``, with no MONAI transform.

    ``x = normalise_ImageNet(resize(rgb / 255, s x s))`` (bilinear; the per-channel affine normalisation commutes
    with the resize), decoder logits ``z = net(x)`` ``[1, 2, s/16, s/16]`` upsampled to ``s x s`` (the inferer) and
    then to ``(H, W)`` (bilinear, as ``Invertd`` with ``nearest_interp: false``), mask ``= argmax_c z``, as uint8.
    """
    with Image.open(image) as src:
        rgb = np.asarray(src.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None], size=(ids["image_size"],) * 2, mode="bilinear")
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = network.eval()((x - mean) / std)
    logits = F.interpolate(F.interpolate(logits, size=x.shape[2:], mode="bilinear"), size=rgb.shape[:2], mode="bilinear")
    return logits[0].argmax(0).numpy().astype(np.uint8)


WSSS_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_workers": 0}
# the few-shot bundle segments what its support set shows: a real Kvasir frame (the last one, never the query) and the
# polyp description; its network is primed with them, so the WSSS reference (one 2-class forward) applies as is
_KVASIR_LAST = sorted((data_root() / "polyp" / "Kvasir" / "images").glob("*.jpg"))[-1:]
CDTG_TINY = {"image_size": 64, "backbone_layers": [1, 1, 1, 1], "backbone_widths": [4, 8, 8, 16], "num_workers": 0,
             "descriptions": "$[common.data.category_text.prompt_file('polyp')]"}
CDTG_INFER = {**CDTG_TINY, "support_class": "polyp", "support_names": [f"Kvasir_{p.stem}" for p in _KVASIR_LAST],
              "support_source": {"kind": "polyp", "root": str(data_root() / "polyp"), "sets": ["Kvasir"]}}
POLYP_TINY = {"backbone": "pvt_v2_b0", "image_size": 64, "num_workers": 0}
CASES = {
    "endoked_polyp_segmentation": Case(
        tiny={"inference.json": POLYP_TINY, "train.json": {**POLYP_TINY, "scales": [1.0], "progress_bar": False}},
        labels={"polyp": 1}, dimension=2, data="polyp", pairs=kvasir_pairs, saved_scale=255,
        reference=polyp_reference_mask, shape=pil_shape, read_mask=pil_mask, check_result=check_png_result,
        result_extension=".png", extensions=["*.jpg", "*.png"], write_bad_label=write_bad_png,
        # per pixel -p ln p of the mean of the binary masks, where MONAI Label lifts 0 to 5e-5: runs that all
        # agree give at most 5e-5 * ln(2e4) = 5e-5 * 9.90 = 4.95e-4, so more means the dropout runs disagreed;
        # -p ln p is at most 1/e = 0.368 (at p = 1/e)
        score_bounds=(4.95e-4, 0.368),
    ),
    "endoked_polyp_wsss_segmentation": Case(
        tiny={"inference.json": {**WSSS_TINY, "image_size": 64},
              "train.json": {**WSSS_TINY, "crop_size": 64, "resize": 80, "iterations": 2, "val_interval": 2,
                             "warmup_iters": 1, "seg_warmup_iters": 1, "aux_to_main_iter": 2, "batch_size": 2,
                             "progress_bar": False}},
        labels={"polyp": 1}, dimension=2, data="polyp", pairs=kvasir_pairs, saved_scale=255,
        reference=wsss_reference_mask, shape=pil_shape, read_mask=pil_mask, check_result=check_png_result,
        result_extension=".png", extensions=["*.jpg", "*.png"], write_bad_label=write_bad_png,
        # as for the polyp bundle: binary masks, MONAI Label's dropout runs (ViT token/projection dropout) disagree
        score_bounds=(4.95e-4, 0.368),
    ),
    "cdtg_fewshot_segmentation": Case(
        tiny={"inference.json": CDTG_INFER,
              "train.json": {**CDTG_TINY, "datalist_class": "polyp", "batch_size": 2, "progress_bar": False}},
        labels={"foreground": 1}, dimension=2, data="polyp", pairs=kvasir_pairs, saved_scale=255,
        reference=wsss_reference_mask, shape=pil_shape, read_mask=pil_mask, check_result=check_png_result,
        result_extension=".png", extensions=["*.jpg", "*.png"], write_bad_label=write_bad_png,
        # binary masks, as for the polyp bundles: MONAI Label's dropout runs (dropout on the hypercorrelations)
        score_bounds=(4.95e-4, 0.368),
    ),
    "dhc_abdomen_ct_segmentation": Case(
        tiny={"inference.json": DHC_TINY, "train.json": {**DHC_TINY, "progress_bar": False}},
        labels={name: value for value, name in enumerate(
            ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
             "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
             "left adrenal gland"], start=1)},
        dimension=3, data="btcv_ct", pairs=btcv_pairs, saved_scale=1, reference=dhc_reference_labels,
        shape=nifti_shape, read_mask=nifti_mask, check_result=check_nifti_result, result_extension=".nii.gz",
        extensions=["*.nii.gz"], write_bad_label=write_bad_nifti,
        # MONAI Label 0.8.5's EpistemicScoring treats the single-channel 0..13 label map as a probability p (the
        # mean label over the runs, 0 lifted to 5e-5) and averages -p ln p: on [5e-5, 13] that lies between
        # -13 ln 13 = -13 * 2.565 = -33.34 (exclusive: not every voxel can be 13) and 1/e = 0.368
        score_bounds=(-33.35, 0.368),
    ),
}


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(params=SEGMENTATION_BUNDLES)
def case(request) -> tuple[str, Case]:
    name = request.param
    if name not in CASES:
        pytest.fail(f"bundle {name} has no MONAI Label test case: add one to CASES in tests/test_monailabel.py")
    return name, CASES[name]


@pytest.fixture
def pairs(case) -> list[tuple[Path, Path]]:
    found = case[1].pairs(require_data(case[1].data))
    assert len(found) >= 5, f"need 5 image/label pairs, found {len(found)}"
    return found


@dataclass
class Served:
    """A temporary, shrunk copy of a bundle and the network whose random-init weights it holds."""

    root: Path
    network: torch.nn.Module


def fetching(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"MONAI Label tried to fetch from the model zoo: {args} {kwargs}")


def serve_copy(name: str, tiny: dict[str, dict[str, Any]], dest: Path) -> Served:
    """Copy the bundle (without its runtime outputs) to ``dest``, shrink it, and save random-init weights."""
    shutil.copytree(REPO_ROOT / "bundles" / name, dest, ignore=RUNTIME_OUTPUTS)
    for config, ids in tiny.items():
        path = dest / "configs" / config
        content = json.loads(path.read_text())
        assert set(ids) <= set(content), f"{config} lacks ids {sorted(set(ids) - set(content))}"
        path.write_text(json.dumps({**content, **ids}, indent=4))
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.json"))
    parser["bundle_root"] = str(dest)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (dest / "models").mkdir()
    torch.save(network.state_dict(), dest / "models" / "model.pt")  # a plain state dict, as training saves it
    return Served(dest, network)


def studies(folder: Path, pairs: list[tuple[Path, Path]], labelled: bool) -> Path:
    """MONAI Label's local datastore layout: images at the root, their labels in ``labels/final``."""
    (folder / "labels" / "final").mkdir(parents=True)
    for image, label in pairs:
        shutil.copy(image, folder)
        if labelled:
            shutil.copy(label, folder / "labels" / "final" / f"{image.stem}{label.suffix}")
    return folder


def sample_app(name: str, root: Path, studies_dir: Path, tmp_path: Path, monkeypatch, conf: dict[str, str]) -> Any:
    """The monaibundle sample app from the wheel, as `monailabel start_server` builds it, with no network: the app
    copied with `monailabel apps --download`, the bundle at ``root`` linked into model/<name>, zoo_source github,
    and any zoo download or listing failing the test; ``conf`` adds to the app's configuration."""
    copied = subprocess.run([sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                             "--output", str(tmp_path / "apps")], capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stdout[-2000:] + copied.stderr[-2000:]
    app_dir = tmp_path / "apps" / "monaibundle"
    (app_dir / "model").mkdir(exist_ok=True)
    (app_dir / "model" / name).symlink_to(root, target_is_directory=True)
    monkeypatch.setattr(settings, "MONAI_LABEL_SESSIONS", False)  # no session folder in the home directory
    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)  # no file-watcher thread
    monkeypatch.setattr(generic, "download", fetching)  # a bundle download or zoo listing would fail the test
    monkeypatch.setattr(generic, "get_all_bundles_list", fetching)
    loader = importlib.util.spec_from_file_location("monaibundle_app", app_dir / "main.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    base = {"models": name, "zoo_source": "github", "sam2": "false", "preload": "false"}
    return module.MyApp(str(app_dir), str(studies_dir), {**base, **conf})


def bundle_inference(root: Path, image: Path, out: Path, read_mask: Callable[[Path], np.ndarray]) -> np.ndarray:
    """The bundle's own ``inference.json`` run on a folder holding ``image``; the single mask it writes."""
    (out / "in" / "images").mkdir(parents=True)
    shutil.copy(image, out / "in" / "images")
    wf = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"),
                        meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="inference", bundle_root=str(root), dataset_dir=str(out / "in"),
                        output_dir=str(out / "pred"))
    wf.initialize()
    wf.run()
    wf.finalize()
    (mask,) = [p for p in (out / "pred").rglob("*") if p.is_file()]
    return read_mask(mask)


# ----------------------------------------------------------------------------------------------- tests
def test_infer_task_matches_the_bundle_and_the_image(case, pairs, tmp_path):
    """BundleInferTask on a real, non-square frame (or non-cubic volume): MONAI Label swaps LoadImaged for its
    LoadImageTensord and appends Restored and its writer; the mask must still be the bundle's own, pixel (voxel) for
    pixel, at native size (and, in 3D, on the input's affine)."""
    name, spec = case
    served = serve_copy(name, spec.tiny, tmp_path / name)
    task = BundleInferTask(str(served.root), conf={"preload": "false"})
    assert task.is_valid()
    assert (task.type, task.dimension, task.labels) == ("segmentation", spec.dimension, spec.labels)

    image = pairs[0][0]
    shape = spec.shape(image)
    assert len(set(shape)) > 1  # 2D: width != height (3D: X != Z); a transposed mask would show as a wrong size
    # no result_dtype: the bundle casts to uint8 itself; result_extension because a JPEG mask would be lossy
    mask_file, result = task({"image": str(image), "device": "cpu", "result_extension": spec.result_extension})
    assert result["label_names"] == spec.labels
    spec.check_result(Path(mask_file), image)  # 2D: PNG, "L", the image's size; 3D: the input's shape and affine
    mask = spec.read_mask(Path(mask_file))
    Path(mask_file).unlink()  # MONAI Label leaves its results in the system temp folder
    values = set(np.unique(mask).tolist())
    # 2D: a subset of {0, 1} with 2 values, i.e. exactly {0, 1}; 3D: at least 2 of 0..13: not a constant mask
    assert mask.shape == shape and mask.dtype == np.uint8
    assert values <= {0, *spec.labels.values()} and len(values) >= 2

    reference = spec.reference(image, served.network, spec.tiny["inference.json"])
    assert reference.shape == shape
    # a few pixels with p within rounding of 0.5 (3D: near-ties of the arg-max) may differ; a flip or an axis swap
    # disagrees on a large part
    assert np.mean(mask == reference) > 0.999
    own = bundle_inference(served.root, image, tmp_path / "own", spec.read_mask)
    assert np.array_equal(own, mask * spec.saved_scale)


def test_train_task_trains_on_the_datastore(case, pairs, tmp_path):
    """BundleTrainTask: MONAI Label's own train/validation lists of {"image", "label"} dicts and max_epochs."""
    name, spec = case
    served = serve_copy(name, spec.tiny, tmp_path / name)
    datastore = LocalDatastore(str(studies(tmp_path / "studies", pairs[:5], labelled=True)),
                               extensions=spec.extensions, auto_reload=False)
    assert len(datastore.datalist()) == 5
    model = served.root / "models" / "model.pt"
    before = torch.load(model, weights_only=True)

    task = BundleTrainTask(str(served.root), conf={})
    assert task.is_valid()
    # val_split 0.4 of 5 pairs: 3 to train, 2 to validate (the CheckpointSaver of the best validation writes model.pt)
    task({"model": name, "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.4}, datastore)

    after = torch.load(model, weights_only=True)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before), "models/model.pt was not rewritten"
    # one epoch, MONAI Label's max_epochs (the bundle's own default on its demo data is 5)
    assert sorted(p.name for p in (served.root / "models").glob("training_state_*")) == ["training_state_epoch=1.pt"]


def test_train_task_names_a_bad_label(case, pairs, tmp_path):
    """MONAI Label's lists go through the bundle's pair checks: a wrong-sized (wrong-shape) label is named in the
    error."""
    name, spec = case
    served = serve_copy(name, spec.tiny, tmp_path / name)
    folder = studies(tmp_path / "studies", pairs[:5], labelled=True)
    bad = next((folder / "labels" / "final").iterdir())
    spec.write_bad_label(bad)
    datastore = LocalDatastore(str(folder), extensions=spec.extensions, auto_reload=False)
    with pytest.raises(Exception) as info:
        BundleTrainTask(str(served.root), conf={})(
            {"model": name, "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.4}, datastore)
    assert str(bad) in error_text(info.value)


def test_sample_app_serves_offline_and_scores(case, pairs, tmp_path, monkeypatch):
    """The monaibundle sample app from the wheel, as `monailabel start_server` builds it, with no network:
    zoo_source github and the bundle linked into model/<name>; then inference by image id and epistemic scoring."""
    name, spec = case
    served = serve_copy(name, spec.tiny, tmp_path / name)
    conf = {"epistemic_model": name, "epistemic_simulation_size": "2", "epistemic_max_samples": "1"}
    app = sample_app(name, served.root, studies(tmp_path / "studies", pairs[:2], labelled=False), tmp_path, monkeypatch,
                     conf)

    info = app.info()
    assert info["models"][name]["labels"] == spec.labels and info["models"][name]["dimension"] == spec.dimension
    assert name in info["trainers"] and name in info["scoring"]
    image = pairs[0][0]
    store = app.datastore()
    (image_id,) = [i for i in store.list_images() if Path(store.get_image_uri(i)).name == image.name]
    result = app.infer({"model": name, "image": image_id, "device": "cpu", "result_extension": spec.result_extension})
    spec.check_result(Path(result["file"]), image)
    Path(result["file"]).unlink()

    summary = app.scoring({"method": name, "device": "cpu", "max_workers": 1})
    assert (summary["total"], summary["executed"]) == (2, 1)
    scores = [app.datastore().get_image_info(i).get("epistemic_entropy") for i in app.datastore().list_images()]
    (score,) = [s for s in scores if s is not None]
    low, high = spec.score_bounds  # worked out in CASES
    assert low < score <= high


# ----------------------------------------------------------------------------------------------- classification
@dataclass(frozen=True)
class ClassificationCase:
    """How to shrink a classification bundle and which real images to serve it.

    Attributes:
        tiny: config file name -> {top-level id: value} written into the temporary copy.
        data: folder of the shared data (``conftest.require_data``).
        subset: ``(data folder, destination) -> dataset folder``: a small dataset in the bundle's layout, with its
            images in ``images/``.
        fit_evaluate: run the copy's ``evaluate.json`` on the subset before serving (Sparsam fits the classifier
            that inference serves there); otherwise the random-init ``model.pt`` alone is served.
        inference_dir: ``dataset folder -> the dataset_dir of the bundle's own inference.json`` whose prediction
            ids are the image stems.
        multi_label: the classes are independent (sigmoid scores that need not sum to 1).
    """

    tiny: dict[str, dict[str, Any]]
    data: str
    subset: Callable[[Path, Path], Path]
    fit_evaluate: bool = True
    inference_dir: Callable[[Path], Path] = lambda dataset: dataset
    multi_label: bool = False


def wbc_subset(root: Path, dest: Path, per_class: int = 6) -> Path:
    """``per_class`` real white-blood-cell images of each class with at least that many, and their labels.csv rows."""
    lines = (root / "labels.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    counts: dict[str, int] = {}
    for _, class_id, _ in rows:
        counts[class_id] = counts.get(class_id, 0) + 1
    kept: list[list[str]] = []
    for row in rows:
        if counts[row[1]] >= per_class and sum(r[1] == row[1] for r in kept) < per_class:
            kept.append(row)
    (dest / "images").mkdir(parents=True)
    for image_id, _, _ in kept:
        shutil.copy(root / "images" / f"{image_id}.png", dest / "images")
    (dest / "labels.csv").write_text("\n".join([lines[0], *(",".join(r) for r in kept)]) + "\n")
    return dest


def kvasir_frames(root: Path, dest: Path, count: int = 6) -> Path:
    """``count`` real Kvasir frames in ``dest/images`` (the MIL bundle classifies single frames)."""
    (dest / "images").mkdir(parents=True)
    for image in sorted((root / "Kvasir" / "images").glob("*.jpg"))[:count]:
        shutil.copy(image, dest / "images")
    return dest


def synthetic_radiographs(root: Path, dest: Path, count: int = 6) -> Path:
    """``count`` synthetic chest radiographs painted from real IU X-ray report texts (``root/annotation.json``; no
    real chest X-ray image exists in the shared data), in ``dest/images``."""
    from common.data.demo_cxr import ensure_demo_cxr_dataset

    demo = ensure_demo_cxr_dataset(dest / "demo", reports=root / "annotation.json", n_train=0, n_valid=0,
                                   n_test=count)
    (dest / "images").mkdir(parents=True)
    for image in sorted((demo / "images").glob("*.png")):
        shutil.copy(image, dest / "images")
    return dest


ASG_TINY = {"image_size": 64, "resize": 80, "vit": {"embed_dim": 32, "depth": 2, "num_heads": 2},
            "proj_hidden_dim": 64, "emb_dim": 16, "irl": {"layers": 1, "heads": 2, "ffn": 64, "dropout": 0.1},
            "num_workers": 0}
SPARSAM_TINY = {"backbone_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 4, "cls_attn_layers": 1},
                "image_resolution": 32, "num_workers": 0}
CLASSIFICATION_CASES = {
    "endoked_report_mil_classification": ClassificationCase(
        tiny={"inference.json": {"image_size": 64, "num_workers": 0}}, data="polyp", subset=kvasir_frames,
        fit_evaluate=False, inference_dir=lambda dataset: dataset / "images",
    ),
    "sparsam_dino_classification": ClassificationCase(
        tiny={"inference.json": SPARSAM_TINY, "evaluate.json": {**SPARSAM_TINY, "budgets": [1], "n_draws": 1}},
        data="wbc", subset=wbc_subset,
    ),
    "asg_cxr_pretraining": ClassificationCase(
        tiny={"inference.json": ASG_TINY}, data="cxr_reports", subset=synthetic_radiographs, fit_evaluate=False,
        inference_dir=lambda dataset: dataset / "images", multi_label=True,
    ),
}


@pytest.fixture(params=CLASSIFICATION_BUNDLES)
def classification_case(request) -> tuple[str, ClassificationCase]:
    name = request.param
    if name not in CLASSIFICATION_CASES:
        pytest.fail(f"bundle {name} has no MONAI Label test case: add one to CLASSIFICATION_CASES in "
                    "tests/test_monailabel.py")
    return name, CLASSIFICATION_CASES[name]


def serve_classifier(name: str, spec: ClassificationCase, dataset: Path, dest: Path) -> Path:
    """A shrunk copy with random-init weights and, where the case fits one, the classifier its own evaluation fits on
    ``dataset``."""
    served = serve_copy(name, spec.tiny, dest)
    if not spec.fit_evaluate:
        return served.root
    wf = ConfigWorkflow(config_file=str(served.root / "configs" / "evaluate.json"),
                        meta_file=str(served.root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="infer", bundle_root=str(served.root), dataset_dir=str(dataset))
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (served.root / "models" / "classifier.skops").is_file()
    return served.root


def own_probabilities(root: Path, dataset: Path, out: Path) -> dict[str, list[float]]:
    """The bundle's own ``inference.json`` on ``dataset``: probabilities per image id, from its predictions.csv."""
    wf = ConfigWorkflow(config_file=str(root / "configs" / "inference.json"),
                        meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="inference", bundle_root=str(root), dataset_dir=str(dataset),
                        output_dir=str(out))
    wf.initialize()
    wf.run()
    wf.finalize()
    lines = (out / "predictions.csv").read_text().splitlines()
    return {cells[0]: [float(v) for v in cells[1:-1]] for cells in (line.split(",") for line in lines[1:])}


def test_classification_infer_task_matches_the_bundle(classification_case, tmp_path):
    """BundleInferTask on real images: the classification type from the folder name, MONAI Label's Restored and
    ClassificationWriter after the bundle's postprocessing, and the bundle's own probabilities per class."""
    name, spec = classification_case
    dataset = spec.subset(require_data(spec.data), tmp_path / "data")
    root = serve_classifier(name, spec, dataset, tmp_path / SERVED_AS_CLASSIFIER.get(name, name))
    task = BundleInferTask(str(root), conf={"preload": "false"})
    assert task.is_valid()
    assert (task.type, task.dimension) == ("classification", 2)

    own = own_probabilities(root, spec.inference_dir(dataset), tmp_path / "own")
    n_classes = len(next(iter(own.values())))
    images = sorted((dataset / "images").iterdir())
    assert len(own) == len(images) and n_classes >= 2
    for image in images[:: max(1, len(images) // 4)]:
        _, result = task({"image": str(image), "device": "cpu"})
        prediction = result["prediction"]
        assert [p["idx"] for p in prediction] == list(range(n_classes))
        scores = [p["score"] for p in prediction]
        if not spec.multi_label:
            assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert scores == pytest.approx(own[image.stem], abs=1e-5)  # predictions.csv keeps 6 decimals


def test_classification_sample_app_serves_offline(classification_case, tmp_path, monkeypatch):
    """The monaibundle sample app from the wheel lists the bundle as a classification model and infers by image id."""
    bundle, spec = classification_case
    name = SERVED_AS_CLASSIFIER.get(bundle, bundle)  # the app's model name is the folder name, which sets the type
    dataset = spec.subset(require_data(spec.data), tmp_path / "data")
    root = serve_classifier(bundle, spec, dataset, tmp_path / name)
    images = sorted((dataset / "images").iterdir())[:2]
    app = sample_app(name, root, studies(tmp_path / "studies", [(i, i) for i in images], labelled=False), tmp_path,
                     monkeypatch, {"skip_trainers": "true"})

    assert app.info()["models"][name]["type"] == "classification"
    result = app.infer({"model": name, "image": images[0].stem, "device": "cpu"})
    scores = [p["score"] for p in result["params"]["prediction"]]
    assert len(scores) >= 2
    if spec.multi_label:
        assert all(0.0 <= score <= 1.0 for score in scores)
    else:
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
