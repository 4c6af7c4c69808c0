"""The asg_cxr_pretraining bundle run as users run it: pre-training on synthetic radiographs paired with the real IU
X-ray report texts, then every evaluation config on its checkpoint (test losses, zero-shot, linear probe, segmentation,
inference), the released-behaviour switches, the official parameter count, and bad input.

Workflows run in-process through ``ConfigWorkflow`` shrunk through top-level ids only (ViT width 32 / depth 2 at
64 px, 64-d projection heads, one IRL layer); the text side is the real all-MiniLM-L6-v2 (packaged offline).
``bundle_root`` is a temporary folder, so nothing is written into the repository.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.networks.asg import ASGModel, ViTImageEncoder
from common.networks.asg_text import BertTextEncoder, build_tag_encoder

from conftest import REPO_ROOT, bundle_workflow, error_text, read_csv, require_data, run_workflow

CONFIGS = REPO_ROOT / "bundles" / "asg_cxr_pretraining" / "configs"
IMAGE = {"image_size": 64, "vit": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "num_workers": 0}
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# the MiniLM vocabulary with a randomly initialised 2-layer, 32-wide BERT for the report and tag encoders
MODEL = {**IMAGE, "resize": 80, "proj_hidden_dim": 64, "emb_dim": 16,
         "irl": {"layers": 1, "heads": 2, "ffn": 64, "dropout": 0.1}, "pretrained_text": False, "text_config": BERT,
         "text_layers": 2, "tag_config": BERT}

SIZES = {"n_train": 32, "n_valid": 16, "n_test": 16}

pytestmark = [pytest.mark.slow]

workflow = partial(bundle_workflow, CONFIGS)
run = run_workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A bundle root pre-trained for 2 epochs on 32 synthetic radiographs painted from the first 32 / 16 / 16 real
    IU X-ray reports of the R2Gen splits (batches of 8, drop_last: 4 steps per epoch)."""
    reports = str(require_data("cxr_reports") / "annotation.json")
    root = tmp_path_factory.mktemp("asg_bundle")
    wf = workflow(root, "train", ["train.json"], reports=reports, epochs=2, progress_bar=False, demo_sizes=SIZES,
                  **MODEL)
    run(wf)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 * 32 // 8
    # the schedule steps per iteration: T = 8 steps, W = int(0.4 x 8) = 3; after step 8 the rate is the floor
    scheduler = wf.parser.get_parsed_content("lr_scheduler")
    assert (scheduler.total_steps, scheduler.warmup_steps, scheduler.last_epoch) == (8, 3, 8)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-8)
    # lr(2) = 1e-8 + (4e-5 - 1e-8) x 2 / 3 = 2.667e-5; lr(5) = 1e-8 + (4e-5 - 1e-8) (1 + cos(pi 2 / 5)) / 2
    assert scheduler.lr_lambdas[0](2) * 4e-5 == pytest.approx(1e-8 + (4e-5 - 1e-8) * 2 / 3, rel=1e-9)
    assert scheduler.lr_lambdas[0](5) * 4e-5 == pytest.approx(1e-8 + (4e-5 - 1e-8) * 0.6545085, rel=1e-6)
    for name in ("train_loss", "train_ira", "train_arsa", "train_irl", "train_erl"):
        assert np.isfinite(trainer.state.metrics[name])
    assert (root / "models" / "model.pt").is_file()
    assert (root / "data" / "demo_cxr_reports" / "pretrain.json").is_file()
    return root, reports


def test_evaluate_zero_shot_and_inference_use_the_checkpoint(trained):
    root, reports = trained
    run(workflow(root, None, ["train.json", "evaluate.json"], reports=reports, demo_sizes=SIZES, **MODEL))
    (row,) = read_csv(root / "eval" / "pretraining_test.csv")
    terms = {k: float(row[f"test_{k}"]) for k in ("ira", "arsa", "irl", "erl", "loss")}
    # L = IRA + ARSA + 5 IRL + ERL (4-decimal CSV values)
    assert terms["loss"] == pytest.approx(terms["ira"] + terms["arsa"] + 5 * terms["irl"] + terms["erl"], abs=5e-3)
    assert 0.0 <= float(row["test_acc1"]) <= float(row["test_acc5"]) <= 100.0

    run(workflow(root, None, ["train.json", "zero_shot.json"], reports=reports, demo_sizes=SIZES, **MODEL))
    rows = read_csv(root / "eval" / "zero_shot.csv")
    # classes whose 16 test reports all agree have no AUC and are left out; the others and their mean are reported
    assert rows[-1]["class"] == "mean" and len(rows) >= 2
    for row in rows[:-1]:
        assert int(row["n"]) == 16 and 0 < int(row["positives"]) < 16
    for key in ("auc", "f1", "acc"):
        values = [float(r[key]) for r in rows[:-1]]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert float(rows[-1][key]) == pytest.approx(np.mean(values), abs=1e-3)
    assert (root / "eval" / "zero_shot_demo.png").stat().st_size > 0

    images = root / "data" / "demo_cxr_reports" / "images"
    out = root / "eval" / "predictions"
    run(workflow(root, "inference", ["inference.json"], dataset_dir=str(images), output_dir=str(out), **MODEL))
    predictions = read_csv(out / "predictions.csv")
    embeddings = read_csv(out / "embeddings.csv")
    assert len(predictions) == len(embeddings) == 32 + 16 + 16
    assert len(predictions[0]) == 1 + 40 + 1  # id, 40 finding probabilities, predicted
    vector = np.array([float(v) for k, v in embeddings[0].items() if k != "id"])
    assert vector.shape == (16,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)


def test_linear_probe_and_segmentation_on_the_frozen_encoder(trained):
    root, reports = trained
    encoder_before = torch.load(root / "models" / "model.pt", weights_only=True)
    for fraction in (0.1, 1.0):
        run(workflow(root, None, ["linear_probe.json"], reports=reports, fraction=fraction, epochs=2,
                     progress_bar=False, demo_sizes=SIZES, **IMAGE))
    rows = read_csv(root / "eval" / "linear_probe.csv")
    # 10 % of 32 training images: round(3.2) = 3
    assert [(r["fraction"], r["n_train"]) for r in rows] == [("0.1000", "3"), ("1.0000", "32")]
    assert all(0.0 <= float(r["test_auc"]) <= 1.0 and 0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    probe = torch.load(root / "models" / "linear_probe_demo_100pct.pt", weights_only=True)
    probe = probe.get("model", probe)
    for key, value in probe.items():  # the probed encoder is the pre-trained one, unchanged
        if key.startswith("encoder."):
            assert torch.equal(value, encoder_before["image_encoder." + key.removeprefix("encoder.")])

    run(workflow(root, None, ["segment.json"], reports=reports, epochs=1, progress_bar=False, demo_sizes=SIZES,
                 **IMAGE))
    (seg,) = read_csv(root / "eval" / "segmentation.csv")
    assert 0.0 <= float(seg["test_dice"]) <= 1.0 and seg["encoder"] == "models/model.pt"


def test_released_behaviours_run(tmp_path):
    """The switches of the spec's §8: caption-length sorting (the RoIAlign index bug) and tag queries recomputed by
    the frozen BERT in train mode, on the embedded template demo."""
    wf = workflow(tmp_path, "train", ["train.json"], sort_by_caption_len=True, cache_tag_queries=False, epochs=1,
                  progress_bar=False, **MODEL)
    assert wf.parser.get_parsed_content("network").tag_encoder is not None
    run(wf)
    assert (tmp_path / "models" / "model.pt").is_file()


def test_official_parameter_count(tmp_path):
    """official_figures.md §6 (ASGMVLP_CODE@088e896): 291,292,673 parameters with the frozen tag BERT, 183,572,993
    trainable: ViT-B/16 85,798,656 + 4 heads x 1,841,280 + 6-layer BERT without token-type table 65,190,912 + IRL
    25,218,305 = 183,572,993, plus the 12-layer tag BERT 107,719,680."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "##s"]
    vocab += [f"w{i}" for i in range(28996 - len(vocab))]  # Bio_ClinicalBERT's vocabulary size
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    vocab_file = str(tmp_path / "vocab.txt")
    with torch.device("meta"):  # counts only (no forward: the tag queries are placeholders)
        tag_encoder = build_tag_encoder(vocab_file)
        tag_inputs = {"input_ids": torch.zeros(40, 128, dtype=torch.long),
                      "attention_mask": torch.ones(40, 128, dtype=torch.long)}
        model = ASGModel(ViTImageEncoder(), BertTextEncoder(vocab_file, num_layers=6, token_type_embeddings=False),
                         torch.zeros(40, 768), tag_encoder=tag_encoder, tag_inputs=tag_inputs)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == (291_292_673, 183_572_993)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(Exception) as err:
        workflow(tmp_path, None, ["linear_probe.json"], task="imagenet", use_pretrained=False, **IMAGE)
    assert "unknown classification task 'imagenet'" in error_text(err.value)
    assert "chexpert" in error_text(err.value)

    images = tmp_path / "images"
    images.mkdir()
    rgba = np.zeros((40, 50, 4), np.uint8)
    cv2.imwrite(str(images / "rgba.png"), rgba)
    with pytest.raises(Exception) as err:
        run(workflow(tmp_path, "inference", ["inference.json"], dataset_dir=str(images), load_pretrain=False,
                     **MODEL))
    assert "rgba.png" in error_text(err.value) and "4 channels" in error_text(err.value)
    shutil.rmtree(images)
