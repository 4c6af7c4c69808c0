"""Convert Synapse, AMOS or Decathlon-layout NIfTI volumes into the DHC ``npy/`` + ``splits/`` layout.

Usage::

    python scripts/prepare_dhc.py --src /data/Synapse --dst ./synapse_data --labelled_percent "[10,20,40]"
    python scripts/prepare_dhc.py --src /data/amos22 --dst ./amos_data --layout amos --labelled_percent "[2,5,10]"
    python scripts/prepare_dhc.py --src ../shared/data/btcv_ct --dst /tmp/btcv_dhc --a_min 0 --a_max 255 \
        --n_eval 2 --n_test 2 --labelled_percent 25

What it does (Wang & Li, DHC, MICCAI 2023; spec ``dhc.md`` §1.1-1.3):

1. reads the cases (``common.data.volume_folders``) and checks every pair before converting anything (files,
   3D, shapes, affines, label values in ``0..num_classes-1``);
2. splits them with :py:func:`common.data.volume_folders.make_splits` (seeded): Synapse and generic Decathlon
   folders 80 % train+eval / 20 % test, train+eval 5/6 : 1/6 (30 -> 20/4/6); AMOS ``imagesTr`` 90/10 train/eval
   (240 -> 216/24) with test = the labelled ``"validation"`` cases (``imagesVa``/``labelsVa``); the labelled set
   is ``floor(r * N_train)`` of train for each percentage ``r``, nested across percentages;
3. preprocesses each volume with :py:func:`common.transforms.dhc_preprocessing.dhc_preprocessing`: ``(D, H, W)``
   order, resize to ``spatial_size`` (image trilinear, label nearest; ``None`` keeps the native grid), and, with
   ``normalise`` (default), clip to ``[a_min, a_max]`` + per-volume min-max to ``[0, 1]``;
4. writes ``<dst>/npy/<case>_image.npy`` (float32) and ``<dst>/npy/<case>_label.npy`` (uint8), the split files
   ``<dst>/splits/{train,eval,test,labeled_<P>p,unlabeled_<P>p}.txt`` and ``<dst>/prepare_dhc.json`` (the
   arguments, the label names, the split sizes).

Case ids follow DHC: Synapse ``XXXX`` (from ``imgXXXX.nii.gz``), AMOS ``amos_XXXX``, Decathlon the file name.
The output is written to a temporary folder beside ``dst`` and renamed to ``dst`` at the end, so an interrupted
run leaves no half-written dataset; a non-empty ``dst`` is refused. Storing normalised volumes is safe for the
load-time window of the bundle: clip + min-max leave ``[0, 1]`` data unchanged whenever ``a_min <= 0 <= 1 <= a_max``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import fire
import numpy as np
from tqdm import tqdm

from common.data.volume_folders import (
    make_splits,
    msd_cases,
    read_label_map,
    synapse_cases,
    write_dhc_splits,
)
from common.transforms.dhc_preprocessing import DHC_SPATIAL_SIZE, DHC_WINDOW, dhc_preprocessing
from common.utils.files import staged_folder

__all__ = ["LAYOUTS", "detect_layout", "prepare"]

logger = logging.getLogger("prepare_dhc")

LAYOUTS: tuple[str, ...] = ("synapse", "amos", "msd")
"""Source layouts: Synapse raw (``RawData/Training/img|label``), AMOS (Decathlon + ``"validation"``), Decathlon."""

SYNAPSE_LABELS = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
                  "stomach", "aorta", "inferior vena cava", "portal vein and splenic vein", "pancreas",
                  "right adrenal gland", "left adrenal gland")
"""BTCV class names, spec §1.1 (Synapse has no ``dataset.json``)."""


def detect_layout(src: str | os.PathLike) -> str:
    """``"synapse"`` when ``src`` holds ``RawData/Training``, ``Training`` or ``img/`` + ``label/``; ``"amos"`` when
    its ``dataset.json`` has a non-empty ``"validation"`` list; ``"msd"`` when it has a ``dataset.json``.

    Raises:
        FileNotFoundError: none of these.
    """
    src = Path(src)
    for base in (src / "RawData" / "Training", src / "Training", src):
        if (base / "img").is_dir() and (base / "label").is_dir():
            return "synapse"
    if (src / "dataset.json").is_file():
        try:
            content = json.loads((src / "dataset.json").read_text())
        except ValueError:  # msd_cases reports the broken file
            return "msd"
        return "amos" if isinstance(content, dict) and content.get("validation") else "msd"
    raise FileNotFoundError(
        f"{src} is neither a Synapse folder (RawData/Training/img|label) nor a Decathlon/AMOS folder (dataset.json)."
    )


def _percents(labelled_percent: float | Sequence[float]) -> list[float]:
    values = [labelled_percent] if isinstance(labelled_percent, (int, float)) else list(labelled_percent)
    if not values:
        raise ValueError("labelled_percent must name at least one percentage.")
    return values


def _read_cases(src: Path, layout: str, num_classes: int | None, check_labels: bool
                ) -> tuple[list[dict], list[dict], dict[int, str]]:
    """``(split cases, fixed test cases, label names)`` of ``src``."""
    if layout == "synapse":
        n = 14 if num_classes is None else num_classes
        names = dict(enumerate(SYNAPSE_LABELS)) if n == len(SYNAPSE_LABELS) else {i: str(i) for i in range(n)}
        return synapse_cases(src, n, check_labels=check_labels), [], names
    names = read_label_map(src)
    cases = msd_cases(src, "training", num_classes, check_labels=check_labels)
    if layout == "msd":
        return cases, [], names
    test = msd_cases(src, "validation", num_classes, check_labels=check_labels)
    clash = sorted({c["case"] for c in cases} & {c["case"] for c in test})
    if clash:
        raise ValueError(f"{src / 'dataset.json'} lists case(s) {clash} in both training and validation.")
    return cases, test, names


def prepare(
    src: str,
    dst: str,
    layout: str = "auto",
    labelled_percent: float | Sequence[float] = 20,
    seed: int = 0,
    n_eval: int | None = None,
    n_test: int | None = None,
    a_min: float = DHC_WINDOW[0],
    a_max: float = DHC_WINDOW[1],
    spatial_size: Sequence[int] | None = DHC_SPATIAL_SIZE,
    normalise: bool = True,
    num_classes: int | None = None,
    check_labels: bool = True,
) -> str:
    """Convert ``src`` into the DHC layout at ``dst`` (module docstring).

    Args:
        src: Synapse, AMOS or Decathlon-layout folder.
        dst: output folder; must not exist or be empty.
        layout: ``"synapse"``, ``"amos"``, ``"msd"`` or ``"auto"`` (:py:func:`detect_layout`).
        labelled_percent: one percentage or a list (``"[10,20,40]"``); one pair of labelled/unlabelled files each.
        seed: seed of the split.
        n_eval, n_test: eval/test sizes; None: the protocol of the layout (Synapse/Decathlon 80/20 then 5/6:1/6;
            AMOS 10 % of ``imagesTr`` for eval, test from ``"validation"``).
        a_min, a_max: intensity window (default -75..275 HU; 0..255 for the 8-bit BTCV test data).
        spatial_size: resize target ``(D, H, W)``; None keeps the native grid.
        normalise: store clipped + min-max-normalised images (default) or resized raw intensities (as DHC).
        num_classes: label values allowed are ``0..num_classes-1``; None: 14 for Synapse, else ``dataset.json``.
        check_labels: decode every label before converting and check its values.

    Returns:
        ``dst`` as a string.

    Raises:
        FileNotFoundError: ``src`` (or a file in it) is missing.
        FileExistsError: ``dst`` exists and is not an empty folder.
        ValueError: an unknown layout, bad cases, or split sizes that leave no labelled case.
    """
    source, target = Path(src).expanduser(), Path(dst).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {source} does not exist (or is not a folder).")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"output folder {target} exists and is not empty; choose a new or empty folder.")
    layout = detect_layout(source) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {list(LAYOUTS)}, got {layout!r}.")
    percents = _percents(labelled_percent)
    cases, fixed_test, label_names = _read_cases(source, layout, num_classes, check_labels)
    ids = [c["case"] for c in cases]
    if layout == "amos":
        n_test = 0 if n_test is None else n_test
        n_eval = len(ids) - 9 * len(ids) // 10 if n_eval is None else n_eval
    splits = {p: make_splits(ids, p, n_eval, n_test, seed) for p in percents}  # all checked before any writing
    first = splits[percents[0]]
    logger.info("%s (%s): %d cases -> train %d / eval %d / test %d", source, layout, len(ids) + len(fixed_test),
                len(first["train"]), len(first["eval"]), len(first["test"]) + len(fixed_test))
    preprocess = dhc_preprocessing(source="nifti", a_min=a_min, a_max=a_max, spatial_size=spatial_size,
                                   normalise=normalise, label_dtype=np.uint8)
    with staged_folder(target) as tmp:  # published only when complete
        (tmp / "npy").mkdir()
        for case in tqdm(cases + fixed_test, desc="prepare_dhc", unit="case"):
            out = preprocess(case)
            np.save(tmp / "npy" / f"{case['case']}_image.npy", out["image"][0].numpy().astype(np.float32))
            np.save(tmp / "npy" / f"{case['case']}_label.npy", out["label"][0].numpy().astype(np.uint8))
        for percent, split in splits.items():
            split = dict(split, test=sorted(split["test"] + [c["case"] for c in fixed_test]))
            write_dhc_splits(tmp, split, percent)
            logger.info("labelled %s%%: %d labelled / %d unlabelled", percent, len(split["labelled"]),
                        len(split["unlabelled"]))
        record = {
            "source": str(source), "layout": layout, "labelled_percent": percents, "seed": seed,
            "window": [a_min, a_max] if normalise else None,
            "spatial_size": None if spatial_size is None else [int(s) for s in spatial_size],
            "axis_order": "D,H,W (z,y,x)", "normalised": normalise,
            "labels": {str(k): v for k, v in label_names.items()},
            "counts": {"train": len(first["train"]), "eval": len(first["eval"]),
                       "test": len(first["test"]) + len(fixed_test)},
        }
        (tmp / "prepare_dhc.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s", target)
    return str(target)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire(prepare)
