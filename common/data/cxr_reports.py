"""Chest X-ray report readers and the MGCA-style sentence cleaning consumed by ASG pre-training.

ASG ("Anatomical Structure-Guided Medical Vision-Language Pre-training", Li et al., MICCAI 2024; spec
``specs/asg.md`` §2.1-§2.2) trains on report sentences cleaned the way MGCA's ``create_path_2_sent_mapping`` does:

1. ``text = impression + " " + findings`` (impression first), newlines become spaces (§2.2 step 1);
2. split into "points" on the regex ``[0-9]+\\.`` (numbered lists), then each point on ``"."`` (step 2);
3. per piece: ``"\\ufffd\\ufffd"`` (2-character mojibake) -> space, lower case, tokens = ``\\w+`` runs, drop the
   piece if it has <= 1 token, strip non-ASCII characters from each token, drop empty tokens; the sentence is the
   tokens joined by single spaces (step 3). Pieces whose tokens all vanish give no sentence (step 5 drops empty
   sentences anyway);
4. keep a report only if its kept tokens number >= :data:`MIN_REPORT_TOKENS` = 3 (step 4).

Readers (each returns :class:`Report` records with the raw FINDINGS / IMPRESSION text):

* IU X-ray / Open-i XML (``<AbstractText Label="FINDINGS">`` / ``"IMPRESSION"``; a missing or empty element is
  ""; the anonymisation token ``XXXX`` is kept as a word, as the text has it): one file
  (:func:`read_iu_xml`), a folder of XMLs, or the ``NLMCXR_reports.tgz`` archive read in memory with
  :mod:`tarfile` (:func:`read_iu_reports`);
* MIMIC-CXR free-text reports (:func:`read_mimic_report`), split into sections by
  :func:`split_report_sections` (headings in capitals followed by a colon at a line start; the last section of a
  given name wins, as in MIMIC-CXR's ``section_text``);
* R2Gen ``annotation.json`` (``{"train"|"val"|"test": [{"id", "report", ...}]}``; each ``report`` is already one
  text and is taken as the findings with an empty impression; ``val`` becomes ``"valid"``).

:func:`load_report_sentences` turns any of these sources into :class:`ReportText` records (id, split, cleaned
sentences) and :func:`corpus_statistics` summarises a corpus for the model card.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Report", "ReportText", "MIN_REPORT_TOKENS", "R2GEN_SPLITS", "read_iu_xml", "read_iu_reports",
           "split_report_sections", "read_mimic_report", "clean_report", "report_sentences",
           "load_report_sentences", "corpus_statistics"]

logger = logging.getLogger(__name__)

MIN_REPORT_TOKENS = 3
"""A report is kept only with at least this many cleaned tokens in total (§2.2 step 4)."""
R2GEN_SPLITS: dict[str, str] = {"train": "train", "val": "valid", "test": "test"}
"""R2Gen ``annotation.json`` split names -> datalist split names."""

_NUMBERED = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")
_MOJIBAKE = "\ufffd\ufffd"
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ()/&,-]*?)[ \t]*:", re.MULTILINE)
_ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")


@dataclass(frozen=True)
class Report:
    """One radiology report: its id, raw FINDINGS and IMPRESSION text ("" when absent) and the file it came from."""

    id: str
    findings: str
    impression: str
    source: str


@dataclass(frozen=True)
class ReportText:
    """A cleaned report: id, split ("train" / "valid" / "test") and its cleaned sentences (§2.2)."""

    id: str
    split: str
    sentences: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------- IU X-ray XML


def _section_text(root: ET.Element, label: str) -> str:
    """Text of the ``AbstractText`` element with ``Label=label`` ("" when missing or empty)."""
    element = root.find(f".//AbstractText[@Label='{label}']")
    return "" if element is None else "".join(element.itertext()).strip()


def _parse_iu_xml(data: bytes, report_id: str, source: str) -> Report:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise ValueError(f"{source}: corrupt XML ({err})") from err
    if root.tag != "eCitation":
        raise ValueError(f"{source}: not an Open-i / IU X-ray report (root element <{root.tag}>, expected "
                         "<eCitation>)")
    return Report(id=report_id, findings=_section_text(root, "FINDINGS"),
                  impression=_section_text(root, "IMPRESSION"), source=source)


def _id_order(report: Report) -> tuple[int, int, str]:
    """Numeric ids in numeric order (2 before 10), then the others alphabetically."""
    return (0, int(report.id), "") if report.id.isdigit() else (1, 0, report.id)


def _unique_sorted(reports: list[Report], path: Path) -> list[Report]:
    """The reports sorted by id; ValueError naming both files when an id occurs twice."""
    seen: dict[str, str] = {}
    for report in reports:
        if report.id in seen:
            raise ValueError(f"{path}: report id {report.id!r} occurs twice ({seen[report.id]} and {report.source})")
        seen[report.id] = report.source
    return sorted(reports, key=_id_order)


def read_iu_xml(path: str | Path) -> Report:
    """One Open-i / IU X-ray report XML; the id is the file stem (``1.xml`` -> ``"1"``, the R2Gen id)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IU X-ray report {path} not found")
    return _parse_iu_xml(path.read_bytes(), path.stem, str(path))


def _read_iu_archive(path: Path) -> list[Report]:
    reports = []
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                stream = archive.extractfile(member)
                reports.append(_parse_iu_xml(stream.read(), Path(member.name).stem, f"{path}::{member.name}"))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"{path}: unreadable report archive ({err})") from err
    return reports


def read_iu_reports(path: str | Path) -> list[Report]:
    """All reports of a folder of IU X-ray XMLs (searched recursively) or of the ``NLMCXR_reports.tgz`` archive
    (read in memory, nothing extracted), sorted by id."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IU X-ray reports {path} not found (a folder of XMLs or NLMCXR_reports.tgz)")
    if path.is_dir():
        reports = [read_iu_xml(p) for p in path.rglob("*.xml")]
    elif path.name.endswith(_ARCHIVE_SUFFIXES):
        reports = _read_iu_archive(path)
    else:
        raise ValueError(f"{path}: expected a folder of IU X-ray XMLs or a .tgz/.tar.gz/.tar archive of them")
    if not reports:
        raise ValueError(f"{path}: no report XML found")
    return _unique_sorted(reports, path)


# -------------------------------------------------------------------------------------------------------- MIMIC-CXR


def split_report_sections(text: str) -> dict[str, str]:
    """Sections of a free-text report: ``{heading in lower case: text}``.

    A heading is a run of capitals (and spaces, ``()/&,-``) at the start of a line followed by a colon
    (``"FINDINGS:"``, ``" IMPRESSION:"``); its section runs to the next heading. Text before the first heading is
    ignored; when a heading occurs twice, the last section wins.
    """
    matches = list(_HEADING.finditer(text))
    sections: dict[str, str] = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = len(text) if following is None else following.start()
        sections[" ".join(match.group(1).split()).lower()] = text[match.end():end].strip()
    return sections


def read_mimic_report(path: str | Path) -> Report:
    """A MIMIC-CXR free-text report (``s<study>.txt``): FINDINGS and IMPRESSION sections (§2.2 step 1); the id is the
    file stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-CXR report {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text report ({err})") from err
    sections = split_report_sections(text)
    return Report(id=path.stem, findings=sections.get("findings", ""), impression=sections.get("impression", ""),
                  source=str(path))


# --------------------------------------------------------------------------------------------------------- cleaning


def _clean_piece(piece: str) -> str | None:
    """§2.2 step 3 for one piece: the cleaned sentence, or None when the piece has <= 1 token."""
    tokens = _WORD.findall(piece.replace(_MOJIBAKE, " ").lower())
    if len(tokens) <= 1:
        return None
    ascii_tokens = (t.encode("ascii", "ignore").decode("ascii") for t in tokens)
    return " ".join(t for t in ascii_tokens if t)


def clean_report(text: str) -> list[str]:
    """Cleaned sentences of a report text (§2.2 steps 2-3): split on ``[0-9]+\\.`` then on ``"."``; each piece
    ``\\ufffd\\ufffd`` -> space, lower case, ``\\w+`` tokens, dropped with <= 1 token, non-ASCII characters stripped
    from tokens, empty tokens dropped, tokens joined by single spaces (pieces left empty give no sentence)."""
    pieces = (piece for point in _NUMBERED.split(text.replace("\n", " ")) for piece in point.split("."))
    return [s for s in map(_clean_piece, pieces) if s]


def report_sentences(report: Report) -> list[str]:
    """``clean_report(impression + " " + findings)``; ValueError naming the report when both sections are empty."""
    if not report.findings.strip() and not report.impression.strip():
        raise ValueError(f"report {report.id!r} ({report.source}) has neither findings nor impression")
    return clean_report(f"{report.impression} {report.findings}")


# ----------------------------------------------------------------------------------------------------- corpus level


def _read_r2gen(path: Path) -> list[tuple[Report, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupt annotation JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected an R2Gen annotation object with splits {sorted(R2GEN_SPLITS)}")
    unknown = sorted(set(data) - set(R2GEN_SPLITS))
    if unknown:
        raise ValueError(f"{path}: unknown split(s) {unknown}; expected {sorted(R2GEN_SPLITS)}")
    out = []
    for split, entries in data.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: split {split!r} is not a list of entries")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), (str, int))
                    and isinstance(entry.get("report"), str)):
                raise ValueError(f"{path}: entry {i} of split {split!r} needs an 'id' and a 'report' string")
            report = Report(id=str(entry["id"]), findings=entry["report"], impression="", source=str(path))
            out.append((report, R2GEN_SPLITS[split]))
    return out


def _report_texts(reports: Iterable[tuple[Report, str]], path: Path) -> list[ReportText]:
    """Clean each report; drop (and count in the log) reports without text or with < MIN_REPORT_TOKENS tokens."""
    kept: list[ReportText] = []
    seen: set[str] = set()
    no_text = short = 0
    for report, split in reports:
        if report.id in seen:
            raise ValueError(f"{path}: report id {report.id!r} occurs twice")
        seen.add(report.id)
        if not report.findings.strip() and not report.impression.strip():
            no_text += 1
            continue
        sentences = report_sentences(report)
        if sum(len(s.split()) for s in sentences) < MIN_REPORT_TOKENS:
            short += 1
            continue
        kept.append(ReportText(id=report.id, split=split, sentences=tuple(sentences)))
    logger.info("%s: %d reports kept; dropped %d without findings/impression and %d with < %d tokens",
                path, len(kept), no_text, short, MIN_REPORT_TOKENS)
    if not kept:
        raise ValueError(f"{path}: no report left after cleaning ({no_text} without text, {short} too short)")
    return kept


def load_report_sentences(path: str | Path) -> list[ReportText]:
    """Cleaned reports of an R2Gen ``annotation.json`` (splits train/val/test -> "train"/"valid"/"test"), of the
    ``NLMCXR_reports.tgz`` archive or of a folder of IU X-ray XMLs (both split "train"). Reports without text or
    with fewer than :data:`MIN_REPORT_TOKENS` cleaned tokens are dropped (the counts are logged)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"report source {path} not found (annotation.json, NLMCXR_reports.tgz or a folder)")
    if path.is_file() and path.suffix == ".json":
        return _report_texts(_read_r2gen(path), path)
    return _report_texts(((r, "train") for r in read_iu_reports(path)), path)


def _summary(values: Sequence[int], prefix: str) -> dict[str, float]:
    return {f"{prefix}_mean": float(np.mean(values)), f"{prefix}_median": float(statistics.median(values)),
            f"{prefix}_max": int(max(values))}


def corpus_statistics(texts: Sequence[ReportText], tokenizer: PreTrainedTokenizerBase,
                      max_length: int = 112) -> dict[str, float]:
    """Size figures of a cleaned corpus for the model card.

    Returns ``reports``; ``sentences_{mean,median,max}`` and ``words_{mean,median,max}`` per report;
    ``tokens_{mean,median,p95,max}``: word-piece tokens per report of the joined text (§2.2 step 5) including
    ``[CLS]`` and ``[SEP]``, not truncated; ``truncated_share``: fraction of reports longer than ``max_length``.
    """
    if not texts:
        raise ValueError("corpus_statistics: no report given")
    joined = [" ".join(s for s in t.sentences if s) for t in texts]
    tokens = [len(ids) for ids in tokenizer(joined, add_special_tokens=True, truncation=False)["input_ids"]]
    stats: dict[str, float] = {"reports": len(texts)}
    stats |= _summary([len(t.sentences) for t in texts], "sentences")
    stats |= _summary([len(j.split()) for j in joined], "words")
    stats |= _summary(tokens, "tokens")
    stats["tokens_p95"] = float(np.percentile(tokens, 95))
    stats["truncated_share"] = float(np.mean(np.asarray(tokens) > max_length))
    return stats
