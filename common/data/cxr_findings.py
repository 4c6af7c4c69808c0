"""Finding tags, anatomical regions and rule-based report parsing for ASG (specs/asg.md §2.3, §3.5).

ASG (Li et al., MICCAI 2024) pre-trains on image–report pairs annotated with ⟨anatomical region, finding,
existence⟩ triplets: ``labels`` (40 finding tags, values 1 / 0 / -1) and, per anatomical region, the report
sentences aligned with it (``region`` boxes + ``sent_index``). The tag extractor and the alignment rules were
never released (spec §0, §2.3), so this module gives a small, documented, rule-based substitute used by the
synthetic demo (:py:mod:`common.data.demo_cxr`) and usable on real report text:

* :data:`TAGS` — the 40 IRL query tags in the fixed order of spec §3.5 (spelled exactly as there);
* :data:`REGIONS` — 23 anatomical regions (Chest ImaGenome-like names, **our choice**, spec §2.3 leaves them
  open): the 16 lateralised lung / pleura / diaphragm regions (right then left: lung, upper / mid / lower lung
  zone, hilar structures, apical zone, costophrenic angle, hemidiaphragm) and 7 midline structures (trachea,
  spine, aortic arch, mediastinum, upper mediastinum, cardiac silhouette, svc). "right" / "left" are the
  patient's sides (the image's left / right on a PA radiograph);
* :func:`extract_tags` — per tag a few surface forms, NegEx-like negation and uncertainty cues;
* :func:`align_regions` — sentence → region keyword rules with a side resolver;
* :func:`sentence_word_index` — the word positions of sentences in the joined report (record format).

Sentences are expected in the cleaned form of spec §2.2 (lower case, ``\\w+`` runs joined by single spaces);
other text is normalised the same way first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["TAGS", "REGIONS", "TAG_INDEX", "REGION_INDEX", "normalise_sentence", "extract_tags", "align_regions",
           "sentence_word_index"]

TAGS: tuple[str, ...] = (
    "pleural effusion", "opacity", "pneumothorax", "edema", "atelectasis", "tube", "consolidation",
    "enlarged cardiomediastinum", "tip", "pneumonia", "line", "cardiomegaly", "fracture", "calcification", "device",
    "engorgement", "nodule", "wire", "pacemaker", "pleural thicken", "marking", "scar", "hyperinflate", "blunt",
    "collapse", "emphysema", "aerate", "mass", "infiltration", "obscure", "deformity", "hernia", "drainage",
    "distention", "shift", "stent", "lesion", "hardware", "dilation", "aspiration",
)
"""The 40 finding tags of spec §3.5 (IRL queries; ``labels`` order)."""

REGIONS: tuple[str, ...] = (
    "right lung", "right upper lung zone", "right mid lung zone", "right lower lung zone", "right hilar structures",
    "right apical zone", "right costophrenic angle", "right hemidiaphragm",
    "left lung", "left upper lung zone", "left mid lung zone", "left lower lung zone", "left hilar structures",
    "left apical zone", "left costophrenic angle", "left hemidiaphragm",
    "trachea", "spine", "aortic arch", "mediastinum", "upper mediastinum", "cardiac silhouette", "svc",
)
"""23 anatomical regions (``num_region = 23``, spec §2.3), Chest ImaGenome names; our selection."""

TAG_INDEX: dict[str, int] = {t: i for i, t in enumerate(TAGS)}
REGION_INDEX: dict[str, int] = {r: i for i, r in enumerate(REGIONS)}

# --- finding tags --------------------------------------------------------------------------------------------

_TAG_FORMS: dict[str, str] = {
    "pleural effusion": r"effusions?|pleural fluid|hydrothorax",
    "opacity": r"opacit(?:y|ies)|opacification|opacified",
    "pneumothorax": r"pneumothora(?:x|ces)",
    "edema": r"o?edema|edematous",
    "atelectasis": r"atelecta\w*",
    "tube": r"tubes?",
    "consolidation": r"consolidat\w*",
    "enlarged cardiomediastinum": r"enlarge\w* cardiomediastin\w*|cardiomediastin\w* (?:silhouette |contours? )?"
                                  r"(?:is |are )?(?:\w+ )?(?:enlarged|widened)|widen\w* (?:of the )?mediastin\w*"
                                  r"|mediastin\w* (?:is )?widen\w*",
    "tip": r"tips?",
    "pneumonia": r"pneumonias?",
    "line": r"lines?",
    "cardiomegaly": r"cardiomegaly|enlarge\w* (?:cardiac silhouette|heart)|(?:heart|cardiac silhouette|heart size"
                    r"|cardiac size) (?:is |are |appears )?(?:\w+ )?(?:enlarged|increased)",
    "fracture": r"fractur\w*",
    "calcification": r"calcifi\w*",
    "device": r"devices?",
    "engorgement": r"engorge\w*|vascular congestion",
    "nodule": r"nodul\w*",
    "wire": r"wires?",
    "pacemaker": r"pacemakers?|pacers?",
    "pleural thicken": r"pleural thicken\w*|thicken\w* (?:of the )?pleura\w*",
    "marking": r"markings?",
    "scar": r"scar(?:s|ring|red)?",
    "hyperinflate": r"hyperinflat\w*|hyperexpan\w*|overinflat\w*",
    "blunt": r"blunt\w*",
    "collapse": r"collaps\w*",
    "emphysema": r"emphysema\w*",
    "aerate": r"\w*aerat\w*",
    "mass": r"mass(?:es)?",
    "infiltration": r"infiltrat\w*",
    "obscure": r"obscur\w*",
    "deformity": r"deformit\w*|deformed",
    "hernia": r"hernia\w*",
    "drainage": r"drain\w*",
    "distention": r"disten(?:tion|sion|ded)|distend\w*",
    "shift": r"shift\w*",
    "stent": r"stents?",
    "lesion": r"lesions?",
    "hardware": r"hardware",
    "dilation": r"dilat\w*",
    "aspiration": r"aspirat\w*",
}
_TAG_RES: tuple[re.Pattern, ...] = tuple(re.compile(rf"\b(?:{_TAG_FORMS[t]})\b") for t in TAGS)

_NEG_PRE = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|resolved|resolution of|absence of|nor)\b")
_PSEUDO_NEG = re.compile(r"\bno (?:\w+ )?(?:change|changes|increase|decrease)\b|\bnot (?:\w+ )?changed\b")
_NEG_POST = re.compile(r"\b(?:not (?:seen|identified|visualized|present|evident|appreciated)|resolved|removed"
                       r"|absent|unlikely)\b")
_UNCERTAIN = re.compile(r"\b(?:possible|possibly|probable|probably|may|might|could|likely|suggest\w*|questionable"
                        r"|cannot be excluded|cannot exclude|not excluded|concerning for|suspicious for|versus|vs)\b")
_TERMINATOR = re.compile(r"\b(?:but|however|although|though|which|except|aside from|apart from|there is|there are)\b")

_RANK_TO_VALUE = np.array([0, -1, 1], np.int8)  # rank 0 = absent / negated, 1 = uncertain, 2 = positive


def normalise_sentence(sentence: str) -> str:
    """Lower-case ``\\w+`` runs joined by single spaces (the cleaned sentence form of spec §2.2)."""
    return " ".join(re.findall(r"\w+", sentence.lower()))


def _clause(text: str, start: int, end: int) -> tuple[int, int]:
    """Character span of the clause holding ``text[start:end]``: from the end of the last terminator cue before the
    mention to the start of the first terminator after it (the whole sentence when there is none)."""
    lo, hi = 0, len(text)
    for m in _TERMINATOR.finditer(text):
        if m.end() <= start:
            lo = m.end()
        elif m.start() >= end:
            hi = m.start()
            break
    return lo, hi


def _mention_rank(text: str, start: int, end: int) -> int:
    """Rank of one mention ``text[start:end]``: 0 negated, 1 uncertain, 2 positive.

    Negated: a negation cue (not inside a pseudo-negation such as "no change") starts in the clause before the
    mention's end, or a post-negation cue ("not seen", "resolved", ...) follows it in the clause. Uncertain: an
    uncertainty cue anywhere in the clause.
    """
    lo, hi = _clause(text, start, end)
    pseudo = [(m.start(), m.end()) for m in _PSEUDO_NEG.finditer(text)]
    pre = any(lo <= m.start() < end and not any(a <= m.start() < b for a, b in pseudo)
              for m in _NEG_PRE.finditer(text))
    post = any(m.start() >= end and m.end() <= hi for m in _NEG_POST.finditer(text))
    if pre or post:
        return 0
    return 1 if _UNCERTAIN.search(text, lo, hi) else 2


def extract_tags(sentences: Sequence[str]) -> np.ndarray:
    """Finding labels of a report, in :data:`TAGS` order: ``int8 [40]`` with values 1 / 0 / -1 (spec §2.3).

    Each mention of a tag's surface forms (e.g. "effusion(s)" / "pleural fluid" → pleural effusion, "cardiomegaly"
    / "enlarged heart" / "heart is (mildly) enlarged" → cardiomegaly) gets rank 0 when negated ("no", "not",
    "without", "negative for", "free of", "clear of", "resolved", ... before it in its clause), 1 when uncertain
    ("possible", "may", "likely", "cannot be excluded", "concerning for", ... in its clause), 2 otherwise. A tag's
    value is the highest rank over all its mentions in all sentences (positive > uncertain > negated) mapped to
    ``{0: 0, 1: -1, 2: 1}``; an unmentioned tag is 0.

    Args:
        sentences: the report's sentences (cleaned; other text is normalised first).

    Returns:
        ``np.ndarray`` int8 ``[40]``.
    """
    rank = np.zeros(len(TAGS), np.int64)
    for sentence in sentences:
        text = normalise_sentence(sentence)
        for t, pattern in enumerate(_TAG_RES):
            for m in pattern.finditer(text):
                rank[t] = max(rank[t], _mention_rank(text, m.start(), m.end()))
    return _RANK_TO_VALUE[rank]


# --- anatomical regions --------------------------------------------------------------------------------------

_SIDE_WORDS = {"right": ("right",), "left": ("left",), "bilateral": ("right", "left"),
               "bilaterally": ("right", "left"), "both": ("right", "left")}
_SIDE_WINDOW = 4  # a side word applies to a structure at most this many words before (or else after) it

# lateralised structures: pattern -> region suffixes (added for the resolved side(s)); a forced side overrides
_SIDED: tuple[tuple[re.Pattern, tuple[str, ...], tuple[str, ...] | None], ...] = tuple(
    (re.compile(rf"\b(?:{p})\b"), suffixes, forced) for p, suffixes, forced in (
        (r"upper (?:lobes?|lungs?|zones?|lung zones?)", ("lung", "upper lung zone"), None),
        (r"mid (?:lungs?|zones?|lung zones?)|midlung", ("lung", "mid lung zone"), None),
        (r"middle lobe", ("lung", "mid lung zone"), ("right",)),
        (r"lingula\w*", ("lung", "mid lung zone"), ("left",)),
        (r"lower (?:lobes?|lungs?|zones?|lung zones?)|bases?|basilar|basal", ("lung", "lower lung zone"), None),
        (r"bibasilar|bibasal", ("lung", "lower lung zone"), ("right", "left")),
        (r"retrocardiac", ("lung", "lower lung zone"), ("left",)),
        (r"ap(?:ex|ices|ical)|pneumothora(?:x|ces)", ("apical zone",), None),
        (r"biapical", ("apical zone",), ("right", "left")),
        (r"hil(?:um|ar|a)|perihilar", ("hilar structures",), None),
        (r"costophrenic|effusions?|pleural fluid|blunt\w*", ("costophrenic angle",), None),
        (r"(?:hemi)?diaphragms?|(?:hemi)?diaphragmatic", ("hemidiaphragm",), None),
        # last: without a side word of its own, a lung word takes the sides of the lung zones found above
        (r"lungs?|pulmonary|ribs?|opacit\w*|consolidat\w*|pneumonias?|infiltrat\w*|atelecta\w*|nodul\w*"
         r"|mass(?:es)?|o?edema|airspace|granulomas?|scar\w*|emphysema\w*", ("lung",), None),
    )
)
# midline structures: pattern -> regions
_MIDLINE: tuple[tuple[re.Pattern, tuple[str, ...]], ...] = tuple(
    (re.compile(rf"\b(?:{p})\b"), regions) for p, regions in (
        (r"heart|cardiac|cardiomegaly|pacemakers?|pericardial", ("cardiac silhouette",)),
        (r"cardiomediastin\w*", ("cardiac silhouette", "mediastinum")),
        (r"mediastin\w*|sternotomy|hiatal", ("mediastinum",)),
        (r"(?:upper|superior) mediastin\w*|paratracheal", ("upper mediastinum",)),
        (r"trachea\w*|endotracheal|carina", ("trachea",)),
        (r"spine|spinal|vertebra\w*|osseous|bony|bones?|skeletal|degenerative", ("spine",)),
        (r"aort\w*|arch", ("aortic arch",)),
        (r"svc|vena cava|cavoatrial|atrium|atrial", ("svc",)),
    )
)


def _side_of(words: list[str], k: int) -> tuple[str, ...] | None:
    """Sides for the structure at word ``k``: the nearest side word at most ``_SIDE_WINDOW`` words before it, else
    the nearest one at most that far after it, else None."""
    before = [j for j in range(max(0, k - _SIDE_WINDOW), k) if words[j] in _SIDE_WORDS]
    if before:
        return _SIDE_WORDS[words[before[-1]]]
    after = [j for j in range(k + 1, min(len(words), k + 1 + _SIDE_WINDOW)) if words[j] in _SIDE_WORDS]
    return _SIDE_WORDS[words[after[0]]] if after else None


def _sentence_regions(text: str) -> set[int]:
    """Region ids one normalised sentence mentions (rules above)."""
    words = text.split()
    found: set[int] = set()
    for pattern, suffixes, forced in _SIDED:
        for m in pattern.finditer(text):
            sides = forced or _side_of(words, text.count(" ", 0, m.start()))
            if sides is None:  # no side word: a lung word follows the lung zones already found, else both sides
                zone_sides = tuple(s for s in ("right", "left") if REGION_INDEX[f"{s} lung"] in found)
                sides = zone_sides if suffixes == ("lung",) and zone_sides else ("right", "left")
            found.update(REGION_INDEX[f"{side} {suffix}"] for side in sides for suffix in suffixes)
    for pattern, regions in _MIDLINE:
        if pattern.search(text):
            found.update(REGION_INDEX[r] for r in regions)
    return found


def align_regions(sentences: Sequence[str]) -> list[list[int]]:
    """Sentence ↔ anatomical-region alignment (our rules; ASG's are unreleased, spec §2.3).

    A sentence is aligned with a region when it mentions it: lung words ("lung(s)", "pulmonary", a parenchymal
    finding such as "opacity", "ribs") → the lung of the resolved side; "upper / mid / lower lobe|lung|zone",
    "base(s)", "basilar", "middle lobe" (right), "lingula" (left), "retrocardiac" (left) → that lung and zone;
    "apex", "apical", "pneumothorax" → apical zone; "hilum / hilar / perihilar" → hilar structures;
    "costophrenic", "effusion", "blunting" → costophrenic angle; "(hemi)diaphragm" → hemidiaphragm; "heart" /
    "cardiac" / "cardiomegaly" → cardiac silhouette; "mediastin*" → mediastinum; "upper / superior mediastinum",
    "paratracheal" → upper mediastinum; "trachea", "endotracheal", "carina" → trachea; "spine", "osseous", "bony"
    → spine; "aorta / aortic / arch" → aortic arch; "svc", "vena cava", "cavoatrial" → svc. The side of a
    lateralised structure is the nearest "right" / "left" ("bilateral", "both": both sides) at most 4 words
    before it, else at most 4 words after it, else — for a lung word — the sides of the lung zones the sentence
    names ("lingula atelectasis" → left), else both sides.

    Returns:
        one list per :data:`REGIONS` entry: the ids (ascending) of the sentences aligned with it.
    """
    aligned: list[list[int]] = [[] for _ in REGIONS]
    for i, sentence in enumerate(sentences):
        for r in sorted(_sentence_regions(normalise_sentence(sentence))):
            aligned[r].append(i)
    return aligned


def sentence_word_index(sentences: Sequence[str], sentence_ids: Sequence[int]) -> list[int]:
    """Positions of the words of ``sentences[i]`` (``i`` in ``sentence_ids``) in ``" ".join(sentences).split()``.

    Position 0 is the report's first word (the first word after [CLS] in the aggregated text sequence, spec §2.3).
    With ``n_j`` the word count of sentence ``j`` and ``o_i = sum_{j<i} n_j``, sentence ``i`` covers
    ``o_i .. o_i + n_i - 1``. The result is ascending, without repeats.

    Raises:
        ValueError: a sentence id outside ``[0, len(sentences))``.
    """
    counts = np.array([len(s.split()) for s in sentences], np.int64)
    ids = np.unique(np.asarray(list(sentence_ids), np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= len(sentences)):
        raise ValueError(f"sentence ids {ids.tolist()} out of range for a report of {len(sentences)} sentences.")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in ids] or [np.zeros(0, np.int64)]).tolist()
