"""scripts/benchmark.py produces every figure it promises, consistently (tiny sizes; speed itself is never asserted).

The command-line runs use one torch thread per process and load data in the main process (``--num_workers 0``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, load_script

pytestmark = pytest.mark.slow

bench = load_script("benchmark")

POLYP_TINY = ["--backbone", "pvt_v2_b0", "--image_size", "64", "--num_workers", "0"]


def run_benchmark(tmp_path: Path, bundle: str, *args: str) -> tuple[dict, list[str]]:
    """The JSON report of ``scripts/benchmark.py --bundle <bundle> <args>`` and the Markdown table lines it printed."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--bundle", bundle, *args, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout.splitlines()


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of every Markdown table row after the header and the separator."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert rows[1][0] == "---"  # separator
    return rows[2:]


def check_train_figures(fig: dict, samples: int) -> None:
    """Medians of the raw lists; samples/s and pipeline efficiency from the report's own medians."""
    for key in ("train_compute_step_s", "train_end_to_end_step_s", "infer_forward_s"):
        assert fig[key] == statistics.median(fig[f"raw_{key}"])
    assert fig["samples_per_step"] == samples
    # samples/s = samples per step / median step time; efficiency = compute median / end-to-end median
    assert fig["train_samples_per_s"] == pytest.approx(samples / fig["train_end_to_end_step_s"])
    assert fig["train_compute_samples_per_s"] == pytest.approx(samples / fig["train_compute_step_s"])
    assert fig["pipeline_efficiency"] == pytest.approx(fig["train_compute_step_s"] / fig["train_end_to_end_step_s"])
    assert fig["infer_end_to_end_s_per_image"] == pytest.approx(
        statistics.median(fig["raw_infer_end_to_end_s"]) / fig["infer_images"])
    assert fig["peak_memory_mib"] > 0 and fig["amp"] is False  # CPU: AMP is off by the bundles' default


def test_variants_each_in_a_fresh_process_with_medians_ratios_and_table(tmp_path):
    variants = json.dumps({"channels_last": {}, "contiguous": {"channels_last": False}})
    report, lines = run_benchmark(tmp_path, "endoked_polyp_segmentation", *POLYP_TINY, "--repeats", "3",
                                  "--warmup", "1", "--variants", variants)
    assert report["mode"] == "variants" and report["machine"]["device"] == "cpu"
    assert report["overrides"]["batch_size"] == 2 and report["warmup"] == 1
    first, second = report["variants"]["channels_last"], report["variants"]["contiguous"]
    for fig in (first, second):
        assert fig["train_input_shape"] == [2, 3, 64, 64] and fig["infer_input_shape"] == [1, 3, 64, 64]
        assert len(fig["raw_train_compute_step_s"]) == len(fig["raw_train_end_to_end_step_s"]) == 3
        assert len(fig["raw_infer_end_to_end_s"]) == 1  # max(1, 3 // 2) runs of the whole inference
        # median of 3 = the middle one once sorted
        assert fig["train_compute_step_s"] == sorted(fig["raw_train_compute_step_s"])[1]
        assert fig["infer_images"] == 16  # the embedded demo's inference frames
        check_train_figures(fig, samples=2)
    assert set(first["ratio_to_first"].values()) == {1.0}
    assert second["ratio_to_first"]["train_end_to_end_step_s"] == pytest.approx(
        second["train_end_to_end_step_s"] / first["train_end_to_end_step_s"])
    rows = table_rows(lines)
    assert [row[0] for row in rows] == ["channels_last", "contiguous"]  # one row per variant
    assert rows[0][4] == f"{first['train_compute_step_s']:.4g}" and rows[0][3] == "2"


def test_compare_interleaves_two_variants_in_one_process(tmp_path):
    compare = json.dumps({"A": {}, "B": {"channels_last": False}})
    report, lines = run_benchmark(tmp_path, "endoked_polyp_segmentation", *POLYP_TINY, "--repeats", "3",
                                  "--warmup", "1", "--compare", compare)
    assert report["mode"] == "compare" and "not measured" in report["peak_memory"]
    a, b = report["variants"]["A"], report["variants"]["B"]
    for part in ("train_compute_step", "infer_forward"):
        assert len(a[f"raw_{part}_s"]) == len(b[f"raw_{part}_s"]) == 3  # repeats each
        # timed A, B, A, B, A, B: every B call starts after its A call and before the next A call
        starts = sorted([(t, "A") for t in a[f"raw_{part}_start_s"]] + [(t, "B") for t in b[f"raw_{part}_start_s"]])
        assert [name for _, name in starts] == ["A", "B"] * 3
        assert b["ratio_to_first"][f"{part}_s"] == pytest.approx(
            statistics.median(b[f"raw_{part}_s"]) / statistics.median(a[f"raw_{part}_s"]))
    for fig in (a, b):
        assert "peak_memory_mib" not in fig and "train_end_to_end_step_s" not in fig
        assert fig["train_compute_samples_per_s"] == pytest.approx(2 / fig["train_compute_step_s"])
    rows = table_rows(lines)
    assert [row[0] for row in rows] == ["A", "B"] and rows[1][5] == rows[1][10] == "–"  # no end-to-end, no peak
    assert any(line.startswith("ratio of medians B / A") for line in lines)


def test_co_training_bundle_with_labelled_and_unlabelled_loaders(tmp_path):
    """DHC: 3D patches, a labelled and an unlabelled loader; samples per step = 2 labelled + 2 unlabelled."""
    report, lines = run_benchmark(tmp_path, "dhc_abdomen_ct_segmentation", "--n_filters", "2", "--num_workers", "0",
                                  "--repeats", "2", "--warmup", "1")
    fig = report["variants"]["default"]
    # the embedded demo: 16x32x32 patches of 20x40x40 volumes; the unlabelled batch keeps the bundle's 2
    assert fig["train_input_shape"] == fig["unlabelled_input_shape"] == [2, 1, 16, 32, 32]
    assert fig["infer_input_shape"] == [1, 1, 20, 40, 40] and fig["batch_size"] == 2
    check_train_figures(fig, samples=4)  # 2 + 2
    assert table_rows(lines)[0][3] == "2 + 2 unlabelled"


def test_multi_view_bundle_with_a_prepare_step(tmp_path):
    """Sparsam: the train batch is a list of DINO views; inference needs the classifier evaluate.json fits."""
    tiny = {"backbone_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 4, "cls_attn_layers": 1},
            "image_resolution": 32, "local_size": 16, "n_local": 2, "head_out_dim": 128, "head_hidden_dim": 64,
            "head_bottleneck_dim": 16, "budgets": [1], "n_draws": 1, "num_workers": 0}
    args = [arg for key, value in tiny.items() for arg in (f"--{key}", json.dumps(value))]
    report, lines = run_benchmark(tmp_path, "sparsam_dino_classification", "--prepare", "evaluate.json",
                                  "--repeats", "2", "--warmup", "1", *args)
    fig = report["variants"]["default"]
    # batch 2 (the CPU default): 2 global views of 32 px, then 2 local views of 16 px
    assert fig["train_input_shape"] == [[2, 3, 32, 32]] * 2 + [[2, 3, 16, 16]] * 2
    assert fig["infer_input_shape"] == [1, 3, 32, 32]
    assert fig["infer_images"] == 72  # the embedded demo: 4 classes x 16 labelled + 8 unlabelled images
    check_train_figures(fig, samples=2)
    assert len(table_rows(lines)) == 1


def test_an_episode_batch_is_measured_by_its_query_images():
    """Few-shot bundles (CD-TG) batch episodes: the batch size and input shape are the query images'."""
    episodes = {"query_image": torch.zeros(4, 3, 8, 8), "support_images": torch.zeros(4, 1, 3, 8, 8)}
    run = bench._Training(trainer=None, device=torch.device("cpu"), batch=episodes, unlabelled=None)
    assert run.batch_size == run.samples_per_step == 4
    assert run.shapes() == {"train_input_shape": [4, 3, 8, 8]}
    assert bench._images({"image": episodes["support_images"], "query_image": None}) is episodes["support_images"]


def test_compute_only_reuses_the_preloaded_unlabelled_batch_then_restores_the_trainer():
    class Trainer:
        def _next_unlabelled(self):
            return "from the loader"

        def _iteration(self, engine, batch):
            return batch, self._next_unlabelled()

    trainer = Trainer()
    run = bench._Training(trainer, None, {"image": "labelled"}, {"image": "preloaded"})
    with bench._compute_only(run) as step:
        assert step() == ({"image": "labelled"}, {"image": "preloaded"})
    assert trainer._next_unlabelled() == "from the loader"  # the class's method again


def test_table_cells():
    results = {"machine": {"device": "cpu", "cpu": "X", "torch_threads": 2}, "variants": {
        "full": {"batch_size": 2, "samples_per_step": 4, "amp": False, "train_compute_step_s": 0.5,
                 "train_end_to_end_step_s": 0.625, "train_samples_per_s": 6.4, "pipeline_efficiency": 0.8,
                 "infer_forward_s": 0.25, "infer_end_to_end_s_per_image": 0.3, "peak_memory_mib": 1234.6},
        "compare": {"batch_size": 2, "samples_per_step": 2, "amp": True, "train_compute_step_s": 0.5,
                    "infer_forward_s": 0.25}}}
    lines = bench.markdown_table(results).splitlines()
    assert len(lines) == 2 + 2
    # 4 samples / 0.625 s = 6.4 samples/s; 0.5 / 0.625 = 0.8; 1234.6 MiB rounds to 1235
    assert lines[2] == ("| full | CPU (X, 2 threads) | no | 2 + 2 unlabelled | 0.5 | 0.625 | 6.4 | 0.8 | 0.25 | 0.3 "
                        "| 1235 |")
    assert lines[3] == "| compare | CPU (X, 2 threads) | yes | 2 | 0.5 | – | – | – | 0.25 | – | – |"


@pytest.mark.parametrize("kwargs, error, words", [
    ({"bundle": "no_such_bundle"}, FileNotFoundError, "no_such_bundle"),
    ({"compare": {"A": {}, "B": {}, "C": {}}}, ValueError, "exactly two"),
    ({"compare": '{"A": {}'}, ValueError, "--compare is not valid JSON"),
    ({"variants": {"A": {}}, "compare": {"A": {}, "B": {}}}, ValueError, "not both"),
    ({"channels_lats": False}, ValueError, "channels_lats"),
    ({"compile": True, "warmup": 1}, ValueError, "warmup must be >= 2"),
    ({"repeats": 0}, ValueError, "repeats must be >= 1"),
])
def test_bad_arguments_are_named(kwargs, error, words):
    with pytest.raises(error, match=words):
        bench.benchmark(**kwargs)


def test_json_words_left_as_strings_by_fire_become_python_values():
    """fire turns ``--variants '{"fp32": {"amp": false}}'`` into ``{"fp32": {"amp": "false"}}``, and the string
    "false" is truthy: without the mapping the "fp32" variant ran with AMP on (seen on an H100)."""
    import fire

    parsed = fire.Fire(lambda variants=None: variants, ["--variants", '{"amp": {}, "fp32": {"amp": false}}'])
    assert parsed == {"amp": {}, "fp32": {"amp": "false"}}  # what fire hands over
    assert bench._override_sets("variants", parsed) == {"amp": {}, "fp32": {"amp": False}}
    assert bench._json_words({"a": ["true", "null", "x"]}) == {"a": [True, None, "x"]}
