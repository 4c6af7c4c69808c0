"""Report readers and MGCA-style cleaning of ASG (specs/asg.md §2.1-§2.2): common.data.cxr_reports."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from conftest import require_data

from common.data.cxr_reports import (MIN_REPORT_TOKENS, Report, ReportText, clean_report, corpus_statistics,
                                     load_report_sentences, read_iu_reports, read_iu_xml, read_mimic_report,
                                     report_sentences, split_report_sections)
from common.transforms.cxr_text import load_tokenizer

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><IUXRId id="{id}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough</AbstractText>
{sections}
</Abstract></Article></MedlineCitation></eCitation>"""


def iu_xml(findings: str | None, impression: str | None, report_id: str = "7") -> str:
    """An Open-i XML; a section given as None is left out, "" gives an empty element."""
    parts = [f'<AbstractText Label="{label}">{text}</AbstractText>' if text else f'<AbstractText Label="{label}"/>'
             for label, text in (("FINDINGS", findings), ("IMPRESSION", impression)) if text is not None]
    return IU_XML.format(id=report_id, sections="\n".join(parts))


def write_tgz(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------------------ cleaning


def test_clean_report_numbered_list_and_decimals():
    # [0-9]+\. splits "1." and "2." (the numbers vanish) and also the "2." of "2.5 cm": "measuring 2" loses its
    # number and "5 cm ..." starts a new piece (MGCA's quirk, kept).
    text = "1. No acute disease. 2. Nodule measuring 2.5 cm in the left apex."
    assert clean_report(text) == ["no acute disease", "nodule measuring", "5 cm in the left apex"]


def test_clean_report_drops_one_token_pieces_and_lowercases():
    # "Normal" (1 token) and "Stable" (1 token) are dropped; "Heart size" (2 tokens) is kept; newline -> space.
    assert clean_report("Normal. Heart\nsize. Stable. There are no XXXX of effusion.") == \
        ["heart size", "there are no xxxx of effusion"]


def test_clean_report_tokens_are_word_runs():
    # \w+ runs: punctuation and hyphens split words ("well-expanded" -> "well expanded", "x-XXXX" -> "x xxxx").
    assert clean_report("Lungs well-expanded, clear; normal chest x-XXXX!") == \
        ["lungs well expanded clear normal chest x xxxx"]


def test_clean_report_mojibake_and_non_ascii():
    # "\ufffd\ufffd" -> space; "café" -> "caf" (non-ASCII stripped per token); "é" alone becomes empty and is dropped,
    # but it still counted for the <= 1-token rule: "é lungs" has 2 tokens, so it survives as "lungs".
    assert clean_report("Heart\ufffd\ufffdsize normal. The café view. \u00e9 lungs. \u00e9 \u00e9.") == \
        ["heart size normal", "the caf view", "lungs"]


def test_clean_report_empty_text():
    assert clean_report("") == []
    assert clean_report("1. 2. .") == []


def test_report_sentences_impression_first():
    report = Report(id="r1", findings="Heart is normal.", impression="No acute disease.", source="mem")
    assert report_sentences(report) == ["no acute disease", "heart is normal"]


def test_report_sentences_without_text_names_the_report():
    report = Report(id="r9", findings=" ", impression="", source="/data/r9.xml")
    with pytest.raises(ValueError, match=r"r9.*/data/r9\.xml.*neither findings nor impression"):
        report_sentences(report)


# ------------------------------------------------------------------------------------------------------- IU XML


def test_read_iu_xml_sections_missing_and_empty(tmp_path):
    (tmp_path / "12.xml").write_text(iu_xml("Heart normal. XXXX clear.", None))
    (tmp_path / "13.xml").write_text(iu_xml("", "No active disease."))
    first = read_iu_xml(tmp_path / "12.xml")
    assert first == Report(id="12", findings="Heart normal. XXXX clear.", impression="",
                           source=str(tmp_path / "12.xml"))
    second = read_iu_xml(tmp_path / "13.xml")
    assert (second.findings, second.impression) == ("", "No active disease.")


def test_read_iu_xml_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.xml"):
        read_iu_xml(tmp_path / "nothere.xml")
    (tmp_path / "bad.xml").write_text("<eCitation><Abstract>")
    with pytest.raises(ValueError, match=r"bad\.xml.*corrupt XML"):
        read_iu_xml(tmp_path / "bad.xml")
    (tmp_path / "other.xml").write_text("<html><body/></html>")
    with pytest.raises(ValueError, match=r"other\.xml.*not an Open-i"):
        read_iu_xml(tmp_path / "other.xml")


def test_read_iu_reports_folder_archive_and_errors(tmp_path):
    folder = tmp_path / "xml"
    folder.mkdir()
    for rid in ("10", "2", "b"):
        (folder / f"{rid}.xml").write_text(iu_xml(f"Finding {rid} here.", "Impression text."))
    reports = read_iu_reports(folder)
    assert [r.id for r in reports] == ["2", "10", "b"]  # numeric ids in numeric order, then the others

    archive = write_tgz(tmp_path / "reports.tgz", {"ecgen-radiology/5.xml": iu_xml("Lungs clear.", ""),
                                                    "ecgen-radiology/readme.txt": "not a report"})
    (report,) = read_iu_reports(archive)
    assert (report.id, report.findings, report.source) == ("5", "Lungs clear.",
                                                            f"{archive}::ecgen-radiology/5.xml")

    broken = write_tgz(tmp_path / "broken.tgz", {"a/6.xml": "<eCitation>"})
    with pytest.raises(ValueError, match=r"broken\.tgz::a/6\.xml.*corrupt XML"):
        read_iu_reports(broken)
    twice = write_tgz(tmp_path / "twice.tgz", {"a/6.xml": iu_xml("A b.", ""), "b/6.xml": iu_xml("C d.", "")})
    with pytest.raises(ValueError, match=r"twice\.tgz.*'6' occurs twice"):
        read_iu_reports(twice)
    (tmp_path / "garbage.tgz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match=r"garbage\.tgz.*unreadable"):
        read_iu_reports(tmp_path / "garbage.tgz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no report XML"):
        read_iu_reports(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_iu_reports(tmp_path / "missing")


def test_load_report_sentences_drops_empty_and_short_reports(tmp_path, caplog):
    folder = tmp_path / "xml"
    folder.mkdir()
    reports = {
        "1": iu_xml("Heart size normal.", "No active disease."),  # 3 + 3 tokens: kept
        "2": iu_xml(None, "No active disease."),                   # exactly MIN_REPORT_TOKENS = 3: kept
        "3": iu_xml("", "Heart normal."),                          # 2 tokens < 3: dropped
        "4": iu_xml(None, "Normal."),                              # 1-token piece dropped -> 0 tokens: dropped
        "5": iu_xml("", ""),                                       # no text: dropped
    }
    for rid, text in reports.items():
        (folder / f"{rid}.xml").write_text(text)
    with caplog.at_level(logging.INFO, logger="common.data.cxr_reports"):
        texts = load_report_sentences(folder)
    assert MIN_REPORT_TOKENS == 3
    assert texts == [ReportText("1", "train", ("no active disease", "heart size normal")),
                     ReportText("2", "train", ("no active disease",))]
    assert "2 reports kept; dropped 1 without findings/impression and 2 with < 3 tokens" in caplog.text


# ---------------------------------------------------------------------------------------------------- MIMIC-CXR

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 Lungs are clear.  No effusion.
 Heart size is normal.

 IMPRESSION:  Preliminary read.

 IMPRESSION:
 No acute cardiopulmonary process.
 NOTIFICATION:  Discussed with Dr. ___.
"""


def test_split_report_sections_last_wins():
    sections = split_report_sections(MIMIC_REPORT)
    assert list(sections) == ["examination", "indication", "findings", "impression", "notification"]
    assert sections["examination"] == "CHEST (PA AND LAT)"
    assert sections["findings"] == "Lungs are clear.  No effusion.\n Heart size is normal."
    assert sections["impression"] == "No acute cardiopulmonary process."  # the second IMPRESSION wins
    # lower-case words followed by a colon, or a heading not at a line start, are not headings
    assert split_report_sections("Note: no heading here. FINDINGS: inline") == {}


def test_read_mimic_report(tmp_path):
    path = tmp_path / "s50414267.txt"
    path.write_text(MIMIC_REPORT)
    report = read_mimic_report(path)
    assert (report.id, report.source) == ("s50414267", str(path))
    assert report_sentences(report) == ["no acute cardiopulmonary process", "lungs are clear", "no effusion",
                                        "heart size is normal"]
    (tmp_path / "s2.txt").write_text("WET READ: something\n")
    assert read_mimic_report(tmp_path / "s2.txt").findings == ""
    with pytest.raises(FileNotFoundError, match="s3.txt"):
        read_mimic_report(tmp_path / "s3.txt")
    (tmp_path / "s4.txt").write_bytes(b"FINDINGS: \xff\xfe bad")
    with pytest.raises(ValueError, match=r"s4\.txt.*UTF-8"):
        read_mimic_report(tmp_path / "s4.txt")


# ------------------------------------------------------------------------------------------------------- R2Gen


def test_load_report_sentences_r2gen(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({
        "train": [{"id": "a", "report": "Heart normal. 1. Lungs are clear.", "image_path": ["x.png"]}],
        "val": [{"id": "b", "report": "No acute disease."}],
        "test": [{"id": "c", "report": "Normal."}, {"id": "d", "report": ""}],
    }))
    texts = load_report_sentences(path)
    # c: "Normal" is one token -> 0 kept tokens -> dropped; d: no text -> dropped
    assert texts == [ReportText("a", "train", ("heart normal", "lungs are clear")),
                     ReportText("b", "valid", ("no acute disease",))]


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "corrupt annotation JSON"),
    ('{"training": []}', r"unknown split\(s\) \['training'\]"),
    ('{"train": [{"id": "a"}]}', r"entry 0 of split 'train' needs an 'id' and a 'report'"),
    ('{"train": {"id": "a"}}', "not a list"),
    ('{"train": [{"id": "a", "report": "X y z."}], "val": [{"id": "a", "report": "X y z."}]}', "'a' occurs twice"),
])
def test_load_report_sentences_r2gen_errors(tmp_path, content, message):
    path = tmp_path / "annotation.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_report_sentences(path)
    assert str(path) in str(err.value)


def test_load_report_sentences_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_report_sentences(tmp_path / "nothing.json")


# ------------------------------------------------------------------------------------------------- statistics


def test_corpus_statistics_by_hand(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heart", "size", "normal", "no", "lungs", "clear", "eff",
             "##usion"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = load_tokenizer(tmp_path / "vocab.txt")
    texts = [ReportText("a", "train", ("heart size normal", "no effusion")),     # 5 words, [CLS] 6 pieces [SEP] = 8
             ReportText("b", "train", ("lungs clear",)),                          # 2 words, 4 tokens
             ReportText("c", "valid", ("no effusion", "lungs clear", "heart normal"))]  # 6 words, 9 tokens
    stats = corpus_statistics(texts, tokenizer, max_length=8)
    assert stats == pytest.approx({
        "reports": 3,
        "sentences_mean": 2.0, "sentences_median": 2.0, "sentences_max": 3,   # (2 + 1 + 3) / 3
        "words_mean": 13 / 3, "words_median": 5.0, "words_max": 6,            # (5 + 2 + 6) / 3
        "tokens_mean": 7.0, "tokens_median": 8.0, "tokens_max": 9,            # (8 + 4 + 9) / 3
        "tokens_p95": 8.9,            # linear percentile of [4, 8, 9]: rank 0.95 * 2 = 1.9 -> 8 + 0.9 * (9 - 8)
        "truncated_share": 1 / 3,     # only c (9 tokens) exceeds max_length 8
    })
    with pytest.raises(ValueError, match="no report"):
        corpus_statistics([], tokenizer)


# ---------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def iu_archive() -> Path:
    return require_data("cxr_reports") / "NLMCXR_reports.tgz"


@pytest.fixture(scope="module")
def iu_reports(iu_archive) -> dict[str, Report]:
    return {r.id: r for r in read_iu_reports(iu_archive)}


@pytest.mark.realdata
def test_real_iu_examples(iu_reports):
    reports = iu_reports
    # ecgen-radiology/1.xml: IMPRESSION "Normal chest x-XXXX." then the FINDINGS, read from the XML:
    # "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema. There is
    #  no focal consolidation. There are no XXXX of a pleural effusion. There is no evidence of pneumothorax."
    assert report_sentences(reports["1"]) == [
        "normal chest x xxxx", "the cardiac silhouette and mediastinum size are within normal limits",
        "there is no pulmonary edema", "there is no focal consolidation", "there are no xxxx of a pleural effusion",
        "there is no evidence of pneumothorax"]
    # 1984.xml: IMPRESSION "1. No acute cardiopulmonary abnormality. 2. Wedge-shaped XXXX fracture of T12."
    # FINDINGS "Heart size and mediastinal contour are within normal limits. No focal consolidation, suspicious
    # pulmonary opacity, large pleural effusion, or pneumothorax is identified. Again visualized is a wedge-shaped
    # XXXX fracture of T12."  The "12." of "T12." matches [0-9]+\. too, so "T12" is left as "t".
    assert report_sentences(reports["1984"]) == [
        "no acute cardiopulmonary abnormality", "wedge shaped xxxx fracture of t",
        "heart size and mediastinal contour are within normal limits",
        "no focal consolidation suspicious pulmonary opacity large pleural effusion or pneumothorax is identified",
        "again visualized is a wedge shaped xxxx fracture of t"]
    # 1747.xml: IMPRESSION "1. No acute cardiopulmonary abnormalities. 2. An ovoid opacity in the left retrocardiac
    # area, could be projectional or solid mass, further study XXXX is recommended. ." FINDINGS "There is an ovoid
    # opacity 3.5 cm in the retrocardiac area on AP view, not well-seen on the lateral view, a dedicated XXXX scan is
    # recommended. No pneumothorax or pleural effusion present. The heart is normal in size. No hilar
    # lymphadenopathy. No destructive bony lesions."  "3.5" is split at "3.", the lone " ." gives no sentence.
    assert report_sentences(reports["1747"]) == [
        "no acute cardiopulmonary abnormalities",
        "an ovoid opacity in the left retrocardiac area could be projectional or solid mass further study xxxx is "
        "recommended",
        "there is an ovoid opacity",
        "5 cm in the retrocardiac area on ap view not well seen on the lateral view a dedicated xxxx scan is "
        "recommended",
        "no pneumothorax or pleural effusion present", "the heart is normal in size", "no hilar lymphadenopathy",
        "no destructive bony lesions"]
    # 100.xml has an empty INDICATION element; its sections are read as written
    assert (reports["100"].findings, reports["100"].impression) == (
        "Both lungs are clear and expanded. Heart and mediastinum normal.", "No active disease.")


@pytest.mark.realdata
def test_real_iu_archive_counts(iu_archive, iu_reports, caplog):
    assert len(iu_reports) == 3955
    with caplog.at_level(logging.INFO, logger="common.data.cxr_reports"):
        texts = load_report_sentences(iu_archive)
    # Measured: 28 of the 3,955 reports have both FINDINGS and IMPRESSION empty (e.g. studies where only
    # COMPARISON/INDICATION were filled) and are dropped; no remaining report falls below 3 tokens, because the
    # shortest texts are impressions such as "No active disease." (exactly 3 tokens). 3,955 - 28 = 3,927 kept.
    assert len(texts) == 3927
    assert "3927 reports kept; dropped 28 without findings/impression and 0 with < 3 tokens" in caplog.text
    assert {t.split for t in texts} == {"train"}
    assert min(sum(len(s.split()) for s in t.sentences) for t in texts) == MIN_REPORT_TOKENS


@pytest.mark.realdata
def test_real_r2gen_annotation():
    texts = load_report_sentences(require_data("cxr_reports") / "annotation.json")
    # R2Gen's IU split: 3,062 / 382 / 382 entries, all with text of >= 3 tokens (measured), so none is dropped
    splits = [t.split for t in texts]
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (3062, 382, 382)
    assert texts[0] == ReportText("3321", "train", (
        "xxxx xxxx and lateral chest examination was obtained", "the heart silhouette is normal in size and contour",
        "aortic xxxx appear unremarkable", "lungs demonstrate no acute findings",
        "there is no effusion or pneumothorax", "no acute pulmonary disease"))
