"""DMTNet: Doubly Matching Transformation network for cross-domain few-shot segmentation (a CD-TG host).

Jiayi Chen, Rong Quan, Jie Qin, "Cross-Domain Few-Shot Semantic Segmentation via Doubly Matching Transformation",
IJCAI 2024 (arXiv 2405.15265; official code github.com/ChenJiayi68/DMTNet, ``model/dmtnet.py`` at cf569bd, scripts at
b67bbb2). An HSNet/PATNet descendant: PATNet's frozen ResNet-50 bottleneck features, anchor transformation,
hypercorrelation and HPN learner (:mod:`common.networks.patnet`), with three additions, re-implemented here from the
paper's description and the official code's equations (no code copied). One 1-shot episode, query ``I_q``
``[B, 3, H, W]`` and support ``(I_s, M_s)`` ``[B, 3, H, W]`` / ``[B, H, W]``; per feature level ``l`` of stage
``s(l)`` (ResNet-50: 4 + 6 + 3 levels of 512 / 1024 / 2048 channels at ``H/8``, ``H/16``, ``H/32``), features
``f^q_l, f^s_l [B, C, h, w]`` and the soft support mask ``m_l = bilinear(M_s, (h, w))``:

1. Support prototypes (MAP): ``p^f_l = MAP(f^s_l, m_l)``, ``p^b_l = MAP(f^s_l, 1 - m_l)`` ``[B, C]``.
2. Grid prototypes: the ``h x w`` map is cut into cells (:func:`grid_cells`: side ``k = max(1, h // G)``, ``G = 4``,
   starts ``0, k, 2k, ...`` plus a last cell flush with the border when the cells do not tile it, e.g. 50 ->
   ``0, 12, 24, 36, 38``: 5 x 5 = 25 cells on every level at 400 px) and ``p^f_{l,g}``, ``p^b_{l,g}`` are the MAPs of
   each cell ``g`` (:func:`grid_prototypes`; a cell without foreground has the zero foreground prototype).
3. Coarse query prediction (:func:`coarse_query_scores`): ``S_l(x) = tau mean_g [cos(f^q_l(x), p^b_{l,g}),
   cos(f^q_l(x), p^f_{l,g})]`` ``[B, 2, h, w]`` with ``tau = 10``; pseudo-mask ``m^q_l = argmax_c S_l`` (1 = fg).
4. Query prototypes (:func:`query_prototypes`): ``q^f_l = MAP(f^q_l, m^q_l)``, ``q^b_l = MAP(f^q_l, 1 - m^q_l)``.
5. Self-Matching Transformation (SMT, :func:`self_matching_transform`). With ``rownorm`` the row-wise L2
   normalisation (``+ 1e-6``) and ``pinv`` the pseudo-inverse::

       C^s = rownorm([p^b; p^f])   A^s = rownorm(drop(A_s))    P^s = (pinv(C^s) A^s)^T     [C, C]
       C^q = rownorm([q^f; q^b])   A^q = rownorm(drop(A'_s))   P^q = (pinv(C^q) A^q)^T     [C, C]
       P~^q = beta P^q + (1 - beta) P^s,   beta = 0.5

   ``A_s`` is ``reference_layer{s+1}.weight`` (support anchors, PATNet's, rows background / foreground) and ``A'_s``
   is ``reference_layer{s+4}.weight`` (query anchors). ``P^s`` maps the support prototypes onto the support anchors
   (``P^s c^b = a^b``, ``P^s c^f = a^f``) and ``P^q`` the query's own prototypes onto the query anchors (row 0 is
   matched with the *foreground* query prototype: the official call passes the query prototypes in ``(fg, bg)``
   order; kept so that official checkpoints keep their meaning). ``drop`` is dropout (``p = 0.2``, training mode
   only) on the anchors expanded to ``[B, 2, C]``, an independent mask per episode and level. Transformed features:
   ``f'^q = P~^q f^q``, ``f'^{s,f} = P^s (f^s m)``, ``f'^{s,b} = P^s (f^s (1 - m))``. Every ``P`` has rank <= 2 and
   is applied in its factored form ``P = U V``, ``U = A^^T [C, 2]``, ``V = pinv(C^)^T [2, C]``
   (:func:`matching_transform`).
6. Dual Hypercorrelation Construction (DHC): ``C^f_l = hypercorrelation(f'^q_l, f'^{s,f}_l)`` and
   ``C^b_l = hypercorrelation(f'^q_l, f'^{s,b}_l)`` (clamped cosines ``[B, h, w, h, w]``), stacked per stage and fed
   to the *same* HPN learner (:class:`common.networks.patnet.HPNLearner`): foreground logits ``Y^f`` (the
   prediction, ``[B, 2, H, W]``) and background logits ``Y^b`` (class 1 = query background), both resized bilinearly
   (``align_corners=True``) to the query size.
7. Training objective (:meth:`DMTNet.loss_terms`, :meth:`DMTNet.training_loss`; :meth:`DMTNet.episode_loss` is
   the episodic trainer's hook)::

       L = CE(Y^f, M_q) + lambda_b CE(Y^b, 1 - M_q) + lambda_c mean_l CE(S_l, trunc(bilinear(M_q, (h_l, w_l))))

   ``lambda_b = 1``, ``lambda_c = 0.5``; ``trunc`` (the official ``.long()``) makes foreground only the cells whose
   bilinear mask is exactly 1. The coarse scores depend on frozen features only, so in the plain host the
   ``lambda_c`` term is a constant (no gradient, as in the official code); it trains a text guide when the grid
   prototypes are fused (``fuse_grid_prototypes=True``).
8. Test-time Self-Finetuning (TSF, :meth:`DMTNet.finetune`): the support is segmented as its own query
   (``forward(I_s, I_s, M_s)``) and Adam (lr 1e-3) minimises ``CE(Y^f, M_s)`` over :data:`TSF_PARAMETERS` only, the
   GroupNorm scales of the last layer of the two mixing blocks of the HPN learner (``encoder_layer4to3.7.weight``,
   ``encoder_layer3to2.7.weight``, 2 x 128 values), one step per episode; then the query is predicted.

CD-TG (specs/cdtg.md §5.6-§5.7): with a text guide, the support features of every level go through
``text_guide.augment`` first (ADaIN in training), and the support prototypes ``(p^f_l, p^b_l)`` that form ``C^s``
are replaced by ``text_guide.fuse(s, f^s_l, m_l, p^f_l, p^b_l, e_c, e_bg)``. The second place DMTNet consumes
support prototypes is the grid of step 2; ``fuse_grid_prototypes=True`` also fuses every cell's prototypes, by
calling ``fuse`` on the cell's crop of the support features and mask (the SGU acts per position, so the crop of the
text-guided map is the text-guided crop). The query prototypes come from the query itself and are not fused.

Values of ``beta``, ``tau``, ``G``, the anchor dropout, the loss weights, the TSF parameters, learning rate and
step count are the official code's (``model/dmtnet.py``, ``trainDDP.py``: Adam 1e-3, batch 12, 20 epochs on
PASCAL fold 4; ``test_finetuning.py``). Where this module differs from the official code:

* TSF: the official test script never restores the weights (one Adam step per test batch, adapting cumulatively
  over the whole test set, Adam state kept) and runs the model in training mode (anchor dropout active during TSF
  and the final prediction). :meth:`DMTNet.finetune` adapts in place with a fresh Adam in the caller's train/eval
  mode; the caller saves/restores :meth:`DMTNet.finetune_parameters` per episode
  (:func:`common.networks.fewshot_host.finetuned`).
* The coarse scores of every level are averaged over that level's own cells (the official code divides every
  level by the cell count of the first level; the same at 400 px, where all levels have 25 cells).
* Levels smaller than ``G`` get cells of side 1 (the official index rule fails with cell side 0).
* The background branch is computed by :meth:`DMTNet.episode_outputs` (training) but not by ``forward``, which
  returns ``Y^f`` only (the official forward computes both and predicts with ``Y^f``).
* ResNet backbones only (the official VGG-16 variant is not built).

Deployment (inference.json, MONAI Label, TorchScript): like PATNet, a network primed with a support set
(:meth:`DMTNet.set_support` or the ``support`` constructor argument) segments a query alone, ``forward(query)``:
K = 1 returns the 1-shot logits, K > 1 the one-hot ``[B, 2, H, W]`` of the HSNet vote
(:func:`common.networks.shot_vote.vote_shots`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.fewshot_host import PrimedSupport, TextGuide, check_episode_inputs, shots_as_batch
from common.networks.patnet import (
    RESNET50_LAYERS,
    RESNET50_WIDTHS,
    HPNLearner,
    extract_bottleneck_features,
    frozen_backbone,
    hypercorrelation,
)
from common.networks.prototypes import masked_average_pool, resize_mask

__all__ = [
    "TSF_PARAMETERS",
    "DMTNetOutput",
    "grid_cells",
    "grid_prototypes",
    "coarse_query_scores",
    "query_prototypes",
    "matching_transform",
    "apply_transform",
    "self_matching_transform",
    "DMTNet",
]

TSF_PARAMETERS: tuple[str, ...] = ("hpn_learner.encoder_layer4to3.7.weight", "hpn_learner.encoder_layer3to2.7.weight")
"""Parameters the official Test-time Self-Finetuning updates: the GroupNorm scale of the third (last) CP-Conv4d
layer of each mixing block (``[CP-Conv4d, GroupNorm, ReLU] x 3``, index 7)."""

CellFuse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # f'^q, f'^{s,f}, f'^{s,b} (None: not computed)


class DMTNetOutput(NamedTuple):
    """Everything one DMTNet pass predicts (training objective of the module docstring, step 7).

    Attributes:
        logits: foreground-branch logits ``Y^f`` ``[B, 2, H, W]`` (the prediction; class 1 = foreground).
        background_logits: background-branch logits ``Y^b`` ``[B, 2, H, W]`` (class 1 = query background).
        coarse_scores: per level, the coarse query scores ``S_l`` ``[B, 2, h_l, w_l]`` (channel 1 = foreground).
    """

    logits: torch.Tensor
    background_logits: torch.Tensor
    coarse_scores: tuple[torch.Tensor, ...]


def _axis_starts(size: int, grid: int) -> tuple[int, list[int]]:
    """Cell side ``k = max(1, size // grid)`` and the cell starts ``0, k, 2k, ... <= size - k``, plus ``size - k``
    when the last cell stops short of the border."""
    k = max(1, size // grid)
    starts = list(range(0, size - k + 1, k))
    if starts[-1] + k < size:
        starts.append(size - k)
    return k, starts


def grid_cells(height: int, width: int, grid: int = 4) -> list[tuple[slice, slice]]:
    """``(rows, cols)`` slices of the cells of an ``height x width`` map cut ``grid`` times per side, row-major
    (module docstring, step 2): 50 x 50 with ``grid = 4`` -> starts ``0, 12, 24, 36, 38`` of side 12 per axis."""
    if height < 1 or width < 1 or grid < 1:
        raise ValueError(f"grid_cells: height ({height}), width ({width}) and grid ({grid}) must be >= 1")
    kh, rows = _axis_starts(height, grid)
    kw, cols = _axis_starts(width, grid)
    return [(slice(r, r + kh), slice(c, c + kw)) for r in rows for c in cols]


def grid_prototypes(features: torch.Tensor, mask: torch.Tensor, grid: int = 4,
                    fuse: CellFuse | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background MAP prototypes of every grid cell, each ``[B, G, C]`` (``G`` cells of
    :func:`grid_cells`), of ``features [B, C, h, w]`` under the soft mask ``mask [B, 1, h, w]``.

    ``fuse(cell_features, cell_mask, proto_fg, proto_bg) -> (proto_fg, proto_bg)``, when given, replaces each cell's
    prototypes (the CD-TG adapter: ``text_guide.fuse`` on the cell's crop).
    """
    if features.dim() != 4 or mask.shape != (features.shape[0], 1, *features.shape[2:]):
        raise ValueError(f"grid_prototypes: features must be [B, C, h, w] and mask [B, 1, h, w] on the same grid, "
                         f"got {tuple(features.shape)} and {tuple(mask.shape)}")
    fg, bg = [], []
    for rows, cols in grid_cells(features.shape[2], features.shape[3], grid):
        cell, cell_mask = features[:, :, rows, cols], mask[:, :, rows, cols]
        proto_fg, proto_bg = masked_average_pool(cell, cell_mask), masked_average_pool(cell, 1.0 - cell_mask)
        if fuse is not None:
            proto_fg, proto_bg = fuse(cell, cell_mask, proto_fg, proto_bg)
        fg.append(proto_fg)
        bg.append(proto_bg)
    return torch.stack(fg, dim=1), torch.stack(bg, dim=1)


def coarse_query_scores(query_feat: torch.Tensor, proto_fg: torch.Tensor, proto_bg: torch.Tensor,
                        scale: float = 10.0, eps: float = 1e-8) -> torch.Tensor:
    """``S(x) = scale * mean_g [cos(f(x), p^b_g), cos(f(x), p^f_g)]`` ``[B, 2, h, w]`` of ``query_feat [B, C, h, w]``
    and grid prototypes ``[B, G, C]``; cosines as :func:`torch.nn.functional.cosine_similarity` (norms clamped at
    ``eps``, so a zero prototype scores 0)."""
    b, c, h, w = query_feat.shape
    if proto_fg.dim() != 3 or proto_fg.shape != proto_bg.shape or proto_fg.shape[0] != b or proto_fg.shape[2] != c:
        raise ValueError(f"coarse_query_scores: prototypes must both be [B={b}, G, C={c}], got "
                         f"{tuple(proto_fg.shape)} and {tuple(proto_bg.shape)}")
    q = query_feat.flatten(2)
    q = q / q.norm(dim=1, keepdim=True).clamp(min=eps)
    protos = torch.stack([proto_bg, proto_fg], dim=1)  # [B, 2, G, C]
    protos = protos / protos.norm(dim=-1, keepdim=True).clamp(min=eps)
    cos = torch.einsum("bkgc,bcx->bkgx", protos, q)
    return (scale * cos.mean(dim=2)).view(b, 2, h, w)


def query_prototypes(query_feat: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query prototypes ``(q^f, q^b)``, each ``[B, C]``: MAPs of ``query_feat [B, C, h, w]`` under the hard pseudo-mask
    ``argmax_c scores`` (``scores [B, 2, h, w]``, channel 1 = foreground; ties go to the background)."""
    pseudo = scores.argmax(dim=1, keepdim=True).to(query_feat.dtype)
    return masked_average_pool(query_feat, pseudo), masked_average_pool(query_feat, 1.0 - pseudo)


def matching_transform(prototypes: torch.Tensor, anchors: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, V)`` of ``P = (pinv(C^) A^)^T = U V`` that maps the normalised prototype rows onto the
    normalised anchor rows (``P c^_k = a^_k`` for linearly independent prototypes).

    Args:
        prototypes: ``[B, 2, C]``, the two prototypes as rows.
        anchors: ``[B, 2, C]`` or ``[2, C]``, the anchors matched with them row by row.
        eps: added to every row norm.

    Returns:
        ``U = A^^T`` ``[B, C, 2]`` and ``V = pinv(C^)^T`` ``[B, 2, C]``.
    """
    if prototypes.dim() != 3 or prototypes.shape[1] != 2:
        raise ValueError(f"matching_transform: prototypes must be [B, 2, C], got {tuple(prototypes.shape)}")
    anchors = anchors.expand_as(prototypes)
    protos = prototypes / (prototypes.norm(dim=-1, keepdim=True) + eps)
    anchors = anchors / (anchors.norm(dim=-1, keepdim=True) + eps)
    return anchors.transpose(1, 2), torch.linalg.pinv(protos).transpose(1, 2)


def apply_transform(features: torch.Tensor, transform: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``P f(x)`` at every pixel of ``features [B, C, h, w]`` for ``P = U V`` given as
    ``(U [B, C, 2], V [B, 2, C])``."""
    u, v = transform
    return torch.einsum("bck,bkhw->bchw", u, torch.einsum("bkc,bchw->bkhw", v, features))


def self_matching_transform(query_feat: torch.Tensor, support_feats: Sequence[torch.Tensor],
                            support_prototypes: torch.Tensor, query_prototypes: torch.Tensor,
                            support_anchors: torch.Tensor, query_anchors: torch.Tensor, beta: float = 0.5,
                            eps: float = 1e-6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SMT of one level (module docstring, step 5): ``(P~^q f^q, [P^s f for f in support_feats])``.

    Args:
        query_feat: ``f^q`` ``[B, C, h, w]``.
        support_feats: support maps to transform with ``P^s`` (the masked ``f^s m`` and ``f^s (1 - m)``).
        support_prototypes: ``[B, 2, C]`` rows ``(p^b, p^f)``, matched with ``support_anchors`` rows.
        query_prototypes: ``[B, 2, C]`` rows ``(q^f, q^b)`` (official order), matched with ``query_anchors`` rows.
        support_anchors, query_anchors: ``[B, 2, C]`` or ``[2, C]``.
        beta: weight of the query's own transformation ``P^q`` in ``P~^q = beta P^q + (1 - beta) P^s``.
        eps: row-norm epsilon of :func:`matching_transform`.
    """
    support_t = matching_transform(support_prototypes, support_anchors, eps)
    query_t = matching_transform(query_prototypes, query_anchors, eps)
    query_out = beta * apply_transform(query_feat, query_t) + (1.0 - beta) * apply_transform(query_feat, support_t)
    return query_out, [apply_transform(f, support_t) for f in support_feats]


class DMTNet(PrimedSupport, nn.Module):
    """DMTNet (ResNet backbone) with the optional CD-TG text hook; equations in the module docstring.

    Children (official ``DMTNetwork`` names, so official checkpoints load strictly): ``backbone`` (torchvision
    ResNet incl. the unused ``fc``, frozen), ``reference_layer3/2/1`` (support anchors of the layer4/3/2 stages,
    ``nn.Linear(c, 2)``), ``reference_layer6/5/4`` (query anchors of the layer4/3/2 stages), ``hpn_learner``
    (:class:`HPNLearner`), ``cross_entropy_loss`` and ``dropout`` (the anchor dropout), no parameters, and
    ``text_guide`` when one is given. ResNet-50: 28,145,174 parameters (no published figure; by hand: backbone
    25,557,032 + six anchor layers 2 x (4,098 + 2,050 + 1,026) = 14,348 + HPN learner 2,573,794), of which
    2,588,142 are trained (the backbone is frozen); 430 state-dict keys (PATNet's 424 + 3 x 2).

    Args:
        layers: bottleneck counts of layer1..4 (ResNet-50 ``(3, 4, 6, 3)``).
        widths: bottleneck widths of layer1..4 (ResNet-50 ``(64, 128, 256, 512)``).
        backbone_weights: optional torchvision ResNet state-dict file (ImageNet ResNet-50) for the backbone.
        checkpoint: optional full DMTNet state dict in the official key format (``module.`` prefixes of the
            official DistributedDataParallel files are stripped), loaded strictly after ``backbone_weights``. Without
            ``text_guide.*`` keys it loads the host and leaves the text guide as built; with them, everything.
        text_guide: optional CD-TG plug-in (:class:`common.networks.fewshot_host.TextGuide`); ``forward`` then needs
            ``class_text`` and ``background_text``.
        support: optional support set to prime the network with (see :meth:`set_support`).
        beta: weight of the query's own transformation in ``P~^q`` (0.5).
        grid_size: cells per side of the support grid prototypes (4).
        coarse_scale: ``tau``, the scale of the coarse query scores (10).
        anchor_dropout: dropout probability on the anchors in training mode (0.2).
        background_loss_weight: ``lambda_b`` of the background branch in :meth:`training_loss` (1.0).
        coarse_loss_weight: ``lambda_c`` of the coarse query scores in :meth:`training_loss` (0.5).
        fuse_grid_prototypes: with a text guide, also fuse the grid prototypes of step 2 (False: only the support
            prototypes of ``C^s``, the spec's default).
        tsf_parameters: names of the parameters :meth:`finetune` updates (:data:`TSF_PARAMETERS`).

    Attributes:
        stage_channels: feature channels of layer2/3/4 (``(512, 1024, 2048)`` for ResNet-50).
        level_stages: stage index (0 = layer2, 1 = layer3, 2 = layer4) of every feature level.
    """

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS, widths: Sequence[int] = RESNET50_WIDTHS,
                 backbone_weights: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                 text_guide: TextGuide | None = None, support: Mapping[str, torch.Tensor] | None = None,
                 beta: float = 0.5, grid_size: int = 4, coarse_scale: float = 10.0, anchor_dropout: float = 0.2,
                 background_loss_weight: float = 1.0, coarse_loss_weight: float = 0.5,
                 fuse_grid_prototypes: bool = False, tsf_parameters: Sequence[str] = TSF_PARAMETERS) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"DMTNet: beta must be in [0, 1], got {beta}")
        if grid_size < 1:
            raise ValueError(f"DMTNet: grid_size must be >= 1, got {grid_size}")
        if not 0.0 <= anchor_dropout < 1.0:
            raise ValueError(f"DMTNet: anchor_dropout must be in [0, 1), got {anchor_dropout}")
        if fuse_grid_prototypes and text_guide is None:
            raise ValueError("DMTNet: fuse_grid_prototypes needs a text_guide")
        self.beta, self.grid_size, self.coarse_scale = float(beta), int(grid_size), float(coarse_scale)
        self.background_loss_weight, self.coarse_loss_weight = float(background_loss_weight), float(coarse_loss_weight)
        self.fuse_grid_prototypes = bool(fuse_grid_prototypes)
        self.backbone, self.stage_channels, self.level_stages = frozen_backbone(layers, widths, backbone_weights)
        for index in (3, 2, 1, 6, 5, 4):  # official registration order; 1-3 support, 4-6 query anchors
            reference = nn.Linear(self.stage_channels[(index - 1) % 3], 2)
            nn.init.kaiming_normal_(reference.weight, a=0, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(reference.bias)
            self.add_module(f"reference_layer{index}", reference)
        self.hpn_learner = HPNLearner(tuple(layers[1:]))
        self.cross_entropy_loss = nn.CrossEntropyLoss()
        self.dropout = nn.Dropout(anchor_dropout)
        self.text_guide = text_guide
        names = dict(self.named_parameters())
        unknown = [n for n in tsf_parameters if n not in names]
        if unknown or not tsf_parameters:
            raise ValueError(f"DMTNet: tsf_parameters {list(tsf_parameters)} must name parameters of the network "
                             f"(unknown: {unknown})")
        self.tsf_parameters = tuple(tsf_parameters)
        self._finish_init(checkpoint, support)

    def train(self, mode: bool = True) -> DMTNet:
        """Set training mode on every child except the backbone, which stays in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def finetune_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters :meth:`finetune` changes (:attr:`tsf_parameters`, by default :data:`TSF_PARAMETERS`)."""
        return [(name, self.get_parameter(name)) for name in self.tsf_parameters]

    def anchors(self, stage: int, query: bool = False) -> torch.Tensor:
        """Anchors ``[2, c]`` of ``stage`` (0 = layer2): support ``reference_layer{stage + 1}`` (rows bg, fg) or, with
        ``query``, ``reference_layer{stage + 4}`` (rows matched with the query's fg, bg prototypes)."""
        return getattr(self, f"reference_layer{stage + (4 if query else 1)}").weight

    def extract_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone features of ``image [B, 3, H, W]`` (no_grad), see :func:`extract_bottleneck_features`."""
        with torch.no_grad():
            return extract_bottleneck_features(self.backbone, image)

    def _support_prototypes(self, feat: torch.Tensor, mask: torch.Tensor, stage: int,
                            class_text: torch.Tensor | None, background_text: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p^f, p^b)`` ``[B, C]`` and the grid prototypes ``[B, G, C]`` of one support level, fused where the
        text guide applies."""
        proto_fg, proto_bg = masked_average_pool(feat, mask), masked_average_pool(feat, 1.0 - mask)
        cell_fuse: CellFuse | None = None
        if self.text_guide is not None:
            proto_fg, proto_bg = self.text_guide.fuse(stage, feat, mask, proto_fg, proto_bg, class_text,
                                                      background_text)
            if self.fuse_grid_prototypes:
                cell_fuse = partial(self.text_guide.fuse, stage, class_text=class_text,
                                    background_text=background_text)
        grid_fg, grid_bg = grid_prototypes(feat, mask, self.grid_size, cell_fuse)
        return proto_fg, proto_bg, grid_fg, grid_bg

    def _transformed_levels(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                            support_mask: torch.Tensor, class_text: torch.Tensor | None,
                            background_text: torch.Tensor | None, background: bool
                            ) -> tuple[list[Level], list[torch.Tensor]]:
        """Steps 1-5 per level: ``(f'^q, f'^{s,f}, f'^{s,b} or None)`` and the coarse scores ``S_l``."""
        if self.text_guide is not None:
            support_feats = self.text_guide.augment(support_feats)
        levels, coarse = [], []
        b = query_feats[0].shape[0]
        for feat_q, feat_s, stage in zip(query_feats, support_feats, self.level_stages):
            mask = resize_mask(support_mask, tuple(feat_s.shape[-2:]))
            proto_fg, proto_bg, grid_fg, grid_bg = self._support_prototypes(feat_s, mask, stage, class_text,
                                                                            background_text)
            scores = coarse_query_scores(feat_q, grid_fg, grid_bg, self.coarse_scale)
            q_fg, q_bg = query_prototypes(feat_q, scores)
            masked = [feat_s * mask] + ([feat_s * (1.0 - mask)] if background else [])
            query_t, support_t = self_matching_transform(
                feat_q, masked, torch.stack([proto_bg, proto_fg], dim=1), torch.stack([q_fg, q_bg], dim=1),
                self.dropout(self.anchors(stage).expand(b, -1, -1)),
                self.dropout(self.anchors(stage, query=True).expand(b, -1, -1)), self.beta)
            levels.append((query_t, support_t[0], support_t[1] if background else None))
            coarse.append(scores)
        return levels, coarse

    def _learn(self, levels: list[Level], branch: int, size: tuple[int, int]) -> torch.Tensor:
        """DHC (step 6) of one branch (1 = foreground, 2 = background): hypercorrelations stacked per stage ->
        HPN learner -> logits ``[B, 2, H, W]``."""
        stacks: list[list[torch.Tensor]] = [[], [], []]
        for level, stage in zip(levels, self.level_stages):
            stacks[stage].append(hypercorrelation(level[0], level[branch]))
        logits = self.hpn_learner([torch.stack(corrs, dim=1) for corrs in stacks])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def episode_outputs(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                        class_text: torch.Tensor | None = None,
                        background_text: torch.Tensor | None = None) -> DMTNetOutput:
        """Both DHC branches and the coarse scores of a 1-shot episode (for :meth:`training_loss`)."""
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        levels, coarse = self._transformed_levels(self.extract_features(query_image),
                                                  self.extract_features(support_image), support_mask, class_text,
                                                  background_text, background=True)
        size = tuple(query_image.shape[-2:])
        return DMTNetOutput(self._learn(levels, 1, size), self._learn(levels, 2, size), tuple(coarse))

    def loss_terms(self, output: DMTNetOutput, query_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three cross-entropies of the official objective (module docstring, step 7) for a binary
        ``query_mask [B, H, W]``: ``foreground`` ``CE(Y^f, M_q)`` (the cross-entropy of the prediction),
        ``background`` ``CE(Y^b, 1 - M_q)`` and ``coarse`` ``mean_l CE(S_l, trunc(bilinear(M_q)))``."""
        if query_mask.shape != (output.logits.shape[0], *output.logits.shape[2:]):
            raise ValueError(f"DMTNet: query_mask must be [B, H, W] = "
                             f"{(output.logits.shape[0], *output.logits.shape[2:])}, got {tuple(query_mask.shape)}")
        target = query_mask.long()
        coarse = [self.cross_entropy_loss(s, resize_mask(query_mask, tuple(s.shape[-2:]))[:, 0].long())
                  for s in output.coarse_scores]
        return {"foreground": self.cross_entropy_loss(output.logits, target),
                "background": self.cross_entropy_loss(output.background_logits, 1 - target),
                "coarse": torch.stack(coarse).mean()}

    def training_loss(self, output: DMTNetOutput, query_mask: torch.Tensor) -> torch.Tensor:
        """``foreground + background_loss_weight * background + coarse_loss_weight * coarse`` of
        :meth:`loss_terms` (the official ``trainDDP.py`` objective)."""
        terms = self.loss_terms(output, query_mask)
        return (terms["foreground"] + self.background_loss_weight * terms["background"]
                + self.coarse_loss_weight * terms["coarse"])

    def episode_loss(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                     query_mask: torch.Tensor, class_text: torch.Tensor | None = None,
                     background_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The episodic trainer's hook (:class:`common.engines.episodic.EpisodicTrainer`): the official objective
        :meth:`training_loss` of :meth:`episode_outputs` and the foreground logits ``Y^f [B, 2, H, W]``."""
        output = self.episode_outputs(query_image, support_image, support_mask, class_text, background_text)
        return self.training_loss(output, query_mask), output.logits

    def _foreground_logits(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                           support_mask: torch.Tensor, class_text: torch.Tensor | None,
                           background_text: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        levels, _ = self._transformed_levels(query_feats, support_feats, support_mask, class_text, background_text,
                                             background=False)
        return self._learn(levels, 1, size)

    def forward(self, query_image: torch.Tensor, support_image: torch.Tensor | None = None,
                support_mask: torch.Tensor | None = None, class_text: torch.Tensor | None = None,
                background_text: torch.Tensor | None = None) -> torch.Tensor:
        """1-shot foreground logits ``Y^f`` ``[B, 2, H, W]`` of ``query_image [B, 3, H, W]`` given
        ``support_image [B, 3, H, W]`` and ``support_mask [B, H, W]``; ``class_text``/``background_text [B, d]`` are
        used only with a text guide (and then required). Without a support, the primed support set is used
        (:meth:`set_support`): K = 1 gives its logits, K > 1 the one-hot ``[B, 2, H, W]`` of the voted mask."""
        if self._primed_call(support_image, support_mask):
            return self._forward_primed(query_image)
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        return self._foreground_logits(self.extract_features(query_image), self.extract_features(support_image),
                                       support_mask, class_text, background_text, tuple(query_image.shape[-2:]))

    def finetune(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                 class_text: torch.Tensor | None = None, background_text: torch.Tensor | None = None,
                 steps: int = 1, lr: float = 1e-3) -> list[float]:
        """Test-time Self-Finetuning (TSF, module docstring step 8), in place.

        Each of ``steps`` Adam steps on :meth:`finetune_parameters` only segments the support as its own query and
        minimises ``CE(Y^f, M_s)``. The query is not looked at (support-as-query); it is validated so that the call
        has the common host signature. K-shot supports ``[B, K, 3, H, W]`` / ``[B, K, H, W]`` are stacked along the
        batch (:func:`~common.networks.fewshot_host.shots_as_batch`), which gives the official K-shot step (the mean
        of the K support losses). The change is permanent: :func:`~common.networks.fewshot_host.finetuned` saves and
        restores the parameters around it to adapt per episode. Runs in the network's current train/eval mode
        (official: training mode, see module docstring).

        Returns:
            the loss before each step.
        """
        if steps < 1 or lr <= 0:
            raise ValueError(f"DMTNet.finetune: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
        query_image, support_image, support_mask, class_text, background_text = shots_as_batch(
            query_image, support_image, support_mask, class_text, background_text)
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        params = [p for _, p in self.finetune_parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)
        support_feats = self.extract_features(support_image)
        target = support_mask.reshape(support_image.shape[0], *support_image.shape[-2:]).long()
        losses = []
        with torch.enable_grad():
            for _ in range(steps):
                logits = self._foreground_logits(support_feats, support_feats, support_mask, class_text,
                                                 background_text, tuple(support_image.shape[-2:]))
                loss = self.cross_entropy_loss(logits, target)
                optimizer.zero_grad()
                loss.backward(inputs=params)
                optimizer.step()
                losses.append(loss.item())
        return losses
