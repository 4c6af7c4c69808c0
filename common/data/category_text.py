"""Category descriptions and their text-embedding tables for the CD-TG plug-in.

CD-TG's Text Generation Unit (specs/cdtg.md §5.1) writes one standardised sentence per class,
"A photo of <class phrase> in which <appearance clause>.", plus one background sentence. We ship them per dataset
as package data, ``common/data/prompts/<dataset>.json`` (:func:`prompt_file`; written for FrugalZoo, shared by
every host network of the plug-in)::

    {"dataset": str,
     "categories": [{"id": int, "name": str, "supercategory": str, "caption": str}, ...],
     "background": {"caption": str}}

and encode them once with a frozen text encoder (§5.3: the embeddings are exactly frozen-encoder outputs) into a
:class:`TextEmbeddingTable`: class embeddings ``E [n, d]`` in id order and a background embedding ``e_bg [d]``.
Class names match case-insensitively, with ``_``, ``-`` and spaces ignored (``seborrheic_keratosis`` ==
``Seborrheic keratosis``, ``diningtable`` == ``dining table``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.networks.text_encoders import TextEncoder

__all__ = ["CategoryDescriptions", "TextEmbeddingTable", "normalize_class_name", "read_descriptions",
           "encode_descriptions", "ensure_text_table", "prompt_file", "PROMPTS_DIR"]

_CATEGORY_KEYS = ("id", "name", "supercategory", "caption")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
"""The shipped description files (isic, lung, wbc, chaos_mr, btcv, polyp, pascal, shapes)."""


def prompt_file(dataset: str) -> str:
    """Path of the shipped description file of ``dataset`` (e.g. ``"wbc"``); FileNotFoundError listing the others."""
    path = PROMPTS_DIR / f"{dataset}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in PROMPTS_DIR.glob("*.json"))
        raise FileNotFoundError(f"no shipped description file {path.name} in {PROMPTS_DIR} (shipped: {shipped})")
    return str(path)


def normalize_class_name(name: str) -> str:
    """The matching key of a class name: lower case, without ``_``, ``-`` or whitespace."""
    return re.sub(r"[\s_\-]+", "", name).lower()


@dataclass(frozen=True)
class CategoryDescriptions:
    """A validated description file: class ``names``/``captions`` sorted by id, and the background caption."""

    path: str
    dataset: str
    ids: list[int]
    names: list[str]
    supercategories: list[str]
    captions: list[str]
    background: str


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"description file {path}: {problem}")


def _text(path: Path, where: str, value: object, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _fail(path, f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def read_descriptions(path: str | Path) -> CategoryDescriptions:
    """Read and validate a description file (schema in the module docstring); FileNotFoundError when it is
    missing, ValueError naming the file and the problem (missing keys, duplicate ids or names, empty captions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"description file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise _fail(path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise _fail(path, "the top level must be an object")
    missing = [k for k in ("dataset", "categories", "background") if k not in data]
    if missing:
        raise _fail(path, f"missing key(s) {missing}")
    dataset = _text(path, "top level", data["dataset"], "dataset")
    categories = data["categories"]
    if not isinstance(categories, list) or not categories:
        raise _fail(path, "'categories' must be a non-empty list")
    rows = []
    for i, cat in enumerate(categories):
        where = f"categories[{i}]"
        if not isinstance(cat, dict):
            raise _fail(path, f"{where} must be an object")
        missing = [k for k in _CATEGORY_KEYS if k not in cat]
        if missing:
            raise _fail(path, f"{where} is missing key(s) {missing}")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool) or cat["id"] < 0:
            raise _fail(path, f"{where}: 'id' must be a non-negative integer, got {cat['id']!r}")
        rows.append((cat["id"], _text(path, where, cat["name"], "name"),
                     _text(path, where, cat["supercategory"], "supercategory", allow_empty=True),
                     _text(path, where, cat["caption"], "caption")))
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        raise _fail(path, f"duplicate category ids {sorted({i for i in ids if ids.count(i) > 1})}")
    keys = [normalize_class_name(r[1]) for r in rows]
    if len(set(keys)) != len(keys):
        dupes = sorted({r[1] for r, k in zip(rows, keys) if keys.count(k) > 1})
        raise _fail(path, f"duplicate category names {dupes} (names match ignoring case, '_', '-' and spaces)")
    background = data["background"]
    if not isinstance(background, dict) or "caption" not in background:
        raise _fail(path, "'background' must be an object with a 'caption'")
    bg_caption = _text(path, "background", background["caption"], "caption")
    rows.sort(key=lambda r: r[0])
    return CategoryDescriptions(path=str(path), dataset=dataset, ids=[r[0] for r in rows],
                                names=[r[1] for r in rows], supercategories=[r[2] for r in rows],
                                captions=[r[3] for r in rows], background=bg_caption)


class TextEmbeddingTable:
    """Class text embeddings ``[n, d]`` (float32, in the description file's id order) and the background text
    embedding ``[d]``, looked up by class name.

    Args:
        names: class names, one per row of ``embeddings``.
        embeddings: ``[n, d]``.
        background: ``[d]``.
        meta: provenance written with the table (``descriptions``: source file, ``sha256``: its hash,
            ``encoder``: the text encoder's name).
    """

    def __init__(self, names: list[str], embeddings: torch.Tensor, background: torch.Tensor,
                 meta: dict[str, str] | None = None) -> None:
        self.meta = dict(meta or {})
        embeddings = torch.as_tensor(embeddings).detach().float().cpu()
        background = torch.as_tensor(background).detach().float().cpu()
        if embeddings.dim() != 2 or embeddings.shape[0] != len(names):
            raise ValueError(f"TextEmbeddingTable ({self.source}): embeddings must be [n={len(names)}, d], got "
                             f"{tuple(embeddings.shape)}")
        if background.shape != (embeddings.shape[1],):
            raise ValueError(f"TextEmbeddingTable ({self.source}): background must be [d={embeddings.shape[1]}], "
                             f"got {tuple(background.shape)}")
        self.names = list(names)
        self._index = {normalize_class_name(n): i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError(f"TextEmbeddingTable ({self.source}): duplicate class names in {self.names}")
        self.embeddings = embeddings
        self.background = background
        self.dim = int(embeddings.shape[1])

    @property
    def source(self) -> str:
        """The description file (and table file) the embeddings come from, for messages."""
        parts = [self.meta.get("descriptions", ""), self.meta.get("table", "")]
        return ", ".join(p for p in parts if p) or "in-memory table"

    def __len__(self) -> int:
        return len(self.names)

    def index(self, class_name: str) -> int:
        """Row of ``class_name``; ValueError naming the class and the file when it has no description."""
        key = normalize_class_name(class_name)
        if key not in self._index:
            raise ValueError(f"class {class_name!r} has no description in {self.source}; known classes: "
                             f"{self.names}")
        return self._index[key]

    def __getitem__(self, class_name: str) -> torch.Tensor:
        """Embedding ``[d]`` of ``class_name`` (see :meth:`index`)."""
        return self.embeddings[self.index(class_name)]

    def save(self, path: str | Path) -> None:
        """Write names, embeddings, background and meta to a ``.pt`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in self.meta.items() if k != "table"}
        torch.save({"names": self.names, "embeddings": self.embeddings, "background": self.background,
                    "meta": meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> TextEmbeddingTable:
        """A table written by :meth:`save`; FileNotFoundError / ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text embedding table {path} not found (write it with "
                                    "scripts/encode_prompts.py)")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or foreign files
            raise ValueError(f"text embedding table {path}: cannot be read ({err})") from err
        missing = [k for k in ("names", "embeddings", "background") if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"text embedding table {path}: missing key(s) {missing}")
        meta = {**dict(data.get("meta", {})), "table": str(path)}
        return cls(list(data["names"]), data["embeddings"], data["background"], meta)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_descriptions(path: str | Path, encoder: TextEncoder) -> TextEmbeddingTable:
    """Encode every caption of a description file and its background caption with ``encoder`` (one call)."""
    desc = read_descriptions(path)
    embeddings = encoder.encode(desc.captions + [desc.background])
    if tuple(embeddings.shape) != (len(desc.captions) + 1, encoder.dim):
        raise ValueError(f"text encoder {encoder.name} returned {tuple(embeddings.shape)} for "
                         f"{len(desc.captions) + 1} captions of {path}, expected [n, {encoder.dim}]")
    meta = {"descriptions": str(path), "sha256": _sha256(Path(path)), "encoder": encoder.name,
            "dataset": desc.dataset}
    return TextEmbeddingTable(desc.names, embeddings[:-1], embeddings[-1], meta)


def ensure_text_table(descriptions_path: str | Path, cache_path: str | Path,
                      encoder_factory: Callable[[], TextEncoder], encoder_name: str | None = None
                      ) -> TextEmbeddingTable:
    """The table of ``descriptions_path``, read from ``cache_path`` when that cache was written from the same file
    content (SHA-256) by an encoder of the same name, otherwise encoded with ``encoder_factory()`` and cached.

    ``encoder_name`` (e.g. :func:`common.networks.text_encoders.text_encoder_name`) lets a valid cache be used
    without building the encoder; when None the encoder is built to learn its name."""
    descriptions_path, cache_path = Path(descriptions_path), Path(cache_path)
    read_descriptions(descriptions_path)  # validate before trusting or writing anything
    digest = _sha256(descriptions_path)
    encoder = None
    if encoder_name is None:
        encoder = encoder_factory()
        encoder_name = encoder.name
    if cache_path.is_file():
        cached = TextEmbeddingTable.load(cache_path)
        if cached.meta.get("sha256") == digest and cached.meta.get("encoder") == encoder_name:
            return cached
    encoder = encoder or encoder_factory()
    if encoder.name != encoder_name:
        raise ValueError(f"ensure_text_table: encoder_name {encoder_name!r} differs from the name of the encoder "
                         f"the factory built ({encoder.name!r})")
    table = encode_descriptions(descriptions_path, encoder)
    table.save(cache_path)
    table.meta["table"] = str(cache_path)
    return table
