"""Report tokenisation for ASG pre-training: an offline WordPiece tokenizer and the MONAI dictionary transform.

ASG (Li et al., MICCAI 2024; spec ``specs/asg.md`` §2.2 step 5, §9) joins a report's cleaned sentences with single
spaces (sentence boundaries are not marked in the token stream) and tokenises the text with the Bio_ClinicalBERT
WordPiece tokenizer, ``max_length = 112``, truncation, padding to ``max_length``::

    "[CLS] w_1 ... w_n [SEP] [PAD] ... [PAD]"  ->  input_ids, attention_mask, token_type_ids  (int64 [L], L = 112)
    cap_len = sum(attention_mask)                                                             (int64 [])

:func:`load_tokenizer` builds that tokenizer from a local ``vocab.txt`` (or a folder holding one) without network
access. The word-piece aggregation of the text encoder (:mod:`common.networks.asg_text`) relies on ``##``
continuation pieces and on ``[CLS]`` / ``[SEP]``, so those are checked here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from transformers import BertTokenizer, PreTrainedTokenizerBase

__all__ = ["load_tokenizer", "TokenizeReportd", "SPECIAL_TOKENS", "TOKEN_KEYS"]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
"""Tokens every vocabulary must hold (padding, unknown words, report start, report end)."""
TOKEN_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "cap_len")
"""The keys :class:`TokenizeReportd` writes."""


def _vocab_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} not found (a vocab.txt or a folder holding one)")
    vocab = path / "vocab.txt" if path.is_dir() else path
    if not vocab.is_file():
        raise FileNotFoundError(f"tokenizer folder {path} has no vocab.txt")
    return vocab


def _read_vocab(vocab: Path) -> dict[str, int]:
    """``{token: line index}`` of a WordPiece vocab.txt, checked: special tokens, ``##`` pieces, no duplicates."""
    try:
        tokens = vocab.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"vocabulary {vocab} is not UTF-8 text ({err})") from err
    ids = {token: i for i, token in enumerate(tokens)}
    if len(ids) != len(tokens):
        raise ValueError(f"vocabulary {vocab} has {len(tokens) - len(ids)} duplicated token line(s)")
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"vocabulary {vocab} lacks the special token(s) {missing}")
    if not any(t.startswith("##") for t in tokens):
        raise ValueError(f"vocabulary {vocab} has no '##' continuation piece: not a WordPiece (BERT) vocabulary")
    return ids


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The BERT WordPiece tokenizer of a local ``vocab.txt``, or of a folder holding one (its
    ``tokenizer_config.json`` / ``tokenizer.json`` are used when present, e.g. for ``do_lower_case``); offline.

    Raises:
        FileNotFoundError: no such path, or a folder without ``vocab.txt``.
        ValueError: a vocabulary without ``[PAD]``/``[UNK]``/``[CLS]``/``[SEP]`` or without any ``##`` piece, with
            duplicated lines, or a folder whose tokenizer files disagree with its ``vocab.txt``.
    """
    path = Path(path)
    vocab = _vocab_file(path)
    ids = _read_vocab(vocab)
    if path.is_dir():
        tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = BertTokenizer(vocab=str(vocab))
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if len(tokenizer) != len(ids) or any(got[t] != ids[t] for t in SPECIAL_TOKENS):
        raise ValueError(f"tokenizer {path}: its tokenizer files ({len(tokenizer)} tokens, special ids {got}) "
                         f"disagree with {vocab} ({len(ids)} tokens)")
    return tokenizer


class TokenizeReportd(MapTransform):
    """Tokenise a record's cleaned sentences (§2.2 step 5) into fixed-length BERT inputs.

    ``d[key]`` (a list of sentences) is joined with ``" "`` (empty sentences dropped) and tokenised with truncation
    and padding to ``max_length``; writes ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``[L]``)
    and ``cap_len = attention_mask.sum()`` (int64 ``[]``). The sentences stay in the record.

    Args:
        keys: the sentence key (exactly one; the outputs have fixed names).
        tokenizer: a tokenizer, or a path for :func:`load_tokenizer`.
        max_length: L (112 in ASG).
        allow_missing_keys: MONAI's.
    """

    def __init__(self, keys: KeysCollection, tokenizer: PreTrainedTokenizerBase | str | Path,
                 max_length: int = 112, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"TokenizeReportd takes one sentence key, got {list(self.keys)}")
        if max_length < 2:
            raise ValueError(f"TokenizeReportd: max_length must hold [CLS] and [SEP] (>= 2), got {max_length}")
        self.tokenizer = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
        self.max_length = max_length

    def _text(self, sentences: Any, record: Mapping[Hashable, Any]) -> str:
        name = record.get("id", "<no id>")
        if isinstance(sentences, str) or not isinstance(sentences, Sequence) \
                or not all(isinstance(s, str) for s in sentences):
            raise ValueError(f"record {name}: sentences must be a list of strings, got {type(sentences).__name__}")
        text = " ".join(s for s in sentences if s.strip())
        if not text:
            raise ValueError(f"record {name}: no report text to tokenise (all sentences empty)")
        return text

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            encoded = self.tokenizer(self._text(d[key], d), max_length=self.max_length, truncation=True,
                                     padding="max_length", return_tensors="pt", return_token_type_ids=True,
                                     return_attention_mask=True)
            for name in TOKEN_KEYS[:3]:
                d[name] = encoded[name][0].to(torch.int64)
            d["cap_len"] = d["attention_mask"].sum()
        return d
