"""Readers and split builders for labelled CT/MR volume folders (DHC and other semi-supervised 3D bundles).

Every reader returns plain MONAI datalists, ``[{"image": str, "label": str, "case": str}, ...]`` sorted by case
id, so that a bundle config can call it directly, e.g.
``"$common.data.volume_folders.volume_datalists(@dataset_dir, @labelled_percent)['labelled']"``.

Layouts recognised:

* **Medical Segmentation Decathlon** (Antonelli et al., "The Medical Segmentation Decathlon", Nat. Commun. 2022):
  ``<root>/dataset.json`` with a ``"labels"`` map (``{"0": "background", "1": "spleen", ...}``) and a
  ``"training"`` list of ``{"image": "./imagesTr/<case>.nii.gz", "label": "./labelsTr/<case>.nii.gz"}``;
  ``imagesTs/`` (or a ``"test"`` list of paths) is optional. AMOS 2022 uses this layout and adds a labelled
  ``"validation"`` list (``imagesVa/``, ``labelsVa/``), read with ``section="validation"``.
* **DHC npy layout** (Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced
  Semi-supervised Medical Image Segmentation", MICCAI 2023; spec ``dhc.md`` §1.3): ``<root>/npy/<case>_image.npy``
  and ``<root>/npy/<case>_label.npy`` (3D arrays in ``(D, H, W)`` order) plus one case id per line in
  ``<root>/splits/{train,eval,test}.txt`` and ``<root>/splits/{labeled,unlabeled}_<P>p.txt`` for a labelled
  percentage ``P`` (``labeled_20p.txt``; American spelling, as in the original repository).
* **Synapse raw** (BTCV multi-atlas challenge): ``<root>/RawData/Training/img/img<XXXX>.nii.gz`` and
  ``.../label/label<XXXX>.nii.gz``, case id ``XXXX`` (``<root>`` may also be ``RawData`` or ``Training``).

Split protocol (DHC ``preprocess.py``, spec §1.1–1.2): the N sorted case ids are permuted; the last ``n_test`` go
to test, the ``n_eval`` before them to eval, the rest to train; a second permutation of train gives the labelled
subset, its first ``floor(r * N_train)`` ids for a percentage ``r``. The original permutations are unseeded; here
they come from ``numpy.random.default_rng(seed)``, and since the labelled set is a prefix of one permutation,
the labelled sets of 10, 20 and 40 % are nested.

The checks fail early, with the case and file in the message: shapes and affines are read from NIfTI headers and
``.npy`` headers (no voxel is decoded); only the label-value check (``check_labels``) decodes the label volumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "ROLES",
    "case_id",
    "volume_header",
    "check_case",
    "read_label_map",
    "msd_cases",
    "msd_test_images",
    "synapse_cases",
    "dhc_npy_cases",
    "n_labelled",
    "make_splits",
    "split_file_names",
    "read_dhc_splits",
    "write_dhc_splits",
    "datalists_from_splits",
    "msd_datalists",
    "dhc_datalists",
    "volume_datalists",
]

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("labelled", "unlabelled", "eval", "test")
"""Roles of the datalists returned by :py:func:`msd_datalists`, :py:func:`dhc_datalists` and
:py:func:`volume_datalists`."""

_SUFFIXES = (".nii.gz", ".nii", ".npy")
_NPY, _SPLITS, _DATASET_JSON = "npy", "splits", "dataset.json"
_IMAGE_SUFFIX, _LABEL_SUFFIX = "_image.npy", "_label.npy"


def case_id(path: str | os.PathLike) -> str:
    """File name without its volume suffix (``.nii.gz``, ``.nii``, ``.npy``): ``imagesTr/la_3.nii.gz`` -> ``la_3``."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _some(values: Sequence, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def volume_header(path: str | os.PathLike, role: str = "image", case: str | None = None
                  ) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Shape and affine of a volume file, from its header only.

    Args:
        path: a NIfTI (``.nii``/``.nii.gz``) or numpy (``.npy``) file.
        role, case: named in error messages (``"image"``/``"label"``, the case id).

    Returns:
        ``(shape, affine)``: the array shape and the 4x4 voxel-to-world affine (None for ``.npy``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be parsed as NIfTI / npy.
    """
    path = Path(path)
    where = f"{role} file {path}" + (f" of case {case!r}" if case is not None else "")
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist.")
    try:
        if path.name.endswith(".npy"):
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape), None  # header + mmap, no read
        image = nib.load(path)  # lazy proxy: parses the header only
        return tuple(int(s) for s in image.shape), np.asarray(image.affine, dtype=np.float64)
    except Exception as err:  # ImageFileError, ValueError from a bad npy header, zlib errors, ...
        raise ValueError(f"{where} cannot be read: {type(err).__name__}: {err}") from err


def _decode(path: Path) -> np.ndarray:
    if path.name.endswith(".npy"):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    return np.asanyarray(nib.load(path).dataobj)


def check_case(
    image: str | os.PathLike,
    label: str | os.PathLike | None,
    case: str,
    label_values: Iterable[int] | None = None,
    affine_atol: float = 1e-3,
) -> None:
    """Check one image/label pair.

    Rules: both files exist and are 3D volumes (one channel, ``ndim == 3``); they have the same shape; for two
    NIfTI files, the affines agree to ``affine_atol`` (max absolute difference of the 4x4 matrices, in mm); with
    ``label_values`` given, the label volume is decoded and all its values must be integers in that set.

    Args:
        image: image file (``.nii.gz``, ``.nii`` or ``.npy``).
        label: label file, or None to check the image alone (unlabelled test images).
        case: case id, named in every message.
        label_values: allowed label values, e.g. ``range(14)``; None skips the value check (no decoding).
        affine_atol: tolerance of the affine comparison.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is unreadable, not 3D, the shapes or affines differ, or the label holds values outside
            ``label_values`` (the message lists them).
    """
    image, label = Path(image), None if label is None else Path(label)
    image_shape, image_affine = volume_header(image, "image", case)
    if len(image_shape) != 3:
        raise ValueError(f"case {case!r}: image {image} has shape {image_shape}; expected a 3D volume.")
    if label is None:
        return
    label_shape, label_affine = volume_header(label, "label", case)
    if len(label_shape) != 3:
        raise ValueError(f"case {case!r}: label {label} has shape {label_shape}; expected a 3D volume.")
    if image_shape != label_shape:
        raise ValueError(
            f"case {case!r}: image {image} has shape {image_shape} but label {label} has shape {label_shape}."
        )
    if image_affine is not None and label_affine is not None:
        diff = float(np.max(np.abs(image_affine - label_affine)))
        if diff > affine_atol:
            raise ValueError(
                f"case {case!r}: the affines of image {image} and label {label} differ by up to {diff:.4g} "
                f"(tolerance {affine_atol}); image affine {image_affine.tolist()}, label affine "
                f"{label_affine.tolist()}."
            )
    if label_values is not None:
        allowed = {int(v) for v in label_values}
        found = np.unique(_decode(label))
        non_integral = found[found != np.round(found)]
        if non_integral.size:
            raise ValueError(
                f"case {case!r}: label {label} holds non-integer values {_some(non_integral.tolist())}."
            )
        outside = sorted(int(v) for v in found if int(v) not in allowed)
        if outside:
            raise ValueError(
                f"case {case!r}: label {label} holds values {outside} outside the label map "
                f"{sorted(allowed)}."
            )


# ------------------------------------------------------------------------------------------------ Decathlon layout


def _read_dataset_json(root: Path) -> dict:
    path = root / _DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a Medical Segmentation Decathlon folder needs it.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(content).__name__}.")
    return content


def read_label_map(root: str | os.PathLike) -> dict[int, str]:
    """Label value -> name from ``<root>/dataset.json``'s ``"labels"``.

    Both the Decathlon form ``{"0": "background", "1": "liver"}`` and the nnU-Net v2 form
    ``{"background": 0, "liver": 1}`` are accepted.

    Raises:
        FileNotFoundError: no ``dataset.json``.
        ValueError: no ``"labels"`` entry, or one that is neither form.
    """
    root = Path(root)
    labels = _read_dataset_json(root).get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{root / _DATASET_JSON} has no \"labels\" map (e.g. {{\"0\": \"background\", ...}}).")
    if all(str(k).isdigit() for k in labels):
        return {int(k): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        return {v: str(k) for k, v in sorted(labels.items(), key=lambda kv: kv[1])}
    raise ValueError(
        f"{root / _DATASET_JSON} \"labels\" must map values to names ({{\"1\": \"liver\"}}) or names to integer "
        f"values ({{\"liver\": 1}}); got {labels}."
    )


def _resolve(root: Path, entry: str) -> Path:
    return root / entry[2:] if entry.startswith("./") else root / entry


def _allowed_values(root: Path, num_classes: int | None) -> range | list[int]:
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        return range(num_classes)
    return sorted(read_label_map(root))


def _check_all(cases: Sequence[dict[str, str]], values: Iterable[int] | None, affine_atol: float) -> None:
    values = None if values is None else list(values)
    for case in cases:
        check_case(case["image"], case.get("label"), case["case"], values, affine_atol)


def _unique_cases(cases: list[dict[str, str]], source: str) -> list[dict[str, str]]:
    seen: dict[str, str] = {}
    for case in cases:
        if case["case"] in seen:
            raise ValueError(
                f"{source} lists case {case['case']!r} twice: {seen[case['case']]} and {case['image']}."
            )
        seen[case["case"]] = case["image"]
    return sorted(cases, key=lambda c: c["case"])


def msd_cases(
    root: str | os.PathLike,
    section: str = "training",
    num_classes: int | None = None,
    check: bool = True,
    check_labels: bool = True,
    affine_atol: float = 1e-3,
) -> list[dict[str, str]]:
    """Labelled cases of a Decathlon-layout folder, from ``dataset.json``.

    Args:
        root: folder holding ``dataset.json`` (and ``imagesTr/``, ``labelsTr/``).
        section: the ``dataset.json`` list to read: ``"training"``, or ``"validation"`` for AMOS's labelled
            ``imagesVa``/``labelsVa``.
        num_classes: label values allowed are ``0..num_classes-1``; None: the keys of ``dataset.json``'s ``"labels"``.
        check: run :py:func:`check_case` on every pair (headers; files, 3D, shapes, affines).
        check_labels: with ``check``, also decode every label and check its values against the label map.
        affine_atol: tolerance of the affine comparison.

    Returns:
        ``[{"image": str, "label": str, "case": str}, ...]`` sorted by case id (the image's file name without
        ``.nii.gz``).

    Raises:
        FileNotFoundError: ``root``, ``dataset.json`` or a listed file is missing.
        ValueError: the section is missing, empty or malformed, a case is listed twice, or a pair fails the checks.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"volume dataset folder {root} does not exist (or is not a folder).")
    source = root / _DATASET_JSON
    entries = _read_dataset_json(root).get(section)
    if not isinstance(entries, list):
        raise ValueError(f"{source} has no {section!r} list of {{\"image\": ..., \"label\": ...}} entries.")
    if not entries:
        raise ValueError(f"{source} lists no case in {section!r}: the dataset is empty.")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(
            entry.get("label"), str
        ):
            raise ValueError(f"{source} {section}[{i}] must be {{\"image\": path, \"label\": path}}, got {entry!r}.")
        image = _resolve(root, entry["image"])
        cases.append({"image": str(image), "label": str(_resolve(root, entry["label"])), "case": case_id(image)})
    cases = _unique_cases(cases, f"{source} ({section})")
    if check:
        _check_all(cases, _allowed_values(root, num_classes) if check_labels else None, affine_atol)
    return cases


def msd_test_images(root: str | os.PathLike, check: bool = True) -> list[dict[str, str]]:
    """Unlabelled test images of a Decathlon-layout folder: ``dataset.json``'s ``"test"`` list when present, else
    ``imagesTs/*.nii.gz``/``*.nii``; ``[]`` when there are none (``imagesTs`` is optional).

    Returns:
        ``[{"image": str, "case": str}, ...]`` sorted by case id.

    Raises:
        FileNotFoundError: a listed file is missing; ValueError: an image is unreadable or not 3D.
    """
    root = Path(root).expanduser()
    listed = _read_dataset_json(root).get("test") if (root / _DATASET_JSON).is_file() else None
    if isinstance(listed, list) and listed:
        paths = [_resolve(root, e if isinstance(e, str) else str(e.get("image", ""))) for e in listed]
    else:
        folder = root / "imagesTs"
        paths = sorted(p for p in folder.glob("*.nii*") if not p.name.startswith(".")) if folder.is_dir() else []
    cases = _unique_cases([{"image": str(p), "case": case_id(p)} for p in paths], f"{root} test images")
    if check:
        for case in cases:
            check_case(case["image"], None, case["case"])
    return cases


# ------------------------------------------------------------------------------------------------ Synapse raw layout


def _synapse_dirs(root: Path) -> tuple[Path, Path]:
    for base in (root / "RawData" / "Training", root / "Training", root):
        if (base / "img").is_dir() and (base / "label").is_dir():
            return base / "img", base / "label"
    raise FileNotFoundError(
        f"no Synapse folders under {root}: looked for RawData/Training/{{img,label}}, Training/{{img,label}} "
        "and {img,label}."
    )


def synapse_cases(
    root: str | os.PathLike,
    num_classes: int = 14,
    check: bool = True,
    check_labels: bool = True,
    affine_atol: float = 1e-3,
) -> list[dict[str, str]]:
    """Cases of the Synapse (BTCV) raw layout: ``img/img<XXXX>.nii.gz`` with ``label/label<XXXX>.nii.gz``.

    Args:
        root: folder holding ``RawData/Training``, ``Training`` or ``img/`` + ``label/`` directly.
        num_classes: label values allowed are ``0..num_classes-1`` (14 for BTCV: background + 13 organs).
        check, check_labels, affine_atol: as for :py:func:`msd_cases`.

    Returns:
        ``[{"image": str, "label": str, "case": "XXXX"}, ...]`` sorted by case id.

    Raises:
        FileNotFoundError: the folders, or the label of an image, are missing.
        ValueError: no image, or a pair fails the checks.
    """
    image_dir, label_dir = _synapse_dirs(Path(root).expanduser())
    cases = []
    for image in sorted(image_dir.glob("img*.nii*")):
        case = case_id(image)[len("img"):]
        label = label_dir / image.name.replace("img", "label", 1)
        if not label.is_file():
            raise FileNotFoundError(f"case {case!r}: image {image} has no label {label}.")
        cases.append({"image": str(image), "label": str(label), "case": case})
    if not cases:
        raise ValueError(f"{image_dir} holds no img<XXXX>.nii.gz volume: the dataset is empty.")
    if check:
        _check_all(cases, range(num_classes) if check_labels else None, affine_atol)
    return cases


# ------------------------------------------------------------------------------------------------ DHC npy layout


def _npy_case(root: Path, case: str) -> dict[str, str]:
    folder = root / _NPY
    return {"image": str(folder / f"{case}{_IMAGE_SUFFIX}"), "label": str(folder / f"{case}{_LABEL_SUFFIX}"),
            "case": case}


def dhc_npy_cases(
    root: str | os.PathLike, num_classes: int | None = None, check: bool = True
) -> list[dict[str, str]]:
    """Every case of ``<root>/npy/``: ``<case>_image.npy`` with its ``<case>_label.npy``.

    Args:
        root: folder holding ``npy/``.
        num_classes: with ``check``, decode every label and require values in ``0..num_classes-1``; None skips it.
        check: run :py:func:`check_case` on every pair.

    Raises:
        FileNotFoundError: ``npy/`` is missing, or an image has no label file.
        ValueError: ``npy/`` holds no image, or a pair fails the checks.
    """
    root = Path(root).expanduser()
    folder = root / _NPY
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; the DHC layout needs npy/<case>_image.npy files.")
    cases = [_npy_case(root, p.name[: -len(_IMAGE_SUFFIX)]) for p in sorted(folder.glob(f"*{_IMAGE_SUFFIX}"))]
    if not cases:
        raise ValueError(f"{folder} holds no <case>{_IMAGE_SUFFIX} file: the dataset is empty.")
    for case in cases:
        if not Path(case["label"]).is_file():
            raise FileNotFoundError(f"case {case['case']!r}: image {case['image']} has no label {case['label']}.")
    if check:
        _check_all(cases, None if num_classes is None else range(num_classes), 0.0)
    return cases


def _percent_tag(labelled_percent: float) -> str:
    value = float(labelled_percent)
    if not 0 < value <= 100:
        raise ValueError(f"labelled_percent must be in (0, 100], got {labelled_percent}.")
    return f"{int(value)}p" if value.is_integer() else f"{value:g}p"


def split_file_names(labelled_percent: float) -> dict[str, str]:
    """Split file of each role in ``<root>/splits/``: ``{"labelled": "labeled_20p.txt", "unlabelled":
    "unlabeled_20p.txt", "eval": "eval.txt", "test": "test.txt"}`` for 20 %."""
    tag = _percent_tag(labelled_percent)
    return {"labelled": f"labeled_{tag}.txt", "unlabelled": f"unlabeled_{tag}.txt", "eval": "eval.txt",
            "test": "test.txt"}


def _read_ids(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_dhc_splits(root: str | os.PathLike, labelled_percent: float) -> dict[str, list[str]]:
    """Case ids of each role (:py:data:`ROLES`) from ``<root>/splits/`` (:py:func:`split_file_names`).

    Raises:
        FileNotFoundError: a split file is missing (the message lists the files that exist).
        ValueError: the labelled list is empty, a list repeats an id, or two roles share an id (e.g. AMOS's
            inconsistent ``labeled_20p.txt``, spec §1.2).
    """
    folder = Path(root).expanduser() / _SPLITS
    splits: dict[str, list[str]] = {}
    for role, name in split_file_names(labelled_percent).items():
        path = folder / name
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.txt")) if folder.is_dir() else []
            raise FileNotFoundError(
                f"split file {path} does not exist (labelled_percent={labelled_percent}); split files present: "
                f"{present or 'none'}."
            )
        ids = _read_ids(path)
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"split file {path} lists case(s) {repeated} more than once.")
        splits[role] = ids
    if not splits["labelled"]:
        raise ValueError(f"split file {folder / split_file_names(labelled_percent)['labelled']} is empty.")
    _check_disjoint(splits, str(folder))
    return splits


def _check_disjoint(splits: Mapping[str, Sequence[str]], source: str) -> None:
    roles = [r for r in ROLES if r in splits]
    for i, first in enumerate(roles):
        for second in roles[i + 1:]:
            shared = sorted(set(splits[first]) & set(splits[second]))
            if shared:
                raise ValueError(f"{source}: case(s) {_some(shared)} are in both {first} and {second}.")


def write_dhc_splits(
    root: str | os.PathLike, splits: Mapping[str, Sequence[str]], labelled_percent: float
) -> list[Path]:
    """Write ``splits`` (from :py:func:`make_splits`) as ``<root>/splits/*.txt``, one id per line.

    Writes ``train.txt`` (when ``splits`` has ``"train"``), ``eval.txt``, ``test.txt`` and the labelled and
    unlabelled files of ``labelled_percent``; existing files are overwritten.

    Returns:
        the files written.
    """
    folder = Path(root).expanduser() / _SPLITS
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(split_file_names(labelled_percent))
    if "train" in splits:
        names["train"] = "train.txt"
    written = []
    for role, name in names.items():
        ids = list(splits[role])
        (folder / name).write_text("".join(f"{i}\n" for i in ids))
        written.append(folder / name)
    return written


# ------------------------------------------------------------------------------------------------ splits


def n_labelled(n_train: int, labelled_percent: float) -> int:
    """Number of labelled cases, ``floor(r * N_train)`` for ``r = labelled_percent / 100`` (spec §1.1).

    Computed exactly (``Fraction``), so that 20 % of 20 is 4 and 2 % of 216 is 4 (4.32 floored).

    Raises:
        ValueError: the percentage is outside ``(0, 100]`` or gives zero labelled cases (the message names the
            percentage, N and the smallest percentage that works).
    """
    _percent_tag(labelled_percent)
    count = math.floor(Fraction(str(labelled_percent)) * n_train / 100)
    if count < 1:
        raise ValueError(
            f"labelled_percent={labelled_percent} of N={n_train} training cases gives floor({labelled_percent}% x "
            f"{n_train}) = 0 labelled cases; use labelled_percent >= {100 / max(n_train, 1):.4g}."
        )
    return count


def make_splits(
    case_ids: Sequence[str],
    labelled_percent: float,
    n_eval: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Seeded DHC split (module docstring) of ``N`` case ids.

    Defaults follow the Synapse protocol (spec §1.1, rounding **[inferred]**): ``n_test = N - floor(4N/5)``
    and ``n_eval = M - floor(5M/6)`` with ``M = N - n_test``, i.e. 30 cases -> 20 train / 4 eval / 6 test.
    For AMOS (spec §1.2) pass ``n_eval=24, n_test=0`` for the 240 ``imagesTr`` cases (216 train) and take test
    from ``imagesVa``.

    Args:
        case_ids: distinct case ids; sorted before the permutation, so their order does not matter.
        labelled_percent: ``r`` in percent; ``floor(r * N_train / 100)`` training cases are labelled.
        n_eval, n_test: sizes of the eval and test sets (None: the Synapse protocol above).
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same train/eval/test for every
            percentage and nested labelled sets.

    Returns:
        ``{"train", "eval", "test", "labelled", "unlabelled"}`` -> sorted case ids; labelled + unlabelled = train.

    Raises:
        ValueError: empty or repeated ids, negative sizes, no training case left, or zero labelled cases.
    """
    _percent_tag(labelled_percent)
    ids = sorted(str(c) for c in case_ids)
    if not ids:
        raise ValueError("make_splits got no case id: the dataset is empty.")
    repeated = sorted({c for c in ids if ids.count(c) > 1})
    if repeated:
        raise ValueError(f"make_splits got repeated case id(s) {repeated}.")
    n = len(ids)
    n_test = n - 4 * n // 5 if n_test is None else n_test
    n_eval = (n - n_test) - 5 * (n - n_test) // 6 if n_eval is None else n_eval
    if n_eval < 0 or n_test < 0:
        raise ValueError(f"n_eval and n_test must be >= 0, got n_eval={n_eval}, n_test={n_test}.")
    n_train = n - n_eval - n_test
    if n_train < 1:
        raise ValueError(f"n_eval={n_eval} + n_test={n_test} leaves no training case out of N={n}.")
    count = n_labelled(n_train, labelled_percent)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(n)]
    train, eval_, test = order[:n_train], order[n_train: n_train + n_eval], order[n_train + n_eval:]
    shuffled = [train[i] for i in rng.permutation(n_train)]
    labelled, unlabelled = shuffled[:count], shuffled[count:]
    return {"train": sorted(train), "eval": sorted(eval_), "test": sorted(test), "labelled": sorted(labelled),
            "unlabelled": sorted(unlabelled)}


def datalists_from_splits(
    cases: Sequence[dict[str, str]], splits: Mapping[str, Sequence[str]]
) -> dict[str, list[dict[str, str]]]:
    """Datalists of the roles in :py:data:`ROLES` from case dicts and split ids.

    Raises:
        ValueError: a role is missing from ``splits``, the labelled role is empty, two roles share a case, or a
            split names a case that is not among ``cases`` (the message names it).
    """
    by_id = {c["case"]: c for c in cases}
    missing_roles = [r for r in ROLES if r not in splits]
    if missing_roles:
        raise ValueError(f"splits lack the role(s) {missing_roles}; expected keys {list(ROLES)}.")
    if not splits["labelled"]:
        raise ValueError("the labelled split is empty.")
    _check_disjoint(splits, "splits")
    out = {}
    for role in ROLES:
        unknown = [c for c in splits[role] if c not in by_id]
        if unknown:
            raise ValueError(
                f"the {role} split names case(s) {_some(unknown)} that are not in the dataset "
                f"(cases: {_some(sorted(by_id))})."
            )
        out[role] = [dict(by_id[c]) for c in sorted(splits[role])]
    return out


def msd_datalists(
    root: str | os.PathLike,
    labelled_percent: float = 20,
    n_eval: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    splits: Mapping[str, Sequence[str]] | None = None,
    num_classes: int | None = None,
    check: bool = True,
    check_labels: bool = True,
) -> dict[str, list[dict[str, str]]]:
    """Role datalists of a Decathlon-layout folder: :py:func:`msd_cases` split by :py:func:`make_splits`, or by
    pinned ``splits`` (e.g. the GenericSSL Synapse list, spec §1.1) when given.

    Returns:
        ``{"labelled", "unlabelled", "eval", "test"}`` -> datalists.
    """
    cases = msd_cases(root, num_classes=num_classes, check=check, check_labels=check_labels)
    if splits is None:
        splits = make_splits([c["case"] for c in cases], labelled_percent, n_eval, n_test, seed)
    return datalists_from_splits(cases, splits)


def dhc_datalists(
    root: str | os.PathLike,
    labelled_percent: float = 20,
    num_classes: int | None = None,
    check: bool = True,
) -> dict[str, list[dict[str, str]]]:
    """Role datalists of a DHC npy-layout folder, from its split files (:py:func:`read_dhc_splits`).

    Args:
        root: folder holding ``npy/`` and ``splits/``.
        labelled_percent: selects ``labeled_<P>p.txt``/``unlabeled_<P>p.txt``.
        num_classes: with ``check``, decode the labels and require values in ``0..num_classes-1``.
        check: check every case named by a split (:py:func:`check_case`).

    Raises:
        FileNotFoundError: a split file is missing, or a split names a case whose npy file does not exist.
        ValueError: see :py:func:`read_dhc_splits` and :py:func:`check_case`.
    """
    root = Path(root).expanduser()
    splits = read_dhc_splits(root, labelled_percent)
    names = split_file_names(labelled_percent)
    out = {}
    for role in ROLES:
        cases = [_npy_case(root, c) for c in splits[role]]
        for case in cases:
            for key in ("image", "label"):
                if not Path(case[key]).is_file():
                    raise FileNotFoundError(
                        f"split file {root / _SPLITS / names[role]} names case {case['case']!r} but {case[key]} "
                        "does not exist."
                    )
        if check:
            _check_all(cases, None if num_classes is None else range(num_classes), 0.0)
        out[role] = sorted(cases, key=lambda c: c["case"])
    return out


def volume_datalists(
    root: str | os.PathLike,
    labelled_percent: float = 20,
    n_eval: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    check: bool = True,
) -> dict[str, list[dict[str, str]]]:
    """Role datalists of ``root`` in either layout: the DHC npy layout when ``<root>/npy`` and ``<root>/splits``
    exist (:py:func:`dhc_datalists`; ``n_eval``, ``n_test`` and ``seed`` are then unused, the split files
    decide), else the Decathlon layout (:py:func:`msd_datalists`).

    Raises:
        FileNotFoundError: ``root`` does not exist, or holds neither ``npy/`` + ``splits/`` nor ``dataset.json``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"volume dataset folder {root} does not exist (or is not a folder).")
    if (root / _NPY).is_dir() and (root / _SPLITS).is_dir():
        logger.info("%s: DHC npy layout", root)
        return dhc_datalists(root, labelled_percent, num_classes, check)
    if (root / _DATASET_JSON).is_file():
        logger.info("%s: Medical Segmentation Decathlon layout", root)
        return msd_datalists(root, labelled_percent, n_eval, n_test, seed, None, num_classes, check)
    raise FileNotFoundError(
        f"{root} is neither a DHC npy folder (npy/ + splits/) nor a Medical Segmentation Decathlon folder "
        "(dataset.json + imagesTr/ + labelsTr/)."
    )
