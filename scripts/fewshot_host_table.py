"""One Markdown table (and one bar chart) of several CD-TG sweeps: every host alone and with the text guide.

Each ``configs/evaluate.json`` run (``--host <name>``) writes ``fewshot_results.csv`` with the host ("Q-Net") and
the host with CD-TG ("Q-Net + CD-TG") at every α of the sweep (:class:`common.handlers.fewshot_report.FewShotSweep`).
This script joins those files into the model card's five-host table: one row per host and target, for each shot
the host's mIoU / FB-IoU, the host + CD-TG's at ``alpha``, and the text's mIoU gain (points); ``--figure`` also
draws the mIoU of both as bars, one panel per shot::

    python scripts/fewshot_host_table.py eval/patnet/fewshot/fewshot_results.csv \
        eval/qnet/fewshot/fewshot_results.csv --alpha 0.7 [--out table.md] [--figure hosts.png]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import fire
import numpy as np
from matplotlib.figure import Figure

from common.handlers.fewshot_report import save_figure
from common.networks.fewshot_hosts import display_name, host_names

__all__ = ["HostScores", "read_results", "host_scores", "host_table", "host_figure", "fewshot_host_table"]

_COLUMNS = ("target", "shot", "model", "alpha", "miou", "fbiou")


@dataclass(frozen=True)
class HostScores:
    """The scores of a set of sweeps at one α: ``scores[(model, target, shot)] = (mIoU, FB-IoU)`` in percent, the
    hosts present (registry names, registry order), the targets (order of appearance) and the shots (ascending)."""

    alpha: float
    scores: dict[tuple[str, str, int], tuple[float, float]]
    hosts: list[str]
    targets: list[str]
    shots: list[int]


def read_results(files: Sequence[str | Path]) -> list[dict[str, str]]:
    """The rows of every ``fewshot_results.csv`` in ``files`` (a missing file, or one without the sweep's columns,
    is a ValueError naming it)."""
    rows: list[dict[str, str]] = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"{path}: no such results file (written by configs/evaluate.json as fewshot_results.csv)")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{path}: not a few-shot results file, columns {missing} are missing")
            rows.extend(reader)
    return rows


def host_scores(rows: Sequence[Mapping[str, str]], alpha: float) -> HostScores:
    """The rows' scores, a host + CD-TG run taken at ``alpha`` only.

    Raises:
        ValueError: a model name that is no host's report name, or no row left at ``alpha``.
    """
    known = {display_name(h, text): (h, text) for h in host_names() for text in (False, True)}
    scores: dict[tuple[str, str, int], tuple[float, float]] = {}
    for row in rows:
        name = row["model"]
        if name not in known:
            raise ValueError(f"unknown model name {name!r}; expected one of the hosts' report names {sorted(known)}")
        if known[name][1] and not (row["alpha"] != "" and math.isclose(float(row["alpha"]), alpha, abs_tol=1e-9)):
            continue
        scores[name, row["target"], int(row["shot"])] = (float(row["miou"]), float(row["fbiou"]))
    if not scores:
        raise ValueError(f"no host results at alpha = {alpha} in the given rows")
    present = {known[name][0] for name, _, _ in scores}
    return HostScores(alpha, scores, [h for h in host_names() if h in present],
                      list(dict.fromkeys(row["target"] for row in rows)), sorted({int(row["shot"]) for row in rows}))


def host_table(result: HostScores) -> str:
    """Markdown table, one row per host and target; cells ``mIoU / FB-IoU`` (one decimal), ``Δ`` = host + CD-TG
    minus host in mIoU points, ``–`` where a run is missing."""
    header = ["host", "target"]
    for k in result.shots:
        header += [f"{k}-shot host", f"{k}-shot + CD-TG (α = {result.alpha:g})", f"{k}-shot Δ mIoU"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    cell = lambda s: "–" if s is None else f"{s[0]:.1f} / {s[1]:.1f}"  # noqa: E731
    for host in result.hosts:
        plain, guided = display_name(host), display_name(host, True)
        for target in result.targets:
            cells = [plain, target]
            for k in result.shots:
                a, b = result.scores.get((plain, target, k)), result.scores.get((guided, target, k))
                cells += [cell(a), cell(b), "–" if a is None or b is None else f"{b[0] - a[0]:+.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def host_figure(result: HostScores, path: str | Path) -> Path:
    """PNG, one panel per shot: per target, a pair of mIoU bars per host (plain, and hatched with CD-TG; a missing
    run is left out)."""
    hosts, targets = result.hosts, result.targets
    width = 0.8 / (2 * len(hosts))
    colours = [f"C{i}" for i in range(len(hosts))]
    figure = Figure(figsize=(4.0 + 1.6 * len(targets) * len(hosts) / 2, 3.4 * len(result.shots)))
    for row, k in enumerate(result.shots):
        ax = figure.add_subplot(len(result.shots), 1, row + 1)
        centres = np.arange(len(targets))
        for i, host in enumerate(hosts):
            for j, text in enumerate((False, True)):
                name = display_name(host, text)
                runs = [(c, result.scores[name, t, k][0]) for c, t in zip(centres, targets)
                        if (name, t, k) in result.scores]
                x = [c - 0.4 + (2 * i + j + 0.5) * width for c, _ in runs]
                y = [miou for _, miou in runs]
                ax.bar(x, y, width, color=colours[i], hatch="//" if text else None, edgecolor="black", linewidth=0.5,
                       label=name)
        ax.set_xticks(centres, targets)
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"{k}-shot (hatched: + CD-TG, α = {result.alpha:g})")
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return save_figure(figure, path)


def fewshot_host_table(*files: str, alpha: float = 0.7, out: str | None = None, figure: str | None = None) -> str:
    """The table of the sweeps' ``fewshot_results.csv`` files (printed by the command line), also written to
    ``out`` and drawn into ``figure`` (PNG) when given."""
    if not files:
        raise ValueError("give at least one fewshot_results.csv")
    result = host_scores(read_results(files), alpha)
    table = host_table(result)
    if out is not None:
        Path(out).write_text(table + "\n")
    if figure is not None:
        host_figure(result, figure)
    return table


if __name__ == "__main__":
    fire.Fire(fewshot_host_table)
