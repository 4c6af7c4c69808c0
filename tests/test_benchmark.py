"""scripts/benchmark.py produces every figure it promises (tiny sizes; speed itself is never asserted)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_benchmark_writes_medians_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    variants = json.dumps({"channels_last": {}, "contiguous": {"channels_last": False}})
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--bundle", "endoked_polyp_segmentation",
           "--backbone", "pvt_v2_b0", "--image_size", "64", "--repeats", "2", "--warmup", "1",
           "--variants", variants, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["overrides"]["batch_size"] == 2
    for figures in report["variants"].values():
        assert figures["train_input_shape"] == [2, 3, 64, 64] and figures["infer_input_shape"] == [1, 3, 64, 64]
        assert len(figures["raw_train_step_s"]) == 2
        assert figures["train_step_s"] == sorted(figures["raw_train_step_s"])[0] + (
            sorted(figures["raw_train_step_s"])[1] - sorted(figures["raw_train_step_s"])[0]) / 2  # median of 2
        assert figures["train_samples_per_s"] == pytest.approx(2 / figures["train_step_s"])
        assert figures["infer_images"] == 16 and figures["peak_memory_mib"] > 0
    assert report["variants"]["channels_last"]["ratio_to_first"]["train_step_s"] == 1.0


def test_benchmark_multi_view_bundle_with_a_prepare_step(tmp_path):
    """Sparsam: the train batch is a list of DINO views; inference needs the classifier evaluate.json fits."""
    out = tmp_path / "bench.json"
    tiny = {"backbone_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 4, "cls_attn_layers": 1},
            "image_resolution": 32, "local_size": 16, "n_local": 2, "head_out_dim": 128, "head_hidden_dim": 64,
            "head_bottleneck_dim": 16, "budgets": [1], "n_draws": 1}
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--bundle", "sparsam_dino_classification",
           "--prepare", "evaluate.json", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    cmd += [arg for key, value in tiny.items() for arg in (f"--{key}", json.dumps(value))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())["variants"]["default"]
    # batch 2 (the CPU default): 2 global views of 32 px, then 2 local views of 16 px
    assert figures["train_input_shape"] == [[2, 3, 32, 32]] * 2 + [[2, 3, 16, 16]] * 2
    assert figures["infer_input_shape"] == [1, 3, 32, 32]
    assert figures["infer_images"] == 72  # the embedded demo: 4 classes x 16 labelled + 8 unlabelled images
    assert figures["train_samples_per_s"] == pytest.approx(2 / figures["train_step_s"])
