"""The dhc_abdomen_ct_segmentation bundle run as users run it: train, evaluate, infer, resume, baselines, bad input.

Workflows run in-process through ``ConfigWorkflow`` (as the model zoo's CI does), shrunk through top-level ids
only; ``bundle_root`` points at a temporary folder so that nothing is written into the repository. On the embedded
demo the bundle already runs at demo size (20x40x40 volumes, 16x32x32 patches, strides 4/8/8); the tests also
narrow the VNets to 4 filters.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events

from common.data.demo_volumes import make_demo_volume_dataset
from common.handlers.training_state import latest_training_state
from common.networks.vnet import DualVNet

from conftest import REPO_ROOT, bundle_workflow, read_csv, run_workflow, require_data

BUNDLE = REPO_ROOT / "bundles" / "dhc_abdomen_ct_segmentation"
CONFIGS = BUNDLE / "configs"
TINY = {"n_filters": 4, "num_workers": 0}
TRAIN_TINY = {**TINY, "progress_bar": False}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


workflow = partial(bundle_workflow, CONFIGS)  # (bundle_root, kind, configs, **override) -> initialised workflow


run = run_workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A bundle root holding a DHC pair trained for 2 epochs on the embedded demo data (no dataset argument)."""
    root = tmp_path_factory.mktemp("dhc_bundle")
    wf = workflow(root, "train", ["train.json"], epochs=2, **TRAIN_TINY)
    assert wf.parser.get_parsed_content("on_demo") is True
    assert type(wf.parser.get_parsed_content("co_training_method")).__name__ == "DHC"
    run(wf)
    trainer = wf.parser.get_parsed_content("train#trainer")
    # demo split: 12 cases -> 1 labelled, 6 unlabelled (2 eval, 3 test); ceil(6 / 2) = 3 iterations per epoch
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 6)
    return root


def test_train_writes_both_branches_and_training_state(trained):
    weights = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in weights} == {"branch_a", "branch_b"}  # one state dict, both branches
    state = torch.load(latest_training_state(trained / "models"), weights_only=True)
    assert {"model", "optimizer", "optimizer_b", "method", "trainer"} <= set(state)
    assert {"diff_dw.weights", "dist_dw.weights"} <= set(state["method"])  # DHC's class weights are resumable
    assert latest_training_state(trained / "models").name == "training_state_epoch=2.pt"
    assert list((trained / "eval" / "runs").glob("events.out.tfevents.*")), "TensorBoard events expected"


def test_evaluate_reports_per_organ_dice_and_asd(trained):
    run(workflow(trained, "train", ["train.json", "evaluate.json"], **TRAIN_TINY))
    rows = read_csv(trained / "eval" / "metrics.csv")
    assert [r["case"] for r in rows] == ["case_0001", "case_0008", "case_0010", "mean"]  # the 3 test cases
    assert len(rows[0]) == 1 + 2 * 14  # case, 13 Dice + avg, 13 ASD + avg
    for row in rows[:-1]:
        assert all(0.0 <= float(row[f"dice_{n}"]) <= 100.0 for n in ("liver", "left adrenal gland"))
    # the mean row is the mean over the 3 cases
    assert float(rows[-1]["dice_liver"]) == pytest.approx(sum(float(r["dice_liver"]) for r in rows[:-1]) / 3,
                                                          abs=1e-5)
    table = (trained / "eval" / "metrics_table.txt").read_text().splitlines()
    assert table[0].split() == ["class", "Dice", "ASD"] and len(table) == 1 + 13 + 1
    assert len(list((trained / "eval" / "slices").glob("*.png"))) == 3


def test_evaluate_scores_another_folder(trained, tmp_path):
    other = make_demo_volume_dataset(tmp_path / "other", n_cases=2, shape=(48, 48, 24), seed=5)
    out = tmp_path / "other_eval"
    run(workflow(trained, "train", ["train.json", "evaluate.json"], test_dataset_dir=str(other),
                 output_dir=str(out), n_figures=0, **TRAIN_TINY))
    assert [r["case"] for r in read_csv(out / "metrics.csv")] == ["case_0000", "case_0001", "mean"]


def test_inference_writes_label_maps_on_the_input_grid(trained):
    run(workflow(trained, "inference", ["inference.json"], **TINY))
    images = sorted((trained / "data" / "demo_volumes" / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 12
    for image in images[:3]:
        pred = nib.load(trained / "eval" / "predictions" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        src = nib.load(image)
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        values = np.unique(np.asarray(pred.dataobj))
        assert pred.get_data_dtype() == np.uint8 and values.min() >= 0 and values.max() <= 13
    assert not (trained / "eval" / "predictions.partial").exists()


def test_inference_without_weights_builds(tmp_path):
    """What verify/lint builds: load_pretrain=False needs no models/model.pt."""
    wf = workflow(tmp_path, "inference", ["inference.json"], load_pretrain=False, **TINY)
    assert isinstance(wf.parser.get_parsed_content("network_def"), DualVNet)  # DHC's pair, built by method name


def test_resume_continues_from_the_last_epoch(trained, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(trained, root)
    wf = workflow(root, "train", ["train.json"], epochs=3, resume=True, **TRAIN_TINY)
    trainer = wf.parser.get_parsed_content("train#trainer")
    saved = torch.load(root / "models" / "training_state_epoch=2.pt", weights_only=True)["method"]
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: started.append(
        (engine.state.epoch, engine.method.dist_dw.weights.clone())))
    run(wf)
    assert [epoch for epoch, _ in started] == [3]  # epochs 1-2 were restored, only epoch 3 ran
    assert torch.equal(started[0][1], saved["dist_dw.weights"])  # DistDW continued from its saved EMA
    assert latest_training_state(root / "models").name == "training_state_epoch=3.pt"


@pytest.mark.parametrize("method, cls, branches", [
    ("cps", "CPS", "AB"), ("uamt", "UAMT", "A"), ("simis", "SimiS", "AB"), ("crest", "CReST", "AB"),
    ("depl", "DePL", "AB"), ("urpc", "URPC", "A"), ("adsh", "Adsh", "AB"), ("cld", "CLD", "AB"), ("dst", "DST", "AB"),
    ("acisis", "ACISIS", "A"), ("ssnet", "SSNet", "A")])
def test_baselines_are_one_override(tmp_path, method, cls, branches):
    wf = workflow(tmp_path, "train", ["train.json"], method=method, epochs=1, **TRAIN_TINY)
    assert type(wf.parser.get_parsed_content("co_training_method")).__name__ == cls
    network = wf.parser.get_parsed_content("network")
    assert network.branches == branches
    run(wf)
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    # single-network methods have no branch B and no second optimiser; the inference config builds the same net
    has_b = method not in ("urpc", "ssnet")
    assert {key.split(".")[0] for key in weights} == ({"branch_a", "branch_b"} if has_b else {"branch_a"})
    assert ("optimizer_b" in torch.load(latest_training_state(tmp_path / "models"), weights_only=True)) == has_b
    infer = workflow(tmp_path, "inference", ["inference.json"], method=method, **TINY)
    infer.parser.get_parsed_content("network_def").load_state_dict(weights)
    if method in ("simis", "crest"):  # the class weights are method state, saved for resuming, and have moved
        state = torch.load(latest_training_state(tmp_path / "models"), weights_only=True)["method"]
        weights = state[f"{method}_a.weights"]
        assert weights.shape == (wf.parser.get_parsed_content("num_classes"),) and torch.isfinite(weights).all()
    if method == "depl":  # q̂ is method state too: one voxel-wise class distribution per branch, moved from 1/C
        qhat = torch.load(latest_training_state(tmp_path / "models"), weights_only=True)["method"]["depl_a.qhat"]
        assert qhat.shape[:2] == (1, wf.parser.get_parsed_content("num_classes"))
        torch.testing.assert_close(qhat.sum(dim=1), torch.ones_like(qhat[:, 0]))
        assert not torch.allclose(qhat, torch.full_like(qhat, 1 / qhat.shape[1]))


def test_real_btcv_subset(tmp_path):
    """Five real BTCV cases (intensities already 0..255): 1 labelled, 2 unlabelled, 1 eval, 1 test, demo sizes."""
    btcv = require_data("btcv_ct")
    meta = json.loads((btcv / "dataset.json").read_text())
    subset = tmp_path / "btcv5"
    subset.mkdir()
    meta["training"] = [{k: str(btcv / v) for k, v in e.items()} for e in meta["training"][:5]]
    (subset / "dataset.json").write_text(json.dumps(meta))
    real = {"dataset_dir": str(subset), "a_min": 0.0, "a_max": 255.0, "spatial_size": [20, 40, 40],
            "patch_size": [16, 32, 32], "strides": [4, 8, 8], "n_eval": 1, "n_test": 1, "labelled_percent": 34}
    root = tmp_path / "run"
    wf = workflow(root, "train", ["train.json"], epochs=1, val_interval=1, **real, **TRAIN_TINY)
    # 3 train cases: floor(0.34 * 3) = 1 labelled, 2 unlabelled -> ceil(2 / 2) = 1 iteration
    roles = wf.parser.get_parsed_content("data_roles")
    assert {k: len(v) for k, v in roles.items()} == {"labelled": 1, "unlabelled": 2, "eval": 1, "test": 1}
    run(wf)
    run(workflow(root, "train", ["train.json", "evaluate.json"], **real, **TRAIN_TINY))
    (row, mean) = read_csv(root / "eval" / "metrics.csv")
    assert row["case"] == roles["test"][0]["case"] and mean["case"] == "mean"
    assert 0.0 <= float(mean["avg_dice"]) <= 100.0


# ----------------------------------------------------------------------------------------------- bad input
def _error_text(err: BaseException) -> str:
    """The message of an error and of everything it was raised from (MONAI wraps config errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def _train_should_fail(root: Path, dataset: Path, **override) -> str:
    with pytest.raises(Exception) as info:
        run(workflow(root, "train", ["train.json"], dataset_dir=str(dataset), epochs=1, **TRAIN_TINY, **override))
    assert not (root / "models" / "model.pt").exists(), "a failed run must not leave a model.pt"
    return _error_text(info.value)


@pytest.fixture
def small(tmp_path) -> Path:
    return make_demo_volume_dataset(tmp_path / "data", n_cases=6, shape=(32, 32, 20))


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(path)
    array = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(array, img.affine if affine is None else affine), path)


def test_label_shape_differs_from_image(tmp_path, small):
    label = small / "labelsTr" / "case_0002.nii.gz"
    _rewrite(label, np.zeros((32, 32, 19), np.uint8))
    text = _train_should_fail(tmp_path / "run", small)
    assert "case_0002" in text and "shape" in text


def test_label_affine_differs_from_image(tmp_path, small):
    label = small / "labelsTr" / "case_0003.nii.gz"
    _rewrite(label, affine=np.diag([2.0, 1.5, 3.0, 1.0]))
    text = _train_should_fail(tmp_path / "run", small)
    assert "case_0003" in text and "affines" in text


def test_label_outside_the_label_map(tmp_path, small):
    label = small / "labelsTr" / "case_0001.nii.gz"
    data = np.asarray(nib.load(label).dataobj).copy()
    data[0, 0, 0] = 20
    _rewrite(label, data)
    text = _train_should_fail(tmp_path / "run", small)
    assert "case_0001" in text and "[20]" in text


def test_image_not_3d(tmp_path, small):
    image = small / "imagesTr" / "case_0004.nii.gz"
    _rewrite(image, np.zeros((32, 32, 20, 2), np.int16))
    text = _train_should_fail(tmp_path / "run", small)
    assert "case_0004" in text and "3D" in text


def test_zero_labelled_cases(tmp_path, small):
    # 6 cases: n_test = 6 - floor(24/5) = 2, n_eval = 4 - floor(20/6) = 1, 3 train; floor(0.1 * 3) = 0 labelled
    text = _train_should_fail(tmp_path / "run", small, labelled_percent=10)
    assert "0 labelled cases" in text


def test_split_naming_a_missing_case(tmp_path):
    root = tmp_path / "npy_data"
    (root / "npy").mkdir(parents=True)
    (root / "splits").mkdir()
    for case in ("0001", "0002", "0003", "0004"):
        np.save(root / "npy" / f"{case}_image.npy", np.zeros((20, 40, 40), np.float32))
        np.save(root / "npy" / f"{case}_label.npy", np.zeros((20, 40, 40), np.float32))
    for name, ids in {"labeled_20p.txt": "0001\n", "unlabeled_20p.txt": "0002\n0009\n", "eval.txt": "0003\n",
                      "test.txt": "0004\n"}.items():
        (root / "splits" / name).write_text(ids)
    text = _train_should_fail(tmp_path / "run", root)
    assert "0009" in text and "unlabeled_20p.txt" in text


def test_unknown_method(tmp_path):
    text = _train_should_fail(tmp_path / "run", make_demo_volume_dataset(tmp_path / "d", n_cases=6,
                                                                         shape=(32, 32, 20)), method="mean_teacher",
                              labelled_percent=40)
    assert "unknown co-training method 'mean_teacher'" in text


def test_native_resolution_switch_keeps_each_volume_grid(tmp_path):
    """Paper-time default: every volume resized to spatial_size; --native_resolution True (the later DHC code)
    keeps the volume's own grid, in (D, H, W) = the NIfTI's (x, y, z) reversed."""
    resized = workflow(tmp_path, "train", ["train.json"], **TRAIN_TINY)
    item = resized.parser.get_parsed_content("train#dataset#data")[0]
    out = resized.parser.get_parsed_content("train#deterministic_transforms")(dict(item))
    assert tuple(out["image"].shape) == (1, 20, 40, 40)  # the demo's spatial_size
    native = workflow(tmp_path, "train", ["train.json"], native_resolution=True, **TRAIN_TINY)
    out = native.parser.get_parsed_content("train#deterministic_transforms")(dict(item))
    x, y, z = nib.load(item["image"]).shape
    assert tuple(out["image"].shape) == (1, z, y, x) and tuple(out["label"].shape) == (1, z, y, x)
