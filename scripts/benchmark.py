"""Speed and memory of a bundle: train step, samples/s, inference latency, peak memory (medians over repeats).

Usage::

    python scripts/benchmark.py --bundle endoked_polyp_segmentation                      # CPU, or GPU if present
    python scripts/benchmark.py --bundle endoked_polyp_segmentation --batch_size 8 --repeats 10 --out bench/x.json
    python scripts/benchmark.py --bundle endoked_polyp_segmentation \\
        --variants '{"channels_last": {}, "contiguous": {"channels_last": false}}'     # ratios between variants
    python scripts/benchmark.py --bundle sparsam_dino_classification --prepare evaluate.json

What is measured (each a median over ``repeats`` after ``warmup`` untimed runs):

* ``train_step_s``: one call of the bundle's own trainer iteration (``train#trainer._iteration``) on a batch from
  its own data loader: for Polyp-PVT that is the three-scale step (three forward/backward/optimiser steps);
  ``train_samples_per_s`` = batch size / ``train_step_s``;
* ``infer_forward_s``: the inference network (``inference.json`` ``network_def``, eval mode, no grad, AMP on GPU)
  on one image of the bundle's inference data as its preprocessing gives it: latency per image;
* ``infer_end_to_end_s_per_image``: the whole inference workflow (load, preprocess, forward, invert, save) over
  the bundle's default inference data, divided by the number of images;
* ``peak_memory_mib``: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident set size
  (``ru_maxrss``) of the fresh process that measures the variant (everything it held: Python, libraries, data).

With several ``variants`` (override sets), every figure is also given as a ratio to the first variant.
Results are written as JSON (default ``bench/<bundle>_<device>.json``) and printed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import fire
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int, sync: bool) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _workflow(bundle: Path, config: list[str], kind: str, root: Path, override: dict) -> Any:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(bundle / "configs" / c) for c in config],
                        meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                        workflow_type=kind, bundle_root=str(root), **override)
    wf.initialize()
    return wf


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _config_ids(bundle: Path, config: str) -> set[str]:
    return set(json.loads((bundle / "configs" / config).read_text()))


def _first_tensor(images: Any) -> torch.Tensor:
    """The batch tensor, or the first view of a multi-view batch (a list of tensors, e.g. DINO's crops)."""
    return images[0] if isinstance(images, (list, tuple)) else images


def measure(bundle: Path, override: dict, repeats: int, warmup: int, workdir: Path,
            prepare: str | None = None) -> dict[str, Any]:
    """Every figure of the module docstring for one set of overrides."""
    wf = _workflow(bundle, ["train.json"], "train", workdir, override)
    trainer = wf.parser.get_parsed_content("train#trainer")
    device = trainer.state.device
    sync = device.type == "cuda"
    if sync:
        torch.cuda.reset_peak_memory_stats(device)
    batch = next(iter(wf.parser.get_parsed_content("train#dataloader")))
    images = batch["image"]
    batch_size = int(_first_tensor(images).shape[0])
    step, step_raw = _median_time(lambda: trainer._iteration(trainer, batch), repeats, warmup, sync)
    train_peak = _peak_memory_mib(device)

    ids = _config_ids(bundle, "inference.json")
    infer_override = {k: v for k, v in override.items() if k in ids and k != "batch_size"}
    iwf = _workflow(bundle, ["inference.json"], "inference", workdir, {"load_pretrain": False, **infer_override})
    net = iwf.parser.get_parsed_content("network").eval()
    if prepare:  # e.g. the evaluation that fits, on this network's features, the classifier inference applies
        (workdir / "models").mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), workdir / "models" / "model.pt")  # the random-init weights, as training saves
        ids = _config_ids(bundle, prepare)
        _workflow(bundle, [prepare], "infer", workdir, {k: v for k, v in override.items() if k in ids}).run()
    # one preprocessed image of the bundle's own inference data, at the size its preprocessing gives
    x = _first_tensor(next(iter(iwf.parser.get_parsed_content("dataloader")))["image"])[:1].to(device)
    amp = torch.autocast("cuda", enabled=sync)

    def forward() -> None:
        with torch.no_grad(), amp:
            net(x)

    if sync:
        torch.cuda.reset_peak_memory_stats(device)
    fwd, fwd_raw = _median_time(forward, repeats, warmup, sync)
    n_images = len(iwf.parser.get_parsed_content("datalist"))
    end_to_end, _ = _median_time(lambda: iwf.run(), max(1, repeats // 2), 1, sync)
    return {
        "batch_size": batch_size,
        "train_input_shape": [list(v.shape) for v in images] if isinstance(images, (list, tuple))
        else list(images.shape),
        "train_step_s": step,
        "train_samples_per_s": batch_size / step,
        "infer_input_shape": list(x.shape),
        "infer_forward_s": fwd,
        "infer_end_to_end_s_per_image": end_to_end / n_images,
        "infer_images": n_images,
        "peak_memory_mib": max(train_peak, _peak_memory_mib(device)),
        "raw_train_step_s": step_raw,
        "raw_infer_forward_s": fwd_raw,
    }


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def benchmark(bundle: str = "endoked_polyp_segmentation", batch_size: int | None = None, repeats: int = 5,
              warmup: int = 1, variants: dict | str | None = None, out: str | None = None,
              prepare: str | None = None, **override: Any) -> None:
    """Benchmark one bundle; see the module docstring.

    Args:
        bundle: bundle folder name under ``bundles/``.
        batch_size: training batch size (default: 2 on CPU, the bundle's own on GPU).
        repeats: timed repetitions (medians are reported).
        warmup: untimed repetitions before timing.
        variants: ``{name: {id: value}}`` override sets to compare (JSON string or dict); ratios are to the first.
        out: JSON file to write (default ``bench/<bundle>_<cpu|cuda>.json``).
        prepare: a config of the bundle run (untimed) before inference, when inference needs its output (Sparsam:
            ``evaluate.json`` fits the classifier that inference applies); it reads the inference network's
            randomly initialised weights from ``models/model.pt`` of the temporary bundle root.
        override: extra top-level ids applied to every variant (e.g. ``--backbone pvt_v2_b0``).
    """
    warnings.filterwarnings("ignore")
    folder = REPO_ROOT / "bundles" / bundle
    if not (folder / "configs" / "train.json").is_file():
        raise SystemExit(f"no bundle {bundle!r} under {REPO_ROOT / 'bundles'}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(variants, str):
        variants = json.loads(variants)
    variants = variants or {"default": {}}
    common = {"num_workers": 0, "progress_bar": False, **override}
    if batch_size is not None or device == "cpu":
        common["batch_size"] = batch_size or 2
    results: dict[str, Any] = {"bundle": bundle, "machine": machine(device), "repeats": repeats, "warmup": warmup,
                               "overrides": common, "variants": {}}
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            print(f"[{bundle}] measuring {name} ...", file=sys.stderr, flush=True)
            # a fresh process per variant: its peak memory is its own, and no variant warms the next one's caches
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                job = pool.submit(measure, folder, {**common, **extra}, repeats, warmup, Path(tmp) / name, prepare)
                results["variants"][name] = job.result()
    base = next(iter(results["variants"].values()))
    for figures in results["variants"].values():
        figures["ratio_to_first"] = {k: figures[k] / base[k] for k in
                                     ("train_step_s", "infer_forward_s", "infer_end_to_end_s_per_image",
                                      "peak_memory_mib") if base[k]}
    path = Path(out) if out else REPO_ROOT / "bench" / f"{bundle}_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    summary = {name: {k: round(v, 4) for k, v in fig.items() if isinstance(v, float)}
               for name, fig in results["variants"].items()}
    print(json.dumps({"machine": results["machine"], "results": summary, "written": str(path)}, indent=2))


if __name__ == "__main__":
    fire.Fire(benchmark)
