"""Exam labels from colonoscopy reports: EndoKED stage 1, the bag labels of the MIL stage.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports Leveraging
Large Language and Vision Models", arXiv:2310.11173 (2023), stage 1 (specs/endoked.md §1, §2.1): each report
gives its exam (bag) the label ``Y_b = 1`` when a polyp is reported, ``Y_b = 0`` when none is, and no label when
the report is uncertain (such exams are left out, as the original ``label_certain.txt`` suggests). The paper asks
an LLM; its code is not released. Here a labeller is any callable ``str -> 1 | 0 | None``
(:class:`ReportLabeller`): :class:`RuleReportLabeller` (offline, deterministic, the default) or
:class:`LLMReportLabeller` (a local causal language model).

Rules of :func:`extract_polyp_label` (English and Chinese, a NegEx-style scope; Chapman et al., "A Simple
Algorithm for Identifying Negated Findings and Diseases in Discharge Summaries", J. Biomed. Inform. 2001):

* **Text**: Unicode NFKC (full-width ``？：；（）`` become ASCII) and lower case. **Clauses**: split at ``。 ; ! \\n``,
  at a full stop not followed by a digit (``0.5cm`` stays whole; not after ``vs``/``approx``/``e.g``/``i.e``), and
  at a comma next to a Chinese character (Chinese reports separate findings by commas; their lists use ``、``).
* **Targets**: ``polyp(s)``, ``polypoid``, ``polyposis``, ``adenoma(s)``, ``adenomatous``, ``polypectomy`` (a
  polyp removed now), a few misspellings (``ployp``, ``pollyp``, ``polpy``); ``息肉`` (also ``息肉样``, polypoid)
  and ``腺瘤``. A **pseudopolyp** (``pseudopolyp``, ``pseudo-polyp``, ``假息肉``, ``假性息肉``; inflammatory
  mucosal tags of colitis) is NOT a polyp and is removed before the search.
* **Cues** act on a target of the same clause only: *pre* cues stand before it, with at most
  :data:`PRE_WINDOW` words (English) or Chinese characters (:data:`PRE_WINDOW_ZH`) between; *post* cues follow
  it within :data:`POST_WINDOW` / :data:`POST_WINDOW_ZH`. A scope *terminator* between cue and target ends the
  scope (``but, however, although, except, apart from, other than, whereas, while, after, following, which,
  in addition, also``; ``但, 然而, 另``), and so does an English comma followed by a new finding (an
  article, a number, a quantifier, a preposition or ``there``: "no polyp in the sigmoid, a 5 mm polyp in ...");
  a post cue does not reach across any comma. Uncertainty cues are matched first and blanked out, so the
  ``not`` of "cannot exclude" or the ``排除`` of ``不排除`` is no negation.

  - *uncertain*: "possible", "probable", "suspected", "suspicious for", "questionable", "query", ``?``,
    "equivocal", "indeterminate", "cannot exclude", "cannot rule out", "not excluded", "may represent",
    "may be", "could be", "versus"/"vs" (either side), "concerning for", "rule out", "not confirmed";
    ``疑似, 可疑, 怀疑, 疑为, 似见, 可能, 不除外, 不排除, 不能除外, 待排, ？``.
  - *negated*: "no", "without", "absence of", "negative for", "free of", "clear of", "rather than",
    "neither/nor", "not a/an/any", "did not see/find", "non-" (attached); after the target "not
    seen/identified/found/detected", "none", "absent", "ruled out", "-free" (``polyp-free``); ``未见, 未发现,
    未检出, 未及, 无, 没有, 否认, 排除, 并非, 不是, 非`` (``无蒂`` sessile, ``无法`` unable and ``无痛`` painless are
    not negations); after the target ``：无, 未见, 阴性``.
  - *history* (not a current finding): "history of", "h/o", "previous(ly)", "prior" (not "prior to"), "past",
    "status post", "s/p", "post(-polypectomy)"; after the target "site", "scar", "surveillance", "follow-up",
    "ago", "previously", "in 2019"; ``既往, 曾, 以往, 前次, 上次, N年前``; after the target ``术后, 病史, 史``.
    A clause that starts with an indication heading ("indication:", "clinical history:", ``检查目的：``,
    ``临床诊断：``) is history as a whole.

  A target takes the first status that applies in the order uncertain, negated, history, affirmed.

* **Report**: 1 when any target is affirmed (one affirmed clause outweighs negated ones: "no polyp in the
  sigmoid; a 5 mm polyp in the ascending colon" is 1); else None when any target is uncertain, or when the
  examination was inadequate (poor/inadequate/suboptimal preparation, large amounts of stool, limited views,
  incomplete or aborted colonoscopy; ``肠道准备差/欠佳/不佳``, ``大量粪水``, ``视野不清``, ``观察不满意``,
  ``终止检查``, ``未能进镜至回盲部``), since a negative finding is then unreliable; else 0 (every polyp negated
  or in the past, or none mentioned). An empty report is None.

Tables (:func:`read_report_table`, :func:`write_exam_labels`): reports come from a CSV or ``.xlsx`` table with an
exam id and a text column; labels go to ``exam_id,label`` (the exam-label CSV read by
:func:`common.data.exam_bags.exam_bag_datalist`), uncertain reports to ``<stem>_uncertain.csv``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from common.utils.files import write_csv

__all__ = [
    "PRE_WINDOW",
    "PRE_WINDOW_ZH",
    "POST_WINDOW",
    "POST_WINDOW_ZH",
    "DEFAULT_PROMPT",
    "PolypMention",
    "find_polyp_mentions",
    "extract_polyp_label",
    "ReportLabeller",
    "RuleReportLabeller",
    "LLMReportLabeller",
    "parse_llm_answer",
    "make_report_labeller",
    "read_report_table",
    "label_reports",
    "write_exam_labels",
    "ensure_exam_labels",
]

logger = logging.getLogger(__name__)

PRE_WINDOW = 6
"""Most English words between a pre cue and its target."""
PRE_WINDOW_ZH = 10
"""Most Chinese characters (or words) between a pre cue and a Chinese target."""
POST_WINDOW = 3
"""Most English words between a target and its post cue."""
POST_WINDOW_ZH = 6
"""Most Chinese characters (or words) between a Chinese target and its post cue."""

AFFIRMED, NEGATED, UNCERTAIN, HISTORY = "affirmed", "negated", "uncertain", "history"
_PRIORITY = (UNCERTAIN, NEGATED, HISTORY)

# ---------------------------------------------------------------------------------------------------- patterns


def _rx(*alternatives: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


_CJK = r"\u4e00-\u9fff"
_UNITS = re.compile(rf"[a-z0-9]+|[{_CJK}]")

_CLAUSE_SPLIT = re.compile(
    rf"[。;!\n]|(?<!\bvs)(?<!\bapprox)(?<!\be\.g)(?<!\bi\.e)\.(?!\d)|(?<=[{_CJK})\]])\s*,|,(?=\s*[{_CJK}])"
)

_TARGET = _rx(r"\b(?:polyp|ployp|pollyp|polpy)(?:s|oid|osis)?\b", r"\badenoma(?:s|tous)?\b",
              r"\bpolypectom(?:y|ies)\b", "息肉", "腺瘤")
# blanked out before anything else: pseudopolyps are no polyps; 无 in these words is no negation
_EXCLUDED = _rx(r"\bpseudo-?\s?polyp(?:s|oid|osis)?\b", "假性?息肉", "无蒂", "无法", "无痛")

_UNCERTAIN_PRE = _rx(
    r"\bpossibl[ey]\b", r"\bprobabl[ey]\b", r"\bsuspect(?:ed)?\b", r"\bsuspicio(?:us|n) (?:for|of)\b",
    r"\bquestionable\b", r"\bquer(?:y|ied)\b", r"\?", r"\bequivocal\b", r"\bindeterminate\b",
    r"\b(?:cannot|can ?not|can't|could not|couldn't) (?:be )?(?:exclude[d]?|rule[d]? out)\b",
    r"\b(?:may|might|could) (?:be|represent)\b", r"\bconcerning for\b", r"\brule out\b", r"\br/o\b",
    r"\bversus\b", r"\bvs\b\.?", r"\b(?:unclear|uncertain) (?:if|whether)\b",
    "疑似", "可疑", "怀疑", "疑为", "似见", "似为", "可能为", "可能是", "不除外", "不排除", "不能除外", "不能排除",
    "待排", "待除外",
)
_UNCERTAIN_POST = _rx(
    r"\?", r"\b(?:cannot|can ?not|can't|could not|couldn't) (?:be )?(?:excluded|ruled out|confirmed)\b",
    r"\bnot (?:be )?(?:excluded|ruled out|confirmed)\b", r"\bunconfirmed\b", r"\bversus\b", r"\bvs\b",
    r"\bsuspected\b", r"\bquestionable\b", r"\b(?:is|was) uncertain\b",
    "可能", "待排", "待除外", "不除外", "不排除",
)
_NEGATION_PRE = _rx(
    r"\bno\b", r"\bwithout\b", r"\babsence of\b", r"\bnegative for\b", r"\bfree of\b", r"\bclear of\b",
    r"\brather than\b",
    r"\bneither\b", r"\bnor\b", r"\bnot (?:a|an|any|consistent with|suggestive of|typical of)\b",
    r"\b(?:did|does|do|could) not (?:see|find|identify|detect|show|reveal|demonstrate)\b", r"\bnon-?(?=polyp|adenoma)",
    "未见", "未发现", "未检出", "未及", "未探及", "未找到", "未再见", "无", "没有", "否认", "排除", "不见", "并非", "不是",
    "非(?=息肉|腺瘤)",
)
_NEGATION_POST = _rx(
    r"\bnot (?:be )?(?:seen|identified|found|detected|observed|present|visuali[sz]ed|appreciated|noted)\b",
    r"\bnone\b", r"\babsent\b", r"\bruled out\b", r"^-?\s*free\b",
    r"^\s*:\s*无", "未见", "阴性", r"\(-\)",
)
_HISTORY_PRE = _rx(
    r"\bhistory of\b", r"\bh/o\b", r"\bhx of\b", r"\bprevious(?:ly)?\b", r"\bprior\b(?! to)", r"\bpast\b",
    r"\bstatus post\b", r"\bs/p\b", r"\bpost\b(?=[-\s]*polypectom)",
    "既往", "曾", "以往", "前次", "上次", "[0-9一二三四五六七八九十半多]+个?(?:年|月)前",
)
_HISTORY_POST = _rx(
    r"\bsites?\b", r"\bscars?\b", r"\bsurveillance\b", r"\bfollow-?up\b", r"\bago\b", r"\bpreviously\b",
    r"\bin (?:19|20)\d\d\b", r"\blast year\b",
    "术后", "病史", "史",
)
_HISTORY_HEADING = re.compile(
    r"^\s*(?:indications?|reason for (?:the )?(?:exam(?:ination)?|procedure|referral)|clinical (?:history|details)"
    r"|history|检查目的|检查指征|临床诊断|申请目的|病史)\s*:"
)
_TERMINATORS = _rx(
    r"\bbut\b", r"\bhowever\b", r"\balthough\b", r"\bthough\b", r"\bexcept\b", r"\bapart from\b",
    r"\baside from\b", r"\bother than\b", r"\bwhereas\b", r"\bwhile\b", r"\bafter\b", r"\bfollowing\b",
    r"\bwhich\b", r"\bin addition\b", r"\badditionally\b", r"\balso\b",
    r",\s*(?:a|an|one|two|three|four|five|several|multiple|numerous|few|\d|there|the|this|it|in|at|on|from)\b",
    "但", "然而", "另",
)
_INADEQUATE = _rx(
    r"\b(?:poor|poorly|inadequate|inadequately|suboptimal|sub-optimal|insufficient|unsatisfactory)\b(?:\s+\w+){0,2}?"
    r"\s+(?:bowel\s+)?(?:prep|preparation|prepped|cleansing)\b",
    r"\b(?:prep|preparation|cleansing)\b(?:\s+\w+){0,2}?\s+"
    r"(?:poor|inadequate|suboptimal|insufficient|unsatisfactory)\b",
    r"\bincomplete (?:colonoscopy|examination|exam|study|procedure)\b",
    r"\b(?:colonoscopy|examination|exam|study|procedure) (?:was )?(?:incomplete|aborted|abandoned|terminated)\b",
    r"\b(?:unable|failed|could not|couldn't) (?:to )?(?:reach|intubate|advance|pass)\b",
    r"\b(?:views?|visuali[sz]ation) (?:was |were )?(?:limited|poor|obscured)\b", r"\blimited views?\b",
    r"\b(?:solid|copious|large amounts? of|extensive) (?:residual )?(?:stool|faeces|feces|faecal|fecal)\b",
    "肠道(?:准备|清洁度?)(?:情况)?(?:差|欠佳|不佳|不良|不充分|不理想|较差)", "(?:大量|较多|多量)粪", "粪(?:便|水)?遮挡",
    "视野(?:不清|欠清|欠佳|差)", "观察(?:不满意|欠满意|受限)", "(?:未能|无法)(?:进镜|到达|抵达)至?(?:回盲部|盲肠)",
    "(?:终止|中止)检查", "检查(?:终止|中止|未完成)", "未完成检查",
)


# ---------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class PolypMention:
    """One polyp word of a report and what its clause says about it.

    Attributes:
        term: the matched word (``"polyps"``, ``"息肉"``).
        clause: the normalised clause holding it.
        status: ``"affirmed"``, ``"negated"``, ``"uncertain"`` or ``"history"``.
        cue: the cue that decided ``status`` (None for an affirmed target).
    """

    term: str
    clause: str
    status: str
    cue: str | None


def _normalise(report: str) -> str:
    return unicodedata.normalize("NFKC", report).lower()


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE_SPLIT.split(text) if c.strip()]


def _blank(text: str, pattern: re.Pattern) -> str:
    """``text`` with every match of ``pattern`` replaced by as many ``_`` (positions stay valid)."""
    return pattern.sub(lambda m: "_" * len(m.group()), text)


def _units(text: str) -> int:
    return len(_UNITS.findall(text))


def _in_scope(clause: str, start: int, end: int, window: int, allow_comma: bool) -> bool:
    """Whether the stretch ``clause[start:end]`` between a cue and its target keeps the cue's scope open."""
    between = clause[start:end]
    if _units(between) > window or (not allow_comma and "," in between):
        return False
    return _TERMINATORS.search(between) is None


def _cue_for(clause: str, target: re.Match, pre: re.Pattern, post: re.Pattern, masked: str) -> str | None:
    """The first cue of ``pre`` (before) or ``post`` (after) that reaches ``target``; cues are searched in
    ``masked`` (a copy of ``clause`` with earlier cue kinds blanked), scopes measured in ``clause``."""
    chinese = re.match(rf"[{_CJK}]", target.group()) is not None
    pre_window, post_window = (PRE_WINDOW_ZH, POST_WINDOW_ZH) if chinese else (PRE_WINDOW, POST_WINDOW)
    for cue in pre.finditer(masked):  # whole text: a cue's lookahead may need to see the target
        if cue.end() > target.start():
            break
        if _in_scope(clause, cue.end(), target.start(), pre_window, True):
            return cue.group()
    tail = masked[target.end():]
    for cue in post.finditer(tail):
        if _in_scope(clause, target.end(), target.end() + cue.start(), post_window, False):
            return cue.group()
    return None


def find_polyp_mentions(report: str) -> list[PolypMention]:
    """Every polyp word of ``report`` with its status under the rules of the module docstring.

    Args:
        report: free-text colonoscopy report, English or Chinese.

    Returns:
        the mentions in reading order (pseudopolyps excluded); empty when the report names no polyp.
    """
    mentions = []
    for clause in _clauses(_normalise(report)):
        clean = _blank(clause, _EXCLUDED)
        heading = _HISTORY_HEADING.match(clause)
        no_uncertain = _blank(clean, _UNCERTAIN_PRE)
        no_uncertain = _blank(no_uncertain, _UNCERTAIN_POST)
        for target in _TARGET.finditer(clean):
            cues = {
                UNCERTAIN: _cue_for(clause, target, _UNCERTAIN_PRE, _UNCERTAIN_POST, clean),
                NEGATED: _cue_for(clause, target, _NEGATION_PRE, _NEGATION_POST, no_uncertain),
                HISTORY: heading.group() if heading else _cue_for(clause, target, _HISTORY_PRE, _HISTORY_POST,
                                                                  no_uncertain),
            }
            status = next((s for s in _PRIORITY if cues[s] is not None), AFFIRMED)
            mentions.append(PolypMention(target.group(), clause, status, cues.get(status)))
    return mentions


def _inadequate_exam(report: str) -> bool:
    return _INADEQUATE.search(_normalise(report)) is not None


def extract_polyp_label(report: str) -> int | None:
    """Polyp label of one colonoscopy report by the offline rules of the module docstring.

    Args:
        report: free-text report (English or Chinese; several sentences allowed).

    Returns:
        1 when a current polyp is reported in any clause, 0 when polyps are negated, only in the patient's
        history, or not mentioned, None when uncertain (hedged finding, or an inadequate examination without an
        affirmed polyp) or when ``report`` is empty. A pseudopolyp is not a polyp.
    """
    if not isinstance(report, str):
        raise ValueError(f"report must be a string, got {type(report).__name__}.")
    if not report.strip():
        return None
    statuses = {m.status for m in find_polyp_mentions(report)}
    if AFFIRMED in statuses:
        return 1
    if UNCERTAIN in statuses or _inadequate_exam(report):
        return None
    return 0


# ---------------------------------------------------------------------------------------------------- labellers


@runtime_checkable
class ReportLabeller(Protocol):
    """Anything that maps a report to 1 (polyp), 0 (no polyp) or None (uncertain)."""

    def __call__(self, report: str) -> int | None: ...


class RuleReportLabeller:
    """The offline rules (:func:`extract_polyp_label`) as a labeller; deterministic, no model."""

    def __call__(self, report: str) -> int | None:
        return extract_polyp_label(report)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


DEFAULT_PROMPT = (
    "You read colonoscopy reports written in English or Chinese (结肠镜报告，英文或中文).\n"
    "Question: does this report describe at least one polyp or adenoma found in this examination?\n"
    "Answer no if polyps are negated (\"no polyps\", \"未见息肉\"), only in the history or removed before "
    "(\"history of polyps\", \"息肉切除术后\"), or are pseudopolyps (假息肉). Answer uncertain if the finding is "
    "hedged (\"possible polyp\", \"疑似息肉\", \"不除外息肉\") or the bowel preparation was too poor to see.\n"
    "Reply with one word: yes, no or uncertain (是 / 否 / 不确定).\n"
    "Report: {report}\n"
    "Answer:"
)
"""Prompt of :class:`LLMReportLabeller`; ``{report}`` is replaced by the report text."""

_ANSWER_PREFIX = re.compile(r"^(?:answer|a|答案|答|回答)\s*[:：]\s*")
_ANSWER_WORDS = {"yes": 1, "y": 1, "1": 1, "positive": 1, "true": 1,
                 "no": 0, "n": 0, "0": 0, "negative": 0, "false": 0}
# checked as prefixes of the first line, in this order (不确定 before 不是; 是 after both)
_ANSWER_CHINESE = (("不确定", None), ("不清楚", None), ("无法", None), ("不是", 0), ("否", 0), ("没有", 0),
                   ("无", 0), ("阴性", 0), ("是", 1), ("有", 1), ("阳性", 1))


def parse_llm_answer(text: str) -> int | None:
    """Label of a generated answer: only its first non-empty line, and of that the first word, counts.

    ``yes``/``是``/``1``/``positive`` -> 1; ``no``/``否``/``0``/``negative`` -> 0; anything else (``uncertain``,
    ``不确定``, an empty answer, a sentence) -> None. Case, surrounding punctuation or markup (``**Yes.**``) and an
    ``Answer:``/``答：`` prefix are ignored.
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _ANSWER_PREFIX.sub("", unicodedata.normalize("NFKC", line).lower().strip(" *_`\"'"))
    for prefix, label in _ANSWER_CHINESE:
        if line.startswith(prefix):
            return label
    word = re.match(r"[a-z0-9]+", line)
    return _ANSWER_WORDS.get(word.group()) if word else None


class LLMReportLabeller:
    """A local causal language model asked :data:`DEFAULT_PROMPT`-style questions, answers parsed by
    :func:`parse_llm_answer`.

    The model and tokenizer are read from ``model_path`` with ``local_files_only=True`` (never downloaded).
    When the tokenizer has a chat template, the prompt is sent as one user message with the generation prompt
    added; otherwise as plain text. Decoding is greedy, so a model gives the same answer every time.

    Args:
        model_path: folder written by ``save_pretrained`` (model and tokenizer).
        max_new_tokens: most tokens generated per report.
        device: torch device of the model.
        prompt: template holding ``{report}`` once or more.

    Raises:
        FileNotFoundError: ``model_path`` is not a folder.
        ValueError: ``prompt`` lacks ``{report}`` or ``max_new_tokens < 1``.
    """

    def __init__(self, model_path: str, max_new_tokens: int = 8, device: str = "cpu",
                 prompt: str = DEFAULT_PROMPT) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"LLM model_path {model_path} is not a folder (a local save_pretrained "
                                    "folder is required; nothing is downloaded).")
        if "{report}" not in prompt:
            raise ValueError(f"prompt must contain the placeholder '{{report}}'; got {prompt[:80]!r}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        self.model_path, self.max_new_tokens, self.device, self.prompt = model_path, max_new_tokens, device, prompt
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).to(device).eval()

    def format_prompt(self, report: str) -> str:
        """The text given to the model for ``report`` (chat template applied when the tokenizer has one)."""
        text = self.prompt.replace("{report}", report.strip())
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def answer(self, report: str) -> str:
        """The generated continuation (new tokens only, special tokens removed) for ``report``."""
        import torch

        inputs = self.tokenizer(self.format_prompt(report), return_tensors="pt", add_special_tokens=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad_id)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, report: str) -> int | None:
        if not report.strip():
            return None
        return parse_llm_answer(self.answer(report))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_path={self.model_path!r}, device={self.device!r})"


def make_report_labeller(kind: str = "rules", model_path: str | None = None, **kw: Any) -> ReportLabeller:
    """``"rules"`` -> :class:`RuleReportLabeller`; ``"llm"`` -> :class:`LLMReportLabeller` (``model_path`` and
    ``kw`` passed on). ValueError for another ``kind``, for ``"llm"`` without ``model_path``, or for ``kw`` given
    to the rules."""
    if kind == "rules":
        if kw:
            raise ValueError(f"the rules labeller takes no options; got {sorted(kw)}.")
        return RuleReportLabeller()
    if kind == "llm":
        if not model_path:
            raise ValueError("labeller kind 'llm' needs model_path: a local folder holding a causal language model "
                             "and its tokenizer (save_pretrained layout).")
        return LLMReportLabeller(str(model_path), **kw)
    raise ValueError(f"unknown labeller kind {kind!r}; expected 'rules' or 'llm'.")


# ---------------------------------------------------------------------------------------------------- tables


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV in UTF-8 (BOM accepted), or GB18030 (Chinese hospital exports) as a fallback."""
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            with open(path, newline="", encoding=encoding) as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                header = list(reader.fieldnames or [])
        except UnicodeDecodeError:
            continue
        if encoding != "utf-8-sig":
            logger.info("%s is not UTF-8; read it as GB18030.", path)
        return header, rows
    raise ValueError(f"report table {path} is neither UTF-8 nor GB18030 text; save it as UTF-8 CSV or .xlsx.")


def _read_xlsx_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of the first sheet of an Excel workbook, every cell as text (empty cells as "")."""
    import pandas as pd

    frame = pd.read_excel(path, sheet_name=0, dtype=str, na_filter=False)
    return [str(c) for c in frame.columns], frame.to_dict(orient="records")


def read_report_table(path: str | os.PathLike, id_column: str = "exam_id",
                      text_column: str = "report") -> list[tuple[str, str]]:
    """``(exam_id, report text)`` pairs of a CSV or Excel table, in file order.

    Column names and exam ids are stripped of surrounding spaces; an empty text is kept (its label is None).

    Args:
        path: ``.csv`` (UTF-8, or GB18030) or ``.xlsx``/``.xlsm`` (first sheet) with a header row.
        id_column: column of exam ids (e.g. ``检查序号`` in the original Excel tables).
        text_column: column of report texts.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: another file type, a missing column (the message lists the columns found), an empty exam
            id, duplicate exam ids (named), or no rows; every message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report table {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, rows = _read_csv_rows(path)
    elif suffix in (".xlsx", ".xlsm"):
        header, rows = _read_xlsx_rows(path)
    else:
        raise ValueError(f"report table {path}: unsupported file type {suffix!r}; use .csv or .xlsx.")
    header = [h.strip() for h in header if h is not None]
    missing = [c for c in (id_column, text_column) if c not in header]
    if missing:
        raise ValueError(f"report table {path} lacks the column(s) {missing}; columns found: {header}. "
                         "Pass id_column/text_column to name them.")
    if not rows:
        raise ValueError(f"report table {path} has a header but no rows.")
    pairs = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        row = {str(k).strip(): ("" if v is None else str(v)) for k, v in row.items() if k is not None}
        exam_id = row[id_column].strip()
        if not exam_id:
            raise ValueError(f"report table {path}, row {number}: empty exam id in column {id_column!r}.")
        pairs.append((exam_id, row[text_column].strip()))
    duplicates = sorted(i for i, n in Counter(i for i, _ in pairs).items() if n > 1)
    if duplicates:
        raise ValueError(f"report table {path}: exam id(s) {duplicates[:10]} appear more than once "
                         f"({len(duplicates)} duplicated id(s)); one report per exam is expected.")
    return pairs


def label_reports(rows: Iterable[tuple[str, str]], labeller: ReportLabeller) -> list[dict[str, Any]]:
    """Label every report: ``[{"exam_id": str, "report": str, "label": 1 | 0 | None}]`` in input order.

    An empty report gets None without calling ``labeller``. ValueError, naming the exam, when ``labeller``
    returns something other than 1, 0 or None.
    """
    labelled = []
    for exam_id, report in rows:
        label = labeller(report) if report.strip() else None
        if label is not None and (isinstance(label, bool) or label not in (0, 1)):
            raise ValueError(f"labeller {labeller!r} returned {label!r} for exam {exam_id!r}; expected 1, 0 or None.")
        labelled.append({"exam_id": exam_id, "report": report, "label": label})
        logger.debug("exam %s: label %s", exam_id, label)
    return labelled


def write_exam_labels(rows: Sequence[Mapping[str, Any]], output_csv: str | os.PathLike) -> dict[str, int]:
    """Write ``exam_id,label`` for the certain reports to ``output_csv`` and ``exam_id,report`` for the
    uncertain ones to ``<output stem>_uncertain.csv`` beside it (both atomic, both always written).

    Args:
        rows: output of :func:`label_reports` (``exam_id``, ``report``, ``label`` in {1, 0, None}).
        output_csv: path of the label table.

    Returns:
        ``{"positive": n1, "negative": n0, "uncertain": n_none}``.

    Raises:
        ValueError: a row whose label is not 1, 0 or None (the exam is named).
    """
    output_csv = Path(output_csv)
    certain, uncertain = [], []
    for row in rows:
        label = row["label"]
        if label is None:
            uncertain.append(row)
        elif label in (0, 1) and not isinstance(label, bool):
            certain.append({"exam_id": row["exam_id"], "label": int(label)})
        else:
            raise ValueError(f"exam {row['exam_id']!r}: label {label!r} is not 1, 0 or None.")
    write_csv(output_csv, ("exam_id", "label"), certain)
    write_csv(output_csv.with_name(f"{output_csv.stem}_uncertain.csv"), ("exam_id", "report"), uncertain)
    positives = sum(r["label"] for r in certain)
    return {"positive": positives, "negative": len(certain) - positives, "uncertain": len(uncertain)}


def ensure_exam_labels(
    reports: str | os.PathLike,
    exam_labels: str | os.PathLike,
    labeller: str = "rules",
    model_path: str | None = None,
    id_column: str = "exam_id",
    text_column: str = "report",
) -> str:
    """Stage 1 of EndoKED: the exam-label table ``exam_labels``, written from the report table ``reports`` when it
    does not exist yet (an existing table, e.g. labelled by hand or by an earlier run, is kept as it is).

    Logs the positive / negative / uncertain counts (uncertain exams are left out of the table) and returns the
    table's path, so a bundle config can use it directly.
    """
    if os.path.isfile(exam_labels):
        logger.info("stage 1, report labels: %s exists, reports not relabelled", exam_labels)
        return str(exam_labels)
    rows = label_reports(read_report_table(reports, id_column, text_column), make_report_labeller(labeller, model_path))
    counts = write_exam_labels(rows, exam_labels)
    logger.info("stage 1, report labels: %s labelled by %r -> %s: %d positive, %d negative, %d uncertain exam(s) "
                "(left out)", reports, labeller, exam_labels, counts["positive"], counts["negative"], counts["uncertain"])
    return str(exam_labels)
