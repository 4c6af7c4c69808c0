"""Label colonoscopy reports as polyp / no polyp / uncertain: the exam labels of EndoKED's MIL stage.

Usage::

    python scripts/label_reports.py --reports reports.csv --output exam_labels.csv \\
        [--id_column exam_id --text_column report] [--labeller rules|llm --model_path DIR]

``--reports`` is a CSV (UTF-8 or GB18030) or ``.xlsx`` table with one report per exam; ``--output`` receives
``exam_id,label`` (0/1) for the certain reports, ``<output stem>_uncertain.csv`` receives ``exam_id,report`` for
the others (left out of training). ``--labeller rules`` (default) applies the offline keyword and negation rules,
``--labeller llm`` a local causal language model read from ``--model_path`` (never downloaded). Rules, prompt and
table checks: :py:mod:`common.data.report_labels` (specs/endoked.md §2.1).
"""

from __future__ import annotations

import logging

import fire

from common.data.report_labels import label_reports, make_report_labeller, read_report_table, write_exam_labels

__all__ = ["main"]

logger = logging.getLogger("label_reports")


def main(reports: str, output: str, id_column: str = "exam_id", text_column: str = "report",
         labeller: str = "rules", model_path: str | None = None) -> dict[str, int]:
    """Label the reports of ``reports`` and write ``output`` (module docstring); returns the counts
    ``{"positive", "negative", "uncertain"}``."""
    rows = read_report_table(reports, id_column=id_column, text_column=text_column)
    labelled = label_reports(rows, make_report_labeller(labeller, model_path=model_path))
    counts = write_exam_labels(labelled, output)
    logger.info("%d report(s) of %s labelled by %s: %d positive, %d negative, %d uncertain -> %s", len(rows),
                reports, labeller, counts["positive"], counts["negative"], counts["uncertain"], output)
    return counts


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire(main)
