"""The endoked_polyp_wsss_segmentation bundle run as users run it: train, pseudo masks, evaluate, infer, MIL scores,
bad input.

Workflows run in-process through ``ConfigWorkflow`` (as the model zoo's CI does), shrunk through top-level ids only;
``bundle_root`` points at a temporary folder so that nothing is written into the repository. A tiny ViT trained for
six steps gives CAMs without any localisation: the real CAM -> box path rejects every frame, so the tests that need
accepted frames replace the CAM function (the ``cam_fn`` id) by an oracle that returns each frame's ground-truth
mask; they check the plumbing (files, sizes, lists), not the CAM quality.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from common.data.wsss_images import exam_mask_path
from common.engines.bag_distillation import write_bag_scores
from common.engines.pseudo_masks import read_filtered_list
from common.engines.toco_trainer import PSEUDO_LABEL_CAM_SCALES, TRAIN_CAM_SCALES
from common.handlers.training_state import latest_training_state
from common.networks.box_refiners import GrabCutBoxRefiner, ThresholdRefiner

from conftest import REPO_ROOT, bundle_workflow, error_text, read_csv, run_workflow

BUNDLE = REPO_ROOT / "bundles" / "endoked_polyp_wsss_segmentation"
CONFIGS = BUNDLE / "configs"
# every size a test shrinks is a top-level id: a 2-block, 32-wide ViT on 64 px crops trains 6 steps in seconds
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "crop_size": 64, "resize": 80, "iterations": 6,
        "val_interval": 3, "warmup_iters": 1, "seg_warmup_iters": 2, "aux_to_main_iter": 4, "batch_size": 2,
        "num_workers": 0, "progress_bar": False}
PSEUDO = ["train.json", "pseudolabel.json"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

workflow = partial(bundle_workflow, CONFIGS)  # (bundle_root, kind, configs, **override) -> initialised workflow
run = run_workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A bundle root holding a model trained for 6 iterations (2 epochs of 3) on the generated demo exams."""
    root = tmp_path_factory.mktemp("wsss_bundle")
    wf = workflow(root, "train", ["train.json"], **TINY)
    assert wf.parser.get_parsed_content("on_demo") is True
    run(wf)
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 6
    return root


def demo_dir(root: Path) -> Path:
    return root / "data" / "demo_exams"


def oracle_cam(root: Path):
    """``image -> ground-truth mask in {0, 1}`` for every demo frame, keyed by the decoded pixels (the pseudo-mask
    writer decodes each frame the same way, with PIL in RGB)."""
    masks = {}
    for frame in sorted((demo_dir(root) / "exams").glob("*/*.jpg")):
        pixels = np.array(Image.open(frame).convert("RGB"))
        masks[pixels.tobytes()] = np.asarray(Image.open(exam_mask_path(frame)).convert("L"), np.float32) / 255.0
    return lambda image: masks[np.ascontiguousarray(image).tobytes()]


def test_train_writes_model_state_and_events(trained):
    weights = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert weights["classifier.weight"].shape == (1, 32, 1, 1)  # a plain state dict of the 32-wide ViT
    assert "decoder.c0.weight" in weights and "proj_head_t.mlp.0.weight" in weights
    assert latest_training_state(trained / "models").name == "training_state_epoch=2.pt"  # 6 iterations / 3
    assert (demo_dir(trained) / "exams" / "exam_000").is_dir()
    assert list((trained / "eval" / "runs").glob("events.out.tfevents.*")), "TensorBoard events expected"


def test_tiny_crop_fits_the_patch_grid():
    # the configs' pseudo-label / evaluation scales are the library's six (specs/endoked.md §3.6)
    for config in ("pseudolabel.json", "evaluate.json"):
        assert tuple(json.loads((CONFIGS / config).read_text())["pseudo_cam_scales"]) == PSEUDO_LABEL_CAM_SCALES
    # every CAM scale of training and pseudo-labelling at 64 px is a whole number of 16-px patches:
    # 64 x 0.5 = 32, x 0.75 = 48, x 1 = 64, x 1.25 = 80, x 1.5 = 96, x 1.75 = 112
    sizes = sorted({int(s * TINY["crop_size"]) for s in (*TRAIN_CAM_SCALES, *PSEUDO_LABEL_CAM_SCALES)})
    assert sizes == [32, 48, 64, 80, 96, 112]
    assert all(size % 16 == 0 for size in sizes)
    # local crops scale with the crop as ToCo's 112 of 448: 64 // 4 = 16 px (one patch), margin 16 // 2 = 8 px
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["crop_size"] = TINY["crop_size"]
    assert parser.get_parsed_content("train#trainer#crop_size") == 16
    assert parser.get_parsed_content("train#trainer#crop_margin") == 8


def test_pseudolabel_with_the_trained_cams(trained, tmp_path):
    """The default run: the trained network's 6-scale CAMs > 0.65 -> box filter -> GrabCut (no SAM checkpoint)."""
    out = tmp_path / "pseudo"
    wf = workflow(trained, "train", PSEUDO, pseudo_dir=str(out), **TINY)
    assert wf.parser.get_parsed_content("refiner") == "grabcut"
    assert isinstance(wf.parser.get_parsed_content("box_refiner"), GrabCutBoxRefiner)
    result = run(wf)[-1]
    positives = wf.parser.get_parsed_content("datalists")["pseudo"]
    assert result.n_images == len(positives) > 0
    filtered, rejected = read_csv(out / "filtered.csv"), read_csv(out / "rejected.csv")
    assert len(filtered) + len(rejected) == len(positives) == result.n_accepted + result.n_rejected
    assert len(read_csv(out / "pseudo_mask_dice.csv")) == len(positives)  # every demo frame has a mask
    assert len(list((out / "overlays").glob("*.png"))) == min(8, len(positives))


def test_pseudolabel_writes_masks_and_lists(trained, tmp_path):
    """GrabCut on boxes from oracle maps: 0/255 masks at native size, a filtered list the SEG bundle reads back."""
    out = tmp_path / "pseudo"
    wf = workflow(trained, "train", PSEUDO, pseudo_dir=str(out), cam_fn=oracle_cam(trained), overlay_count=3, **TINY)
    result = run(wf)[-1]
    assert result.n_accepted > 0
    pairs = read_filtered_list(out / "filtered.csv", out / "labels")
    assert len(pairs) == result.n_accepted == len(list((out / "labels").glob("*.png")))
    for pair in pairs:
        with Image.open(pair["image"]) as image, Image.open(pair["label"]) as label:
            assert label.size == image.size and label.mode == "L"
            assert set(np.unique(np.asarray(label))) <= {0, 255}
    dice = [float(r["dice"]) for r in read_csv(out / "pseudo_mask_dice.csv") if r["dice"]]
    assert len(dice) == result.n_accepted and all(0.0 < d <= 1.0 for d in dice)
    assert result.mean_dice == pytest.approx(np.mean(dice), abs=1e-6)
    assert len(list((out / "overlays").glob("*.png"))) == 3


def test_pseudolabel_threshold_refiner_keeps_the_map(trained, tmp_path):
    """--refiner threshold writes the thresholded map itself: with the oracle map (mask in {0, 1} > 0.65 = the
    mask) every accepted pseudo mask is the ground truth, Dice (2|G| + 1) / (|G| + |G| + 1) = 1."""
    out = tmp_path / "pseudo"
    wf = workflow(trained, "train", PSEUDO, pseudo_dir=str(out), refiner="threshold", cam_fn=oracle_cam(trained),
                  **TINY)
    assert isinstance(wf.parser.get_parsed_content("box_refiner"), ThresholdRefiner)
    result = run(wf)[-1]
    assert result.n_accepted > 0 and result.mean_dice == 1.0
    for pair in read_filtered_list(out / "filtered.csv", out / "labels"):
        with Image.open(exam_mask_path(pair["image"])) as gt, Image.open(pair["label"]) as label:
            assert np.array_equal(np.asarray(label), (np.asarray(gt.convert("L")) >= 128).astype(np.uint8) * 255)


def test_pseudolabel_sam_without_checkpoint(trained, tmp_path):
    wf = workflow(trained, "train", PSEUDO, pseudo_dir=str(tmp_path / "pseudo"), refiner="sam", **TINY)
    with pytest.raises(Exception) as err:
        run(wf)
    assert "sam_checkpoint" in error_text(err.value)
    assert not (tmp_path / "pseudo").exists()


def test_pseudolabel_without_model_names_the_file(tmp_path):
    wf = workflow(tmp_path, "train", PSEUDO, **TINY)
    with pytest.raises(Exception) as err:
        run(wf)
    assert str(tmp_path / "models" / "model.pt") in error_text(err.value)
    assert not (tmp_path / "eval" / "pseudo_masks").exists()


def test_evaluate_writes_decoder_and_cam_dice(trained):
    wf = workflow(trained, "train", ["train.json", "evaluate.json"], **TINY)
    run(wf)
    val = wf.parser.get_parsed_content("datalists")["val"]
    rows = read_csv(trained / "eval" / "metrics.csv")
    assert [r["image"] for r in rows] == [item["image"] for item in val]
    for row, item in zip(rows, val):
        assert row["mask"] == item["label"] and int(row["polyp"]) == int(item["class"])
        # smoothed Dice (2|P∩G| + 1) / (|P| + |G| + 1) lies in (0, 1]
        assert 0.0 < float(row["decoder_dice"]) <= 1.0 and 0.0 < float(row["cam_dice"]) <= 1.0
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert metrics["cam_dice"] == pytest.approx(np.mean([float(r["cam_dice"]) for r in rows]), abs=1e-5)
    assert metrics["decoder_dice"] == pytest.approx(np.mean([float(r["decoder_dice"]) for r in rows]), abs=1e-5)
    assert {"val_cam_dice", "val_decoder_dice"} <= set(metrics)  # the validation evaluator's own metrics still run


def test_validation_masks_are_binary_with_the_polyp(trained):
    """The checkpoint-selecting Dice compares against 0/1 masks: a polyp frame's mask keeps its foreground after
    loading (scaled to [0, 1]), resizing and thresholding at 0.5 (a threshold on the 0-255 scale would erase it)."""
    wf = workflow(trained, "train", ["train.json"], **TINY)
    dataset = wf.parser.get_parsed_content("validate#dataset")
    val = wf.parser.get_parsed_content("datalists")["val"]
    index = next(i for i, item in enumerate(val) if item["class"] == 1.0)
    label = dataset[index]["label"]
    assert set(label.unique().tolist()) == {0.0, 1.0} and label.shape == (1, TINY["crop_size"], TINY["crop_size"])


def test_inference_writes_masks_at_native_size(trained):
    run(workflow(trained, "inference", ["inference.json"], embed_dim=32, depth=2, num_heads=2, image_size=64,
                 num_workers=0))
    frames = sorted((demo_dir(trained) / "exams").glob("*/*.jpg"))
    assert len(frames) == len(read_csv(demo_dir(trained) / "instance_labels.csv")) > 0
    for frame in frames:
        mask = trained / "eval" / "predictions" / "exams" / frame.parent.name / f"{frame.stem}.png"
        with Image.open(frame) as src, Image.open(mask) as out:
            assert out.size == src.size and out.mode == "L"
            assert set(np.unique(np.asarray(out))) <= {0, 255}
    assert not (trained / "eval" / "predictions.partial").exists()


def test_inference_without_weights_builds(tmp_path):
    """What verify/lint build: load_pretrain False needs no models/model.pt; the network is the seg-only ToCo ViT."""
    wf = workflow(tmp_path, "inference", ["inference.json"], load_pretrain=False, embed_dim=32, depth=2,
                  num_heads=2, num_workers=0)
    net = wf.parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 2, 4, 4)  # seg only: 2 classes at 64 / 16 = 4 tokens per side


# ----------------------------------------------------------------------------------------------- MIL scores
def _score_folder(root: Path, folder: Path) -> tuple[list[str], list[str]]:
    """Exam A (positive bag) = the first 3 frames of exam_000, exam B (negative bag) = the 4 frames of exam_001."""
    exams = demo_dir(root) / "exams"
    a = [str(p) for p in sorted((exams / "exam_000").glob("*.jpg"))[:3]]
    b = [str(p) for p in sorted((exams / "exam_001").glob("*.jpg"))]
    assert len(a) == 3 and len(b) == 4
    write_bag_scores("A", a, [0.9, 0.5, 0.8], 1, folder)
    write_bag_scores("B", b, [0.3, 0.1, 0.2, 0.4], 0, folder)
    return a, b


def test_training_on_mil_scores(trained, tmp_path):
    a, b = _score_folder(trained, tmp_path / "scores")
    wf = workflow(tmp_path / "run", "train", ["train.json"], dataset_dir=str(demo_dir(trained)),
                  mil_scores=str(tmp_path / "scores"), negative_fraction=0.5, **{**TINY, "iterations": 3})
    # positives: bag A's frames with p >= 0.8 -> a0 (0.9) and a2 (0.8, inclusive); negatives: floor(0.5 x 4) = 2
    # lowest scores of bag B -> b1 (0.1), b2 (0.2), listed in row order after the positives
    expected = [{"image": a[0], "label": 1.0}, {"image": a[2], "label": 1.0},
                {"image": b[1], "label": 0.0}, {"image": b[2], "label": 0.0}]
    assert wf.parser.get_parsed_content("train#dataset#data") == expected
    assert wf.parser.get_parsed_content("datalists")["pseudo"] == [a[0], a[2]]
    run(wf)
    assert (tmp_path / "run" / "models" / "model.pt").is_file()


def test_mil_scores_folder_without_csv(trained, tmp_path):
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "notes.txt").write_text("not a score table")
    with pytest.raises(Exception) as err:
        run(workflow(tmp_path / "run", "train", ["train.json"], dataset_dir=str(demo_dir(trained)),
                     mil_scores=str(tmp_path / "scores"), **TINY))
    text = error_text(err.value)
    assert str(tmp_path / "scores") in text and "_gt1.csv" in text
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def test_mil_scores_naming_a_missing_frame(trained, tmp_path):
    _score_folder(trained, tmp_path / "scores")
    missing = str(demo_dir(trained) / "exams" / "exam_000" / "frame_99.jpg")
    write_bag_scores("C", [missing], [0.95], 1, tmp_path / "scores")
    with pytest.raises(Exception) as err:
        run(workflow(tmp_path / "run", "train", ["train.json"], dataset_dir=str(demo_dir(trained)),
                     mil_scores=str(tmp_path / "scores"), **TINY))
    text = error_text(err.value)
    assert missing in text and "C_gt1.csv" in text


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_polyp_exams_train_pseudolabel_evaluate_infer(polyp_data, tmp_path):
    """Exams built from the real polyp frames (full frames positive, polyp-free crops negative): train, CAM pseudo
    masks, evaluation; then inference on a plain folder of native-size frames (Kvasir-Sessile)."""
    from common.data.exam_bags import make_exams_from_polyp_sets

    exams = make_exams_from_polyp_sets(polyp_data, tmp_path / "exams", size=(128, 160))
    sets = {"dataset_dir": str(exams)}
    run(workflow(tmp_path, "train", ["train.json"], **TINY, **sets))
    assert (tmp_path / "models" / "model.pt").is_file()

    wf = workflow(tmp_path, "train", PSEUDO, refiner="threshold", **TINY, **sets)
    result = run(wf)[-1]
    positives = wf.parser.get_parsed_content("datalists")["pseudo"]
    assert result.n_images == len(positives) > 0 and result.n_dice == result.n_accepted
    assert len(read_csv(tmp_path / "eval" / "pseudo_masks" / "pseudo_mask_dice.csv")) == len(positives)

    wf = workflow(tmp_path, "train", ["train.json", "evaluate.json"], **TINY, **sets)
    run(wf)
    rows = read_csv(tmp_path / "eval" / "metrics.csv")
    assert len(rows) == len(wf.parser.get_parsed_content("datalists")["val"]) > 0
    assert all(0.0 < float(r["cam_dice"]) <= 1.0 and 0.0 < float(r["decoder_dice"]) <= 1.0 for r in rows)

    out = tmp_path / "pred"
    run(workflow(tmp_path, "inference", ["inference.json"], dataset_dir=str(polyp_data / "Kvasir-Sessile"),
                 output_dir=str(out), embed_dim=32, depth=2, num_heads=2, image_size=64, num_workers=0))
    for image in sorted((polyp_data / "Kvasir-Sessile" / "images").iterdir()):
        with Image.open(image) as src, Image.open(out / "images" / f"{image.stem}.png") as mask:
            assert mask.size == src.size  # masks are written at native size
