"""ASG text side: the 6-layer BERT report encoder with word-piece aggregation, and the frozen tag-query BERT.

ASG ("Anatomical Structure-Guided Medical Vision-Language Pre-training", Li et al., MICCAI 2024; spec
``specs/asg.md`` §3.2, §3.5, §8, §9), built on ``transformers.BertModel`` (no pooler):

* :class:`BertTextEncoder` (§3.2): Bio_ClinicalBERT shape (hidden 768, 12 heads, FFN 3072, max-pos 512, dropout
  0.1) cut to its first ``num_layers = 6`` layers, trainable. The released model is BLIP's BERT, whose
  embeddings have **no token-type table** (65,190,912 parameters with vocab 28996, official_figures.md §6, vs
  65,192,448 for ``transformers.BertModel``); ``token_type_embeddings=False`` (default) reproduces that by
  replacing the table with a parameter-free module that adds nothing. Its last hidden states ``H`` ``[B, L, D]``
  are aggregated per word (GLoRIA-style): with ``w_t`` the index of the word token ``t`` belongs to (a token
  whose string starts with ``##`` continues the current word) and ``t_sep`` the first ``[SEP]``,

      A[b, k] = sum_{t <= t_sep[b], w_t = k} H[b, t]            (k = 0 .. L-1; zero where no token maps)

  so ``A[:, 0]`` is ``[CLS]``, words follow in order, ``[SEP]`` is the last non-zero element and the length
  stays ``L``. Outputs: ``report_feat = A[:, 0]`` ``[B, D]`` and ``word_feat = A[:, 1:]`` ``[B, L-1, D]``.
  (A row without ``[SEP]`` aggregates all L tokens; the released loop would lose its last word.)
* :func:`build_tag_encoder` / :func:`encode_tag_queries` (§3.5, §8.2): the full (12-layer) BERT, frozen, in eval
  mode; a tag's query is its last-layer ``[CLS]`` state with ``max_length = 128`` padding, computed once
  (107,719,680 parameters with vocab 28996, token-type table included).

Weights: ``checkpoint`` is a local Hugging Face folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``); nothing is downloaded. Without a checkpoint, ``config`` (a dict of ``BertConfig``
fields) or the Bio_ClinicalBERT shape with the tokenizer's vocabulary size gives a randomly initialised BERT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from common.transforms.cxr_text import load_tokenizer

__all__ = ["BIO_CLINICAL_BERT", "BertTextEncoder", "NoTokenTypeEmbedding", "aggregate_word_pieces",
           "continuation_mask", "build_bert", "build_tag_encoder", "encode_tag_queries"]

BIO_CLINICAL_BERT: dict[str, object] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "max_position_embeddings": 512, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2,
}
"""``BertConfig`` fields of emilyalsentzer/Bio_ClinicalBERT (vocab 28996 taken from the tokenizer)."""
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class NoTokenTypeEmbedding(nn.Module):
    """Parameter-free stand-in for ``embeddings.token_type_embeddings``: returns a 0-dim zero, so adding it to the
    word embeddings changes nothing (BLIP's BERT has no token-type table)."""

    def forward(self, token_type_ids: Tensor) -> Tensor:
        return torch.zeros((), device=token_type_ids.device)


def continuation_mask(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Tensor:
    """Bool ``[vocab_size]``: True for the ids whose token string starts with ``##`` (WordPiece continuation)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for token, i in tokenizer.get_vocab().items() if token.startswith("##") and i < vocab_size]
    mask[ids] = True
    return mask


def aggregate_word_pieces(hidden: Tensor, input_ids: Tensor, is_continuation: Tensor, sep_token_id: int) -> Tensor:
    """Sum word pieces into words, up to and including the first ``[SEP]`` (one ``index_add``; §3.2).

    ``w_t = (number of non-continuation tokens in 0..t) - 1``; token t is added to slot ``w_t`` when
    ``t <= t_sep`` (first ``[SEP]``; all t when there is none), other slots stay zero.

    Args:
        hidden: ``[B, L, D]`` token states.
        input_ids: ``[B, L]`` token ids.
        is_continuation: bool ``[V]``, True for ``##`` pieces (:func:`continuation_mask`).
        sep_token_id: id of ``[SEP]``.

    Returns:
        ``[B, L, D]`` aggregated sequence (``[CLS]`` at 0, then words, then ``[SEP]``, then zeros).
    """
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"aggregate_word_pieces: hidden [B, L, D] and input_ids [B, L] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(input_ids.shape)}")
    batch, length, dim = hidden.shape
    is_sep = (input_ids == sep_token_id).long()
    kept = (is_sep.cumsum(1) - is_sep) == 0                                    # t <= first [SEP]
    starts = (~is_continuation[input_ids]).long()
    slot = (starts.cumsum(1) - 1).clamp_min(0)
    slot = torch.where(kept, slot, torch.full_like(slot, length))             # slot L collects the dropped tokens
    offsets = torch.arange(batch, device=hidden.device).unsqueeze(1) * (length + 1)
    out = hidden.new_zeros(batch * (length + 1), dim).index_add(0, (slot + offsets).reshape(-1),
                                                                 hidden.reshape(batch * length, dim))
    return out.view(batch, length + 1, dim)[:, :length]


def _checkpoint_dir(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"BERT checkpoint folder {path} not found (a local Hugging Face folder; nothing is "
                                "downloaded)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"BERT checkpoint folder {path} has no config.json")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"BERT checkpoint folder {path} has no weights ({' or '.join(_WEIGHT_FILES)})")
    return path


def _check_match(config: BertConfig, tokenizer: PreTrainedTokenizerBase, tokenizer_path: str | Path,
                 source: str) -> None:
    """ValueError naming both sides when the vocabulary size or a special-token id set in the config differs."""
    problems = []
    if config.vocab_size != len(tokenizer):
        problems.append(f"vocab_size {config.vocab_size} != tokenizer size {len(tokenizer)}")
    for field, token in (("pad_token_id", "[PAD]"), ("cls_token_id", "[CLS]"), ("sep_token_id", "[SEP]")):
        value = getattr(config, field, None)
        if value is not None and value != tokenizer.convert_tokens_to_ids(token):
            problems.append(f"{field} {value} != tokenizer {token} id {tokenizer.convert_tokens_to_ids(token)}")
    if problems:
        raise ValueError(f"tokenizer {tokenizer_path} does not match the BERT of {source}: {'; '.join(problems)}")


def build_bert(tokenizer: PreTrainedTokenizerBase, tokenizer_path: str | Path, checkpoint: str | Path | None = None,
               config: dict | None = None, num_layers: int | None = None) -> BertModel:
    """``BertModel(add_pooling_layer=False)`` from a local checkpoint folder, a config dict, or (neither) the
    Bio_ClinicalBERT shape with the tokenizer's vocabulary; ``num_layers`` keeps only the first layers.

    Raises:
        ValueError: both ``checkpoint`` and ``config``; more layers than the checkpoint has; a tokenizer that does
            not match the config (vocabulary size, special-token ids; both paths named).
        FileNotFoundError: a checkpoint folder without config.json or weights.
    """
    if checkpoint is not None and config is not None:
        raise ValueError("build_bert: give a checkpoint folder or a config dict, not both")
    if checkpoint is not None:
        folder = _checkpoint_dir(checkpoint)
        bert_config = BertConfig.from_pretrained(str(folder), local_files_only=True)
        _check_match(bert_config, tokenizer, tokenizer_path, f"checkpoint {folder}")
        layers = bert_config.num_hidden_layers if num_layers is None else num_layers
        if not 1 <= layers <= bert_config.num_hidden_layers:
            raise ValueError(f"checkpoint {folder} has {bert_config.num_hidden_layers} layers; cannot keep {layers}")
        return BertModel.from_pretrained(str(folder), local_files_only=True, num_hidden_layers=layers,
                                         add_pooling_layer=False)
    fields = {**BIO_CLINICAL_BERT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              **(config or {})}
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    bert_config = BertConfig(**fields)
    _check_match(bert_config, tokenizer, tokenizer_path, "the given config" if config else "the default config")
    return BertModel(bert_config, add_pooling_layer=False)


class BertTextEncoder(nn.Module):
    """Report encoder of ASG (§3.2): BERT (first ``num_layers`` layers) + word-piece aggregation.

    Args:
        tokenizer_path: ``vocab.txt`` or a tokenizer folder (:func:`common.transforms.cxr_text.load_tokenizer`).
        checkpoint: local Hugging Face BERT folder; None for random initialisation.
        config: ``BertConfig`` fields (without a checkpoint); None for the Bio_ClinicalBERT shape.
            ``num_layers`` overrides its ``num_hidden_layers``.
        num_layers: encoder layers kept (6 in ASG).
        token_type_embeddings: keep the token-type table (transformers' BERT); False (default) drops it as BLIP's
            BERT does (a checkpoint's table is then ignored).

    ``forward(input_ids [B, L], attention_mask [B, L], token_type_ids [B, L] | None)`` returns
    ``(report_feat [B, D], word_feat [B, L-1, D])`` with ``D = hidden_size``.
    """

    def __init__(self, tokenizer_path: str, checkpoint: str | None = None, config: dict | None = None,
                 num_layers: int = 6, token_type_embeddings: bool = False) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.bert = build_bert(self.tokenizer, tokenizer_path, checkpoint, config, num_layers)
        if not token_type_embeddings:
            self.bert.embeddings.token_type_embeddings = NoTokenTypeEmbedding()
        self.hidden_size: int = self.bert.config.hidden_size
        self.sep_token_id: int = self.tokenizer.sep_token_id
        self.register_buffer("is_continuation", continuation_mask(self.tokenizer, self.bert.config.vocab_size),
                             persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        words = aggregate_word_pieces(hidden, input_ids, self.is_continuation, self.sep_token_id)
        return words[:, 0], words[:, 1:]


def build_tag_encoder(tokenizer_path: str, checkpoint: str | None = None, config: dict | None = None) -> nn.Module:
    """The frozen tag-query BERT of IRL (§3.5): all layers of the checkpoint / config (12 for Bio_ClinicalBERT),
    token-type table kept, no pooler, eval mode, ``requires_grad = False``."""
    tokenizer = load_tokenizer(tokenizer_path)
    encoder = build_bert(tokenizer, tokenizer_path, checkpoint, config)
    encoder.requires_grad_(False)
    return encoder.eval()


def encode_tag_queries(tags: Sequence[str], tokenizer: PreTrainedTokenizerBase, encoder: nn.Module,
                       max_length: int = 128) -> Tensor:
    """Tag queries ``[n, D]``: last-layer ``[CLS]`` state of each tag tokenised with ``max_length`` padding, in
    eval mode without gradients (§3.5, §8.2: computed once and cached); the encoder's mode is restored after."""
    if isinstance(tags, str) or len(tags) == 0:
        raise ValueError(f"encode_tag_queries: a non-empty sequence of tag strings expected, got {tags!r}")
    encoded = tokenizer(list(tags), max_length=max_length, truncation=True, padding="max_length",
                        return_tensors="pt")
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            hidden = encoder(**{k: v.to(device) for k, v in encoded.items()})[0]
    finally:
        encoder.train(was_training)
    return hidden[:, 0]
