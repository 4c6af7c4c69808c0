"""SS-Net as a DHC baseline: one network trained with a labelled Dice, a virtual adversarial smoothness term and a
class-separation term against a class-wise memory bank.

Wu, Wu, Wu, Ge & Cai, "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image Segmentation",
MICCAI 2022 (arXiv 2203.01324); the "ssnet" baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training
Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §9). With the
batch ``x = [x_l; x_u]`` (``L`` labelled patches first), ``(z, e) = f(x)`` the logits and the per-voxel embedding
of :class:`~common.networks.vnet_ssnet.SSNetVNet`, ``p = softmax(z)``::

    L = L_Dice(p_l, y_l) + λ(e) (LDS(x) + 0.1 (L_sep(g(e_l), y_l) + L_sep(g(e_u), argmax_c p_u)))

* ``L_Dice = -(1/C) sum_c D_c``, batch-pooled soft Dice over all C classes, background included, smooth 1e-8, and
  **no cross-entropy** (specs/dhc.md §9; the original's value is negative, in [-1, 0]).
* ``LDS`` on all ``L + U`` patches: :func:`~common.losses.ssnet.vat_loss` with ``ξ = 10``, ``ε = 10``, one power
  iteration, the soft-Dice distance, BatchNorm statistics frozen during the two perturbed passes.
* ``g`` = projection then prediction head; ``L_sep`` = :func:`~common.losses.ssnet.class_separation_loss` on every
  labelled voxel (ground truth) and every unlabelled voxel (arg-max pseudo label, no confidence threshold), against
  the :class:`~common.losses.ssnet.PrototypeMemory` bank (32 per class), which is first fed, every iteration, with the
  eval-mode projections of the labelled voxels whose prediction is correct and not background.
* ``λ(e)`` is the trainer's sigmoid ramp to 0.1 (the same ``-w 0.1 -r`` as the other baselines).

Choices and deviations (also for the model card):
* ``p(x)`` of the LDS is the detached softmax of this iteration's training pass; the original runs the network once
  more on ``x`` without gradient (another dropout mask, a second BatchNorm running-statistics update on the same
  batch). One forward pass less; the BatchNorm statistics move once per iteration.
* The VAT direction is obtained with ``torch.autograd.grad`` on the perturbation only (the original back-propagates
  into the parameters and zeroes their gradients afterwards; same direction).
* Memory-side selector weights are identically 1 and the bank keeps the K *lowest*-scored features, both as the
  original (``weight_memory=False``, ``keep_highest=False``; :mod:`common.losses.ssnet` explains both quirks).
* ``L`` labelled patches are ``label.shape[0]`` (the original splits the batch in halves, i.e. assumes ``L = U``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.engines.co_training import CoTrainingMethod
from common.losses.ssnet import VAT_DISTANCES, PrototypeMemory, class_separation_loss, soft_dice_distance, vat_loss
from common.networks.vnet_ssnet import SSNetVNet

__all__ = ["SSNet"]


class SSNet(CoTrainingMethod):
    """SS-Net (module docstring): single network, ``net_b`` is None.

    Buffers: ``memory.bank`` ``[C, memory_size, feature_dim]`` and ``memory.count`` ``[C]``.

    Args:
        num_classes: C, including background.
        feature_dim: width of the projected features, ``2 n_filters`` of the network (64 for DHC's f = 32).
        memory_size: K, bank entries per class (32).
        xi: VAT's ``ξ`` (10).
        epsilon: VAT's ``ε`` (10).
        power_iterations: VAT power iterations (1).
        contrastive_weight: weight of the class-separation terms inside the λ bracket (0.1).
        vat_distance: ``"dice"`` (the original) or ``"kl"`` (VAT's KL divergence).
        weight_memory: apply Alonso et al.'s memory-side selector weights (False: the original, weights 1).
        keep_highest: the bank keeps the K highest-scored features (False: the original keeps the lowest).
    """

    trains_b = False
    uses_b = False

    def __init__(
        self,
        num_classes: int,
        feature_dim: int = 64,
        memory_size: int = 32,
        xi: float = 10.0,
        epsilon: float = 10.0,
        power_iterations: int = 1,
        contrastive_weight: float = 0.1,
        vat_distance: str = "dice",
        weight_memory: bool = False,
        keep_highest: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SSNet: num_classes must be >= 2, got {num_classes}")
        if xi <= 0 or epsilon <= 0 or power_iterations < 1:
            raise ValueError(f"SSNet: need xi > 0, epsilon > 0 and power_iterations >= 1; got xi={xi}, "
                             f"epsilon={epsilon}, power_iterations={power_iterations}")
        if contrastive_weight < 0:
            raise ValueError(f"SSNet: contrastive_weight must be >= 0, got {contrastive_weight}")
        if vat_distance not in VAT_DISTANCES:
            raise ValueError(f"SSNet: vat_distance must be one of {sorted(VAT_DISTANCES)}, got {vat_distance!r}")
        self.num_classes = num_classes
        self.memory = PrototypeMemory(num_classes, memory_size, feature_dim, keep_highest)
        self.xi, self.epsilon, self.power_iterations = xi, epsilon, power_iterations
        self.contrastive_weight = contrastive_weight
        self.vat_distance = vat_distance
        self.weight_memory = weight_memory

    def _check(self, net: nn.Module, image: torch.Tensor, label: torch.Tensor) -> None:
        if not isinstance(net, SSNetVNet):
            raise ValueError(f"SSNet: branch A must be an SSNetVNet (VNet with SS-Net's heads), got "
                             f"{type(net).__name__}")
        if net.out_channels != self.num_classes or net.feature_dim != self.memory.feature_dim:
            raise ValueError(f"SSNet: the network has {net.out_channels} classes and feature_dim {net.feature_dim}, "
                             f"the method num_classes={self.num_classes} and feature_dim={self.memory.feature_dim}")
        if image.ndim != 5 or label.ndim != 5 or label.shape[1] != 1 or label.shape[0] > image.shape[0] \
                or label.shape[2:] != image.shape[2:]:
            raise ValueError(f"SSNet: expected image [L+U, 1, D, H, W] and label [L, 1, D, H, W] with the same "
                             f"spatial size, got {tuple(image.shape)} and {tuple(label.shape)}")
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ValueError(f"SSNet: label values must lie in [0, {self.num_classes}), got range "
                             f"[{int(label.min())}, {int(label.max())}]")

    def _separation(self, net: SSNetVNet, embedding: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``L_sep`` of one part of the batch: ``embedding [n, f, D, H, W]``, ``classes [n, D, H, W]``."""
        features = net.predict(embedding.movedim(1, -1).reshape(-1, net.embedding_dim))
        return class_separation_loss(features, classes.reshape(-1), self.memory.bank, self.memory.count,
                                     net.class_selectors, net.memory_selectors if self.weight_memory else None)

    def _feed_memory(self, net: SSNetVNet, embedding: torch.Tensor, classes: torch.Tensor) -> None:
        """Bank update from the labelled voxels ``embedding [M, f]`` of classes ``[M]`` (projection head in eval
        mode, no gradient; restored to its previous mode)."""
        if classes.numel() == 0:
            return
        was_training = net.projection_head.training
        net.projection_head.eval()
        try:
            with torch.no_grad():
                projected = net.project(embedding)
        finally:
            net.projection_head.train(was_training)
        self.memory.update(projected, classes, net.class_selectors)

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module | None, image: torch.Tensor, label: torch.Tensor,
        consistency: float, epoch: int,
    ) -> dict[str, torch.Tensor]:
        self._check(net_a, image, label)
        n = label.shape[0]
        labels = label[:, 0].long()
        logits, embedding = net_a.forward_features(image)
        probs = torch.softmax(logits.float(), dim=1)
        sup = soft_dice_distance(probs[:n], F.one_hot(labels, self.num_classes).movedim(-1, 1))
        with torch.no_grad():
            predicted = probs.argmax(dim=1)
            correct = (predicted[:n] == labels) & (predicted[:n] > 0)
        self._feed_memory(net_a, embedding[:n].movedim(1, -1)[correct], labels[correct])
        sep_l = self._separation(net_a, embedding[:n], labels)
        sep_u = self._separation(net_a, embedding[n:], predicted[n:]) if image.shape[0] > n else sep_l.new_zeros(())
        lds = vat_loss(net_a, image, probs.detach(), self.xi, self.epsilon, self.power_iterations, self.vat_distance)
        unsup = lds + self.contrastive_weight * (sep_l + sep_u)
        return {"loss": sup + consistency * unsup, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
                "pred": logits.detach(), "loss_vat": lds.detach(), "loss_sep_labelled": sep_l.detach(),
                "loss_sep_unlabelled": sep_u.detach(), "pseudo": predicted[n:]}
