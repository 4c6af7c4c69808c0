"""The endoked_polyp_segmentation bundle run as users run it: train, evaluate, infer, resume, baselines, bad input.

Workflows run in-process through ``ConfigWorkflow`` (as the model zoo's CI does), shrunk through top-level ids
only; ``bundle_root`` points at a temporary folder so that nothing is written into the repository.
"""

from __future__ import annotations

import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from common.data.demo_polyps import make_demo_polyp_dataset
from common.handlers.training_state import latest_training_state
from common.utils.config import check_cli_overrides

from conftest import REPO_ROOT, bundle_workflow, error_text, read_csv, run_workflow

BUNDLE = REPO_ROOT / "bundles" / "endoked_polyp_segmentation"
CONFIGS = BUNDLE / "configs"
# every size a test shrinks is a top-level id (DESIGN.md): a PVTv2-b0 Polyp-PVT at 64 px trains in seconds
TINY = {"backbone": "pvt_v2_b0", "image_size": 64, "batch_size": 4, "num_workers": 0, "progress_bar": False}

pytestmark = pytest.mark.slow


workflow = partial(bundle_workflow, CONFIGS)  # (bundle_root, kind, configs, **override) -> initialised workflow


run = run_workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A bundle root holding a model trained for 2 epochs on the embedded demo data (no dataset argument)."""
    root = tmp_path_factory.mktemp("polyp_bundle")
    wf = workflow(root, "train", ["train.json"], epochs=2, **TINY)
    assert wf.parser.get_parsed_content("on_demo") is True
    run(wf)
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2
    return root


def test_train_writes_model_and_training_state(trained):
    weights = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert "backbone.patch_embed1.proj.weight" in weights  # a plain state dict, as MONAI Label loads it
    assert latest_training_state(trained / "models").name == "training_state_epoch=2.pt"
    assert (trained / "data" / "demo" / "TrainDataset" / "images").is_dir()
    assert list((trained / "eval" / "runs").glob("events.out.tfevents.*")), "TensorBoard events expected"


def test_evaluate_reports_every_test_set(trained):
    wf = workflow(trained, "train", ["train.json", "evaluate.json"], **TINY)
    run(wf)
    rows = {r["set"]: r for r in read_csv(trained / "eval" / "metrics_per_set.csv")}
    assert set(rows) == {"SynthA", "SynthB", "all images"}
    assert int(rows["SynthA"]["images"]) == 8 and int(rows["all images"]["images"]) == 16
    for row in rows.values():
        for column in ("dice", "iou", "precision", "recall", "s_measure", "weighted_f", "mean_e", "mae"):
            assert 0.0 <= float(row[column]) <= 1.0, (column, row[column])
    per_image = read_csv(trained / "eval" / "metrics_per_image.csv")
    assert len(per_image) == 16
    # the set row is the mean of its images (protocol (b): mean of per-image Dice)
    dice_a = [float(r["dice"]) for r in per_image if r["set"] == "SynthA"]
    assert float(rows["SynthA"]["dice"]) == pytest.approx(sum(dice_a) / 8)
    assert len(list((trained / "eval" / "overlays").glob("*.png"))) == 8  # 4 per set


def test_inference_writes_masks_at_native_size(trained):
    run(workflow(trained, "inference", ["inference.json"], image_size=64, backbone="pvt_v2_b0", num_workers=0))
    images = sorted((trained / "data" / "demo" / "TestDataset").glob("*/images/*.jpg"))
    assert len(images) == 16
    for image in images:
        mask = trained / "eval" / "predictions" / image.parent.parent.name / "images" / f"{image.stem}.png"
        with Image.open(image) as src, Image.open(mask) as out:
            assert out.size == src.size and out.mode == "L"
            assert set(np.unique(np.asarray(out))) <= {0, 255}
    assert not (trained / "eval" / "predictions.partial").exists()


def test_inference_without_weights_builds(tmp_path):
    """What verify/lint builds: load_pretrain=False needs no models/model.pt."""
    wf = workflow(tmp_path, "inference", ["inference.json"], load_pretrain=False, image_size=64,
                  backbone="pvt_v2_b0", num_workers=0)
    assert wf.parser.get_parsed_content("network_def").__class__.__name__ == "PolypPVT"


def test_resume_continues_from_the_last_epoch(trained, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(trained, root)
    wf = workflow(root, "train", ["train.json"], epochs=3, resume=True, **TINY)
    trainer = wf.parser.get_parsed_content("train#trainer")
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: started.append(engine.state.epoch))
    run(wf)
    assert started == [3]  # epochs 1-2 were restored, only epoch 3 ran
    assert latest_training_state(root / "models").name == "training_state_epoch=3.pt"
    assert not (root / "models" / "training_state_epoch=2.pt").exists()  # n_saved=1 also prunes after resuming


@pytest.mark.parametrize("network", ["unet", "unetpp"])
def test_baselines_train_as_overrides(tmp_path, network):
    wf = workflow(tmp_path, "train", ["train.json", f"networks/{network}.json"], epochs=1,
                  unet_features=[4, 4, 8, 8, 16, 4], **TINY)
    assert wf.parser.get_parsed_content("normalize_imagenet") is True  # the baselines use ImageNet statistics
    run(wf)
    assert (tmp_path / "models" / "model.pt").is_file()


def test_training_is_deterministic(tmp_path):
    """Two runs with the same seed give the same weights (CPU, set_determinism in initialize)."""
    states = []
    for name in ("a", "b"):
        run(workflow(tmp_path / name, "train", ["train.json"], epochs=1, **TINY))
        states.append(torch.load(tmp_path / name / "models" / "model.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ----------------------------------------------------------------------------------------------- bad input
def _error_text(err: BaseException) -> str:
    """The message of an error and of everything it was raised from (MONAI wraps config errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def _train_should_fail(root: Path, dataset: Path) -> str:
    with pytest.raises(Exception) as info:
        wf = workflow(root, "train", ["train.json"], dataset_dir=str(dataset), epochs=1, **TINY)
        run(wf)
    assert not (root / "models" / "model.pt").exists(), "a failed run must not leave a model.pt"
    return _error_text(info.value)


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return make_demo_polyp_dataset(tmp_path / "data", n_train=6, n_test=(2, 2), size=(64, 96))


def test_dataset_without_images(tmp_path):
    (tmp_path / "empty" / "TrainDataset" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "TrainDataset" / "masks").mkdir(parents=True)
    assert "images" in _train_should_fail(tmp_path / "run", tmp_path / "empty")


def test_image_without_mask(tmp_path, small_dataset):
    mask = small_dataset / "TrainDataset" / "masks" / "0003.png"
    mask.unlink()
    assert "0003" in _train_should_fail(tmp_path / "run", small_dataset)


def test_mask_size_differs_from_image(tmp_path, small_dataset):
    mask = small_dataset / "TrainDataset" / "masks" / "0002.png"
    Image.new("L", (10, 10)).save(mask)
    assert str(mask) in _train_should_fail(tmp_path / "run", small_dataset)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grey_or_four_channel_image(tmp_path, small_dataset, mode):
    image = small_dataset / "TrainDataset" / "images" / "0001.jpg"
    converted = image.with_suffix(".png")
    Image.open(image).convert(mode).save(converted)
    image.unlink()
    text = _train_should_fail(tmp_path / "run", small_dataset)
    assert str(converted) in text and "RGB" in text


def test_corrupt_image(tmp_path, small_dataset):
    image = small_dataset / "TrainDataset" / "images" / "0004.jpg"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # truncated JPEG: header still valid
    assert str(image) in _train_should_fail(tmp_path / "run", small_dataset)


def test_override_of_a_missing_id(tmp_path):
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", str(CONFIGS / "train.json"), "--epoch", "3"]
    with pytest.raises(KeyError, match="--epoch names no id.*did you mean epochs"):
        check_cli_overrides(argv)
    check_cli_overrides([*argv[:-2], "--epochs", "3", "--network_def#dropout", "0.1"])  # real ids pass
    with pytest.raises(KeyError):  # a nested id under a missing parent: MONAI's own error
        ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
                       logging_file=False, workflow_type="train", **{"train#trainerr#max_epochs": 1})


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_polyps_loss_falls_and_every_test_set_scores(polyp_data, tmp_path):
    """Train a few iterations on Kvasir + CVC-ClinicDB; evaluate on EndoScene and Kvasir-Sessile."""
    sets = {"dataset_dir": str(polyp_data), "train_sets": ["Kvasir", "CVC-ClinicDB"], "val_fraction": 0.1}
    wf = workflow(tmp_path, "train", ["train.json"], epochs=3, epoch_length=4, scales=[1.0],
                  **{**TINY, "image_size": 96}, **sets)
    trainer = wf.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))
    run(wf)
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses  # the loss falls over 12 steps

    run(workflow(tmp_path, "train", ["train.json", "evaluate.json"], **{**TINY, "image_size": 96}, **sets))
    rows = {r["set"]: r for r in read_csv(tmp_path / "eval" / "metrics_per_set.csv")}
    assert {"EndoScene", "Kvasir-Sessile"} <= set(rows)
    assert int(rows["EndoScene"]["images"]) == 24 and int(rows["Kvasir-Sessile"]["images"]) == 6
    for name in ("EndoScene", "Kvasir-Sessile"):
        assert all(math.isfinite(float(rows[name][c])) for c in ("dice", "iou", "precision", "recall", "mae"))

    out = tmp_path / "pred"
    run(workflow(tmp_path, "inference", ["inference.json"], dataset_dir=str(polyp_data / "Kvasir-Sessile"),
                 output_dir=str(out), image_size=96, backbone="pvt_v2_b0", num_workers=0))
    for image in sorted((polyp_data / "Kvasir-Sessile" / "images").iterdir()):
        with Image.open(image) as src, Image.open(out / "images" / f"{image.stem}.png") as mask:
            assert mask.size == src.size  # masks are written at native size


def test_a_fresh_run_replaces_the_states_of_an_older_run(trained, tmp_path):
    """Without --resume, training in a folder holding an older run's states starts at epoch 1 and, once it has
    saved its own state, removes the older ones (so a later resume cannot pick a stale file)."""
    root = tmp_path / "again"
    shutil.copytree(trained, root)
    (root / "models" / "training_state_epoch=7.pt").write_bytes(b"an older run's state")
    run(workflow(root, "train", ["train.json"], epochs=2, **TINY))
    assert [p.name for p in (root / "models").glob("training_state_*")] == ["training_state_epoch=2.pt"]


def _oracle_round0(tmp_path: Path) -> tuple[Path, Path]:
    """Demo exams and a round-0 pseudo-label folder made from their ground truth (oracle map, no refiner):
    the rounds start from perfect masks, so the test checks the plumbing, not the CAM stage."""
    from common.data.demo_exams import make_demo_exam_dataset
    from common.data.wsss_images import exam_mask_paths
    from common.engines.pseudo_masks import generate_pseudo_masks
    from common.networks.box_refiners import ThresholdRefiner

    exams = make_demo_exam_dataset(tmp_path / "exams", n_exams=4, frames=(4, 4), size=(96, 128))
    positives = [r["image"] for r in read_csv(exams / "instance_labels.csv") if r["label"] == "1"]
    images = [str(exams / p) for p in positives]
    gt = exam_mask_paths(images)
    assert len(gt) == len(images) > 0
    oracle = {image: np.asarray(Image.open(gt[image]).convert("L"), dtype=np.float32) / 255.0 for image in images}
    calls = iter(images)
    generate_pseudo_masks(images, lambda image: oracle[next(calls)], ThresholdRefiner(), tmp_path / "round0",
                          threshold=0.5, gt_paths=gt, overlay_count=0, progress=False)
    return exams, tmp_path / "round0"


def test_rounds_train_predict_and_relabel(tmp_path):
    """configs/rounds.json: one round trains a fresh Polyp-PVT on the round-0 masks (train.json with
    --pseudo_labels), predicts every candidate frame, boxes it and writes round 1's masks and Dice vs ground truth."""
    _, round0 = _oracle_round0(tmp_path)
    accepted = read_csv(round0 / "filtered.csv")
    root = tmp_path / "bundle"
    wf = ConfigWorkflow(config_file=str(CONFIGS / "rounds.json"), meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type=None, bundle_root=str(root), pseudo_labels=str(round0),
                        rounds=1, image_size=64, overlay_count=2, train_config=str(CONFIGS / "train.json"),
                        train_overrides={**TINY, "epochs": 1})
    wf.initialize()
    rows = run(wf)[0]
    assert [r["round"] for r in rows] == [0, 1]
    # round 0 is the oracle: every accepted mask equals the ground truth -> smoothed Dice (2n + 1) / (2n + 1) = 1
    assert float(rows[0]["pseudo_mask_dice"]) == 1.0 and rows[0]["accepted"] == len(accepted)
    table = read_csv(root / "eval" / "rounds" / "rounds.csv")
    assert [t["round"] for t in table] == ["0", "1"] and table[1]["images"] == str(rows[0]["images"])
    round1 = root / "eval" / "rounds" / "round_1"
    assert (round1 / "models" / "model.pt").is_file()
    for row in read_csv(round1 / "pseudo_masks" / "filtered.csv"):  # the label names of round 0 are kept
        assert (round1 / "pseudo_masks" / "labels" / row["filtered_label_name"]).is_file()
    assert (root / "eval" / "rounds" / "rounds.png").is_file()


def test_training_on_pseudo_labels_reads_the_filtered_list(tmp_path):
    _, round0 = _oracle_round0(tmp_path)
    wf = workflow(tmp_path / "bundle", "train", ["train.json"], epochs=1, pseudo_labels=str(round0), **TINY)
    pairs = wf.parser.get_parsed_content("train#dataset#data")
    assert [p["image"] for p in pairs] == [r["filtered_img_path"] for r in read_csv(round0 / "filtered.csv")]
    (round0 / "labels" / "00000.png").unlink()
    with pytest.raises(Exception) as err:
        workflow(tmp_path / "bundle2", "train", ["train.json"], epochs=1, pseudo_labels=str(round0), **TINY)
    assert "00000.png" in error_text(err.value) and "filtered.csv" in error_text(err.value)


def test_rounds_without_pseudo_labels_says_what_to_pass(tmp_path):
    wf = ConfigWorkflow(config_file=str(CONFIGS / "rounds.json"), meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type=None, bundle_root=str(tmp_path))
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert "--pseudo_labels" in error_text(err.value)


def test_rounds_stop_when_a_round_accepts_nothing(tmp_path, monkeypatch):
    """A round whose predictions all fail the box filter ends the loop (with its row written) instead of failing
    the next round's training on an empty list; a round 0 without any mask is refused up front."""
    from common.engines import pseudo_label_rounds
    from common.networks.box_refiners import make_box_refiner

    _, round0 = _oracle_round0(tmp_path)
    blank = lambda network, *args: (lambda image: np.zeros(image.shape[:2], np.float32))  # noqa: E731
    monkeypatch.setattr(pseudo_label_rounds, "polyp_pvt_prob_fn", blank)  # every map empty: "no foreground"
    trained = []
    rows = pseudo_label_rounds.run_rounds(round0, 3, tmp_path / "rounds",
                                          lambda overrides: trained.append(overrides) or torch.nn.Identity(),
                                          make_box_refiner("threshold"))
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["accepted"] == 0 and len(trained) == 1
    empty = tmp_path / "empty"
    shutil.copytree(tmp_path / "rounds" / "round_1" / "pseudo_masks", empty)
    with pytest.raises(ValueError, match="no accepted pseudo mask"):
        pseudo_label_rounds.run_rounds(empty, 1, tmp_path / "again", lambda overrides: None,
                                       make_box_refiner("threshold"))
