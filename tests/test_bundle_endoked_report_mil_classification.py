"""The endoked_report_mil_classification bundle run as users run it: reports -> exam labels -> MIL training with
validation, evaluation, the per-bag score export read back by the WSSS stage, per-frame inference, resume, and bad
input (Wang et al., EndoKED, arXiv:2310.11173; specs/endoked.md §2).

Workflows run in-process through ``ConfigWorkflow`` from a copy of the bundle's configs in a temporary folder
(``bundle_root`` = the copy), so that ``models/``, ``eval/`` and ``data/`` are written there and never into the
repository. Sizes are shrunk through top-level ids only (32 px frames, instance batches of 8, 2 epochs).

Numbers used below (the embedded demo, :mod:`common.data.demo_exams`, default arguments): 12 exams with a definite
report, ``12 // 2 = 6`` of them positive (they and only they have polyp frames), plus 2 exams with a hedged report
that the labeller leaves out; 4 to 8 frames per exam. The 70/30 split keeps ``round(0.7 * 12) = 8`` exams for
training and 4 for validation.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from common.data.exam_bags import mil_frame_transforms
from common.data.mil_scores import read_bag_score_csvs, select_wsss_images
from common.handlers.training_state import latest_training_state
from common.networks.mil import EndoKEDMIL

from conftest import REPO_ROOT, bundle_workflow, error_text, read_csv, run_workflow

BUNDLE = REPO_ROOT / "bundles" / "endoked_report_mil_classification"
TINY = {"image_size": 32, "instance_batch_size": 8, "num_workers": 0, "progress_bar": False}
N_LABELLED, N_UNCERTAIN, N_TRAIN = 12, 2, 8  # module docstring
VAL_METRICS = {"val_student_auc", "val_teacher1_auc", "val_teacher2_auc", "val_instance_auc"}
CLASSES = ["no polyp", "polyp"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def workflow(bundle_root: Path, kind: str | None, configs: list[str], **override) -> ConfigWorkflow:
    """:func:`conftest.bundle_workflow` of this bundle's configs (bundle_root / "configs")."""
    return bundle_workflow(bundle_root / "configs", bundle_root, kind, configs, **override)


def bundle_copy(dest: Path) -> Path:
    """The bundle's configs copied to ``dest`` (without data or outputs of earlier runs: the demo is generated)."""
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("data", "models", "eval", "docs"))
    return dest


def demo_dir(root: Path) -> Path:
    return root / "data" / "demo_exams"


def frames_of(exam_dir: Path) -> list[Path]:
    return sorted(p for p in exam_dir.iterdir() if p.suffix == ".jpg")


def check_auc(name: str, value: float, n_pos: int, n_neg: int) -> None:
    """A ROC AUC over ``n_pos`` positives and ``n_neg`` negatives counts pairs, a tie as 1/2: a multiple of
    ``1 / (2 n_pos n_neg)`` in [0, 1]."""
    steps = value * 2 * n_pos * n_neg
    assert 0.0 <= value <= 1.0 and steps == pytest.approx(round(steps), abs=1e-6), (name, value)


# ----------------------------------------------------------------------------------------------- demo runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> SimpleNamespace:
    """A bundle copy trained for 2 epochs on the embedded demo (no dataset argument), with the validation metrics of
    every epoch, the training bags and the number of student batches per epoch recorded."""
    root = bundle_copy(tmp_path_factory.mktemp("endoked_mil") / "bundle")
    wf = workflow(root, "train", ["train.json"], epochs=2, **TINY)
    assert wf.parser.get_parsed_content("on_demo") is True
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    val_metrics, student_batches = [], []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: val_metrics.append(dict(e.state.metrics)))
    trainer.student_engine.add_event_handler(Events.COMPLETED, lambda e: student_batches.append(e.state.iteration))
    run_workflow(wf)
    return SimpleNamespace(root=root, trainer=trainer, val_metrics=val_metrics, student_batches=student_batches,
                           train_bags=wf.parser.get_parsed_content("train_bags"),
                           val_bags=wf.parser.get_parsed_content("val_bags"))


def test_reports_are_labelled_first_uncertain_ones_left_out(trained):
    data = demo_dir(trained.root)
    labels = {r["exam_id"]: int(r["label"]) for r in read_csv(data / "exam_labels.csv")}
    uncertain = [r["exam_id"] for r in read_csv(data / "exam_labels_uncertain.csv")]
    reports = {r["exam_id"] for r in read_csv(data / "reports.csv")}
    assert len(labels) == N_LABELLED and len(uncertain) == N_UNCERTAIN
    assert set(labels) | set(uncertain) == reports and not set(labels) & set(uncertain)
    # the demo's truth: an exam with a definite report is positive exactly when one of its frames shows a polyp
    has_polyp = {}
    for row in read_csv(data / "instance_labels.csv"):
        exam = row["image"].split("/")[1]  # exams/<exam_id>/<frame>
        has_polyp[exam] = has_polyp.get(exam, False) or row["label"] == "1"
    assert labels == {exam: int(has_polyp[exam]) for exam in labels}
    assert sum(labels.values()) == N_LABELLED // 2
    # uncertain exams take part neither in training nor in validation
    used = [b["exam_id"] for b in trained.train_bags + trained.val_bags]
    assert sorted(used) == sorted(labels) and len(trained.train_bags) == N_TRAIN


def test_train_writes_model_state_events_and_aucs(trained):
    models = trained.root / "models"
    weights = torch.load(models / "model.pt", weights_only=True)
    EndoKEDMIL().load_state_dict(weights)  # strict: the four parts, ResNet-18 encoder
    state_file = latest_training_state(models)
    assert state_file is not None and state_file.name == "training_state_epoch=2.pt"
    state = torch.load(state_file, weights_only=True)
    assert set(state) == {"model", "optimizer_encoder", "optimizer_teacher1", "optimizer_teacher2",
                          "optimizer_student", "checkpoint_saver", "trainer"}
    assert state["trainer"]["iteration"] == 2 * N_TRAIN  # one teacher iteration per training bag, 2 epochs
    assert list((trained.root / "eval" / "runs").glob("events.out.tfevents.*")), "TensorBoard events expected"
    metrics = trained.trainer.state.metrics
    assert math.isfinite(metrics["teacher_loss"]) and math.isfinite(metrics["student_loss"])

    # student phase: n training frames in batches of 8, a last batch of one frame dropped (1 x 1 BatchNorm at 32 px)
    n = sum(len(frames_of(demo_dir(trained.root) / "exams" / b["exam_id"])) for b in trained.train_bags)
    assert trained.student_batches == [n // 8 + (n % 8 > 1)] * 2

    # validation every epoch; 4 validation exams, 2 per class (bag AUC in steps of 1/8)
    assert len(trained.val_metrics) == 2
    n_pos = sum(b["label"] for b in trained.val_bags)
    assert (n_pos, len(trained.val_bags) - n_pos) == (2, 2)
    inst = [v for b in trained.val_bags for v in b["instance_label"]]
    for epoch_metrics in trained.val_metrics:
        assert set(epoch_metrics) == VAL_METRICS
        for name in ("val_student_auc", "val_teacher1_auc", "val_teacher2_auc"):
            check_auc(name, epoch_metrics[name], 2, 2)
        check_auc("val_instance_auc", epoch_metrics["val_instance_auc"], inst.count(1), inst.count(0))


def test_evaluate_writes_the_metrics_of_the_best_model(trained):
    run_workflow(workflow(trained.root, "train", ["train.json", "evaluate.json"], **TINY))
    with open(trained.root / "eval" / "metrics.csv", newline="") as f:
        metrics = {name: float(value) for name, value in csv.reader(f)}
    assert set(metrics) == VAL_METRICS
    # model.pt holds the epoch with the best student bag AUC; evaluation in eval() mode repeats it
    best = max(m["val_student_auc"] for m in trained.val_metrics)
    assert metrics["val_student_auc"] == pytest.approx(best, abs=1e-6)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_export_writes_one_csv_per_training_exam_for_the_wsss_stage(trained):
    run_workflow(workflow(trained.root, "train", ["train.json", "export.json"], **TINY))
    out = trained.root / "eval" / "bag_scores"
    assert not (trained.root / "eval" / "bag_scores.partial").exists()
    expected = {f"{b['exam_id']}_gt{b['label']}.csv": b for b in trained.train_bags}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    rows = read_bag_score_csvs(out)
    assert len(rows) == sum(len(b["image"]) for b in trained.train_bags)
    for bag in trained.train_bags:
        mine = [r for r in rows if r["exam_id"] == bag["exam_id"]]
        assert [r["image"] for r in mine] == bag["image"] and {r["bag_label"] for r in mine} == {bag["label"]}
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    # every frame of a positive bag passes threshold 0; floor(0.5 n) frames of each negative bag of n frames
    picked = select_wsss_images(rows, positive_threshold=0.0, negative_fraction=0.5)
    pos = [b for b in trained.train_bags if b["label"] == 1]
    neg = [b for b in trained.train_bags if b["label"] == 0]
    assert sum(r["label"] for r in picked) == sum(len(b["image"]) for b in pos)
    assert sum(1 - r["label"] for r in picked) == sum(len(b["image"]) // 2 for b in neg)

    # "all": every labelled exam (train and validation); anything else is refused by name
    run_workflow(workflow(trained.root, "train", ["train.json", "export.json"], export_bags="all", **TINY))
    assert len(list(out.glob("*.csv"))) == N_LABELLED
    with pytest.raises(Exception) as err:
        run_workflow(workflow(trained.root, "train", ["train.json", "export.json"], export_bags="test", **TINY))
    assert "export_bags must be one of ['all', 'train', 'val'], got 'test'" in error_text(err.value)


def test_inference_writes_frame_probabilities(trained):
    out = trained.root / "eval" / "predictions"
    run_workflow(workflow(trained.root, "inference", ["inference.json"], image_size=32, num_workers=0))
    with open(out / "predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == ["id", *CLASSES, "predicted"]
    rows = read_csv(out / "predictions.csv")
    exams = demo_dir(trained.root) / "exams"
    frames = sorted(p for e in exams.iterdir() for p in frames_of(e))
    assert [r["id"] for r in rows] == [f"{p.parent.name}/{p.stem}" for p in frames]  # all 14 exams, uncertain too
    for row in rows:
        probs = np.array([float(row[c]) for c in CLASSES])
        # 6 decimals each: the sum is 1 within 1e-6
        assert probs.min() >= 0.0 and probs.sum() == pytest.approx(1.0, abs=1e-5), row
        assert row["predicted"] == CLASSES[int(probs.argmax())]
    # the trained student, not a random one: softmax of model.pt's logits on the first frame
    net = EndoKEDMIL()
    net.load_state_dict(torch.load(trained.root / "models" / "model.pt", weights_only=True))
    image = mil_frame_transforms(32)({"image": str(frames[0])})["image"]
    with torch.no_grad():
        expected = torch.softmax(net.eval()(image[None]), dim=1)[0]
    assert [float(rows[0][c]) for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)


def test_inference_builds_without_weights(tmp_path):
    root = bundle_copy(tmp_path / "bundle")
    wf = workflow(root, "inference", ["inference.json"], load_pretrain=False, image_size=32, num_workers=0)
    assert isinstance(wf.parser.get_parsed_content("network_def"), EndoKEDMIL)
    assert not (root / "models").exists()


def test_resume_continues_at_the_next_epoch(trained, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(trained.root, root)
    wf = workflow(root, "train", ["train.json"], epochs=3, resume=True, **TINY)
    trainer = wf.parser.get_parsed_content("train#trainer")
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    run_workflow(wf)
    assert started == [3]  # epochs 1 and 2 come from the training state
    assert trainer.state.iteration == 3 * N_TRAIN
    assert latest_training_state(root / "models").name == "training_state_epoch=3.pt"


# ----------------------------------------------------------------------------------------------- bad input
def exam_dataset(root: Path, frames: dict[str, int], reports: str | None = None) -> Path:
    """``root/exams/<exam>/f<i>.png`` (32 x 32 RGB) for ``frames = {exam: n}``, and ``reports.csv`` when given."""
    for exam, n in frames.items():
        (root / "exams" / exam).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "exams" / exam / f"f{i}.png")
    if reports is not None:
        (root / "reports.csv").write_text(reports, encoding="utf-8")
    return root


def failure(root: Path, dataset: Path, **override) -> str:
    """The chained error message of building and running training on ``dataset``."""
    with pytest.raises(Exception) as err:
        run_workflow(workflow(root, "train", ["train.json"], dataset_dir=str(dataset), epochs=1, **TINY, **override))
    return error_text(err.value)


def test_bad_input_is_named(tmp_path):
    root = bundle_copy(tmp_path / "bundle")
    exams = {"E1": 2, "E2": 2, "E3": 2, "E4": 2}
    no_text = exam_dataset(tmp_path / "no_text", exams, "exam_id,text\nE1,A polyp.\nE2,No polyps.\n")
    message = failure(root, no_text)
    assert f"report table {no_text / 'reports.csv'} lacks the column(s) ['report']" in message

    twice = exam_dataset(tmp_path / "twice", exams, "exam_id,report\nE1,A polyp.\nE2,No polyps.\nE1,No polyps.\n")
    assert "exam id(s) ['E1'] appear more than once" in failure(root, twice)

    reports = "exam_id,report\n" + "".join(f"{e},{t}\n" for e, t in zip(
        ["E1", "E2", "E3", "E4"], ["A 5 mm polyp in the rectum.", "No polyps were seen.", "A small polyp.",
                                   "No polyps."]))
    empty = exam_dataset(tmp_path / "empty", {**exams, "E4": 0}, reports)
    assert f"exam folder {empty / 'exams' / 'E4'} holds no frame" in failure(root, empty)

    broken = exam_dataset(tmp_path / "broken", exams, reports)
    for exam in exams:
        (broken / "exams" / exam / "f1.png").write_bytes(b"not an image")
    message = failure(root, broken)
    assert "cannot load image file" in message
    assert any(f"frame {broken / 'exams' / e / 'f1.png'} of exam '{e}'" in message for e in exams), message


def test_single_frame_training_exams_are_dropped_with_a_warning(tmp_path, caplog):
    root = bundle_copy(tmp_path / "bundle")
    sizes = {"E1": 1, "E2": 2, "E3": 1, "E4": 2, "E5": 1, "E6": 2}
    reports = "exam_id,report\n" + "".join(f"{e},{'A 4 mm polyp.' if i % 2 else 'No polyps.'}\n"
                                          for i, e in enumerate(sizes))
    dataset = exam_dataset(tmp_path / "data", sizes, reports)
    wf = workflow(root, "train", ["train.json"], dataset_dir=str(dataset), epochs=1, **TINY)
    split_train = [b["exam_id"] for b in wf.parser.get_parsed_content("split")[0]]
    kept = [b["exam_id"] for b in wf.parser.get_parsed_content("train_bags")]
    dropped = [e for e in split_train if sizes[e] == 1]
    # round(0.7 * 6) = 4 training exams: with only 3 exams of each size, 1 to 3 of them have a single frame
    assert len(split_train) == 4 and 1 <= len(dropped) <= 3
    assert kept == [e for e in split_train if sizes[e] == 2]
    assert f"dropping {len(dropped)} single-frame training exam(s) {dropped}" in caplog.text
    trainer = wf.parser.get_parsed_content("train#trainer")
    run_workflow(wf)  # single-frame validation exams are evaluated in eval() mode
    assert trainer.state.iteration == len(kept)
