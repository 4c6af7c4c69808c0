"""The sparsam_dino_classification bundle run as users run it: DINO pre-training, few-label evaluation, class
probabilities, the supervised baseline, resume, and bad input (Nielsen et al., Bioengineering 10(8):895, 2023;
specs/sparsam.md).

Workflows run in-process through ``ConfigWorkflow`` from a copy of the bundle in a temporary folder
(``bundle_root`` = the copy), so that ``models/``, ``eval/`` and ``data/`` are written there and never into the
repository. Sizes are shrunk through top-level ids only: a 2-block XCiT of width 48 at 32 px, 16 px local crops and
a 128-prototype head (spec §10) train in seconds on a CPU.

Numbers used below (the embedded demo, :mod:`common.data.demo_classification`): 4 classes x 16 labelled images +
8 unlabelled; the stratified split puts ``floor(16 * 0.3 + 0.5) = 5`` images per class in test, so train has
4 x 11 = 44 labelled images, self-supervision sees 44 + 8 = 52 images, i.e. ``52 // 8 = 6`` iterations per epoch
at batch size 8 (``drop_last``).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from common.handlers.training_state import latest_training_state
from common.metrics.label_budget_sweep import load_classifier
from common.networks.timm_backbone import create_backbone
from common.transforms.multicrop import EvalTransformd
from common.utils.config import check_cli_overrides

from conftest import REPO_ROOT, bundle_workflow, read_csv, run_workflow, error_text, require_data

BUNDLE = REPO_ROOT / "bundles" / "sparsam_dino_classification"
BACKBONE = "xcit_small_12_p8_224"
BACKBONE_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 4, "cls_attn_layers": 1}
TINY = {"backbone_kwargs": BACKBONE_KWARGS, "image_resolution": 32, "num_workers": 0}
TRAIN_TINY = {**TINY, "local_size": 16, "n_local": 2, "head_out_dim": 128, "head_hidden_dim": 64,
              "head_bottleneck_dim": 16, "batch_size": 8, "progress_bar": False}
EVAL_TINY = {**TINY, "n_draws": 2, "budgets": [1, 5]}
DEMO_CLASSES = ["round", "bilobed", "multilobed", "kidney"]  # demo class_id 1..4, i.e. class index order
ITERATIONS_PER_EPOCH = 6  # 52 SSL images // batch 8 (module docstring)
CLASSIFIERS = ("svm", "knn", "logreg")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def workflow(bundle_root: Path, kind: str | None, configs: list[str], **override) -> ConfigWorkflow:
    """:func:`conftest.bundle_workflow` of this bundle's configs (bundle_root / "configs")."""
    return bundle_workflow(bundle_root / "configs", bundle_root, kind, configs, **override)


run = run_workflow


# ----------------------------------------------------------------------------------------------- helpers
def bundle_copy(dest: Path) -> Path:
    """The bundle's configs copied to ``dest`` (without data or outputs of earlier runs: the demo is generated)."""
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("data", "models", "eval", "docs"))
    return dest


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def tiny_backbone() -> torch.nn.Module:
    return create_backbone(BACKBONE, kwargs=BACKBONE_KWARGS)


def assert_budget_rows(rows: list[dict[str, str]], budgets: list[int], n_draws: int, n_train: dict[int, int],
                       n_test_per_class: int) -> None:
    """One row per classifier x budget x draw, with the subset size and a balanced accuracy on the test split."""
    assert len(rows) == len(CLASSIFIERS) * len(budgets) * n_draws
    keys = {(r["classifier"], int(r["n_per_class"]), int(r["draw"])) for r in rows}
    assert keys == {(c, b, d) for c in CLASSIFIERS for b in budgets for d in range(n_draws)}
    for row in rows:
        assert int(row["n_train"]) == n_train[int(row["n_per_class"])], row
        assert int(row["seed"]) == int(row["draw"])  # draw d uses seed 0 + d
        score = float(row["balanced_accuracy"])
        # balanced accuracy = mean over classes of recall = k_c / n_test_per_class, so a multiple of
        # 1 / (n_classes * n_test_per_class) in [0, 1] (4 classes: 1/20 on the demo, 1/12 on the real subset)
        steps = score * 4 * n_test_per_class
        assert 0.0 <= score <= 1.0 and steps == pytest.approx(round(steps), abs=1e-9), row


def assert_predictions(csv_path: Path, ids: list[str], class_names: list[str]) -> list[dict[str, str]]:
    """One row per image id, probabilities summing to 1 and ``predicted`` = name of the largest one."""
    rows = read_csv(csv_path)
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == ["id", *class_names, "predicted"]
    assert [r["id"] for r in rows] == ids
    for row in rows:
        probs = np.array([float(row[c]) for c in class_names])
        # each value is written with 6 decimals (rounding error <= 5e-7 each, <= 2e-6 for 4 classes)
        assert probs.min() >= 0.0 and probs.sum() == pytest.approx(1.0, abs=1e-5), row
        assert row["predicted"] == class_names[int(probs.argmax())], row
    return rows


# ----------------------------------------------------------------------------------------------- demo runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> SimpleNamespace:
    """A bundle copy trained for 2 epochs on the embedded demo (no dataset argument), with the student's
    parameters recorded before training and after every iteration (for the EMA checks)."""
    root = bundle_copy(tmp_path_factory.mktemp("sparsam") / "bundle")
    wf = workflow(root, "train", ["train.json"], epochs=2, **TRAIN_TINY)
    assert wf.parser.get_parsed_content("on_demo") is True
    assert wf.parser.get_parsed_content("teacher_momentum") == 0.9995
    student = wf.parser.get_parsed_content("network")
    teacher = wf.parser.get_parsed_content("teacher")
    trainer = wf.parser.get_parsed_content("train#trainer")
    initial = params_of(student)
    steps: list[dict[str, torch.Tensor]] = []
    losses: list[float] = []

    def record(engine) -> None:
        steps.append(params_of(student))
        losses.append(float(engine.state.output["loss"]))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    run(wf)
    return SimpleNamespace(root=root, initial=initial, steps=steps, losses=losses, student=params_of(student),
                           teacher=params_of(teacher), epoch=trainer.state.epoch, iteration=trainer.state.iteration)


@pytest.fixture(scope="module")
def evaluated(trained) -> SimpleNamespace:
    """The trained bundle after evaluate.json (teacher features, budgets [1, 5], 2 draws, 3 classifiers)."""
    wf = workflow(trained.root, "infer", ["evaluate.json"], **EVAL_TINY)
    run(wf)
    assert wf.parser.get_parsed_content("class_names") == DEMO_CLASSES
    return trained


def test_train_writes_teacher_weights_and_training_state(trained):
    models = trained.root / "models"
    assert trained.epoch == 2 and trained.iteration == 2 * ITERATIONS_PER_EPOCH  # 2 epochs x 6 iterations
    assert len(trained.losses) == 12 and all(math.isfinite(x) and x > 0 for x in trained.losses)  # CE > 0

    weights = torch.load(models / "model.pt", weights_only=True)  # a plain state dict of the teacher backbone
    assert set(weights) == set(tiny_backbone().state_dict())
    tiny_backbone().load_state_dict(weights)  # strict: loads into the timm tiny XCiT

    state_file = latest_training_state(models)
    assert state_file is not None and state_file.name == "training_state_epoch=2.pt"
    state = torch.load(state_file, weights_only=True)
    assert set(state) == {"student", "teacher", "optimizer", "loss", "trainer"}
    assert state["trainer"]["iteration"] == 12 and state["trainer"]["epoch_length"] == ITERATIONS_PER_EPOCH
    center = state["loss"]["center"]
    assert center.shape == (1, 128) and center.abs().sum() > 0  # zeros at start, EMA of teacher outputs after
    for key, tensor in weights.items():  # model.pt is the teacher's backbone, not the student's
        assert torch.equal(tensor, state["teacher"][f"backbone.{key}"]), key
    assert any(not torch.equal(weights[k], state["student"][f"backbone.{k}"]) for k in weights)
    assert list((trained.root / "eval" / "runs").glob("events.out.tfevents.*")), "TensorBoard events expected"


def test_teacher_is_an_ema_of_the_student(trained):
    """theta_t <- 0.9995 theta_t + 0.0005 theta_s after every step, from theta_t = theta_s at the start."""
    assert len(trained.steps) == 12
    expected = {name: value.double() for name, value in trained.initial.items()}  # deepcopy of the student
    for step in trained.steps:
        for name in expected:
            expected[name] = 0.9995 * expected[name] + 0.0005 * step[name].double()
    for name, value in trained.teacher.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-7, msg=name)

    backbone = [n for n in trained.teacher if n.startswith("backbone.")]
    assert any(not torch.equal(trained.teacher[n], trained.student[n]) for n in backbone)
    assert any(not torch.equal(trained.teacher[n], trained.initial[n]) for n in backbone)
    # theta_t - theta_0 = sum_k 0.0005 * 0.9995^(12-k) (theta_s(k) - theta_0): weights summing to
    # 1 - 0.9995^12 = 1 - exp(12 ln 0.9995) = 1 - exp(-0.0060015) = 0.005983 < 0.006, so over the whole backbone
    # the teacher has moved at most 0.006 x the student's largest move (float32 rounding of the updates aside)
    def distance(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(params[n] - trained.initial[n]).double().flatten() for n in backbone]).norm()

    assert distance(trained.teacher) <= 0.006 * max(distance(s) for s in trained.steps)
    # the last layer was frozen for epoch 1 (iterations 0-5) only, so after 2 epochs it has been trained
    last = "projection_head.last_layer.parametrizations.weight.original1"
    assert torch.equal(trained.steps[5][last], trained.initial[last])
    assert not torch.equal(trained.student[last], trained.initial[last])


def test_momentum_one_keeps_the_initial_teacher_and_last_layer_frozen_in_epoch_one(tmp_path):
    root = bundle_copy(tmp_path / "bundle")
    wf = workflow(root, "train", ["train.json"], epochs=1, teacher_momentum=1.0, freeze_last_layer_epochs=1,
                  **TRAIN_TINY)
    student = wf.parser.get_parsed_content("network")
    teacher = wf.parser.get_parsed_content("teacher")
    initial = params_of(student)
    run(wf)
    # theta_t <- 1.0 theta_t + 0.0 theta_s: the teacher keeps the values it was copied with
    for name, value in teacher.named_parameters():
        assert torch.equal(value, initial[name]), name
    trained_student = params_of(student)
    last = "projection_head.last_layer.parametrizations.weight.original1"
    assert torch.equal(trained_student[last], initial[last])  # every iteration of epoch 1 dropped its gradient
    assert not torch.equal(trained_student["backbone.cls_token"], initial["backbone.cls_token"])  # others trained


def test_resume_continues_from_the_last_epoch(trained, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(trained.root, root)
    wf = workflow(root, "train", ["train.json"], epochs=3, resume=True, **TRAIN_TINY)
    trainer = wf.parser.get_parsed_content("train#trainer")
    started: list[tuple[int, int]] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append((e.state.epoch, e.state.iteration)))
    run(wf)
    assert started == [(3, 12)]  # epochs 1-2 (12 iterations) restored, only epoch 3 ran
    assert trainer.state.iteration == 18  # 3 epochs x 6 iterations
    assert latest_training_state(root / "models").name == "training_state_epoch=3.pt"
    assert not (root / "models" / "training_state_epoch=2.pt").exists()


def test_evaluate_sweeps_label_budgets_and_saves_the_classifier(evaluated):
    out, models = evaluated.root / "eval", evaluated.root / "models"
    # budget n draws min(11, n) images of each of 4 classes: n_train 4 x 1 = 4 and 4 x 5 = 20
    assert_budget_rows(read_csv(out / "budget_rows_ssl.csv"), [1, 5], 2, {1: 4, 5: 20}, n_test_per_class=5)
    summary = read_csv(out / "budget_summary.csv")
    assert [(r["classifier"], int(r["n_per_class"]), int(r["n_draws"])) for r in summary] == [
        (c, b, 2) for c in CLASSIFIERS for b in (1, 5)]
    with Image.open(out / "balanced_accuracy.png") as figure:
        figure.load()
        assert figure.size[0] > 100 and figure.size[1] > 100
    assert (models / "classifier.skops").is_file()
    info = json.loads((models / "classifier.json").read_text())
    assert info == {"classifier": "svm", "class_names": DEMO_CLASSES, "n_train": 44, "feature_dim": 48}


def test_inference_writes_class_probabilities(evaluated):
    root = evaluated.root
    wf = workflow(root, "infer", ["inference.json"], **TINY)
    run(wf)
    demo = Path(wf.parser.get_parsed_content("dataset_dir"))
    ids = [f"{i:04d}" for i in range(72)]  # every demo image, labelled (64) or not (8)
    rows = assert_predictions(root / "eval" / "predictions" / "predictions.csv", ids, DEMO_CLASSES)
    assert not list((root / "eval" / "predictions").glob(".*.tmp"))

    # the probabilities are those of the saved classifier on the model.pt (teacher) features
    backbone = tiny_backbone()
    backbone.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    backbone.eval()
    classifier = load_classifier(root / "models" / "classifier.skops")
    transform = EvalTransformd(keys="image", image_resolution=32)
    for row in rows[:3]:
        image = transform({"image": str(demo / "images" / f"{row['id']}.png")})["image"]
        with torch.no_grad():
            features = backbone(torch.as_tensor(image)[None]).numpy()
        np.testing.assert_allclose([float(row[c]) for c in DEMO_CLASSES], classifier.predict_proba(features)[0],
                                   atol=1e-5)


def test_inference_before_evaluation_names_the_missing_file(tmp_path):
    root = bundle_copy(tmp_path / "bundle")
    wf = workflow(root, "infer", ["inference.json"], load_pretrain=False, **TINY)  # the config parses...
    with pytest.raises(Exception) as info:
        run(wf)  # ...and the run stops at its start, naming the file the evaluation writes
    text = error_text(info.value)
    assert "classifier.json" in text and "evaluate.json" in text
    assert not (root / "eval" / "predictions").exists()  # nothing half-written


def test_supervised_baseline_adds_rows_to_the_summary(evaluated, tmp_path):
    root = tmp_path / "supervised"
    shutil.copytree(evaluated.root, root)
    ssl_before = [r for r in read_csv(root / "eval" / "budget_summary.csv") if r["classifier"] != "supervised"]
    run(workflow(root, None, ["supervised.json"], **{**TINY, "n_draws": 1, "budgets": [1, 5], "epochs": 2,
                                                     "progress_bar": False}))
    rows = read_csv(root / "eval" / "budget_rows_supervised.csv")
    assert [(r["classifier"], int(r["n_per_class"]), int(r["n_train"]), int(r["draw"])) for r in rows] == [
        ("supervised", 1, 4, 0), ("supervised", 5, 20, 0)]  # 4 classes x min(11, n)
    for row in rows:
        steps = float(row["balanced_accuracy"]) * 20  # multiple of 1/20 (5 test images in each of 4 classes)
        assert steps == pytest.approx(round(steps), abs=1e-9)
    summary = read_csv(root / "eval" / "budget_summary.csv")
    assert len(summary) == 6 + 2  # 3 classifiers x 2 budgets (ssl) + 2 budgets (supervised)
    assert [r for r in summary if r["classifier"] != "supervised"] == ssl_before  # the ssl rows are kept
    with Image.open(root / "eval" / "balanced_accuracy.png") as figure:
        figure.load()


def test_budget_above_every_class_uses_all_labelled_images(tmp_path):
    """budgets_for drops budgets above the largest class (11 training images per demo class) and evaluates
    that class size once instead: [1000] becomes [11], i.e. every labelled training image (4 x 11 = 44)."""
    root = bundle_copy(tmp_path / "bundle")
    run(workflow(root, "infer", ["evaluate.json"], load_pretrain=False, budgets=[1000], n_draws=1, **TINY))
    rows = read_csv(root / "eval" / "budget_rows_ssl.csv")
    assert sorted((r["classifier"], int(r["n_per_class"]), int(r["n_train"])) for r in rows) == [
        ("knn", 11, 44), ("logreg", 11, 44), ("svm", 11, 44)]
    # an untrained backbone (load_pretrain False: the random-init baseline) never writes the inference classifier
    assert not (root / "models" / "classifier.skops").exists() and not (root / "models" / "classifier.json").exists()


# ----------------------------------------------------------------------------------------------- bad input
def make_dataset(root: Path, classes: dict[str, int], n_unlabelled: int = 1, size: int = 40) -> Path:
    """``images/<id>.png`` (RGB noise, ``size x size``) + ``labels.csv``; ids ``000``, ``001``, ... with the
    unlabelled images last."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, i = ["id,class_id,class_name"], 0
    for class_id, (name, count) in enumerate(classes.items(), start=1):
        for _ in range(count):
            rows.append(f"{i:03d},{class_id},{name}")
            i += 1
    for j in range(i + n_unlabelled):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{j:03d}.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """2 classes x 3 labelled images (1 test + 2 train each) and the unlabelled image 006."""
    return make_dataset(tmp_path / "data", {"alpha": 3, "beta": 3})


def train_should_fail(root: Path, dataset: Path, **override) -> str:
    with pytest.raises(Exception) as info:
        run(workflow(bundle_copy(root), "train", ["train.json"], dataset_dir=str(dataset), epochs=1,
                     **{**TRAIN_TINY, **override}))
    assert not (root / "models" / "model.pt").exists(), "a failed run must not leave a model.pt"
    return error_text(info.value)


def test_grey_image_among_rgb(tmp_path, small_dataset):
    grey = small_dataset / "images" / "006.png"
    Image.open(grey).convert("L").save(grey)
    text = train_should_fail(tmp_path / "run", small_dataset)
    assert str(grey) in text and "mixed channel counts" in text


def test_label_row_without_image(tmp_path, small_dataset):
    labels = small_dataset / "labels.csv"
    labels.write_text(labels.read_text() + "ghost,1,alpha\n")
    text = train_should_fail(tmp_path / "run", small_dataset)
    assert "'ghost'" in text and str(labels) in text and "no image" in text


def test_labels_csv_missing_a_column(tmp_path, small_dataset):
    labels = small_dataset / "labels.csv"
    labels.write_text("\n".join(line.rsplit(",", 1)[0] for line in labels.read_text().splitlines()) + "\n")
    text = train_should_fail(tmp_path / "run", small_dataset)
    assert str(labels) in text and "class_name" in text and "missing" in text


def test_class_with_a_single_image(tmp_path):
    dataset = make_dataset(tmp_path / "data", {"alpha": 3, "beta": 3, "lonely": 1})  # 'lonely' is image 006
    text = train_should_fail(tmp_path / "run", dataset)
    assert "'lonely'" in text and "min_class_size" in text
    # with min_class_size=2 the class is dropped: SSL uses 2 x 2 training images + the unlabelled 007
    wf = workflow(bundle_copy(tmp_path / "ok"), "train", ["train.json"], dataset_dir=str(dataset), min_class_size=2,
                  **TRAIN_TINY)
    ssl = wf.parser.get_parsed_content("ssl_datalist")
    assert len(ssl) == 5 and "006" not in {e["id"] for e in ssl}
    assert sorted(e["label"] for e in ssl) == [-1, 0, 0, 1, 1]


def test_corrupt_image(tmp_path, small_dataset):
    image = small_dataset / "images" / "006.png"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # truncated PNG: header still valid
    text = train_should_fail(tmp_path / "run", small_dataset)
    assert str(image) in text and "corrupt" in text


@pytest.mark.parametrize("config, typo, hint", [
    ("train.json", "epoch", "epochs"), ("evaluate.json", "budget", "budgets"),
    ("supervised.json", "n_draw", "n_draws"), ("inference.json", "batchsize", "batch_size"),
])
def test_misspelt_cli_override_is_refused(tmp_path, monkeypatch, config, typo, hint):
    root = bundle_copy(tmp_path / "bundle")
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", str(root / "configs" / config), f"--{typo}", "3"]
    with pytest.raises(KeyError, match=f"--{typo} names no id.*did you mean {hint}"):
        check_cli_overrides(argv)
    check_cli_overrides([*argv[:-2], f"--{hint}", "3", "--backbone_kwargs#embed_dim", "48"])  # real ids pass
    # the bundle itself calls the check when run from the monai.bundle command line
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(Exception) as info:
        workflow(root, None, [config], **{typo: 3})
    assert f"--{typo} names no id" in error_text(info.value)


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_blood_cells_train_evaluate_infer(tmp_path):
    """1 epoch on 10 images of each of 4 WBC classes, budgets [1, 5] x 2 draws, probabilities per image."""
    wbc = require_data("wbc")
    subset = tmp_path / "wbc_subset"
    (subset / "images").mkdir(parents=True)
    rows = read_csv(wbc / "labels.csv")
    names = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]  # class_id 1..4
    kept = [r for name in names for r in [r for r in rows if r["class_name"] == name][:10]]
    for row in kept:
        shutil.copy(wbc / "images" / f"{row['id']}.png", subset / "images")
    with open(subset / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "class_id", "class_name"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)

    root = bundle_copy(tmp_path / "bundle")
    data = {"dataset_dir": str(subset)}
    wf = workflow(root, "train", ["train.json"], epochs=1, **TRAIN_TINY, **data)
    assert wf.parser.get_parsed_content("on_demo") is False
    trainer = wf.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    run(wf)
    # 10 - floor(10 * 0.3 + 0.5) = 7 training images per class: 28 SSL images, 28 // 8 = 3 iterations
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert set(torch.load(root / "models" / "model.pt", weights_only=True)) == set(tiny_backbone().state_dict())

    run(workflow(root, "infer", ["evaluate.json"], **EVAL_TINY, **data))
    # n_train 4 x 1 and 4 x 5; 3 test images per class
    assert_budget_rows(read_csv(root / "eval" / "budget_rows_ssl.csv"), [1, 5], 2, {1: 4, 5: 20}, n_test_per_class=3)
    assert len(read_csv(root / "eval" / "budget_summary.csv")) == 6
    with Image.open(root / "eval" / "balanced_accuracy.png") as figure:
        figure.load()
    assert (root / "models" / "classifier.skops").is_file()

    run(workflow(root, "infer", ["inference.json"], **TINY, **data))
    assert_predictions(root / "eval" / "predictions" / "predictions.csv", sorted(r["id"] for r in kept), names)


@pytest.mark.realdata
def test_real_blood_cells_split_drops_the_single_basophil(tmp_path):
    """The full WBC folder (176 neutrophils, 53 lymphocytes, 48 monocytes, 22 eosinophils, 1 basophil)."""
    wbc = require_data("wbc")
    root = bundle_copy(tmp_path / "bundle")
    with pytest.raises(Exception) as info:
        workflow(root, "infer", ["evaluate.json"], dataset_dir=str(wbc), **TINY).parser.get_parsed_content("splits")
    text = error_text(info.value)
    assert "'basophil'" in text and "min_class_size" in text

    wf = workflow(root, "infer", ["evaluate.json"], dataset_dir=str(wbc), min_class_size=2, **TINY)
    assert wf.parser.get_parsed_content("class_names") == ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    datalist = wf.parser.get_parsed_content("eval_datalist")
    counts = {role: np.bincount([e["label"] for e in datalist if e["role"] == role], minlength=4).tolist()
              for role in ("train", "test")}
    # test = floor(n * 0.3 + 0.5): 176 -> 53, 53 -> 16, 48 -> 14, 22 -> 7; train = the rest
    assert counts == {"test": [53, 16, 14, 7], "train": [123, 37, 34, 15]}
