"""Embedded demo for ASG: synthetic chest radiographs with reports, region boxes and downstream labels.

ASG (specs/asg.md) pre-trains on MIMIC-CXR image–report pairs with ≤ 23 anatomical-region boxes aligned to
report sentences (§2.3), then evaluates on CheXpert-like classification, RSNA-like zero-shot pneumonia detection
and SIIM-like segmentation (§6). None of these images can be used here, so this module draws look-alikes on
demand (spec §10)::

    <root>/images/<id>.png        8-bit grey, non-square (H in [272, 320], W in [224, 264])
    <root>/masks/<id>.png         0 / 255 lesion mask (opacity-type lesions and pneumothorax; may be empty)
    <root>/pretrain.json          {"train"|"valid"|"test": [record]}, the contract record format (id, image,
                                  sentences, labels[40], boxes (original px, pascal_voc), sent_index)
    <root>/classification.json    {"classes": CLASSIFICATION_CLASSES, split: [{"image", "label": [5], "pneumonia"}]}
    <root>/segmentation.json      {split: [{"image", "label": "masks/<id>.png"}]}
    <root>/.complete              marker (common.data.generated)

Image paths are relative to ``<root>``.

**Reports.** ``reports=None``: each report is composed from embedded template sentences (normal findings,
negations, abnormal findings with a location, uncertain phrasings) for 0–3 randomly drawn findings. Otherwise
``reports`` is a path for :py:func:`common.data.cxr_reports.load_report_sentences` (e.g. IU X-ray's
``annotation.json``): its cleaned sentences and splits are used (the first ``n_<split>`` of each split, in file
order) and an image is painted for each.

**Labels and painting.** ``labels = extract_tags(sentences)`` (:py:mod:`common.data.cxr_findings`); the image is
painted from the same text, sentence by sentence: every tag a sentence asserts (1, full strength) or leaves
uncertain (-1, half strength) is drawn in the regions the sentence aligns with (``align_regions``), or in a
random lung zone / side when it names none. Anatomy (patient's right on the image's left): a bright body, two
dark textured lung fields (ellipses cut by the diaphragm domes, the heart and the mediastinum), posterior ribs,
clavicles, a mediastinum band, a bright spine with a dark trachea, the aortic knob and the heart. Findings:

* cardiomegaly → heart 1.45x wider (1.2x if uncertain); enlarged cardiomediastinum → mediastinum 1.5x wider;
  hyperinflate / emphysema → taller lungs, lower domes;
* opacity / consolidation / pneumonia / infiltration / atelectasis → a bright blurred patch (atelectasis: a thin
  tilted band) in a lung zone, clipped to the lung (→ segmentation mask);
* pleural effusion / blunt → fluid with a meniscus (higher laterally) filling the costophrenic angle;
* pneumothorax → the apical-lateral lung replaced by a dark band without lung texture, with a bright visceral
  pleural line (→ segmentation mask);
* nodule / mass / calcification → a small / large / tiny dense round spot; edema → perihilar haze over both lungs;
* tube (endotracheal, down the trachea), line (central line to the svc), wire (sternotomy loops), pacemaker /
  device (a generator box with a lead), hardware / stent (a spinal plate), fracture (a gap in the ribs of one
  side), hernia (a gas bubble behind the heart). The other tags only appear in the text.

**Regions.** The boxes of the 23 :data:`~common.data.cxr_findings.REGIONS` are computed from the drawn anatomy
(lung zones = thirds of the lung's box, apical zone = its top fifth, hilum = medial 45 % of the middle band,
costophrenic angle = lateral 40 % of the bottom 18 %, ...); a record keeps the rows of the regions the report
aligns at least one sentence with, in region order, with ``sent_index`` the word positions of those sentences.

**Downstream labels.** ``classification.json``: CheXpert-5 (:data:`CLASSIFICATION_CLASSES`) from the tags, an
uncertain tag mapped to 1 (U-Ones: atelectasis, edema, pleural effusion) or 0 (U-Zeros: cardiomegaly,
consolidation) as in spec §6.1, and ``pneumonia`` = 1 iff the pneumonia tag is positive (the RSNA-like zero-shot
target).

Drawing is vectorised (OpenCV primitives and numpy masks); the default 96 images are written in a few seconds,
atomically (:py:func:`common.data.generated.ensure_generated`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.data.cxr_reports import load_report_sentences
from common.data.cxr_findings import REGION_INDEX, REGIONS, TAG_INDEX, TAGS, align_regions, extract_tags, \
    normalise_sentence, sentence_word_index
from common.data.generated import ensure_generated

__all__ = ["ensure_demo_cxr_dataset", "template_report", "CLASSIFICATION_CLASSES", "U_ONES", "SPLITS",
           "LESION_TAGS"]

GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "valid", "test")
CLASSIFICATION_CLASSES: tuple[str, ...] = ("atelectasis", "cardiomegaly", "consolidation", "edema",
                                           "pleural effusion")
U_ONES: tuple[bool, ...] = (True, False, False, True, True)
"""Per class of :data:`CLASSIFICATION_CLASSES`: an uncertain (-1) tag maps to 1 (True, U-Ones) or 0 (U-Zeros)."""
LESION_TAGS: tuple[str, ...] = ("opacity", "atelectasis", "consolidation", "pneumonia", "infiltration")
"""Opacity-type tags painted as a lung patch that enters the segmentation mask (with pneumothorax)."""

_SIDES = ("right", "left")
_ZONES = {s: tuple(REGION_INDEX[f"{s} {z} lung zone"] for z in ("upper", "mid", "lower")) for s in _SIDES}
_LUNG = {s: REGION_INDEX[f"{s} lung"] for s in _SIDES}
_LESION_AMPLITUDE = {"opacity": 70.0, "atelectasis": 75.0, "consolidation": 90.0, "pneumonia": 85.0,
                     "infiltration": 60.0}
_DEVICE_TAGS = ("tube", "line", "wire", "pacemaker", "device", "hardware", "stent")

# --- template reports ----------------------------------------------------------------------------------------

_LOCATIONS = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula",
              "left lower lobe", "right base", "left base", "right lung", "left lung")
# finding kind -> (weight, positive templates, uncertain templates); {loc} a lung location, {side} right / left;
# pneumonia (weight 0) is drawn on its own with probability _PNEUMONIA_RATE, for the zero-shot task's positives
_FINDINGS: dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]] = {
    "opacity": (1.0, ("there is a {loc} opacity", "patchy airspace opacity in the {loc}"),
                ("possible {loc} opacity",)),
    "consolidation": (1.2, ("focal consolidation in the {loc}", "{loc} consolidation"),
                      ("{loc} consolidation cannot be excluded",)),
    "pneumonia": (0.0, ("{loc} consolidation consistent with pneumonia", "{loc} pneumonia"),
                  ("findings concerning for {loc} pneumonia", "possible early {loc} pneumonia")),
    "atelectasis": (1.4, ("linear atelectasis in the {loc}", "{loc} atelectasis"),
                    ("{loc} opacity likely atelectasis", "probable {loc} atelectasis")),
    "infiltration": (0.5, ("patchy infiltrates in the {loc}",), ("questionable {loc} infiltrate",)),
    "effusion": (1.6, ("small {side} pleural effusion", "moderate {side} pleural effusion",
                       "blunting of the {side} costophrenic angle from a small effusion",
                       "bilateral pleural effusions"),
                 ("cannot exclude a small {side} pleural effusion", "possible small {side} effusion")),
    "pneumothorax": (1.0, ("small {side} apical pneumothorax", "there is a moderate {side} pneumothorax"),
                     ("questionable small {side} apical pneumothorax",)),
    "cardiomegaly": (1.4, ("the heart is enlarged", "moderate cardiomegaly", "enlarged cardiac silhouette"),
                     ("possible mild cardiomegaly", "the heart is possibly enlarged")),
    "edema": (1.4, ("mild pulmonary edema", "interstitial edema in both lungs"), ("possible mild pulmonary edema",)),
    "nodule": (0.6, ("a small nodule in the {loc}", "a 1 cm nodule in the {loc}"), ("questionable {loc} nodule",)),
    "mass": (0.4, ("a {loc} mass is present",), ()),
    "tube": (0.4, ("endotracheal tube tip 4 cm above the carina",), ()),
    "line": (0.4, ("right internal jugular central line with tip in the svc",), ()),
    "wire": (0.3, ("median sternotomy wires are intact",), ()),
    "pacemaker": (0.3, ("left chest wall pacemaker with leads in the heart",), ()),
    "fracture": (0.3, ("healed {side} rib fracture",), ()),
    "calcification": (0.4, ("calcified granuloma in the {loc}",), ()),
    "emphysema": (0.3, ("the lungs are hyperinflated with emphysema",), ()),
    "hernia": (0.2, ("small hiatal hernia",), ()),
    "scar": (0.3, ("{loc} scarring",), ()),
}
_PNEUMONIA_RATE = 0.3
_PARENCHYMAL = {"opacity", "consolidation", "pneumonia", "atelectasis", "infiltration", "edema", "nodule", "mass",
                "emphysema", "scar", "calcification"}
# negated statements, used for kinds not drawn
_NEGATIONS: dict[str, tuple[str, ...]] = {
    "effusion": ("no pleural effusion", "there is no pleural effusion", "the costophrenic angles are sharp"),
    "pneumothorax": ("no pneumothorax", "negative for pneumothorax", "there is no pneumothorax"),
    "consolidation": ("no focal consolidation", "the lungs are free of consolidation"),
    "pneumonia": ("no evidence of pneumonia",),
    "edema": ("no pulmonary edema", "there is no edema"),
    "cardiomegaly": ("the heart is normal in size", "heart size is normal", "the heart is not enlarged"),
    "nodule": ("no suspicious pulmonary nodule or mass",),
    "opacity": ("the lungs are clear", "no focal airspace opacity"),
}
_NORMALS = ("the trachea is midline", "the osseous structures are intact", "the mediastinal contours are normal",
            "the aortic arch is unremarkable", "the hila are unremarkable", "the hemidiaphragms are normal",
            "no acute bony abnormality")


def template_report(rng: np.random.Generator) -> list[str]:
    """A synthetic report: pneumonia with probability 0.3 and 0–3 other findings drawn by weight (each
    positive, or uncertain with probability 0.25 when the kind has an uncertain phrasing), 2 negated statements
    about kinds not drawn ("the lungs are clear" only when no parenchymal finding was drawn), 1–3 normal midline
    statements; shuffled. Cleaned sentences."""
    kinds = list(_FINDINGS)
    weights = np.array([_FINDINGS[k][0] for k in kinds])
    n = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
    drawn = [kinds[i] for i in rng.choice(len(kinds), size=n, replace=False, p=weights / weights.sum())]
    if rng.random() < _PNEUMONIA_RATE:
        drawn.append("pneumonia")
    sentences = []
    for kind in drawn:
        _, positive, uncertain = _FINDINGS[kind]
        pool = uncertain if uncertain and rng.random() < 0.25 else positive
        sentences.append(pool[rng.integers(len(pool))].format(loc=_LOCATIONS[rng.integers(len(_LOCATIONS))],
                                                              side=_SIDES[rng.integers(2)]))
    blocked = set(drawn) | ({"opacity", "consolidation", "pneumonia", "nodule"} if _PARENCHYMAL & set(drawn) else set())
    negatable = [k for k in _NEGATIONS if k not in blocked]
    for k in rng.choice(negatable, size=min(2, len(negatable)), replace=False):
        sentences.append(_NEGATIONS[k][rng.integers(len(_NEGATIONS[k]))])
    sentences += [_NORMALS[i] for i in rng.choice(len(_NORMALS), size=int(rng.integers(1, 4)), replace=False)]
    if not drawn:
        sentences.append("no acute cardiopulmonary process")
    return [normalise_sentence(sentences[i]) for i in rng.permutation(len(sentences))]


# --- anatomy -------------------------------------------------------------------------------------------------

def _ellipse(shape: tuple[int, int], cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    """Boolean filled ellipse (centre / semi-axes in pixels, sub-pixel via OpenCV ``shift=4``)."""
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (round(cx * 16), round(cy * 16)), (max(1, round(ax * 16)), max(1, round(ay * 16))), angle, 0, 360,
                1, -1, cv2.LINE_8, 4)
    return m.astype(bool)


def _rect(shape: tuple[int, int], x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[max(0, int(y1)):max(0, int(np.ceil(y2))), max(0, int(x1)):max(0, int(np.ceil(x2)))] = True
    return m


def _bbox(mask: np.ndarray) -> np.ndarray:
    """``[x1, y1, x2, y2]`` (exclusive ends, float) of a non-empty boolean mask."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


@dataclass
class _Anatomy:
    """Masks of the drawn structures of one image (``right`` = the patient's right = image left)."""

    body: np.ndarray
    lungs: dict[str, np.ndarray]
    domes: np.ndarray
    dome_top: dict[str, float]
    heart: np.ndarray
    mediastinum: np.ndarray
    spine: np.ndarray
    trachea: np.ndarray
    aorta: np.ndarray
    svc: np.ndarray
    carina_y: float


def _factor(value: int, full: float, uncertain: float) -> float:
    return full if value == 1 else uncertain if value == -1 else 1.0


def _sample_anatomy(rng: np.random.Generator, shape: tuple[int, int], labels: np.ndarray) -> _Anatomy:
    """Jittered anatomy; cardiomegaly / enlarged cardiomediastinum / hyperinflation change it (module docstring)."""
    h, w = shape
    j = lambda a: rng.uniform(-a, a)  # noqa: E731
    cardio = _factor(labels[TAG_INDEX["cardiomegaly"]], 1.45, 1.2) * rng.uniform(0.92, 1.08)
    widen = _factor(labels[TAG_INDEX["enlarged cardiomediastinum"]], 1.5, 1.25)
    inflated = max(labels[TAG_INDEX["hyperinflate"]], labels[TAG_INDEX["emphysema"]], key=abs)
    tall = _factor(inflated, 1.08, 1.04)
    body = _ellipse(shape, w * (0.5 + j(0.01)), h * 0.56, w * 0.5, h * 0.62)
    dome_top = {"right": h * (0.70 + j(0.02) + 0.05 * (tall - 1) / 0.08),
                "left": h * (0.73 + j(0.02) + 0.05 * (tall - 1) / 0.08)}
    domes = (_ellipse(shape, w * 0.30, dome_top["right"] + 0.17 * h, w * 0.21, h * 0.17)
             | _ellipse(shape, w * 0.70, dome_top["left"] + 0.17 * h, w * 0.21, h * 0.17))
    half_med = w * 0.065 * widen
    mediastinum = _rect(shape, w * 0.5 - half_med, h * 0.03, w * 0.5 + half_med, h * 0.72)
    heart = _ellipse(shape, w * (0.55 + j(0.015)), h * (0.645 + j(0.015)), w * 0.16 * cardio, h * 0.13)
    carina_y = h * (0.33 + j(0.015))
    trachea = _rect(shape, w * 0.482, 0, w * 0.518, carina_y)
    spine = _rect(shape, w * 0.465, 0, w * 0.535, h)
    aorta = _ellipse(shape, w * 0.555, h * 0.30, w * 0.045, h * 0.035)
    svc = _rect(shape, w * 0.5 - half_med - w * 0.03, h * 0.16, w * 0.5 - half_med + w * 0.02, h * 0.55)
    blocked = domes | heart | mediastinum
    lungs = {
        "right": _ellipse(shape, w * (0.295 + j(0.015)), h * (0.47 + j(0.015)), w * 0.165 * rng.uniform(0.94, 1.06),
                          h * 0.31 * tall) & ~blocked,
        "left": _ellipse(shape, w * (0.705 + j(0.015)), h * (0.48 + j(0.015)), w * 0.155 * rng.uniform(0.94, 1.06),
                         h * 0.30 * tall) & ~blocked,
    }
    return _Anatomy(body, lungs, domes, dome_top, heart, mediastinum, spine, trachea, aorta, svc, carina_y)


def _region_boxes(anat: _Anatomy) -> np.ndarray:
    """``float64 [23, 4]`` boxes (pascal_voc, pixels) of :data:`REGIONS` from the drawn anatomy."""
    h, w = anat.heart.shape
    boxes = np.zeros((len(REGIONS), 4))
    for side in _SIDES:
        x1, y1, x2, y2 = _bbox(anat.lungs[side])
        bw, bh = x2 - x1, y2 - y1
        medial = (x2 - 0.45 * bw, x2) if side == "right" else (x1, x1 + 0.45 * bw)
        lateral = (x1, x1 + 0.4 * bw) if side == "right" else (x2 - 0.4 * bw, x2)
        rows = {
            "lung": (x1, y1, x2, y2),
            "upper lung zone": (x1, y1, x2, y1 + bh / 3), "mid lung zone": (x1, y1 + bh / 3, x2, y1 + 2 * bh / 3),
            "lower lung zone": (x1, y1 + 2 * bh / 3, x2, y2),
            "hilar structures": (medial[0], y1 + 0.35 * bh, medial[1], y1 + 0.62 * bh),
            "apical zone": (x1, y1, x2, y1 + 0.2 * bh),
            "costophrenic angle": (lateral[0], y2 - 0.18 * bh, lateral[1], y2),
            "hemidiaphragm": (x1, min(anat.dome_top[side] - 0.03 * h, y2 - 1), x2, y2),
        }
        for name, box in rows.items():
            boxes[REGION_INDEX[f"{side} {name}"]] = box
    med = _bbox(anat.mediastinum | anat.heart)
    upper = _bbox(anat.mediastinum)
    boxes[REGION_INDEX["trachea"]] = _bbox(anat.trachea)
    boxes[REGION_INDEX["spine"]] = _bbox(anat.spine)
    boxes[REGION_INDEX["aortic arch"]] = _bbox(anat.aorta)
    boxes[REGION_INDEX["mediastinum"]] = med
    boxes[REGION_INDEX["upper mediastinum"]] = (upper[0], upper[1], upper[2], _bbox(anat.aorta)[3])
    boxes[REGION_INDEX["cardiac silhouette"]] = _bbox(anat.heart)
    boxes[REGION_INDEX["svc"]] = _bbox(anat.svc)
    return np.clip(boxes, 0, [w, h, w, h])


# --- painting plan -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Paint:
    kind: str        # a tag name, or "lesion:<tag>"
    strength: float  # 1.0 positive, 0.5 uncertain
    region: int      # region id (lung zone for spots / lesions, lung for a side) or -1


def _lung_zones(regions: set[int], rng: np.random.Generator) -> list[int]:
    """Lung zones a sentence points at: its aligned zones; a random zone of an aligned lung without one; else a
    random zone of a random lung."""
    zones = [r for s in _SIDES for r in _ZONES[s] if r in regions]
    for side in _SIDES:
        if _LUNG[side] in regions and not set(_ZONES[side]) & regions:
            zones.append(_ZONES[side][rng.integers(3)])
    return zones or [_ZONES[_SIDES[rng.integers(2)]][rng.integers(3)]]


def _sides(regions: set[int], suffix: str, rng: np.random.Generator) -> list[str]:
    found = [s for s in _SIDES if REGION_INDEX[f"{s} {suffix}"] in regions]
    return found or [_SIDES[rng.integers(2)]]


def _plan(sentences: list[str], rng: np.random.Generator) -> list[_Paint]:
    """What to paint where, sentence by sentence (module docstring); one entry per kind and region, strongest."""
    aligned = align_regions(sentences)
    plan: dict[tuple[str, int], float] = {}

    def add(kind: str, strength: float, region: int) -> None:
        plan[kind, region] = max(strength, plan.get((kind, region), 0.0))

    for i, sentence in enumerate(sentences):
        values = extract_tags([sentence])
        strength = {t: 1.0 if values[k] == 1 else 0.5 for k, t in enumerate(TAGS) if values[k] != 0}
        regions = {r for r in range(len(REGIONS)) if i in aligned[r]}
        lesions = [t for t in LESION_TAGS if t in strength]
        if lesions:
            for zone in _lung_zones(regions, rng):
                add(f"lesion:{lesions[0]}", max(strength[t] for t in lesions), zone)
        for tag in ("nodule", "mass", "calcification"):
            if tag in strength:
                add(tag, strength[tag], _lung_zones(regions, rng)[0])
        for tag, suffix in (("pleural effusion", "costophrenic angle"), ("blunt", "costophrenic angle"),
                            ("pneumothorax", "apical zone"), ("fracture", "lung")):
            if tag in strength:
                for side in _sides(regions, suffix, rng):
                    add("pleural effusion" if tag == "blunt" else tag, strength[tag], _LUNG[side])
        for tag in ("edema", "hernia") + _DEVICE_TAGS:
            if tag in strength:
                add(tag, strength[tag], -1)
    return [_Paint(kind, s, region) for (kind, region), s in plan.items()]


# --- rendering -----------------------------------------------------------------------------------------------

def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(sigma, 0.5))


def _side_of_region(region: int) -> str:
    return "right" if REGIONS[region].startswith("right") else "left"


def _point_in(rng: np.random.Generator, box: np.ndarray, inner: float = 0.6) -> tuple[float, float]:
    """A uniform point in the central ``inner`` fraction of ``box``."""
    cx, cy, bw, bh = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    return cx + rng.uniform(-0.5, 0.5) * inner * bw, cy + rng.uniform(-0.5, 0.5) * inner * bh


def _pneumothorax(anat: _Anatomy, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(air, pleural line): the lung minus the lung shrunk by 0.8 towards its lower medial point, in its top 55 %;
    the line is the edge of the shrunk lung next to the air."""
    lung = anat.lungs[side]
    x1, y1, x2, y2 = _bbox(lung)
    centre = (float(x2 if side == "right" else x1), float(y1 + 0.75 * (y2 - y1)))
    affine = cv2.getRotationMatrix2D(centre, 0.0, 0.8)
    shrunk = cv2.warpAffine(lung.astype(np.uint8), affine, lung.shape[::-1], flags=cv2.INTER_NEAREST).astype(bool)
    air = lung & ~shrunk & (np.arange(lung.shape[0])[:, None] < y1 + 0.55 * (y2 - y1))
    kernel = np.ones((3, 3), np.uint8)
    edge = shrunk & ~cv2.erode(shrunk.astype(np.uint8), kernel).astype(bool)
    return air, edge & cv2.dilate(air.astype(np.uint8), kernel, iterations=2).astype(bool)


def _render(anat: _Anatomy, plan: list[_Paint], boxes: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Grey ``uint8 [H, W]`` radiograph and ``uint8`` 0 / 255 lesion mask (module docstring)."""
    h, w = anat.heart.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lungs = anat.lungs["right"] | anat.lungs["left"]
    seg = np.zeros((h, w), bool)
    img = np.where(anat.body, 118 + 28 * yy / h, 10).astype(np.float32)
    for mask, value in ((anat.domes & anat.body, 165), (anat.mediastinum, 168), (anat.heart, 178),
                        (anat.aorta, 182), (anat.spine, 192), (anat.trachea, 100)):
        img[mask] = value
    # lung fields: dark, with texture; pneumothorax air is darker and without texture
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
    lung_value = 52 + 40 * texture
    for p in plan:
        if p.kind == "pneumothorax":
            air, line = _pneumothorax(anat, _side_of_region(p.region))
            lung_value = np.where(air, lung_value + p.strength * (30 - lung_value), lung_value)
            lung_value = np.where(line, lung_value + 45 * p.strength, lung_value)
            seg |= air
    img = np.where(lungs, lung_value, img)
    # posterior ribs (arcs over both lungs), clavicles
    ribs = np.zeros((h, w), np.uint8)
    thick = max(2, h // 70)
    for k in range(7):
        cv2.ellipse(ribs, (w // 2, int(h * (0.24 + 0.085 * k))), (int(w * 0.42), int(h * 0.1)), 0, 180, 360, 1, thick)
    for p in plan:
        if p.kind == "fracture":
            x1, y1, x2, y2 = boxes[p.region]
            xf = x1 + 0.2 * (x2 - x1) if _side_of_region(p.region) == "right" else x2 - 0.2 * (x2 - x1)
            ribs[_rect((h, w), xf - 1.5, y1 + 0.3 * (y2 - y1), xf + 1.5, y1 + 0.45 * (y2 - y1))] = 0
    img += 22 * (ribs.astype(np.float32) * lungs)
    clav = np.zeros((h, w), np.uint8)
    for s in (-1, 1):
        cv2.line(clav, (int(w * (0.5 + 0.05 * s)), int(h * 0.13)), (int(w * (0.5 + 0.38 * s)), int(h * 0.07)), 1,
                 max(3, h // 40))
    img = np.where(clav > 0, np.maximum(img, 170), img)
    for p in plan:
        img = _paint_finding(img, seg, p, anat, boxes, rng, xx, yy)
    img = cv2.GaussianBlur(img, (0, 0), 0.8) + rng.normal(0, 2.5, (h, w)).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), seg.astype(np.uint8) * 255


def _paint_finding(img: np.ndarray, seg: np.ndarray, p: _Paint, anat: _Anatomy, boxes: np.ndarray,
                   rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """``img`` with finding ``p`` painted (lesion pixels added to ``seg`` in place)."""
    h, w = img.shape
    shape = (h, w)
    if p.kind.startswith("lesion:") or p.kind in ("nodule", "mass", "calcification"):
        lung = anat.lungs[_side_of_region(p.region)]
        box = boxes[p.region]
        cx, cy = _point_in(rng, box)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if p.kind.startswith("lesion:"):
            tag = p.kind.split(":", 1)[1]
            if tag == "atelectasis":  # a thin tilted band
                blob = _ellipse(shape, cx, cy, 0.4 * bw, 0.08 * bh + 2, rng.uniform(-15, 15)) & lung
            else:
                blob = _ellipse(shape, cx, cy, rng.uniform(0.25, 0.4) * bw, rng.uniform(0.3, 0.45) * bh,
                                rng.uniform(0, 180)) & lung
            seg |= blob
            return img + p.strength * _LESION_AMPLITUDE[tag] * _blur(blob, 0.012 * w)
        radius = {"nodule": 0.02 * w, "mass": 0.055 * w, "calcification": 1.5}[p.kind]
        spot = _ellipse(shape, cx, cy, radius, radius) & lung
        return img + p.strength * (110 if p.kind == "calcification" else 80) * _blur(spot, 0.6)
    if p.kind == "pleural effusion":
        side = _side_of_region(p.region)
        x1, y1, x2, y2 = _bbox(anat.lungs[side])
        medial = x2 if side == "right" else x1
        t = np.abs(xx - medial) / (x2 - x1)  # 0 medial .. 1 lateral
        depth = rng.uniform(0.12, 0.28) * (y2 - y1)
        fluid = anat.lungs[side] & (yy > y2 - depth * (0.55 + 0.45 * t**2))
        return img + p.strength * (168 - img) * _blur(fluid, 1.5)
    if p.kind == "edema":
        lungs = anat.lungs["right"] | anat.lungs["left"]
        haze = _blur(lungs, 0.05 * w) * lungs * np.exp(-(((xx - w / 2) / (0.22 * w)) ** 2))
        return img + p.strength * 40 * haze
    if p.kind == "hernia":
        hx1, hy1, hx2, hy2 = _bbox(anat.heart)
        bubble = _ellipse(shape, (hx1 + hx2) / 2, hy1 + 0.7 * (hy2 - hy1), 0.06 * w, 0.035 * h)
        return img - p.strength * 70 * _blur(bubble, 1.0)
    if p.kind == "pneumothorax":
        return img  # drawn with the lung fields
    if p.kind == "fracture":
        return img  # drawn with the ribs
    return _draw_device(img, p, anat)


def _draw_device(img: np.ndarray, p: _Paint, anat: _Anatomy) -> np.ndarray:
    """Thin bright radio-opaque lines / boxes for the device tags."""
    h, w = img.shape
    layer = np.zeros((h, w), np.uint8)
    if p.kind == "tube":
        cv2.line(layer, (w // 2, 0), (w // 2, int(anat.carina_y - 0.05 * h)), 1, max(2, w // 80))
    elif p.kind == "line":
        sx1, sy1, sx2, sy2 = _bbox(anat.svc)
        pts = np.array([[w * 0.12, h * 0.05], [w * 0.3, h * 0.14], [(sx1 + sx2) / 2, h * 0.2],
                        [(sx1 + sx2) / 2, sy2 - 0.05 * h]], np.int32)
        cv2.polylines(layer, [pts], False, 1, 2)
    elif p.kind == "wire":
        for k in range(4):
            cv2.ellipse(layer, (w // 2, int(h * (0.36 + 0.07 * k))), (max(2, w // 60), max(2, h // 90)), 0, 0, 360,
                        1, 1)
    elif p.kind in ("pacemaker", "device"):
        hx1, hy1, hx2, hy2 = _bbox(anat.heart)
        cv2.rectangle(layer, (int(w * 0.78), int(h * 0.12)), (int(w * 0.9), int(h * 0.19)), 1, -1)
        cv2.polylines(layer, [np.array([[w * 0.8, h * 0.17], [w * 0.6, h * 0.25], [(hx1 + hx2) / 2, (hy1 + hy2) / 2]],
                                       np.int32)], False, 1, 2)
    else:  # hardware / stent: a spinal plate
        cv2.rectangle(layer, (int(w * 0.47), int(h * 0.55)), (int(w * 0.53), int(h * 0.68)), 1, 2)
    return np.where(layer > 0, img + p.strength * (240 - img), img)


# --- records and files ---------------------------------------------------------------------------------------

def _record(rid: str, sentences: list[str], labels: np.ndarray, boxes: np.ndarray) -> dict:
    aligned = align_regions(sentences)
    rows = [r for r in range(len(REGIONS)) if aligned[r]]
    return {"id": rid, "image": f"images/{rid}.png", "sentences": list(sentences), "labels": labels.tolist(),
            "boxes": [[round(float(v), 2) for v in boxes[r]] for r in rows],
            "sent_index": [sentence_word_index(sentences, aligned[r]) for r in rows]}


def _classification_entry(record: dict) -> dict:
    labels = np.asarray(record["labels"])
    values = [int(labels[TAG_INDEX[c]]) for c in CLASSIFICATION_CLASSES]
    label = [1 if v == 1 or (v == -1 and ones) else 0 for v, ones in zip(values, U_ONES)]
    return {"image": record["image"], "label": label, "pneumonia": int(labels[TAG_INDEX["pneumonia"]] == 1)}


def _texts(reports: str | None, counts: dict[str, int], rng: np.random.Generator) -> list[tuple[str, str, list[str]]]:
    """(split, id, sentences) of every sample: template reports, or the first ``counts[split]`` real ones."""
    if reports is None:
        return [(split, f"demo_{split}_{k:03d}", template_report(rng))
                for split in SPLITS for k in range(counts[split])]
    taken = {s: 0 for s in SPLITS}
    out, seen = [], set()
    for text in load_report_sentences(reports):
        if text.split not in taken or taken[text.split] >= counts[text.split]:
            continue
        rid = re.sub(r"[^\w.-]", "_", str(text.id))
        if rid in seen:
            raise ValueError(f"{reports}: report id {text.id!r} appears twice; ids name the image files.")
        seen.add(rid)
        taken[text.split] += 1
        out.append((text.split, rid, list(text.sentences)))
    return out


def _write(folder: Path, reports: str | None, counts: dict[str, int], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    pretrain: dict[str, list] = {s: [] for s in SPLITS}
    classification: dict[str, object] = {"classes": list(CLASSIFICATION_CLASSES), **{s: [] for s in SPLITS}}
    segmentation: dict[str, list] = {s: [] for s in SPLITS}
    files = []
    for split, rid, sentences in _texts(reports, counts, rng):
        labels = extract_tags(sentences)
        shape = (int(rng.integers(272, 321)), int(rng.integers(224, 265)))
        anat = _sample_anatomy(rng, shape, labels)
        boxes = _region_boxes(anat)
        image, mask = _render(anat, _plan(sentences, rng), boxes, rng)
        cv2.imwrite(str(folder / "images" / f"{rid}.png"), image)
        cv2.imwrite(str(folder / "masks" / f"{rid}.png"), mask)
        record = _record(rid, sentences, labels, boxes)
        pretrain[split].append(record)
        classification[split].append(_classification_entry(record))
        segmentation[split].append({"image": record["image"], "label": f"masks/{rid}.png"})
        files += [record["image"], f"masks/{rid}.png"]
    for name, content in (("pretrain.json", pretrain), ("classification.json", classification),
                          ("segmentation.json", segmentation)):
        (folder / name).write_text(json.dumps(content, indent=1))
        files.append(name)
    return files


def ensure_demo_cxr_dataset(root: str | os.PathLike, reports: str | os.PathLike | None = None, n_train: int = 64,
                            n_valid: int = 16, n_test: int = 16, seed: int = 0) -> Path:
    """Write the synthetic chest-radiograph dataset (module docstring) at ``root`` unless it is already there.

    Idempotent: a second call with the same parameters rewrites nothing; other parameters regenerate it; nothing
    half-written is left on failure (:py:func:`common.data.generated.ensure_generated`).

    Args:
        root: dataset folder.
        reports: ``None`` for the embedded template reports, or a report source for
            :py:func:`common.data.cxr_reports.load_report_sentences` (R2Gen ``annotation.json``, the IU
            ``NLMCXR_reports.tgz`` or a folder of IU XMLs); then ``n_<split>`` are maxima per split.
        n_train, n_valid, n_test: number of samples per split.
        seed: seed of the generator (same seed and parameters → identical bytes).

    Returns:
        ``root`` as an absolute path.

    Raises:
        ValueError: a negative count, no sample at all, or two reports with the same id.
        FileNotFoundError: ``reports`` does not exist.
        FileExistsError: ``root`` holds something else.
    """
    counts = {"train": int(n_train), "valid": int(n_valid), "test": int(n_test)}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise ValueError(f"ensure_demo_cxr_dataset needs non-negative split sizes, not all 0; got {counts}.")
    source = None
    if reports is not None:
        path = Path(reports).expanduser().absolute()
        if not path.exists():
            raise FileNotFoundError(f"report source {path} does not exist.")
        source = str(path)
    params = {"generator": __name__, "version": GENERATOR_VERSION, "reports": source, **counts, "seed": int(seed)}
    return ensure_generated(root, params, lambda folder: _write(folder, source, counts, int(seed)),
                            "demo chest radiographs")
