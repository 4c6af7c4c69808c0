"""ASG networks: image encoders, projection heads, region / sentence pooling, IRL decoder and the pre-training model.

Re-implementation of "Anatomical Structure-Guided Medical Vision-Language Pre-training" (Li et al., MICCAI 2024)
from the spec ``specs/asg.md``:

* §3.1 image encoders: ViT-B/16 (timm ``VisionTransformer``; [CLS] + patch tokens after the final LayerNorm) and
  ResNet-50 (torchvision; input upsampled to 299 px, pooled layer4 + layer3 map).
* §3.3 projection heads :class:`GlobalEmbedding` / :class:`LocalEmbedding` (768 -> 2048 -> 128, output BN without
  affine), L2-normalised by :class:`ASGModel`.
* §3.4 :func:`region_features` (RoIAlign of the patch-embedding map) and :func:`sentence_features` (mean of the
  normalised word embeddings of a region's sentences).
* §3.5 :class:`IRLDecoder`: pre-LN transformer decoder over the 40 finding-tag queries, memory = raw patch tokens.

Deviations (§8): the tag queries are cached in eval mode by default (§8.2; the released per-step recomputation
with the frozen BERT in its current mode is available through ``tag_encoder`` / ``tag_inputs``); the IRL decoder
works at the encoder's local width (1024 for ResNet-50, §8.7) and a Linear ``query_proj`` maps tag queries of
another width to it (e.g. a 384-d MiniLM tag encoder); padding RoIs give zero region vectors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.ops import roi_align

from common.utils.checkpoints import load_checkpoint

__all__ = [
    "ViTImageEncoder",
    "ResNetImageEncoder",
    "GlobalEmbedding",
    "LocalEmbedding",
    "IRLDecoder",
    "region_features",
    "sentence_features",
    "ASGModel",
]

logger = logging.getLogger(__name__)

# key prefixes of the image encoder's backbone in released ASG (Lightning) checkpoints and in ASGModel state dicts
_ENCODER_PREFIXES = ("img_encoder_q.model.", "image_encoder.model.")
_TAG_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _backbone_state(path: Path, what: str) -> dict[str, Tensor]:
    """The backbone tensors of a checkpoint file: unwrap ``model`` / ``state_dict``, strip ``module.`` and, when
    present, an ASG encoder prefix (:data:`_ENCODER_PREFIXES`; keys of other parts are then dropped)."""
    loaded = load_checkpoint(path, what)
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{what} '{path}' does not hold a state dict (a mapping of names to tensors).")
    state = {k.removeprefix("module."): v for k, v in loaded.items()}
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _load_backbone(module: nn.Module, checkpoint: str | os.PathLike, what: str) -> None:
    """Load a checkpoint into ``module`` non-strictly (as released: DeiT weights with ``strict=False``), logging
    missing / unexpected keys.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, no key matches the network, or a matching key has another shape.
    """
    path = Path(checkpoint)
    state = _backbone_state(path, what)
    expected = module.state_dict()
    matching = [k for k in state if k in expected]
    if not matching:
        raise ValueError(f"{what} '{path}' shares no key with {type(module).__name__} "
                         f"(checkpoint keys e.g. {list(state)[:5]}, network keys e.g. {list(expected)[:5]}).")
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
             for k in matching if state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{what} '{path}' does not fit {type(module).__name__}: {len(wrong)} tensor(s) of "
                         f"another shape, e.g. {wrong[:3]}.")
    missing, unexpected = module.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s '%s'", len(matching), what, path)
    if missing:
        logger.warning("%s '%s': %d network keys not in the checkpoint (left at init), e.g. %s",
                       what, path, len(missing), missing[:5])
    if unexpected:
        logger.info("%s '%s': %d checkpoint keys ignored, e.g. %s", what, path, len(unexpected), unexpected[:5])


class ViTImageEncoder(nn.Module):
    """ViT image encoder (§3.1): timm ``VisionTransformer`` (``num_classes=0``, ``qkv_bias``, LayerNorm eps 1e-6).

    ``forward(x [B, 3, H, W]) -> (global [B, D], patches [B, grid*grid, D])`` = the final-LayerNorm tokens
    ``(tokens[:, 0], tokens[:, 1:])`` with ``grid = img_size // patch_size`` (14 for ViT-B/16 at 224) and
    ``D = embed_dim``. 85,798,656 parameters for ViT-B/16 at 224.

    Args:
        checkpoint: optional local file: a timm / DeiT state dict (possibly under ``"model"`` or ``"state_dict"``)
            or an ASG checkpoint whose keys start with ``img_encoder_q.model.`` (or ``image_encoder.model.``),
            loaded non-strictly (missing / unexpected keys are logged).

    Raises:
        ValueError: ``img_size`` not a multiple of ``patch_size``; a checkpoint with no matching key or with a
            tensor of another shape (names the file).
        FileNotFoundError: ``checkpoint`` does not exist.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                       num_heads=num_heads, num_classes=0, qkv_bias=True,
                                       norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.global_width = embed_dim
        self.local_width = embed_dim
        self.grid = img_size // patch_size
        if checkpoint is not None:
            _load_backbone(self.model, checkpoint, "ViT checkpoint")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 3, H, W]`` -> ([CLS] ``[B, D]``, patch tokens ``[B, grid*grid, D]``), both after the final LN."""
        tokens = self.model.forward_features(x)
        return tokens[:, 0], tokens[:, 1:]


def _resnet_grid(size: int) -> int:
    """Side of the ResNet layer3 map for a ``size`` px input: conv1, max-pool, layer2 and layer3 each map
    n -> floor((n - 1) / 2) + 1 (299 -> 150 -> 75 -> 38 -> 19)."""
    for _ in range(4):
        size = (size - 1) // 2 + 1
    return size


class ResNetImageEncoder(nn.Module):
    """ResNet-50 image encoder (§3.1): torchvision ``resnet50(weights=None)`` without its classifier.

    The input is bilinearly upsampled to ``input_size`` (299, ``align_corners=True``); ``global`` = average-pooled
    layer4 ``[B, 2048]``; ``patches`` = the layer3 map ``[B, 1024, 19, 19]`` flattened row-major to
    ``[B, 361, 1024]`` (token u = 19 * y + x). ``grid = 19``, ``global_width = 2048``, ``local_width = 1024``.

    Args:
        depth: only 50 is supported.
        checkpoint: optional local file: a torchvision state dict (possibly under ``"model"`` / ``"state_dict"``,
            or with an ASG ``img_encoder_q.model.`` prefix), loaded non-strictly with the rules of
            :class:`ViTImageEncoder` (the ImageNet ``fc`` is ignored).

    Raises:
        ValueError: ``depth`` other than 50; a checkpoint with no matching key or a tensor of another shape.
        FileNotFoundError: ``checkpoint`` does not exist.
    """

    def __init__(self, depth: int = 50, input_size: int = 299, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        if depth != 50:
            raise ValueError(f"ResNetImageEncoder supports depth 50 only (ASG-R50), got {depth}")
        self.model = torchvision.models.resnet50(weights=None)
        self.model.fc = nn.Identity()
        self.input_size = input_size
        self.global_width = 2048
        self.local_width = 1024
        self.grid = _resnet_grid(input_size)
        if checkpoint is not None:
            _load_backbone(self.model, checkpoint, "ResNet checkpoint")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 3, H, W]`` -> (pooled layer4 ``[B, 2048]``, layer3 tokens ``[B, grid*grid, 1024]``)."""
        m = self.model
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=True)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        local = m.layer3(m.layer2(m.layer1(x)))
        pooled = torch.flatten(m.avgpool(m.layer4(local)), 1)
        return pooled, local.flatten(2).transpose(1, 2)


class GlobalEmbedding(nn.Module):
    """Global projection head (§3.3): Linear -> BN -> ReLU -> Linear -> BN(affine=False); ``[B, in] -> [B, out]``.

    1,841,280 parameters for 768 -> 2048 -> 128 (768*2048 + 2048 + 2*2048 + 2048*128 + 128).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim, affine=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_dim]`` -> ``[B, out_dim]`` (not normalised)."""
        return self.head(x)


class LocalEmbedding(nn.Module):
    """Token-wise projection head (§3.3): the :class:`GlobalEmbedding` stack as 1x1 Conv1d over the token axis;
    ``[B, N, in] -> [B, N, out]``. Its BatchNorm statistics pool over batch x tokens, zero-padded word positions
    included (as released, §8.4). 1,841,280 parameters for 768 -> 2048 -> 128.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv1d(in_dim, hidden_dim, kernel_size=1), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Conv1d(hidden_dim, out_dim, kernel_size=1), nn.BatchNorm1d(out_dim, affine=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, N, in_dim]`` -> ``[B, N, out_dim]`` (not normalised)."""
        return self.head(x.transpose(1, 2)).transpose(1, 2)


class IRLDecoder(nn.Module):
    """IRL tag-recognition decoder (§3.5): pre-LN ``nn.TransformerDecoder`` + final LayerNorm, then Dropout ->
    Linear(d_model, 1) per query.

    Each layer: q += SA(LN1 q); q += CA(LN2 q, memory); q += FFN(LN3 q) (ReLU); no positional encodings.
    Linear and attention weights ~ N(0, 0.02), their biases 0. At the default size (768, 4 heads, FFN 1024,
    4 layers): 4 x 6,304,000 + 1,536 (norm) + 769 (head) = 25,218,305 parameters.
    """

    def __init__(self, d_model: int = 768, nhead: int = 4, dim_feedforward: int = 1024, num_layers: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation="relu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(d_model))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) weights and zero biases for Linear layers and attention projections."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        """``queries [Q, D]`` (shared by the batch), ``memory [B, N, D]`` -> tag logits ``[B, Q]``."""
        tgt = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        return self.head(self.dropout(self.decoder(tgt, memory))).squeeze(-1)


def region_features(patch_emb: Tensor, grid: int, rois: Tensor) -> Tensor:
    """Region vectors by RoIAlign of the patch-embedding map (§3.4).

    ``v[i, r] = RoIAlign(map_i, box_{i,r}, output 1x1, spatial_scale 1, sampling_ratio -1, aligned=False)`` with
    ``map_i [E, grid, grid]`` the patches of image i laid out row-major (token u = grid * y + x). The image of a
    row is ``rois[i, r, 0]`` (the collated batch index); padding rows (``x1 < 0``) give zero vectors. Not
    re-normalised.

    Args:
        patch_emb: ``[B, N, E]`` with ``N = grid * grid``.
        grid: side of the patch grid.
        rois: ``[B, R, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in grid units.

    Returns:
        ``[B, R, E]``.

    Raises:
        ValueError: shapes that do not fit, or a valid row whose batch index is outside ``[0, B)``.
    """
    b, n, e = patch_emb.shape
    if n != grid * grid:
        raise ValueError(f"patch_emb has {n} tokens, expected grid*grid = {grid * grid}")
    if rois.dim() != 3 or rois.shape[0] != b or rois.shape[2] != 5:
        raise ValueError(f"rois must be [B={b}, R, 5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    valid = rois[..., 1] >= 0
    index = rois[..., 0]
    if bool(((index < 0) | (index >= b))[valid].any()):
        raise ValueError(f"rois hold a batch index outside [0, {b}) in a non-padding row")
    # padding rows read image 0 (any in-range index); their output is zeroed below
    rois = torch.where(valid.unsqueeze(-1), rois, rois.new_tensor([0.0, -1.0, -1.0, -1.0, -1.0]))
    feature_map = patch_emb.transpose(1, 2).reshape(b, e, grid, grid)
    pooled = roi_align(feature_map, rois.reshape(-1, 5).to(feature_map.dtype), output_size=(1, 1),
                       spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    return pooled.reshape(b, -1, e) * valid.unsqueeze(-1).to(pooled.dtype)


def sentence_features(word_emb: Tensor, sent_index: Tensor) -> Tensor:
    """Sentence vectors of the regions (§3.4): ``t[i, r] = (1 / |S|) sum_{k in S} word_emb[i, k]``.

    ``S`` = the valid entries (``0 <= k < W``) of ``sent_index[i, r]``; ``|S|`` is clamped to >= 1 (a row without
    words gives a zero vector); not re-normalised.

    Args:
        word_emb: ``[B, W, E]`` (normalised word embeddings; word k of the report at index k).
        sent_index: int ``[B, R, S]`` word positions, padded with -1.

    Returns:
        ``[B, R, E]``.
    """
    b, w, e = word_emb.shape
    if sent_index.dim() != 3 or sent_index.shape[0] != b:
        raise ValueError(f"sent_index must be [B={b}, R, S], got {tuple(sent_index.shape)}")
    _, r, s = sent_index.shape
    valid = (sent_index >= 0) & (sent_index < w)
    index = torch.where(valid, sent_index, torch.zeros_like(sent_index)).long()
    words = torch.gather(word_emb.unsqueeze(1).expand(b, r, w, e), 2, index.unsqueeze(-1).expand(b, r, s, e))
    mask = valid.unsqueeze(-1).to(word_emb.dtype)
    return (words * mask).sum(2) / mask.sum(2).clamp(min=1.0)


class ASGModel(nn.Module):
    """The ASG pre-training network (§3): image / text encoders, four projection heads and the IRL decoder.

    Image: ``g, P = image_encoder(x)``; ``ĝ = norm(GlobalEmbedding(g))`` ``[B, E]``, ``p̂ = norm(LocalEmbedding(P))``
    ``[B, N, E]``. Text: ``h, W = text_encoder(ids, mask, types)``; ``ĥ`` ``[B, E]``, ``ŵ`` ``[B, L-1, E]`` likewise
    (separate heads). IRL: ``logits = IRLDecoder(query_proj(queries), P)`` with ``d_model =
    image_encoder.local_width`` and memory = the raw patch tokens.

    Args:
        image_encoder: duck type of :class:`ViTImageEncoder` (``global_width``, ``local_width``, ``grid``).
        text_encoder: ``forward(input_ids, attention_mask, token_type_ids=None) -> (report [B, D], words
            [B, L-1, D])`` with ``hidden_size``.
        tag_queries: ``[Q, Dq]`` tag-query embeddings (cached in eval mode, §8.2), kept as a buffer. When
            ``Dq != d_model`` a Linear ``query_proj`` (Dq -> d_model) is added (documented deviation).
        tag_encoder, tag_inputs: optional frozen module returning ``.last_hidden_state`` and its inputs
            (``input_ids`` / ``attention_mask`` [/ ``token_type_ids``], each ``[Q, Lq]``): the queries are then
            recomputed every forward as the [CLS] state, in the encoder's current train/eval mode (released
            behaviour). The tag encoder's parameters are set to ``requires_grad=False``.

    Raises:
        ValueError: ``tag_queries`` not 2-D; only one of ``tag_encoder`` / ``tag_inputs``; tag inputs with other
            keys or a row count other than Q.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, tag_queries: Tensor, emb_dim: int = 128,
                 proj_hidden_dim: int = 2048, irl_layers: int = 4, irl_heads: int = 4, irl_ffn: int = 1024,
                 irl_dropout: float = 0.1, tag_encoder: nn.Module | None = None,
                 tag_inputs: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        if tag_queries.dim() != 2:
            raise ValueError(f"tag_queries must be [Q, D], got {tuple(tag_queries.shape)}")
        if (tag_encoder is None) != (tag_inputs is None):
            raise ValueError("tag_encoder and tag_inputs must be given together (or neither)")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_global = GlobalEmbedding(image_encoder.global_width, proj_hidden_dim, emb_dim)
        self.image_local = LocalEmbedding(image_encoder.local_width, proj_hidden_dim, emb_dim)
        self.text_global = GlobalEmbedding(text_encoder.hidden_size, proj_hidden_dim, emb_dim)
        self.text_local = LocalEmbedding(text_encoder.hidden_size, proj_hidden_dim, emb_dim)
        d_model = image_encoder.local_width
        self.irl = IRLDecoder(d_model, irl_heads, irl_ffn, irl_layers, irl_dropout)
        query_dim = tag_queries.shape[1]
        self.query_proj = nn.Linear(query_dim, d_model) if query_dim != d_model else nn.Identity()
        self.register_buffer("tag_queries", tag_queries.detach().clone())
        self.tag_encoder = tag_encoder
        self._tag_keys: tuple[str, ...] = ()
        if tag_encoder is not None:
            tag_encoder.requires_grad_(False)
            self._register_tag_inputs(tag_inputs, tag_queries.shape[0])

    def _register_tag_inputs(self, tag_inputs: Mapping[str, Tensor], num_queries: int) -> None:
        """Keep the tag-encoder inputs as non-persistent buffers ``tag_<key>`` (they follow ``.to(device)``)."""
        keys = tuple(tag_inputs)
        if not {"input_ids", "attention_mask"} <= set(keys) <= set(_TAG_INPUT_KEYS):
            raise ValueError(f"tag_inputs must hold input_ids and attention_mask (token_type_ids optional), "
                             f"got keys {list(keys)}")
        for key in keys:
            value = torch.as_tensor(tag_inputs[key])
            if value.dim() != 2 or value.shape[0] != num_queries:
                raise ValueError(f"tag_inputs['{key}'] must be [Q={num_queries}, Lq], got {tuple(value.shape)}")
            self.register_buffer(f"tag_{key}", value.long(), persistent=False)
        self._tag_keys = keys

    def queries(self) -> Tensor:
        """Tag queries at the decoder width ``[Q, d_model]``: the cached buffer, or the [CLS] states of the frozen
        tag encoder recomputed now (no gradient)."""
        queries = self.tag_queries
        if self.tag_encoder is not None:
            with torch.no_grad():
                inputs = {key: getattr(self, f"tag_{key}") for key in self._tag_keys}
                queries = self.tag_encoder(**inputs).last_hidden_state[:, 0]
        return self.query_proj(queries)

    def forward(self, image: Tensor) -> Tensor:
        """``image [B, 3, H, W]`` -> finding-tag logits ``[B, Q]``."""
        _, patches = self.image_encoder(image)
        return self.irl(self.queries(), patches)

    def embed(self, image: Tensor) -> Tensor:
        """``image [B, 3, H, W]`` -> L2-normalised global image embedding ``ĝ [B, emb_dim]``."""
        global_feat, _ = self.image_encoder(image)
        return F.normalize(self.image_global(global_feat), dim=-1)

    def pretrain_outputs(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         token_type_ids: Tensor | None, rois: Tensor, sent_index: Tensor) -> dict[str, Tensor]:
        """All pre-training outputs of a collated batch.

        Returns:
            ``image_emb`` ĝ ``[B, E]``, ``report_emb`` ĥ ``[B, E]``, ``region_emb`` ``[B, R, E]`` (RoIAlign of the
            p̂ map at ``rois [B, R, 5]``), ``sentence_emb`` ``[B, R, E]`` (means of ŵ at ``sent_index [B, R, S]``),
            ``tag_logits`` ``[B, Q]``.
        """
        global_feat, patches = self.image_encoder(image)
        report_feat, word_feat = self.text_encoder(input_ids, attention_mask, token_type_ids)
        patch_emb = F.normalize(self.image_local(patches), dim=-1)
        word_emb = F.normalize(self.text_local(word_feat), dim=-1)
        return {
            "image_emb": F.normalize(self.image_global(global_feat), dim=-1),
            "report_emb": F.normalize(self.text_global(report_feat), dim=-1),
            "region_emb": region_features(patch_emb, self.image_encoder.grid, rois),
            "sentence_emb": sentence_features(word_emb, sent_index),
            "tag_logits": self.irl(self.queries(), patches),
        }
