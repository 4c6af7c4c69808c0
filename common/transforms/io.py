"""Loading transforms for polyp image/mask pairs that fail with the offending file's name.

Two MONAI dictionary transforms used at the head of the polyp bundles' preprocessing::

    LoadPolypImaged(keys=["image", "label"]) -> EnsureChannelFirstd(keys=["image", "label"])
        -> CheckPolypPaird(image_key="image", label_key="label") -> resizing, augmentation, ...

What MONAI 1.6.1 does with a bad file (checked by cutting a Kvasir-SEG JPEG in half and by writing text bytes
to a ``.png``):

* ``PILReader.read`` only calls ``PIL.Image.open``, which parses the header. Pixels are decoded later, in
  ``PILReader.get_data`` (``np.asarray(img)``), which ``LoadImage`` calls outside its per-reader
  ``try``/``except``. A truncated JPEG therefore escapes as ``OSError("image file is truncated (16 bytes not
  processed)")``, a message without the file name (unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set, in
  which case PIL silently fills the missing rows with grey).
* A file whose header cannot be parsed raises ``PIL.UnidentifiedImageError`` naming the file when MONAI picks
  the reader by suffix (``reader=None``), and a ``RuntimeError("LoadImage cannot find a suitable reader ...")``
  with one traceback per registered reader when a reader is named.

:py:class:`LoadPolypImaged` turns both cases into one ``ValueError`` that names the file.

Array layout: ``PILReader`` (``reverse_indexing=True``, the default) swaps the two spatial axes so that 2D
images follow the medical-image convention: a PIL image of width ``W`` and height ``H`` loads as ``(W, H, C)``
(``(W, H)`` for a one-channel mask), and ``EnsureChannelFirstd`` makes that ``(C, W, H)``, not numpy's
``(C, H, W)``. Image and mask are read by the same reader, so their spatial shapes compare directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, LoadImaged, MapTransform, SaveImaged
from monai.utils import ImageMetaKey
from monai.utils.enums import PostFix

__all__ = ["LoadPolypImaged", "CheckPolypPaird", "SaveMaskd", "LUMA_WEIGHTS"]

_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception): ")

LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights, as in PIL's ``convert("L")`` with which the reference code reads its masks."""


class _FileNamingLoadImage(LoadImage):
    """:py:class:`monai.transforms.LoadImage` whose errors name the file being loaded."""

    def __call__(self, filename: Any, reader: Any = None) -> Any:
        files = list(filename) if isinstance(filename, (list, tuple)) else [filename]
        names = [str(f) for f in files]
        missing = [str(f) for f in files if isinstance(f, (str, os.PathLike)) and not Path(f).expanduser().exists()]
        if missing:
            raise FileNotFoundError(f"image file(s) {', '.join(missing)} do not exist.")
        try:
            return super().__call__(filename, reader)
        except Exception as err:  # OSError from PIL's decoder, RuntimeError from LoadImage, ...
            lines = str(err).strip().splitlines() or [""]
            # LoadImage's RuntimeError embeds one traceback per reader; the first one is the chosen reader's
            cause = next((line for line in lines[1:] if _EXCEPTION_LINE.match(line)), "")
            raise ValueError(
                f"cannot load image file {', '.join(names)}: {type(err).__name__}: {lines[0]}"
                + (f" ({cause})" if cause else "")
            ) from err


class LoadPolypImaged(LoadImaged):
    """:py:class:`monai.transforms.LoadImaged` that reports unreadable files by name.

    A subclass, so that code looking for ``LoadImaged`` instances (MONAI Label, bundle inference that swaps
    the loader) still finds it. Every error raised while loading one key — a header PIL cannot parse, a JPEG
    or PNG whose pixel data is truncated (PIL's decoder raises ``OSError`` without the path, see the module
    docstring), no reader for the suffix — is re-raised as ``ValueError("cannot load image file <path>:
    <error>")`` chained to the original. A path that does not exist raises ``FileNotFoundError`` naming it.

    Args:
        keys: keys of the file paths to load, e.g. ``["image", "label"]``.
        reader: as for ``LoadImaged``; default ``"PILReader"``, so that ``.tif`` masks load without ITK
            and image and mask always share PIL's axis convention (``(W, H, C)``, module docstring).
        The other arguments are those of :py:class:`monai.transforms.LoadImaged`, with the same defaults.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: Any = "PILReader",
        dtype: DtypeLike = np.float32,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = PostFix.meta(),
        overwriting: bool = False,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        simple_keys: bool = False,
        prune_meta_pattern: str | None = None,
        prune_meta_sep: str = ".",
        allow_missing_keys: bool = False,
        expanduser: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            keys, reader, dtype, meta_keys, meta_key_postfix, overwriting, image_only, ensure_channel_first,
            simple_keys, prune_meta_pattern, prune_meta_sep, allow_missing_keys, expanduser, *args, **kwargs,
        )
        # the loader LoadImaged.__init__ builds (MONAI 1.6.1 keeps it in ``_loader``), with file-naming errors
        self._loader = _FileNamingLoadImage(
            reader, image_only, dtype, ensure_channel_first, simple_keys, prune_meta_pattern, prune_meta_sep,
            expanduser, *args, **kwargs,
        )


def _source(x: Any) -> str:
    if isinstance(x, MetaTensor):
        return str(x.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "<unknown file>"))
    return "<array without file metadata>"


class CheckPolypPaird(MapTransform):
    """Check a loaded polyp image/mask pair and scale the mask to ``[0, 1]``.

    Runs after ``EnsureChannelFirstd``. With ``x`` the image of shape ``(C, S1, S2)`` and ``g`` the mask of
    shape ``(C_g, S1', S2')`` (spatial axes as loaded, ``(W, H)`` with PILReader; module docstring):

    1. the image must have ``C == 3`` channels;
    2. an RGB mask (``C_g == 3``, three equal channels in public data such as Kvasir-SEG) is reduced to grey
       with the ITU-R 601-2 luma weights, ``g = 0.299 g_R + 0.587 g_G + 0.114 g_B``, which is what the
       EndoKED/PraNet evaluation does when it reads masks with PIL ``convert("L")`` (for equal channels this is
       the channel value itself); after that the mask must have one channel;
    3. the mask's spatial shape must equal the image's;
    4. the mask is scaled by its maximum, ``g <- g / max(g)`` when ``max(g) > 0`` (EndoKED spec §5.1: "GT read
       as grayscale and divided by its max"), so 0/255, 0/1 and palette-index masks all become ``{0, 1}``;
       an all-zero mask stays zero. The result is float32; later resizing may make it soft, which is intended.

    Args:
        image_key: key of the image.
        label_key: key of the mask; a sample without it (inference) is checked for the image only.
        allow_missing_keys: let the label key be absent.

    Raises:
        ValueError: wrong channel count or shape mismatch; the message names the file(s) (the MetaTensor's
            ``filename_or_obj``) and the shapes.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", allow_missing_keys: bool = True) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"key {self.image_key!r} is not in the sample (keys: {list(d)}).")
        image = d[self.image_key]
        if image.ndim != 3 or image.shape[0] != 3:
            channels = f"{image.shape[0]} channel(s)" if image.ndim == 3 else "no channel axis"
            raise ValueError(
                f"image {_source(image)} has shape {tuple(image.shape)} (channel first), {channels}; "
                "expected an RGB image with 3 channels."
            )
        if self.label_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"key {self.label_key!r} is not in the sample (keys: {list(d)}).")
        label = d[self.label_key]
        label = label if isinstance(label, torch.Tensor) else torch.as_tensor(label)
        if label.ndim == 3 and label.shape[0] == 3:
            weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32, device=label.device).view(3, 1, 1)
            label = (label.float() * weights).sum(dim=0, keepdim=True)
        if label.ndim != 3 or label.shape[0] != 1:
            raise ValueError(
                f"mask {_source(d[self.label_key])} has shape {tuple(label.shape)} (channel first); expected one "
                "channel (or three equal RGB channels)."
            )
        if label.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"mask {_source(d[self.label_key])} has spatial shape {tuple(label.shape[1:])} but image "
                f"{_source(image)} has {tuple(image.shape[1:])}; they must match."
            )
        label = label.float()
        peak = label.max()
        d[self.label_key] = label / peak if peak > 0 else label
        return d


class SaveMaskd(SaveImaged):
    """Save a binary mask ``[1, H, W]`` in ``[0, 1]`` as an 8-bit 0/255 PNG named like its source image.

    ``SaveImaged`` with PNG defaults (``scale=255``, ``uint8``, no resampling, no sub-folder, no postfix: the
    mask of ``images/cju0.jpg`` is ``<output_dir>/cju0.png``). ``reverse_indexing`` must match the loader's:
    the bundles load with ``reverse_indexing=False`` (numpy's ``(H, W)`` order, the order the original networks
    were trained in), so the writer must not swap the axes back either.

    Args:
        keys: key of the mask to save.
        output_dir: destination folder.
        reverse_indexing: as given to the loader's ``PILReader``.
        kwargs: other ``SaveImaged`` arguments.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, reverse_indexing: bool = False,
                 **kwargs: Any) -> None:
        options = {"output_ext": ".png", "output_dtype": np.uint8, "scale": 255, "resample": False,
                   "separate_folder": False, "output_postfix": "", "writer": "PILWriter", "print_log": False}
        options.update(kwargs)
        super().__init__(keys, output_dir=output_dir, **options)
        self.set_options(write_kwargs={"reverse_indexing": reverse_indexing})
