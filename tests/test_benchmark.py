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
