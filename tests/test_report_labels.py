"""Tests of common/data/report_labels.py and scripts/label_reports.py: the rule labeller on hand-written report
sentences (tests/data/polyp_report_sentences.csv) and hand-picked cases, the LLM answer parser, the LLM labeller
with a tiny random GPT-2 whose answer token is forced, report tables, label files and the CLI."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.data.report_labels import (
    DEFAULT_PROMPT,
    LLMReportLabeller,
    ReportLabeller,
    RuleReportLabeller,
    extract_polyp_label,
    find_polyp_mentions,
    label_reports,
    make_report_labeller,
    parse_llm_answer,
    read_report_table,
    write_exam_labels,
)
from conftest import load_script, read_csv

SENTENCES = Path(__file__).parent / "data" / "polyp_report_sentences.csv"
LABEL_NAMES = {"1": 1, "0": 0, "uncertain": None}

cli = load_script("label_reports")


def sentence_rows() -> list[dict[str, str]]:
    with open(SENTENCES, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------- rules


def test_sentence_set_is_large_and_balanced_enough():
    rows = sentence_rows()
    classes = Counter(r["expected"] for r in rows)
    assert set(classes) == {"1", "0", "uncertain"}
    assert len(rows) >= 60 and classes["1"] >= 20 and classes["0"] >= 20 and classes["uncertain"] >= 10, classes
    assert sum(r["language"] == "zh" for r in rows) >= 20
    assert len({r["text"] for r in rows}) == len(rows), "duplicate sentences"


def test_rules_accuracy_on_hand_written_sentences():
    rows = sentence_rows()
    confusion = Counter()  # (expected, predicted) -> count
    misses = []
    for row in rows:
        expected = LABEL_NAMES[row["expected"]]
        predicted = extract_polyp_label(row["text"])
        confusion[(row["expected"], {1: "1", 0: "0", None: "uncertain"}[predicted])] += 1
        if predicted != expected:
            misses.append(f"{row['text']!r}: expected {expected}, got {predicted}")
    correct = sum(n for (e, p), n in confusion.items() if e == p)
    accuracy = correct / len(rows)
    table = "; ".join(f"expected {e}: " + ", ".join(f"->{p} {confusion[(e, p)]}" for p in LABEL_NAMES)
                      for e in LABEL_NAMES)
    assert accuracy >= 0.9, f"accuracy {correct}/{len(rows)} = {accuracy:.3f}; confusion {table}; misses {misses}"


@pytest.mark.parametrize("report, expected", [
    # one affirmed clause outweighs a negated one, whether split by ';' or by a comma before 'a 5 mm'
    ("no polyp in the sigmoid; a 5 mm polyp in the ascending colon", 1),
    ("No polyp in the sigmoid, a 5 mm polyp in the ascending colon.", 1),
    ("乙状结肠未见息肉，升结肠见一枚0.5cm息肉。", 1),
    # negated, every wording of the brief
    ("No polyps were seen.", 0), ("Colon polyp-free to the caecum.", 0), ("Without polyps.", 0),
    ("no polyp", 0), ("未见息肉", 0), ("无息肉", 0), ("未发现息肉", 0),
    # no polyp word at all in a colonoscopy report
    ("Normal colonoscopy to the terminal ileum.", 0),
    # uncertain
    ("Possible polyp in the caecum.", None), ("Cannot exclude a polyp behind the fold.", None),
    ("Suspicious for polyp at 20 cm.", None), ("疑似息肉", None), ("横结肠息肉?", None), ("不除外息肉", None),
    # pseudopolyps are not polyps; a true polyp beside them still counts
    ("Inflammatory pseudopolyps in the descending colon.", 0), ("降结肠见多发炎性假息肉。", 0),
    ("Pseudo-polyps in the sigmoid; a 4 mm adenoma in the rectum, removed.", 1),
    # history / post-polypectomy status is no current polyp; a new one is
    ("History of polyps. Normal colonoscopy today.", 0), ("Post-polypectomy scar, well healed.", 0),
    ("结肠息肉切除术后复查，未见异常。", 0), ("History of polyps. Today a 6 mm polyp in the caecum.", 1),
    # 无 in 无蒂 (sessile) and 无痛 (painless) is no negation
    ("直肠见一枚无蒂息肉。", 1), ("无痛肠镜下见乙状结肠息肉。", 1),
    # poor preparation: uncertain without a finding, positive with one
    ("Poor bowel preparation; no lesions seen.", None), ("Poor bowel preparation; no polyps seen.", None),
    ("肠道准备差，大量粪水。", None), ("Poor prep on the right, but a 10 mm polyp in the sigmoid was removed.", 1),
    # empty text is no report
    ("", None), ("   \n", None),
])
def test_extract_polyp_label_hand_picked(report, expected):
    assert extract_polyp_label(report) == expected


@pytest.mark.parametrize("report, statuses", [
    # "no" reaches every item of its list: masses, polyps, diverticula
    ("No masses, polyps or diverticula.", ["negated"]),
    # 4 words between "no" and "polyp" (evidence of any residual) <= PRE_WINDOW = 6: negated
    ("No evidence of any residual polyp.", ["negated"]),
    # 9 words between (bleeding from the cold snare resection site of the) > 6: out of scope
    ("No bleeding from the cold snare resection site of the polyp.", ["affirmed"]),
    # 5 words between (bleeding after removal of the) <= 6, but the terminator "after" ends the scope of "no"
    ("No bleeding after removal of the polyp.", ["affirmed"]),
    # the "not" of "cannot exclude" is blanked before negations are searched: uncertain, not negated
    ("A small polyp cannot be excluded.", ["uncertain"]),
    # pseudopolyp removed before the search; the adenoma stays
    ("Pseudopolyps and one adenoma.", ["affirmed"]),
    ("Previous polypectomy site; no new polyps.", ["history", "negated"]),
    ("Indication: adenoma surveillance. Findings: 3 mm polyp in the rectum.", ["history", "affirmed"]),
    ("息肉：无。", ["negated"]),
    ("2年前行息肉切除，本次见一枚新发腺瘤。", ["history", "affirmed"]),
])
def test_find_polyp_mentions_scopes(report, statuses):
    assert [m.status for m in find_polyp_mentions(report)] == statuses


def test_mention_reports_its_cue_and_clause():
    (first, second) = find_polyp_mentions("No polyp in the sigmoid; a 5 mm polyp in the ascending colon.")
    assert (first.term, first.status, first.cue, first.clause) == ("polyp", "negated", "no", "no polyp in the sigmoid")
    assert (second.status, second.cue) == ("affirmed", None)


def test_extract_polyp_label_refuses_non_text():
    with pytest.raises(ValueError, match="report must be a string"):
        extract_polyp_label(None)


def test_make_report_labeller_rules_and_bad_kinds():
    labeller = make_report_labeller()
    assert isinstance(labeller, RuleReportLabeller) and isinstance(labeller, ReportLabeller)
    assert labeller("Two polyps in the rectum.") == 1
    with pytest.raises(ValueError, match="needs model_path"):
        make_report_labeller("llm")
    with pytest.raises(ValueError, match="unknown labeller kind 'gpt'"):
        make_report_labeller("gpt")
    with pytest.raises(ValueError, match="takes no options"):
        make_report_labeller("rules", device="cpu")


# ---------------------------------------------------------------------------------------------------- LLM


@pytest.mark.parametrize("text, expected", [
    ("yes", 1), (" Yes, the report describes a polyp.", 1), ("**Yes.**", 1), ("Answer: yes", 1), ("1", 1),
    ("positive", 1), ("是", 1), ("是的，有息肉", 1),
    ("no", 0), ("\n\nNo.", 0), ("0", 0), ("negative", 0), ("否", 0), ("不是", 0), ("答：否", 0),
    ("uncertain", None), ("不确定", None), ("", None), ("   \n  ", None),
    ("yesterday", None),  # a whole word must match
    ("maybe yes", None),  # only the first word counts
    ("no\nyes", 0),  # only the first line counts
])
def test_parse_llm_answer(text, expected):
    assert parse_llm_answer(text) == expected


ANSWER_WORDS = ["yes", "no", "uncertain", "是", "否", "不确定"]


def force_answer(model, token_id: int) -> None:
    """Make the tiny GPT-2 emit ``token_id`` after any input: with ln_f weight 0 and bias e_0 the final hidden
    state is h = e_0 at every position, so logits = W h = W[:, 0]; W[:, 0] = 10 at ``token_id``, 0 elsewhere."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 10.0


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 1-layer GPT-2 (16 channels) with a word-level tokenizer trained in memory, forced to answer "yes"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(ANSWER_WORDS) + " report polyp answer"],
                                  trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=fast.vocab_size, n_positions=512,
                                       tie_word_embeddings=False, eos_token_id=fast.eos_token_id))
    force_answer(model, fast.convert_tokens_to_ids("yes"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llm(tiny_lm) -> LLMReportLabeller:
    return LLMReportLabeller(str(tiny_lm), max_new_tokens=3)


def test_llm_prompt_holds_the_report(llm):
    report = "A 6 mm sessile polyp in the sigmoid colon."
    prompt = llm.format_prompt(report)
    assert report in prompt and prompt == DEFAULT_PROMPT.replace("{report}", report)
    assert prompt.endswith("Answer:")


def test_llm_generates_the_forced_answer_read_from_disk(llm):
    # the saved model is forced to "yes": 3 new tokens, all "yes", none of the prompt's words
    assert llm.answer("Two polyps in the rectum.").split() == ["yes", "yes", "yes"]
    assert llm("Two polyps in the rectum.") == 1
    assert llm("  ") is None  # empty report: no generation


@pytest.mark.parametrize("word, expected", [("no", 0), ("uncertain", None), ("是", 1), ("否", 0), ("不确定", None)])
def test_llm_parses_each_forced_answer(llm, word, expected):
    force_answer(llm.model, llm.tokenizer.convert_tokens_to_ids(word))
    try:
        assert llm.answer("未见息肉").split()[0] == word
        assert llm("未见息肉") == expected
    finally:
        force_answer(llm.model, llm.tokenizer.convert_tokens_to_ids("yes"))


def test_llm_uses_the_chat_template_when_the_tokenizer_has_one(tiny_lm):
    labeller = LLMReportLabeller(str(tiny_lm), prompt="Polyp? {report}")
    labeller.tokenizer.chat_template = ("{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                                        "{% if add_generation_prompt %} <assistant>{% endif %}")
    assert labeller.format_prompt("A polyp.") == "<user> Polyp? A polyp. <assistant>"
    assert labeller("A polyp.") == 1


def test_llm_bad_arguments(tiny_lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_model"):
        LLMReportLabeller(str(tmp_path / "no_model"))
    with pytest.raises(ValueError, match="placeholder"):
        LLMReportLabeller(str(tiny_lm), prompt="Is there a polyp?")
    with pytest.raises(ValueError, match="max_new_tokens"):
        LLMReportLabeller(str(tiny_lm), max_new_tokens=0)
    assert isinstance(make_report_labeller("llm", model_path=str(tiny_lm), max_new_tokens=2), LLMReportLabeller)


# ---------------------------------------------------------------------------------------------------- tables


REPORTS = [  # exam id, report, rule label
    ("E001", "A 5 mm polyp in the sigmoid colon, removed.", 1),
    ("E002", "全结肠未见息肉。", 0),
    ("E003", "Possible polyp in the caecum, not confirmed.", None),
    ("E004", "", None),
    ("E005", "直肠见一枚0.3cm息肉，已钳除。", 1),
]


def write_reports_csv(path: Path, rows=REPORTS, header=("exam_id", "report"), encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(row[:2] for row in rows)
    return path


def test_read_report_table_csv(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text(" exam_id , report \n E001 , A polyp. \nE002,全结肠未见息肉。\n", encoding="utf-8-sig")
    # header and ids stripped, BOM accepted, Chinese kept
    assert read_report_table(path) == [("E001", "A polyp."), ("E002", "全结肠未见息肉。")]


def test_read_report_table_gb18030_csv(tmp_path):
    path = write_reports_csv(tmp_path / "gbk.csv", REPORTS[1:2], header=("检查序号", "检查所见"), encoding="gb18030")
    assert read_report_table(path, id_column="检查序号", text_column="检查所见") == [("E002", "全结肠未见息肉。")]


def test_read_report_table_xlsx(tmp_path):
    path = tmp_path / "reports.xlsx"
    pd.DataFrame({"检查序号": [1001, 1002], "报告": ["乙状结肠息肉", None]}).to_excel(path, index=False)
    # integer ids become their digits, the empty cell an empty text
    assert read_report_table(path, id_column="检查序号", text_column="报告") == [("1001", "乙状结肠息肉"), ("1002", "")]


def test_read_report_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_report_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['report'\]; columns found: \['exam_id', 'text'\]"):
        read_report_table(write_reports_csv(tmp_path / "cols.csv", header=("exam_id", "text")))
    dup = write_reports_csv(tmp_path / "dup.csv", REPORTS + [("E002", "again", 0), ("E001", "again", 0)])
    with pytest.raises(ValueError, match=r"dup.csv: exam id\(s\) \['E001', 'E002'\] appear more than once"):
        read_report_table(dup)
    with pytest.raises(ValueError, match="empty.csv has a header but no rows"):
        read_report_table(write_reports_csv(tmp_path / "empty.csv", []))
    with pytest.raises(ValueError, match="noid.csv, row 3: empty exam id"):
        read_report_table(write_reports_csv(tmp_path / "noid.csv", [("E1", "x", 0), (" ", "y", 0)]))
    (tmp_path / "reports.txt").write_text("exam_id,report\n")
    with pytest.raises(ValueError, match=r"reports.txt: unsupported file type '.txt'"):
        read_report_table(tmp_path / "reports.txt")


def test_label_reports_skips_empty_text_and_checks_labels():
    calls = []

    def labeller(report: str) -> int | None:
        calls.append(report)
        return 1

    rows = [(exam_id, text) for exam_id, text, _ in REPORTS]
    labelled = label_reports(rows, labeller)
    assert [r["label"] for r in labelled] == [1, 1, 1, None, 1]  # E004 is empty: None, labeller not called
    assert len(calls) == 4
    with pytest.raises(ValueError, match="returned 2 for exam 'E001'"):
        label_reports(rows, lambda report: 2)


def test_write_exam_labels(tmp_path):
    rows = label_reports([(exam_id, text) for exam_id, text, _ in REPORTS], RuleReportLabeller())
    assert [r["label"] for r in rows] == [label for *_, label in REPORTS]
    counts = write_exam_labels(rows, tmp_path / "out" / "exam_labels.csv")
    assert counts == {"positive": 2, "negative": 1, "uncertain": 2}  # E001, E005 | E002 | E003, E004
    assert read_csv(tmp_path / "out" / "exam_labels.csv") == [
        {"exam_id": "E001", "label": "1"}, {"exam_id": "E002", "label": "0"}, {"exam_id": "E005", "label": "1"}]
    assert read_csv(tmp_path / "out" / "exam_labels_uncertain.csv") == [
        {"exam_id": "E003", "report": REPORTS[2][1]}, {"exam_id": "E004", "report": ""}]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["exam_labels.csv", "exam_labels_uncertain.csv"]
    with pytest.raises(ValueError, match="exam 'X': label 'yes' is not 1, 0 or None"):
        write_exam_labels([{"exam_id": "X", "report": "r", "label": "yes"}], tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_rules_end_to_end(tmp_path):
    reports = write_reports_csv(tmp_path / "reports.csv", header=("id", "text"))
    counts = cli.main(reports=str(reports), output=str(tmp_path / "labels.csv"), id_column="id", text_column="text")
    assert counts == {"positive": 2, "negative": 1, "uncertain": 2}
    assert [r["exam_id"] for r in read_csv(tmp_path / "labels.csv")] == ["E001", "E002", "E005"]
    assert [r["exam_id"] for r in read_csv(tmp_path / "labels_uncertain.csv")] == ["E003", "E004"]


def test_cli_llm_end_to_end(tmp_path, tiny_lm):
    reports = write_reports_csv(tmp_path / "reports.csv")
    counts = cli.main(reports=str(reports), output=str(tmp_path / "labels.csv"), labeller="llm",
                      model_path=str(tiny_lm))
    # the model always answers "yes": the 4 non-empty reports are positive, the empty E004 uncertain
    assert counts == {"positive": 4, "negative": 0, "uncertain": 1}
    with pytest.raises(ValueError, match="needs model_path"):
        cli.main(reports=str(reports), output=str(tmp_path / "x.csv"), labeller="llm")


def test_ensure_exam_labels_writes_once_and_keeps_an_existing_table(tmp_path):
    from common.data.report_labels import ensure_exam_labels

    reports = tmp_path / "reports.csv"
    reports.write_text("exam_id,report\na,A 5 mm polyp in the rectum.\nb,No polyps were seen.\nc,Possible polyp.\n")
    out = tmp_path / "exam_labels.csv"
    assert ensure_exam_labels(reports, out) == str(out)
    # a: affirmed -> 1, b: negated -> 0, c: uncertain -> left out (listed in exam_labels_uncertain.csv)
    assert out.read_text().splitlines() == ["exam_id,label", "a,1", "b,0"]
    assert "c" in (tmp_path / "exam_labels_uncertain.csv").read_text()
    out.write_text("exam_id,label\na,0\n")  # edited by hand: kept, not relabelled
    ensure_exam_labels(reports, out)
    assert out.read_text() == "exam_id,label\na,0\n"
