"""SS-Net's two unsupervised terms: the 3D virtual adversarial smoothness loss (LDS) and the class-separation loss
against a class-wise memory bank of prototypes.

Wu, Wu, Wu, Ge & Cai, "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image Segmentation",
MICCAI 2022 (arXiv 2203.01324), as run by the "ssnet" baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous
Co-training Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md
§9). The smoothness term is virtual adversarial training (Miyato, Maeda, Koyama & Ishii, "Virtual Adversarial
Training: A Regularization Method for Supervised and Semi-Supervised Learning", TPAMI 2018); the separation term is
the class-wise memory-bank contrastive loss of Alonso, Sabater, Ferstl, Montesano & Murillo, "Semi-Supervised
Semantic Segmentation with Pixel-Level Contrastive Learning from a Class-wise Memory Bank", ICCV 2021.

Smoothness (:func:`vat_loss`), for a batch ``x [N, 1, D, H, W]`` and ``p = softmax(f(x))`` (detached)::

    d   ~ U(-0.5, 0.5)^{shape of x},  d <- d / (||d_n||_2 + 1e-8)       per sample n (norm over all its voxels)
    g   = grad_d  Dist(p, softmax(f(x + xi d)))                          one power iteration (ip = 1)
    d   <- g / (||g_n||_2 + 1e-8);   r_adv = eps d
    LDS = Dist(p, softmax(f(x + r_adv)))                                 gradient into f only, r_adv is a constant

with ``xi = 10``, ``eps = 10`` (DHC; SS-Net's LA default is eps = 10 too) and, as in both SS-Net's and DHC's code,
``Dist`` a soft Dice rather than VAT's KL divergence: ``Dist(p, q) = -(1/C) sum_c D_c`` with the batch-pooled
``D_c = (2 sum q_c p_c + 1e-8) / (sum q_c + sum p_c + 1e-8 + 1e-8)`` over every class, background included
(:func:`soft_dice_distance`; negative, in [-1, 0], like the original's loss value). ``distance="kl"`` gives VAT's
``KL(p || q) = sum_c p_c (ln p_c - ln q_c)`` averaged over voxels and samples instead. The perturbed passes run the
network in its current mode but leave every BatchNorm running statistic untouched (:func:`frozen_batchnorm_stats`,
the original's ``_disable_tracking_bn_stats``).

Class separation (:func:`class_separation_loss`), for per-voxel features ``z_i [V, F]`` (projection + prediction
heads) with classes ``y_i`` (ground truth or pseudo label), the bank ``M_c`` (at most K = 32 projected features per
class) and the selector MLPs ``S_c`` (class) and ``S'_c`` (memory)::

    dist_ij = 1 - <z_i / ||z_i||, m_j / ||m_j||>                          i in Z_c = {i : y_i = c}, j in M_c
    w_i     = |Z_c| s_i / sum_k s_k,   s_i = sigmoid(S_c(z_i))            (z_i detached: S_c is trained by the loss)
    L_sep   = (1/C) sum_c [|Z_c| > 1 and |M_c| > 1] mean_{i,j} w_i dist_ij

The mean runs over the ``|Z_c| x |M_c|`` pairs and the sum divides by all C classes, skipped ones included. Alonso
et al. also weight the memory side, ``w'_j = |M_c| s'_j / sum_k s'_k`` with ``s'_j = sigmoid(S'_c(m_j / ||m_j||))``;
in SS-Net's and DHC's code that weight is taken over a transposed ``[1, |M_c|]`` tensor, so it is ``s'_j / s'_j = 1``
and ``S'_c`` never influences the loss. ``memory_selectors=None`` reproduces that (default of the method), passing
the memory selectors applies Alonso's weight.

Memory bank (:class:`PrototypeMemory`), fed once per iteration before the loss with the *projected* (projection head
in eval mode, no gradient) features of the labelled voxels predicted correctly as a foreground class: for every class
present, if more than K features arrive they are ranked by ``sigmoid(S_c(.))`` and K are kept, and the class's bank
is *replaced* by them (classes absent from the iteration keep their entries). The original sorts the scores in
ascending order and keeps the first K, i.e. the K *lowest*-scored features despite its comment "highest rankings";
``keep_highest=False`` reproduces that, ``True`` keeps the K highest. Only labelled foreground features ever enter
the bank, so the background's bank stays empty and class 0 never contributes to ``L_sep``.

Shapes: images ``[N, 1, D, H, W]``, probabilities ``[N, C, D, H, W]``, features ``[V, F]``, labels ``[V]``, bank
``[C, K, F]``. Multi-GPU: the bank is per rank (each rank feeds it from its own batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.losses.weighted_ce_dice import batch_dice

__all__ = [
    "VAT_DISTANCES",
    "soft_dice_distance",
    "kl_distance",
    "frozen_batchnorm_stats",
    "vat_loss",
    "class_separation_loss",
    "PrototypeMemory",
]

DICE_SMOOTH = 1e-8  # the original's SoftDiceLoss(smooth=1e-8, do_bg=True) for the supervised and the VAT Dice
NORM_EPS = 1e-8  # added to the per-sample L2 norm of the perturbation direction


def _check_pair(probs: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if probs.shape != target.shape or probs.ndim < 3:
        raise ValueError(f"{name}: probabilities {tuple(probs.shape)} and target {tuple(target.shape)} must both be "
                         "[N, C, *spatial]")


def soft_dice_distance(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-(1/C) sum_c D_c``: minus the mean batch-pooled soft Dice over all classes, background included.

    ``D_c = (2 sum_{n,v} q p + 1e-8) / (sum q + sum p + 1e-8 + 1e-8)`` (:func:`common.losses.weighted_ce_dice.
    batch_dice`). The supervised loss of SS-Net (``target`` one-hot) and its VAT distance (``target`` the clean
    softmax).

    Args:
        probs: ``q`` ``[N, C, *spatial]`` probabilities.
        target: ``p`` ``[N, C, *spatial]`` one-hot or probabilities.

    Returns:
        scalar in ``[-1, 0]``.
    """
    _check_pair(probs, target, "soft_dice_distance")
    return -batch_dice(probs.float(), target.float(), DICE_SMOOTH).mean()


def kl_distance(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_c p_c (ln p_c - ln q_c)`` averaged over samples and voxels (VAT's divergence; ``0 ln 0 = 0``).

    Args:
        probs: ``q`` ``[N, C, *spatial]``.
        target: ``p`` ``[N, C, *spatial]``.

    Returns:
        scalar >= 0.
    """
    _check_pair(probs, target, "kl_distance")
    p, q = target.float(), probs.float()
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(dim=1).mean()


VAT_DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dice": soft_dice_distance,
    "kl": kl_distance,
}
"""``Dist(q, p)`` of :func:`vat_loss` by name; ``"dice"`` is SS-Net's and DHC's choice."""


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, no BatchNorm of ``module`` updates its running statistics or batch counter.

    In ``train()`` mode the layers still normalise with the batch statistics (as the original's
    ``_disable_tracking_bn_stats``, which flips ``track_running_stats``); in ``eval()`` mode they keep using the
    running ones. The flags are restored on exit, also after an exception.
    """
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def _unit_per_sample(d: torch.Tensor) -> torch.Tensor:
    """``d_n / (||d_n||_2 + 1e-8)`` for every sample ``n`` (norm over all non-batch dimensions)."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1)))
    return d / (norm + NORM_EPS)


def vat_loss(
    network: nn.Module,
    image: torch.Tensor,
    target: torch.Tensor,
    xi: float = 10.0,
    epsilon: float = 10.0,
    power_iterations: int = 1,
    distance: str = "dice",
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """SS-Net's local distributional smoothness ``LDS = Dist(p, softmax(f(x + r_adv)))`` (module docstring).

    Args:
        network: ``f``, returning logits ``[N, C, *spatial]`` for ``[N, 1, *spatial]``; run in its current mode with
            its BatchNorm statistics frozen.
        image: ``x`` ``[N, 1, *spatial]``.
        target: ``p = softmax(f(x))`` ``[N, C, *spatial]`` of the clean batch (detached here).
        xi: ``ξ``, the finite-difference step of the power iteration (10).
        epsilon: ``ε``, the norm of ``r_adv`` per sample (10).
        power_iterations: number of power iterations (1).
        distance: a key of :data:`VAT_DISTANCES` (``"dice"``).
        direction: the initial direction before normalisation, shaped like ``image``; None draws
            ``U(-0.5, 0.5)`` as the original.

    Returns:
        scalar LDS with gradient into the network's parameters.
    """
    if xi <= 0 or epsilon <= 0:
        raise ValueError(f"vat_loss: xi and epsilon must be > 0, got xi={xi}, epsilon={epsilon}")
    if power_iterations < 1:
        raise ValueError(f"vat_loss: power_iterations must be >= 1, got {power_iterations}")
    if distance not in VAT_DISTANCES:
        raise ValueError(f"vat_loss: distance must be one of {sorted(VAT_DISTANCES)}, got {distance!r}")
    if image.ndim < 3 or target.ndim != image.ndim or target.shape[0] != image.shape[0] \
            or target.shape[2:] != image.shape[2:]:
        raise ValueError(f"vat_loss: target {tuple(target.shape)} must be [N, C, *spatial] of the image "
                         f"{tuple(image.shape)}")
    if direction is None:
        direction = torch.rand(image.shape, device=image.device) - 0.5
    elif direction.shape != image.shape:
        raise ValueError(f"vat_loss: direction {tuple(direction.shape)} must have the image's shape "
                         f"{tuple(image.shape)}")
    measure = VAT_DISTANCES[distance]
    target = target.detach()
    d = _unit_per_sample(direction.detach().float())
    with frozen_batchnorm_stats(network):
        with torch.enable_grad():
            for _ in range(power_iterations):
                d.requires_grad_(True)
                gap = measure(torch.softmax(network(image + xi * d).float(), dim=1), target)
                (grad,) = torch.autograd.grad(gap, d)
                d = _unit_per_sample(grad.detach())
        return measure(torch.softmax(network(image + epsilon * d).float(), dim=1), target)


def _check_features(features: torch.Tensor, labels: torch.Tensor, feature_dim: int, num_classes: int,
                    name: str) -> None:
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise ValueError(f"{name}: features must be [V, {feature_dim}], got {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"{name}: labels must be [V] = [{features.shape[0]}], got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def class_separation_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    bank: torch.Tensor,
    bank_count: torch.Tensor,
    class_selectors: Sequence[nn.Module],
    memory_selectors: Sequence[nn.Module] | None = None,
) -> torch.Tensor:
    """``L_sep`` of the module docstring: selector-weighted cosine distance of each class's features to its bank.

    Args:
        features: ``z`` ``[V, F]`` per-voxel features (projection + prediction heads).
        labels: ``[V]`` class of every feature (ground truth or pseudo label).
        bank: ``[C, K, F]`` memory bank; the first ``bank_count[c]`` rows of class ``c`` are valid.
        bank_count: ``[C]`` valid entries per class.
        class_selectors: ``S_c``, C modules ``[M, F] -> [M, 1]`` (scores before the sigmoid).
        memory_selectors: ``S'_c``, or None for the original (memory weights identically 1).

    Returns:
        scalar (0 with no class having more than one feature and more than one bank entry).
    """
    num_classes, _, feature_dim = bank.shape
    _check_features(features, labels, feature_dim, num_classes, "class_separation_loss")
    if bank_count.shape != (num_classes,) or len(class_selectors) != num_classes \
            or (memory_selectors is not None and len(memory_selectors) != num_classes):
        raise ValueError(f"class_separation_loss: bank_count {tuple(bank_count.shape)} and the selectors "
                         f"({len(class_selectors)} class, "
                         f"{'no' if memory_selectors is None else len(memory_selectors)} memory) must cover the "
                         f"bank's {num_classes} classes")
    total = features.new_zeros((), dtype=torch.float32)
    for c in range(num_classes):
        n_bank, mask = int(bank_count[c]), labels == c
        n_feat = int(mask.sum())
        if n_bank < 2 or n_feat < 2:
            continue
        feats = features[mask]
        memory = F.normalize(bank[c, :n_bank].float(), dim=1)
        dist = 1.0 - F.normalize(feats.float(), dim=1) @ memory.T  # [M, N] in [0, 2]
        scores = torch.sigmoid(class_selectors[c](feats.detach()).float())  # [M, 1]
        dist = dist * (n_feat * scores / scores.sum())
        if memory_selectors is not None:
            memory_scores = torch.sigmoid(memory_selectors[c](memory.to(feats.dtype)).float())  # [N, 1]
            dist = dist * (n_bank * memory_scores / memory_scores.sum()).T
        total = total + dist.mean()
    return total / num_classes


class PrototypeMemory(nn.Module):
    """Class-wise memory bank of at most ``size`` features per class, in buffers (a checkpoint restores it).

    Buffers: ``bank`` ``[C, size, F]`` (rows past ``count[c]`` are zero) and ``count`` ``[C]`` (int64).

    Args:
        num_classes: C, including background.
        size: K, features kept per class (32).
        feature_dim: F, the projected feature width (2 n_filters = 64 in DHC).
        keep_highest: keep the K highest-scored features; False (the original) keeps the K lowest-scored.
    """

    def __init__(self, num_classes: int, size: int = 32, feature_dim: int = 64, keep_highest: bool = False) -> None:
        super().__init__()
        if num_classes < 2 or size < 2 or feature_dim < 1:
            raise ValueError(f"PrototypeMemory: need num_classes >= 2, size >= 2 (the loss needs two entries of a "
                             f"class) and feature_dim >= 1; got {num_classes}, {size}, {feature_dim}")
        self.num_classes, self.size, self.feature_dim = num_classes, size, feature_dim
        self.keep_highest = keep_highest
        self.register_buffer("bank", torch.zeros(num_classes, size, feature_dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, class_selectors: Sequence[nn.Module]) -> None:
        """Replace the entries of every class present in ``labels`` by (at most K of) its ``features``.

        Args:
            features: ``[M, F]`` projected features (detached here).
            labels: ``[M]`` their classes.
            class_selectors: ``S_c``, C modules ``[M, F] -> [M, 1]`` ranking a class's features when more than K
                arrive (run in their current mode, as the original).
        """
        _check_features(features, labels, self.feature_dim, self.num_classes, "PrototypeMemory.update")
        if len(class_selectors) != self.num_classes:
            raise ValueError(f"PrototypeMemory.update: {len(class_selectors)} selectors for {self.num_classes} "
                             "classes")
        for c in range(self.num_classes):
            feats = features[labels == c].detach()
            if feats.shape[0] == 0:
                continue
            if feats.shape[0] > self.size:
                scores = torch.sigmoid(class_selectors[c](feats)[:, 0].float())
                order = torch.sort(scores, descending=self.keep_highest, stable=True).indices
                feats = feats[order[: self.size]]
            self.bank[c].zero_()
            self.bank[c, : feats.shape[0]] = feats.to(self.bank.dtype)
            self.count[c] = feats.shape[0]
