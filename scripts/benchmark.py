"""Speed and memory of a bundle: compute-only and end-to-end train step, pipeline efficiency, samples/s, inference
latency, peak memory (medians over repeats), as JSON and as a Markdown table for the model card.

Usage::

    python scripts/benchmark.py --bundle endoked_polyp_segmentation                      # CPU, or GPU if present
    python scripts/benchmark.py --bundle endoked_polyp_segmentation --batch_size 8 --repeats 10 --out bench/x.json
    python scripts/benchmark.py --bundle endoked_polyp_segmentation \\
        --variants '{"amp": {}, "fp32": {"amp": false}}'        # each variant in a fresh process; ratios to the first
    python scripts/benchmark.py --bundle endoked_polyp_segmentation \\
        --compare '{"fp32": {"amp": false}, "amp": {}}'         # both in one process, timed steps alternating
    python scripts/benchmark.py --bundle sparsam_dino_classification --prepare evaluate.json

What is measured (each a median over ``repeats`` timed runs after ``warmup`` untimed ones; on CUDA every timed
region is bracketed by ``torch.cuda.synchronize``):

* ``train_compute_step_s``: one call of the bundle's own trainer iteration (``train#trainer._iteration``) on a
  batch of its own train loader that is already on the device (nested dicts and lists of views moved as they are).
  A co-training trainer (DHC), which draws an unlabelled batch inside the iteration, reuses one unlabelled batch
  pre-loaded to the device instead. For Polyp-PVT one iteration is the three-scale step (three
  forward/backward/optimiser steps);
* ``train_end_to_end_step_s``: fetching the next batch from the train loader (restarted when exhausted; DHC also
  draws from its unlabelled loader) plus the iteration, over consecutive steps: what training sees;
* ``pipeline_efficiency`` = ``train_compute_step_s / train_end_to_end_step_s`` (at most 1 up to noise; below 1
  the input pipeline makes the device wait);
* ``samples_per_step``: the batch, plus the unlabelled batch for co-training; ``train_samples_per_s`` =
  ``samples_per_step / train_end_to_end_step_s`` and ``train_compute_samples_per_s`` = ``samples_per_step /
  train_compute_step_s``;
* ``infer_forward_s``: the bundle's inferer (``inference.json``; DHC: its sliding windows) with the inference
  network in eval mode, without gradients, on one image of the bundle's inference data as its preprocessing gives
  it; under ``torch.autocast`` only when the ``amp`` id is on (bundle default: on CUDA), so ``amp=False`` is fp32;
* ``infer_end_to_end_s_per_image``: the whole inference workflow (load, preprocess, forward, invert, save) over the
  bundle's default inference data, divided by the number of images (``max(1, repeats // 2)`` runs after 1 warm-up);
* ``peak_memory_mib``: on CUDA the largest ``torch.cuda.max_memory_allocated`` of the four parts above, its
  statistics reset before each part (``peak_memory_mib_by_part`` gives each); on CPU the peak resident set size
  (``ru_maxrss``) of the fresh process that measures the variant (everything it held: Python, libraries, data).

``variants`` (``{name: {id: value}}``) measures each override set in a fresh process, and gives every figure also
as a ratio to the first variant. ``compare`` (exactly two sets ``A``, ``B``) builds both in one process and times
their steps in alternation, ``A, B, A, B, ...``, so that slow drifts of a shared machine hit both alike: the
compute-only train step, then the inference forward; it reports both medians and the ratio of medians ``B / A``.
Compare mode has no peak memory (both variants share one process and one allocator, so their peaks cannot be told
apart) and no end-to-end figures; ``prepare`` is not needed there.

Overrides are top-level ids of ``train.json``, ``inference.json`` or the ``prepare`` config, applied as the bundle
defines them (``amp``, ``channels_last``, ``compile``, sizes, ...). ``num_workers`` is the bundle's own unless
given (``--num_workers 0`` loads in the main process). With ``compile`` on, the first calls compile, and each new
input shape (Polyp-PVT's three scales, DINO's global and local views) recompiles once more, so warm-up must be at
least 2 (default 3 when any variant compiles); the benchmark then also compiles the inference network
(``nn.Module.compile()``) unless ``inference.json`` has its own ``compile`` id.

Results are written as JSON (default ``bench/<bundle>_<device>.json``, with every raw time); a summary and a
Markdown table (one row per variant) are printed.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fire
import torch

__all__ = ["measure", "measure_compare", "markdown_table", "machine", "benchmark"]

REPO_ROOT = Path(__file__).resolve().parents[1]
RATIO_KEYS = ("train_compute_step_s", "train_end_to_end_step_s", "pipeline_efficiency", "infer_forward_s",
              "infer_end_to_end_s_per_image", "peak_memory_mib")
COMPILE_MIN_WARMUP = 2

logger = logging.getLogger("benchmark")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """``(start, seconds)`` of one call, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return start, time.perf_counter() - start


def _timed(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    return [_time_once(fn, device)[1] for _ in range(repeats)]


def _interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int,
                 device: torch.device) -> dict[str, tuple[list[float], list[float]]]:
    """``{name: (start times, seconds)}`` of ``repeats`` rounds, each calling every ``fn`` once, in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, seconds = _time_once(fn, device)
            times[name][0].append(start)
            times[name][1].append(seconds)
    return times


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _release(device: torch.device) -> None:
    """Free what the dropped workflows held (reference cycles), so the next part's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _workflow(bundle: Path, config: list[str], kind: str, root: Path, override: dict) -> Any:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(bundle / "configs" / c) for c in config],
                        meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                        workflow_type=kind, bundle_root=str(root), **override)
    wf.initialize()
    return wf


def _config_ids(bundle: Path, config: str) -> set[str]:
    path = bundle / "configs" / config
    if not path.is_file():
        raise FileNotFoundError(f"benchmark: config {config!r} not found ({path})")
    return set(json.loads(path.read_text()))


def _to_device(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor moved to ``device``, through nested dicts, lists and tuples."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {key: _to_device(value, device) for key, value in data.items()}
    if isinstance(data, list):
        return [_to_device(value, device) for value in data]
    if isinstance(data, tuple):
        return tuple(_to_device(value, device) for value in data)
    return data


def _first_tensor(images: Any) -> torch.Tensor:
    """The batch tensor, or the first view of a multi-view batch (a list of tensors, e.g. DINO's crops)."""
    return images[0] if isinstance(images, (list, tuple)) else images


def _shape(images: Any) -> list:
    """``[B, C, *spatial]``, or one such list per view of a multi-view batch."""
    return [list(v.shape) for v in images] if isinstance(images, (list, tuple)) else list(images.shape)


def _images(batch: Mapping) -> Any:
    """The input images of a batch: ``image``, or an episode batch's ``query_image`` (few-shot bundles)."""
    return batch["image"] if "image" in batch else batch["query_image"]


@dataclass
class _Training:
    """A bundle's trainer, with its first train batch (and, for co-training, unlabelled batch) on the device."""

    trainer: Any
    device: torch.device
    batch: Any
    unlabelled: Any | None

    @property
    def batch_size(self) -> int:
        return int(_first_tensor(_images(self.batch)).shape[0])

    @property
    def samples_per_step(self) -> int:
        extra = 0 if self.unlabelled is None else int(self.unlabelled["image"].shape[0])
        return self.batch_size + extra

    def shapes(self) -> dict[str, Any]:
        shapes = {"train_input_shape": _shape(_images(self.batch))}
        if self.unlabelled is not None:
            shapes["unlabelled_input_shape"] = _shape(self.unlabelled["image"])
        return shapes


def _training(bundle: Path, override: dict, root: Path) -> _Training:
    wf = _workflow(bundle, ["train.json"], "train", root, override)
    trainer = wf.parser.get_parsed_content("train#trainer")
    # the first iteration of the first epoch: engines index their schedules with epoch - 1 and iteration - 1
    trainer.state.epoch = max(trainer.state.epoch, 1)
    trainer.state.iteration = max(trainer.state.iteration, 1)
    # MONAI's Trainer.run creates the AMP grad scaler; the steps here call _iteration directly, and without a
    # scaler every MONAI-style iteration (ours too) silently runs in fp32
    trainer.scaler = torch.amp.GradScaler("cuda") if trainer.amp else None
    device = torch.device(trainer.state.device)
    batch = _to_device(next(iter(trainer.data_loader)), device)
    unlabelled = None
    if hasattr(trainer, "unlabelled_loader"):
        unlabelled = _to_device(next(iter(trainer.unlabelled_loader)), device)
    return _Training(trainer, device, batch, unlabelled)


@contextmanager
def _compute_only(run: _Training) -> Iterator[Callable[[], Any]]:
    """The compute-only step: the iteration on the pre-loaded batch; meanwhile a co-training trainer's
    ``_next_unlabelled`` returns the pre-loaded unlabelled batch instead of drawing from its loader."""
    trainer = run.trainer
    if run.unlabelled is not None:
        trainer._next_unlabelled = lambda: run.unlabelled
    try:
        yield lambda: trainer._iteration(trainer, run.batch)
    finally:
        if run.unlabelled is not None:
            del trainer._next_unlabelled  # the class's method again


def _end_to_end_step(trainer: Any) -> Callable[[], Any]:
    """One training step as training sees it: the next batch of the train loader (a new epoch's iterator when the
    loader is exhausted), then the iteration."""
    loader = trainer.data_loader
    batches = iter(loader)

    def step() -> Any:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        return trainer._iteration(trainer, batch)

    return step


@dataclass
class _Inference:
    """The inference workflow and a forward of its inferer and network on one preprocessed image."""

    workflow: Any
    network: torch.nn.Module
    inferer: Any
    image: torch.Tensor
    amp: bool

    def forward(self) -> None:
        with torch.no_grad(), torch.autocast("cuda", enabled=self.amp):
            self.inferer(self.image, self.network)


def _inference(bundle: Path, override: dict, root: Path) -> _Inference:
    ids = _config_ids(bundle, "inference.json")
    chosen = {k: v for k, v in override.items() if k in ids and k != "batch_size"}
    iwf = _workflow(bundle, ["inference.json"], "inference", root, {"load_pretrain": False, **chosen})
    net = iwf.parser.get_parsed_content("network").eval()
    device = next(net.parameters()).device
    if override.get("compile") and "compile" not in ids:
        net.compile()  # in place: the state_dict keys stay those of the plain network
    amp = bool(iwf.parser.get_parsed_content("amp")) and device.type == "cuda"
    # one preprocessed image of the bundle's own inference data, at the size its preprocessing gives
    image = _first_tensor(next(iter(iwf.parser.get_parsed_content("dataloader")))["image"])[:1].to(device)
    return _Inference(iwf, net, iwf.parser.get_parsed_content("inferer"), image, amp)


def _train_figures(run: _Training, compute: list[float], end_to_end: list[float] | None) -> dict[str, Any]:
    step = statistics.median(compute)
    figures: dict[str, Any] = {
        "batch_size": run.batch_size, "samples_per_step": run.samples_per_step, **run.shapes(),
        "amp": bool(run.trainer.amp) and run.device.type == "cuda",
        "train_compute_step_s": step, "train_compute_samples_per_s": run.samples_per_step / step,
    }
    if end_to_end is not None:
        full = statistics.median(end_to_end)
        figures.update(train_end_to_end_step_s=full, train_samples_per_s=run.samples_per_step / full,
                       pipeline_efficiency=step / full)
    return figures


def measure(bundle: Path, override: dict, repeats: int, warmup: int, workdir: Path,
            prepare: str | None = None) -> dict[str, Any]:
    """Every figure of the module docstring for one set of overrides (run it in a fresh process)."""
    run = _training(bundle, override, workdir)
    device = run.device
    peaks = {}
    _reset_peak(device)
    with _compute_only(run) as step:
        compute = _timed(step, repeats, warmup, device)
    peaks["train_compute"] = _peak_memory_mib(device)
    _reset_peak(device)
    end_to_end = _timed(_end_to_end_step(run.trainer), repeats, warmup, device)
    peaks["train_end_to_end"] = _peak_memory_mib(device)
    figures = _train_figures(run, compute, end_to_end)
    del run
    _release(device)

    infer = _inference(bundle, override, workdir)
    if prepare:  # e.g. the evaluation that fits, on this network's features, the classifier inference applies
        (workdir / "models").mkdir(parents=True, exist_ok=True)
        torch.save(infer.network.state_dict(), workdir / "models" / "model.pt")  # random-init weights, as saved
        ids = _config_ids(bundle, prepare)
        _workflow(bundle, [prepare], "infer", workdir, {k: v for k, v in override.items() if k in ids}).run()
    _reset_peak(device)
    forward = _timed(infer.forward, repeats, warmup, device)
    peaks["infer_forward"] = _peak_memory_mib(device)
    n_images = len(infer.workflow.parser.get_parsed_content("datalist"))
    _reset_peak(device)
    whole = _timed(infer.workflow.run, max(1, repeats // 2), 1, device)
    peaks["infer_end_to_end"] = _peak_memory_mib(device)
    figures.update({
        "infer_input_shape": list(infer.image.shape),
        "infer_forward_s": statistics.median(forward),
        "infer_end_to_end_s_per_image": statistics.median(whole) / n_images,
        "infer_images": n_images,
        "peak_memory_mib": max(peaks.values()),
        "raw_train_compute_step_s": compute,
        "raw_train_end_to_end_step_s": end_to_end,
        "raw_infer_forward_s": forward,
        "raw_infer_end_to_end_s": whole,
    })
    if device.type == "cuda":
        figures["peak_memory_mib_by_part"] = peaks
    return figures


def measure_compare(bundle: Path, overrides: Mapping[str, dict], repeats: int, warmup: int,
                    workdir: Path) -> dict[str, dict[str, Any]]:
    """Both override sets of ``overrides`` built in this one process; their compute-only train steps, then their
    inference forwards, timed in alternation (module docstring). ``raw_*_start_s`` are the ``perf_counter``
    readings at which each timed call began, for checking the alternation."""
    runs = {name: _training(bundle, extra, workdir / name) for name, extra in overrides.items()}
    device = next(iter(runs.values())).device
    with ExitStack() as stack:
        steps = {name: stack.enter_context(_compute_only(run)) for name, run in runs.items()}
        train = _interleaved(steps, repeats, warmup, device)
    results = {}
    for name, run in runs.items():
        starts, seconds = train[name]
        results[name] = {**_train_figures(run, seconds, None), "raw_train_compute_step_s": seconds,
                         "raw_train_compute_step_start_s": starts}
    del runs, steps, run
    _release(device)
    infers = {name: _inference(bundle, extra, workdir / name) for name, extra in overrides.items()}
    forward = _interleaved({name: infer.forward for name, infer in infers.items()}, repeats, warmup, device)
    for name, infer in infers.items():
        starts, seconds = forward[name]
        results[name].update({"infer_input_shape": list(infer.image.shape),
                              "infer_forward_s": statistics.median(seconds), "raw_infer_forward_s": seconds,
                              "raw_infer_forward_start_s": starts})
    return results


def _cell(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """One Markdown row per variant of ``results`` (what :func:`benchmark` writes): device, AMP, batch, compute
    and end-to-end step, samples/s (end to end), pipeline efficiency, inference s/image (forward and end to end),
    peak memory; "–" where the mode has no such figure."""
    info = results["machine"]
    threads = info["torch_threads"]
    device = info.get("gpu", f"CPU ({info['cpu']}, {threads} thread{'s' if threads != 1 else ''})")
    header = ["variant", "device", "AMP", "batch", "compute step (s)", "end-to-end step (s)", "samples/s",
              "pipeline efficiency", "infer forward (s/image)", "infer end-to-end (s/image)", "peak (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, fig in results["variants"].items():
        batch = str(fig["batch_size"])
        if fig["samples_per_step"] != fig["batch_size"]:
            batch += f" + {fig['samples_per_step'] - fig['batch_size']} unlabelled"
        row = [name, device, "yes" if fig["amp"] else "no", batch, _cell(fig["train_compute_step_s"]),
               _cell(fig.get("train_end_to_end_step_s")), _cell(fig.get("train_samples_per_s"), 3),
               _cell(fig.get("pipeline_efficiency"), 3), _cell(fig["infer_forward_s"]),
               _cell(fig.get("infer_end_to_end_s_per_image")),
               "–" if "peak_memory_mib" not in fig else f"{fig['peak_memory_mib']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


_JSON_WORDS = {"true": True, "false": False, "null": None}


def _json_words(value: Any) -> Any:
    """Fire parses ``--variants '{"fp32": {"amp": false}}'`` itself and keeps JSON's bare ``false``/``true``/``null``
    as the strings ``"false"``/... (and ``"false"`` is truthy): map them back to Python values, recursively."""
    if isinstance(value, str):
        return _JSON_WORDS.get(value, value)
    if isinstance(value, dict):
        return {k: _json_words(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_json_words(v) for v in value)
    return value


def _override_sets(name: str, value: dict | str | None) -> dict[str, dict] | None:
    """``{name: {id: value}}`` from a dict (JSON words mapped back, :func:`_json_words`) or its JSON text."""
    if value is None:
        return None
    value = _json_words(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"benchmark: --{name} is not valid JSON ({err}): {value!r}") from err
    if not isinstance(value, dict) or not value or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"benchmark: --{name} must map names to override dicts, e.g. "
                         f"'{{\"A\": {{}}, \"B\": {{\"amp\": false}}}}'; got {value!r}")
    return value


def _check_ids(folder: Path, configs: list[str], sets: list[dict]) -> None:
    """Every override names a top-level id of one of ``configs`` (a misspelt id would silently change nothing)."""
    known = set().union(*(_config_ids(folder, c) for c in configs))
    unknown = sorted({key.split("#")[0] for s in sets for key in s} - known)
    if unknown:
        raise ValueError(f"benchmark: override id(s) {unknown} are not top-level ids of {configs} in {folder}")


def benchmark(bundle: str = "endoked_polyp_segmentation", batch_size: int | None = None, repeats: int = 5,
              warmup: int | None = None, variants: dict | str | None = None, compare: dict | str | None = None,
              out: str | None = None, prepare: str | None = None, **override: Any) -> None:
    """Benchmark one bundle; see the module docstring.

    Args:
        bundle: bundle folder name under ``bundles/``.
        batch_size: training batch size (default: 2 on CPU, the bundle's own on GPU).
        repeats: timed repetitions (medians are reported).
        warmup: untimed repetitions before timing (default 1, or 3 when ``compile`` is on; at least 2 then).
        variants: ``{name: {id: value}}`` override sets, each measured in a fresh process (JSON string or dict);
            ratios are to the first.
        compare: exactly two override sets ``{A: {...}, B: {...}}`` measured in one process in alternation; ratios
            are ``B / A``. Not together with ``variants``.
        out: JSON file to write (default ``bench/<bundle>_<cpu|cuda>.json``).
        prepare: a config of the bundle run (untimed) before inference, when inference needs its output (Sparsam:
            ``evaluate.json`` fits the classifier that inference applies); it reads the inference network's
            randomly initialised weights from ``models/model.pt`` of the temporary bundle root. Unused by
            ``compare``.
        override: extra top-level ids applied to every variant (e.g. ``--backbone pvt_v2_b0``, ``--amp False``).

    Raises:
        FileNotFoundError: no such bundle, or no ``prepare`` config in it.
        ValueError: bad ``variants``/``compare``, an unknown override id, ``repeats < 1``, or a warm-up below 2
            with ``compile``.
    """
    folder = REPO_ROOT / "bundles" / bundle
    if not (folder / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"benchmark: no bundle {bundle!r} (no {folder / 'configs' / 'train.json'})")
    if repeats < 1:
        raise ValueError(f"benchmark: repeats must be >= 1, got {repeats}")
    variants, compare = _override_sets("variants", variants), _override_sets("compare", compare)
    if variants and compare:
        raise ValueError("benchmark: give either --variants or --compare, not both")
    if compare and len(compare) != 2:
        raise ValueError(f"benchmark: --compare takes exactly two override sets, got {len(compare)}: {list(compare)}")
    sets = compare or variants or {"default": {}}
    compiled = any(s.get("compile", override.get("compile")) for s in sets.values())
    if warmup is None:
        warmup = COMPILE_MIN_WARMUP + 1 if compiled else 1
    if compiled and warmup < COMPILE_MIN_WARMUP:
        raise ValueError(f"benchmark: with compile on, warmup must be >= {COMPILE_MIN_WARMUP} (the first calls "
                         f"compile and recompile per input shape), got {warmup}")
    if warmup < 0:
        raise ValueError(f"benchmark: warmup must be >= 0, got {warmup}")
    _check_ids(folder, ["train.json", "inference.json"] + ([prepare] if prepare else []),
               [override, *sets.values()])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"progress_bar": False, **_json_words(override)}
    if batch_size is not None or device == "cpu":
        common["batch_size"] = batch_size or 2
    results: dict[str, Any] = {"bundle": bundle, "machine": machine(device), "mode": "compare" if compare else
                               "variants", "repeats": repeats, "warmup": warmup, "overrides": common, "variants": {}}
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        # a fresh process per measurement: its peak memory is its own, and nothing warms the next one's caches
        if compare:
            logger.info("[%s] comparing %s in alternation ...", bundle, " and ".join(compare))
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                job = pool.submit(measure_compare, folder, {n: {**common, **e} for n, e in compare.items()},
                                  repeats, warmup, Path(tmp))
                results["variants"] = job.result()
            results["peak_memory"] = "not measured in compare mode: both variants share one process"
        else:
            for name, extra in sets.items():
                logger.info("[%s] measuring %s ...", bundle, name)
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    job = pool.submit(measure, folder, {**common, **extra}, repeats, warmup, Path(tmp) / name,
                                      prepare)
                    results["variants"][name] = job.result()
    base = next(iter(results["variants"].values()))
    for figures in results["variants"].values():
        figures["ratio_to_first"] = {k: figures[k] / base[k] for k in RATIO_KEYS if base.get(k) and k in figures}
    path = Path(out) if out else REPO_ROOT / "bench" / f"{bundle}_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    summary = {name: {k: round(v, 4) for k, v in fig.items() if isinstance(v, float)}
               for name, fig in results["variants"].items()}
    print(json.dumps({"machine": results["machine"], "results": summary, "written": str(path)}, indent=2))
    print(markdown_table(results))
    if compare:
        first, second = results["variants"]
        ratios = results["variants"][second]["ratio_to_first"]
        print(f"\nratio of medians {second} / {first}: compute step {ratios['train_compute_step_s']:.3f}, "
              f"infer forward {ratios['infer_forward_s']:.3f} (interleaved, {repeats} rounds)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    fire.Fire(benchmark)
