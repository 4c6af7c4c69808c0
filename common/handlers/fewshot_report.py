"""Few-shot evaluation report: example-episode figures and the target x shot x model x alpha sweep.

Evaluation protocol of PATNet (Lei et al., ECCV 2022) / HSNet, as used by CD-TG ("Leveraging Language to
Generalize Natural Images to Few-shot Medical Image Segmentation"; specs/cdtg.md §3, §6): on each target domain
and shot count K, every model is scored by the accumulated per-class foreground IoU (mIoU) and the FB-IoU of
:mod:`common.metrics.fewshot`, the K-shot prediction being the vote of :func:`common.engines.episodic.vote_shots`.
For a text-guided model the text weight α of ``P = (1 - α) P_visual + α P_text`` (spec §5.4 step 5) is swept as in
the README's ablation (spec §6).

* :class:`FewShotExamples` keeps the first episodes of an :class:`~common.engines.episodic.EpisodicEvaluator` run
  (ImageNet normalisation undone) for :func:`write_episode_figure`.
* :class:`FewShotSweep` runs the evaluations and writes ``fewshot_results.csv``, ``examples_<target>_<K>shot.png``
  and, when more than one α was run, ``alpha_sweep.png``; every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.engines.episodic import EpisodicEvaluator
from common.metrics.fewshot import FewShotIoUMetric
from common.utils.figures import GT_COLOUR, PRED_COLOUR
from common.utils.files import write_csv

__all__ = [
    "FewShotExamples", "FewShotSweep", "RESULT_COLUMNS", "format_results_table", "save_figure", "write_episode_figure",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESULT_COLUMNS = ("target", "shot", "model", "alpha", "miou", "fbiou", "episodes", "seconds")
"""Leading columns of ``fewshot_results.csv``; per-class ``iou/<class name>`` columns follow."""
FIGURE_KEYS = ("support_image", "support_mask", "query_image", "label")


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` ImageNet-normalised -> ``[H, W, 3]`` float in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _mask(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() > 0.5


class FewShotExamples:
    """Keep the first ``n_examples`` episodes of an :class:`~common.engines.episodic.EpisodicEvaluator` run.

    ``self.examples`` maps ``support_image`` / ``query_image`` (``[H, W, 3]`` in [0, 1], the first support),
    ``support_mask`` / ``label`` / ``pred`` / ``ignore`` (boolean ``[H, W]``), ``class_name`` and ``query_name``
    (from the batch; the class id and the episode position when absent) to one list each, ready for
    :func:`write_episode_figure`. Reset when the evaluator starts.

    Args:
        n_examples: episodes kept.
    """

    def __init__(self, n_examples: int = 4) -> None:
        if n_examples < 1:
            raise ValueError(f"FewShotExamples: n_examples must be >= 1, got {n_examples}")
        self.n_examples = n_examples
        self.examples: dict[str, list] = {}
        self._reset(None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _reset(self, _: Engine | None) -> None:
        keys = (*FIGURE_KEYS, "pred", "ignore", "class_name", "query_name")
        self.examples = {key: [] for key in keys}

    def _collect(self, engine: Engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        if not isinstance(out, Mapping) or "support_images" not in out:
            raise ValueError("FewShotExamples: the engine output must be an EpisodicEvaluator output (a dict with "
                             "'image', 'support_images', 'support_masks', 'label', 'pred')")
        names = batch.get("class_name") if isinstance(batch, Mapping) else None
        queries = batch.get("query_name") if isinstance(batch, Mapping) else None
        for b in range(out["pred"].shape[0]):
            if len(self.examples["pred"]) >= self.n_examples:
                return
            ex = self.examples
            ex["support_image"].append(_denormalise(out["support_images"][b, 0]))
            ex["support_mask"].append(_mask(out["support_masks"][b, 0]))
            ex["query_image"].append(_denormalise(out["image"][b]))
            ex["label"].append(_mask(out["label"][b]))
            ex["pred"].append(_mask(out["pred"][b]))
            ignore = out.get("ignore")
            ex["ignore"].append(np.zeros_like(ex["label"][-1]) if ignore is None else _mask(ignore[b]))
            ex["class_name"].append(str(names[b]) if names is not None else f"class {int(out['class_id'][b])}")
            ex["query_name"].append(str(queries[b]) if queries is not None else f"episode {len(ex['pred']) - 1}")


def _blend(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], opacity: float = 0.45) -> np.ndarray:
    """``image`` with ``mask`` filled in ``colour`` (0-255 RGB) at ``opacity``."""
    out = image.copy()
    out[mask] = (1 - opacity) * out[mask] + opacity * np.asarray(colour, dtype=np.float64) / 255.0
    return out


def _episode_iou(pred: np.ndarray, label: np.ndarray, ignore: np.ndarray | None) -> float:
    """Foreground IoU of one episode in percent, ``|P ∩ G| / max(|P ∪ G|, 1)`` over the kept pixels."""
    keep = np.ones_like(label, dtype=bool) if ignore is None else ~ignore
    return 100.0 * np.count_nonzero(pred & label & keep) / max(np.count_nonzero((pred | label) & keep), 1)


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as PNG through a temporary file renamed into place (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_episode_figure(examples: Mapping[str, Sequence], path: str | os.PathLike, title: str = "") -> Path:
    """PNG grid, one row per episode: the support image with its mask (green), the query, the ground truth (green),
    then one column per prediction (red) with the episode's foreground IoU.

    Args:
        examples: lists of equal length under ``support_image``, ``query_image`` (``[H, W, 3]`` in [0, 1]),
            ``support_mask``, ``label`` (``[H, W]`` boolean), and prediction columns ``pred`` (titled
            "prediction") and/or ``pred/<model>`` (titled ``<model>``), in the order of the mapping; optional
            ``ignore`` (pixels left out of the IoU), ``class_name``, ``query_name`` (row titles).
        path: PNG file (written to a temporary name, then renamed).
        title: figure title.
    """
    missing = [k for k in FIGURE_KEYS if k not in examples]
    pred_keys = [k for k in examples if k == "pred" or k.startswith("pred/")]
    if missing or not pred_keys:
        raise ValueError(f"write_episode_figure({path}): examples lack {missing or 'a pred / pred/<model> column'}; "
                         f"got keys {sorted(examples)}")
    lengths = {k: len(v) for k, v in examples.items()}
    n = lengths["query_image"]
    if n < 1 or any(length != n for length in lengths.values()):
        raise ValueError(f"write_episode_figure({path}): need >= 1 example and lists of equal length, got {lengths}")
    columns = ["support", "query", "ground truth", *(k[5:] if k.startswith("pred/") else "prediction"
                                                    for k in pred_keys)]
    figure = Figure(figsize=(2.2 * len(columns), 2.5 * n + 0.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(n, len(columns), squeeze=False)
    for i in range(n):
        query, label = examples["query_image"][i], np.asarray(examples["label"][i], dtype=bool)
        ignore = np.asarray(examples["ignore"][i], dtype=bool) if "ignore" in examples else None
        cells = [_blend(examples["support_image"][i], np.asarray(examples["support_mask"][i], dtype=bool), GT_COLOUR),
                 query, _blend(query, label, GT_COLOUR)]
        titles = [f"support: {examples['class_name'][i]}" if "class_name" in examples else "support",
                  f"query: {examples['query_name'][i]}" if "query_name" in examples else "query", "ground truth"]
        for key, name in zip(pred_keys, columns[3:]):
            pred = np.asarray(examples[key][i], dtype=bool)
            cells.append(_blend(query, pred, PRED_COLOUR))
            titles.append(f"{name}\nIoU {_episode_iou(pred, label, ignore):.1f}")
        for ax, cell, cell_title in zip(axes[i], cells, titles):
            ax.imshow(cell, interpolation="nearest")
            ax.set_title(cell_title, fontsize="small")
            ax.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def _n_classes(dataset: Dataset) -> int:
    """Episode classes of ``dataset``: ``len(dataset.class_names)``, else ``1 + max class_id`` of
    ``dataset.episodes``, else of every item (reads the whole dataset once)."""
    names = getattr(dataset, "class_names", None)
    if names is not None:
        return len(names)
    episodes = getattr(dataset, "episodes", None)
    if episodes is not None:
        return 1 + max(int(e.class_id) for e in episodes)
    logger.info("%s has neither class_names nor episodes: reading every episode once to count the classes",
                type(dataset).__name__)
    return 1 + max(int(dataset[i]["class_id"]) for i in range(len(dataset)))  # type: ignore[arg-type]


def format_results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table of the :data:`RESULT_COLUMNS` of ``rows``, aligned, scores to 2 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(r[c]) for c in RESULT_COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(RESULT_COLUMNS)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(RESULT_COLUMNS), line(["-" * w for w in widths]), *map(line, cells)])


class FewShotSweep:
    """Evaluate every network on every target and shot count (and every α of a text-guided network).

    For each target and shot it builds the episode dataset ``targets[name](shot)`` (contract §1 items) and a
    ``DataLoader`` (no shuffling), then runs one :class:`~common.engines.episodic.EpisodicEvaluator` per network —
    per α in ``alphas`` for a network with a ``text_guide`` (its ``text_guide.alpha`` is set before the run and
    restored at the end of the sweep; with no ``alphas`` its current α is used). :meth:`run` writes into
    ``output_dir``:

    * ``fewshot_results.csv`` — one row per run: :data:`RESULT_COLUMNS` (``alpha`` empty for a network without
      text guide; ``miou``, ``fbiou`` in percent; ``seconds`` of evaluation) and ``iou/<class name>`` (the
      accumulated foreground IoU of each class seen, in percent);
    * ``examples_<target>_<K>shot.png`` — the first ``n_examples`` episodes, one prediction column per run;
    * ``alpha_sweep.png`` — mIoU against α per target, shot and text-guided network (the networks without text
      as dashed lines), when more than one α was run.

    The results table is printed and logged.

    Args:
        targets: target name -> ``shot -> Dataset`` of episodes; the names appear in file names.
        shots: shot counts K.
        networks: model name -> network (contract §2 call signature).
        alphas: text weights to sweep, each in [0, 1].
        device: torch device of the evaluations.
        output_dir: folder of the outputs (created).
        batch_size, num_workers: of the data loaders.
        amp: CUDA autocast for the forward passes.
        n_examples: episodes shown per figure.
        finetune_steps: test-time fine-tuning steps of every network per batch of episodes (0: off; see
            :class:`~common.engines.episodic.EpisodicEvaluator`).
    """

    def __init__(self, targets: Mapping[str, Callable[[int], Dataset]], shots: Sequence[int],
                 networks: Mapping[str, nn.Module], alphas: Sequence[float] = (), device: str | torch.device = "cpu",
                 output_dir: str | os.PathLike = ".", batch_size: int = 1, num_workers: int = 0, amp: bool = False,
                 n_examples: int = 4, finetune_steps: int = 0) -> None:
        if not targets or not networks or not shots:
            raise ValueError(f"FewShotSweep: targets, networks and shots must not be empty (got {len(targets)} "
                             f"targets, {len(networks)} networks, shots {list(shots)})")
        bad_names = [t for t in targets if not t or "/" in t or "\\" in t or t in (".", "..")]
        if bad_names:
            raise ValueError(f"FewShotSweep: target names {bad_names} cannot be part of a file name")
        if any(int(k) != k or k < 1 for k in shots):
            raise ValueError(f"FewShotSweep: shots must be positive integers, got {list(shots)}")
        if any(not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"FewShotSweep: alphas (text weights) must lie in [0, 1], got {list(alphas)}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"FewShotSweep: batch_size must be >= 1 and num_workers >= 0, got {batch_size}, "
                             f"{num_workers}")
        self.targets, self.shots, self.networks = dict(targets), [int(k) for k in shots], dict(networks)
        self.alphas = [float(a) for a in alphas]
        self.device = torch.device(device)
        self.output_dir = Path(output_dir)
        self.batch_size, self.num_workers, self.amp, self.n_examples = batch_size, num_workers, amp, n_examples
        self.finetune_steps = finetune_steps
        self.rows: list[dict[str, Any]] = []

    def _runs(self) -> Iterator[tuple[str, nn.Module, float | None]]:
        """``(model name, network, α or None)`` of every evaluation of one target and shot."""
        for name, network in self.networks.items():
            guide = getattr(network, "text_guide", None)
            if guide is None:
                yield name, network, None
            else:
                for alpha in self.alphas or [float(guide.alpha)]:
                    yield name, network, alpha

    def _evaluate(self, loader: DataLoader, n_classes: int, network: nn.Module, alpha: float | None
                  ) -> tuple[dict[str, Any], dict[str, list]]:
        """One evaluator run: its row (without target / shot / model) and its examples."""
        if alpha is not None:
            network.text_guide.alpha = alpha
        miou, fbiou = FewShotIoUMetric(n_classes, "miou"), FewShotIoUMetric(n_classes, "fbiou")
        examples = FewShotExamples(self.n_examples)
        evaluator = EpisodicEvaluator(self.device, loader, network, finetune_steps=self.finetune_steps,
                                      key_val_metric={"miou": miou}, additional_metrics={"fbiou": fbiou},
                                      val_handlers=[examples], amp=self.amp)
        class_names: dict[int, str] = {}

        def record_names(engine: Engine) -> None:
            names = engine.state.batch.get("class_name")
            if names is not None:
                class_names.update(zip(engine.state.output["class_id"].tolist(), map(str, names)))

        evaluator.add_event_handler(Events.ITERATION_COMPLETED, record_names)
        start = time.perf_counter()
        evaluator.run()
        seconds = time.perf_counter() - start
        accumulated = miou.accumulated()
        row: dict[str, Any] = {
            "alpha": "" if alpha is None else alpha, "miou": evaluator.state.metrics["miou"],
            "fbiou": evaluator.state.metrics["fbiou"], "episodes": int(accumulated.episodes.sum()),
            "seconds": seconds,
        }
        for c, iou in accumulated.per_class_iou().items():
            row[f"iou/{class_names.get(c, str(c))}"] = 100.0 * iou
        return row, examples.examples

    def run(self) -> list[dict[str, Any]]:
        """Run the sweep (class docstring); returns the rows, also kept in ``self.rows``."""
        guides = {name: net.text_guide for name, net in self.networks.items()
                  if getattr(net, "text_guide", None) is not None}
        original = {name: guide.alpha for name, guide in guides.items()}
        self.rows = []
        try:
            for target, build in self.targets.items():
                for shot in self.shots:
                    self._run_target(target, build, shot)
        finally:
            for name, guide in guides.items():
                guide.alpha = original[name]
        columns = [*RESULT_COLUMNS, *dict.fromkeys(k for r in self.rows for k in r if k.startswith("iou/"))]
        write_csv(self.output_dir / "fewshot_results.csv", columns, self.rows)
        table = format_results_table(self.rows)
        print(table)
        logger.info("few-shot results (mIoU / FB-IoU in %%, specs/cdtg.md §3):\n%s", table)
        if len({r["alpha"] for r in self.rows if r["alpha"] != ""}) > 1:
            self._plot_alphas(self.output_dir / "alpha_sweep.png")
        return self.rows

    def _run_target(self, target: str, build: Callable[[int], Dataset], shot: int) -> None:
        dataset = build(shot)
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"FewShotSweep: target {target!r} gave an empty {shot}-shot episode dataset")
        n_classes = _n_classes(dataset)
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        figure: dict[str, list] = {}
        for model, network, alpha in self._runs():
            label = model if alpha is None else f"{model} α={alpha:g}"
            logger.info("evaluating %s on %s, %d-shot (%d episodes)", label, target, shot, len(dataset))
            row, examples = self._evaluate(loader, n_classes, network, alpha)
            self.rows.append({"target": target, "shot": shot, "model": model, **row})
            if not figure:
                figure = {k: v for k, v in examples.items() if k != "pred"}
            elif examples["query_name"] != figure["query_name"]:
                logger.warning("%s %d-shot: %s saw other episodes than the first model (a random episode dataset?); "
                               "the example figure shows the first model's episodes", target, shot, label)
            figure[f"pred/{label}"] = examples["pred"]
        write_episode_figure(figure, self.output_dir / f"examples_{target}_{shot}shot.png",
                             f"{target}, {shot}-shot")

    def _plot_alphas(self, path: Path) -> Path:
        figure = Figure(figsize=(6.4, 4.2))
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        groups: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
        for r in self.rows:
            groups.setdefault((r["target"], r["shot"], r["model"]), []).append((r["alpha"], r["miou"]))
        for i, ((target, shot, model), points) in enumerate(groups.items()):
            name, colour = f"{target} {shot}-shot {model}", f"C{i % 10}"
            if points[0][0] == "":
                ax.axhline(points[0][1], linestyle="--", linewidth=1, color=colour, label=f"{name} (no text)")
            else:
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=name)
        ax.set_xlabel("α (text weight)")
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        figure.tight_layout()
        return save_figure(figure, path)
