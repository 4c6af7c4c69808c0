"""Two-branch semi-supervised co-training (DHC, CPS, UA-MT) as a MONAI ``SupervisedTrainer``.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023 (arXiv 2307.11960), specs/dhc.md §2, §4, §5, §9. The baselines share DHC's data,
network and schedules and differ only in the *method* object that turns the logits into a loss:

* :class:`DHC` — branch A weighted by DiffDW, branch B by DistDW (§4.3–4.4); with ``w^A, w^B`` updated first::

      L = L_sup(z^A_l, y_l; w^A) + L_sup(z^B_l, y_l; w^B) + λ(e) (L_CE(z^A, ŷ^B; w^A) + L_CE(z^B, ŷ^A; w^B))

  ``L_sup = L_CE + L_Dice`` (:class:`~common.losses.weighted_ce_dice.WeightedCEDiceLoss`), ``ŷ = argmax_c z``
  (detached) of the *other* branch on all patches (cross pseudo supervision, no threshold).
* :class:`CPS` (Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision", CVPR 2021) —
  the same with ``w ≡ 1`` (branch B xavier-initialised: :class:`~common.networks.vnet.DualVNet`
  ``init_b="xavier"``).
* :class:`SimiS` and :class:`CReST` — CPS whose two branches get their own class weights (§9: SimiS from each
  branch's arg-max over the whole batch, CReST's reverse-rank frequency weights from its unlabelled arg-max);
  :class:`DePL` — CPS on debiased, confidence-masked pseudo labels.
* :class:`UAMT` (Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium
  Segmentation", MICCAI 2019) — student = A, EMA teacher = B (never trained by the optimiser)::

      L = ½ (L_CE + L_Dice)(z^A_l, y_l) + λ(e) Σ_i m_i ‖p^A_i − p^B_i‖² / (C Σ_i m_i + 1e-16)

  with ``p = softmax(z)`` on the unlabelled patches, ``m_i = [H_i < (0.75 + 0.25 r(e)) ln 2]``, ``H`` the
  entropy of the mean teacher softmax over ``T`` passes on noisy inputs ``x_u + clip(N(0, 0.1²), ±0.2)`` (dropout
  active), ``r`` the sigmoid ramp; after the step ``θ_B ← α θ_B + (1 − α) θ_A`` with
  ``α = min(1 − 1/(e + 1), 0.99)`` (§9).

One iteration (:class:`CoTrainingTrainer`) takes a labelled batch ``{"image": [L, 1, d, h, w], "label": [L, 1, d,
h, w]}`` from ``train_data_loader`` and an unlabelled batch ``{"image": [U, 1, d, h, w]}`` from its own loader,
concatenates them labelled first (``x = [x_l; x_u]``, DHC: 2 + 2), runs the method, back-propagates one summed
loss (one ``GradScaler`` under AMP on CUDA) and steps both optimisers (A, then B). In a ``torch.distributed`` run
the gradients are averaged over the ranks before the steps (the class-weight states stay per rank).
The labelled loader is sized to the unlabelled one with :class:`RepeatedRandomSampler` (DHC's ``repeat = #U``),
so an epoch has ``⌈#U / 2⌉`` iterations; at every epoch start the engine sets, for the 0-based epoch ``e``,
``lr = lr_in_epoch(e)`` on both optimisers and ``λ = consistency_weight_in_epoch(e)`` (:mod:`common.utils.ramps`:
poly 0.9 and the sigmoid ramp, both assigned with a one-epoch lag as in DHC).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SlidingWindowInferer
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader, Sampler

from common.engines.sliding_window import DHC_STRIDES, monai_overlap
from common.losses.crest_weighting import CReSTWeighting
from common.losses.debiased_pseudo_labels import DebiasedPseudoLabels, masked_cross_entropy
from common.losses.debiased_weighting import DiffDW, DistDW, class_counts
from common.losses.simis_weighting import SimiSWeighting
from common.losses.weighted_ce_dice import WeightedCEDiceLoss
from common.utils.distributed import average_gradients, broadcast_from_rank0
from common.utils.ramps import consistency_weight_in_epoch, lr_in_epoch, sigmoid_rampup
from common.utils.schedules import ema_update

__all__ = [
    "RepeatedRandomSampler",
    "CoTrainingMethod",
    "DHC",
    "CPS",
    "SimiS",
    "CReST",
    "DePL",
    "UAMT",
    "labelled_class_counts",
    "ProbabilitySlidingWindowInferer",
    "CoTrainingTrainer",
]

logger = logging.getLogger(__name__)


class RepeatedRandomSampler(Sampler[int]):
    """Indices ``i mod n`` for ``i < num_samples``, shuffled every epoch (DHC's ``repeat`` of the labelled set).

    DHC's labelled dataset has length ``#U`` and item ``index % #L``; with ``shuffle=True`` each epoch visits every
    labelled case ``⌊#U / #L⌋`` or ``⌈#U / #L⌉`` times, so the labelled loader has as many batches as the
    unlabelled one.

    Args:
        n_items: size ``n`` of the dataset (the labelled cases).
        num_samples: indices per epoch (the number of unlabelled cases).
        seed: base seed; epoch ``k`` of the sampler uses ``seed + k`` (deterministic across runs).
    """

    def __init__(self, n_items: int, num_samples: int, seed: int = 0) -> None:
        if n_items < 1:
            raise ValueError(f"RepeatedRandomSampler: the labelled set is empty (n_items={n_items}); at least one "
                             "labelled case is needed")
        if num_samples < 1:
            raise ValueError(f"RepeatedRandomSampler: num_samples must be >= 1 (the number of unlabelled cases), "
                             f"got {num_samples}")
        self.n_items, self.num_samples, self.seed, self._epoch = n_items, num_samples, seed, 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Shuffle of the 0-based epoch ``epoch`` next (``seed + epoch``), as ``DistributedSampler.set_epoch``: a
        resumed run (which starts a new sampler) repeats the order of the uninterrupted one."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        order = torch.randperm(self.num_samples, generator=generator)
        return iter([int(i) % self.n_items for i in order])


def labelled_class_counts(data: Sequence[Mapping[str, Any]], transform: Any, num_classes: int) -> torch.Tensor:
    """Voxel histogram ``N_c`` of the labelled volumes as stored (DistDW's initialisation, specs/dhc.md §4.3).

    Args:
        data: labelled datalist ``[{"image", "label", ...}]``.
        transform: the deterministic preprocessing (load, resize, window), applied to each item; its ``"label"``
            output is counted whole (no crop).
        num_classes: C, including background.

    Returns:
        float64 ``[C]`` counts summed over the cases.
    """
    if not data:
        raise ValueError("labelled_class_counts: the labelled datalist is empty")
    total = torch.zeros(num_classes, dtype=torch.float64)
    for item in data:
        total += class_counts(convert_to_tensor(transform(dict(item))["label"], track_meta=False), num_classes)
    return total


class CoTrainingMethod(nn.Module):
    """Loss of one co-training iteration; state (class weights) lives in buffers, so a checkpoint restores it.

    Subclasses implement :meth:`forward`; ``trains_b`` says whether branch B has its own optimiser step,
    ``uses_b`` whether the method has a branch B at all (single-network methods get ``net_b=None``).
    """

    trains_b: bool = True
    uses_b: bool = True

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        """One iteration's loss.

        Args:
            net_a, net_b: the two branches (in ``train()`` mode); ``net_b`` is None when ``uses_b`` is False.
            image: ``[L + U, 1, d, h, w]``, labelled patches first.
            label: ``[L, 1, d, h, w]`` class indices of the labelled patches.
            consistency: λ of this epoch.
            epoch: 0-based epoch index.

        Returns:
            ``{"loss": scalar, "pred": logits used for monitoring, ...}``.
        """
        raise NotImplementedError

    def after_step(self, net_a: nn.Module, net_b: nn.Module, epoch: int) -> None:
        """Called after the optimiser steps (UA-MT's EMA); nothing by default."""


class CPS(CoTrainingMethod):
    """Cross pseudo supervision with unweighted CE + Dice (module docstring; ``w ≡ 1``).

    Args:
        num_classes: C, including background.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.supervised = WeightedCEDiceLoss(1.0, 1.0, smooth=1.0)
        self.pseudo = WeightedCEDiceLoss(1.0, 0.0)

    def weights(self, z_a: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w^A, w^B)`` of this iteration; all ones for CPS."""
        ones = torch.ones(self.num_classes, device=z_a.device)
        return ones, ones

    def branch_logits(self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z^A, z^B)`` ``[N, C, d, h, w]``; a network with another channel count than C is named."""
        z_a, z_b = net_a(image), net_b(image)
        if z_a.shape[1] != self.num_classes:
            raise ValueError(f"{type(self).__name__}: the network returns {z_a.shape[1]} channels, the method "
                             f"expects num_classes={self.num_classes}")
        return z_a, z_b

    def cross_predictions(self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z^A, z^B, ŷ^A, ŷ^B)``: both branches' logits and their detached arg-max ``[N, d, h, w]``."""
        z_a, z_b = self.branch_logits(net_a, net_b, image)
        return z_a, z_b, z_a.argmax(dim=1).detach(), z_b.argmax(dim=1).detach()

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        z_a, z_b, pseudo_a, pseudo_b = self.cross_predictions(net_a, net_b, image)
        w_a, w_b = self.weights(z_a, z_b, label)
        sup = self.supervised(z_a[:n], label, w_a) + self.supervised(z_b[:n], label, w_b)
        cps = self.pseudo(z_a, pseudo_b, w_a) + self.pseudo(z_b, pseudo_a, w_b)
        return self.outputs(sup, cps, consistency, z_a, z_b, pseudo_a, pseudo_b, w_a, w_b)

    @staticmethod
    def outputs(sup: torch.Tensor, cps: torch.Tensor, consistency: float, z_a: torch.Tensor, z_b: torch.Tensor,
                pseudo_a: torch.Tensor, pseudo_b: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """The iteration's output: ``loss = sup + λ cps``, its parts, the mean logits (monitoring), the pseudo
        labels and the class weights of both branches."""
        return {"loss": sup + consistency * cps, "loss_sup": sup.detach(), "loss_unsup": cps.detach(),
                "pred": ((z_a + z_b) / 2).detach(), "pseudo_a": pseudo_a, "pseudo_b": pseudo_b,
                "weights_a": w_a.detach(), "weights_b": w_b.detach()}


class DHC(CPS):
    """DHC: CPS whose branch A is weighted by DiffDW and branch B by DistDW (module docstring, specs/dhc.md §5).

    Args:
        num_classes: C, including background.
        labelled_counts: voxel histogram of the labelled volumes (:func:`labelled_class_counts`), DistDW's
            starting point; None leaves DistDW uninitialised until :meth:`init_distribution` is called.
        dist_momentum: DistDW EMA momentum (0.99).
        accumulate_iters: DiffDW's K (50, β = 0.98).
    """

    def __init__(
        self,
        num_classes: int,
        labelled_counts: torch.Tensor | Sequence[float] | None = None,
        dist_momentum: float = 0.99,
        accumulate_iters: int = 50,
    ) -> None:
        super().__init__(num_classes)
        self.diff_dw = DiffDW(num_classes, accumulate_iters)
        self.dist_dw = DistDW(num_classes, dist_momentum)
        if labelled_counts is not None:
            self.init_distribution(labelled_counts)

    def init_distribution(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Initialise DistDW from the labelled histogram; returns ``w^B``."""
        return self.dist_dw.init_weights(counts)

    def weights(self, z_a: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w^A = DiffDW.update(z^A_l, y_l)``, ``w^B = DistDW.update(z^B_u)`` (the unlabelled patches)."""
        n = label.shape[0]
        w_a = self.diff_dw.update(z_a[:n].detach().float(), label)
        w_b = self.dist_dw.update(z_b[n:].detach().float()) if z_b.shape[0] > n else self.dist_dw.get_weights()
        return w_a.to(z_a.device), w_b.to(z_b.device)


class SimiS(CPS):
    """CPS with SimiS class weights per branch (specs/dhc.md §9): ``w_c = C (max_k π_k − π_c)``, ``π`` the class
    frequencies of the branch's own arg-max over the whole batch (labelled and unlabelled), EMA 0.99
    (:class:`~common.losses.simis_weighting.SimiSWeighting`), applied to its CE, Dice and pseudo-label CE.

    Args:
        num_classes: C, including background.
        labelled_counts: labelled class histogram; when given, both weightings start one EMA step from ``C·1``
            towards its SimiS weights (as the original), otherwise at ``C·1``.
        momentum: EMA momentum (0.99).
    """

    def __init__(self, num_classes: int, labelled_counts: torch.Tensor | Sequence[float] | None = None,
                 momentum: float = 0.99) -> None:
        super().__init__(num_classes)
        self.simis_a = SimiSWeighting(num_classes, momentum)
        self.simis_b = SimiSWeighting(num_classes, momentum)
        if labelled_counts is not None:
            self.simis_a.init_weights(labelled_counts)
            self.simis_b.init_weights(labelled_counts)

    def weights(self, z_a: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each branch's weights updated from its own arg-max over all patches, before the losses."""
        return (self.simis_a.update(z_a.detach().float()).to(z_a.device),
                self.simis_b.update(z_b.detach().float()).to(z_b.device))


class CReST(CPS):
    """CPS with CReST class-rebalancing weights per branch (Wei et al., CVPR 2021; specs/dhc.md §9):
    ``μ_c = (N_c / N_max)^{1/3}`` given in reverse frequency rank, from the branch's own arg-max on the unlabelled
    patches, EMA 0.99 from the labelled histogram (:class:`~common.losses.crest_weighting.CReSTWeighting`),
    applied to its supervised and pseudo-label losses.

    Args:
        num_classes: C, including background.
        labelled_counts: labelled class histogram (:func:`labelled_class_counts`), the weights' starting point.
        momentum: EMA momentum (0.99).
    """

    def __init__(self, num_classes: int, labelled_counts: torch.Tensor | Sequence[float], momentum: float = 0.99
                 ) -> None:
        super().__init__(num_classes)
        self.crest_a = CReSTWeighting(num_classes, momentum)
        self.crest_b = CReSTWeighting(num_classes, momentum)
        self.crest_a.init_weights(labelled_counts)
        self.crest_b.init_weights(labelled_counts)

    def weights(self, z_a: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each branch's weights updated from its own arg-max on the unlabelled patches, before the losses."""
        n = label.shape[0]
        if z_a.shape[0] == n:  # no unlabelled patch in this batch
            return self.crest_a.get_weights().to(z_a.device), self.crest_b.get_weights().to(z_b.device)
        return (self.crest_a.update(z_a[n:].detach().float()).to(z_a.device),
                self.crest_b.update(z_b[n:].detach().float()).to(z_b.device))


class DePL(CPS):
    """CPS with debiased pseudo labels (Wang et al., "Debiased Learning from Naturally Imbalanced Pseudo-Labels",
    CVPR 2022; specs/dhc.md §9)::

        L = L_sup(z^A_l, y_l) + L_sup(z^B_l, y_l) + λ(e) (CE_m(z^A, ŷ^B; m^B) + CE_m(z^B, ŷ^A; m^A))

    with, per branch, ``ŷ = argmax softmax(z − τ ln q̂)``, ``m = [max softmax(z − τ ln q̂) ≥ 0.9]`` on all patches
    from the previous iteration's ``q̂`` (a voxel-wise ``[1, C, *patch]`` EMA 0.99 of the mean softmax over the
    unlabelled patches, updated after the labels are made), and ``CE_m`` the masked CE summed over kept voxels and
    divided by all voxels, as the original (``normalise="mask"`` divides by the kept ones)
    (:class:`~common.losses.debiased_pseudo_labels.DebiasedPseudoLabels`).

    Args:
        num_classes: C, including background.
        patch_size: the training patch ``(d, h, w)``, the shape of ``q̂``.
        normalise: ``"all"`` (original) or ``"mask"``.
        momentum, tau, threshold: 0.99, 1, 0.9.
    """

    def __init__(self, num_classes: int, patch_size: Sequence[int], normalise: str = "all", momentum: float = 0.99,
                 tau: float = 1.0, threshold: float = 0.9) -> None:
        super().__init__(num_classes)
        self.normalise = normalise
        self.depl_a = DebiasedPseudoLabels(num_classes, patch_size, momentum, tau, threshold)
        self.depl_b = DebiasedPseudoLabels(num_classes, patch_size, momentum, tau, threshold)

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        z_a, z_b = self.branch_logits(net_a, net_b, image)
        pseudo_a, mask_a = self.depl_a.pseudo_labels(z_a.detach())
        pseudo_b, mask_b = self.depl_b.pseudo_labels(z_b.detach())
        if z_a.shape[0] > n:
            self.depl_a.update(z_a[n:].detach())
            self.depl_b.update(z_b[n:].detach())
        ones = torch.ones(self.num_classes, device=z_a.device)
        sup = self.supervised(z_a[:n], label, ones) + self.supervised(z_b[:n], label, ones)
        cps = (masked_cross_entropy(z_a, pseudo_b, mask_b, self.normalise)
               + masked_cross_entropy(z_b, pseudo_a, mask_a, self.normalise))
        return self.outputs(sup, cps, consistency, z_a, z_b, pseudo_a, pseudo_b, ones, ones)


class UAMT(CoTrainingMethod):
    """Uncertainty-aware mean teacher (module docstring): student = branch A, EMA teacher = branch B.

    Args:
        num_classes: C, including background.
        mc_passes: ``T`` noisy teacher passes for the uncertainty.
        noise_std, noise_clip: Gaussian input noise of the teacher and its clipping.
        max_epochs: ``E`` of the threshold ramp ``(0.75 + 0.25 r(e)) ln 2``.
        ema_max: the EMA momentum cap (0.99).
    """

    trains_b = False

    def __init__(
        self,
        num_classes: int,
        mc_passes: int = 8,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        max_epochs: int = 300,
        ema_max: float = 0.99,
    ) -> None:
        super().__init__()
        if num_classes < 2 or mc_passes < 1 or max_epochs < 0:
            raise ValueError(f"UAMT: need num_classes >= 2, mc_passes >= 1, max_epochs >= 0; got {num_classes}, "
                             f"{mc_passes}, {max_epochs}")
        self.num_classes, self.mc_passes = num_classes, mc_passes
        self.noise_std, self.noise_clip = noise_std, noise_clip
        self.max_epochs, self.ema_max = max_epochs, ema_max
        self.supervised = WeightedCEDiceLoss(0.5, 0.5, smooth=1.0)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.clamp(torch.randn_like(x) * self.noise_std, -self.noise_clip, self.noise_clip)

    def threshold(self, epoch: int) -> float:
        """Entropy threshold ``(0.75 + 0.25 r(e)) ln 2`` (the binary-task value kept for C classes, §9)."""
        return (0.75 + 0.25 * sigmoid_rampup(epoch, self.max_epochs)) * math.log(2.0)

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        z_a = net_a(image)
        ones = torch.ones(self.num_classes, device=z_a.device)
        sup = self.supervised(z_a[:n], label, ones)
        unlabelled = image[n:]
        if unlabelled.shape[0] == 0:
            return {"loss": sup, "loss_sup": sup.detach(), "loss_unsup": sup.new_zeros(()), "pred": z_a.detach()}
        with torch.no_grad():
            teacher = torch.softmax(net_b(self._noisy(unlabelled)).float(), dim=1)
            mean = torch.stack([torch.softmax(net_b(self._noisy(unlabelled)).float(), dim=1)
                                for _ in range(self.mc_passes)]).mean(dim=0)
            entropy = -(mean * torch.log(mean + 1e-6)).sum(dim=1, keepdim=True)
            mask = (entropy < self.threshold(epoch)).float()
        student = torch.softmax(z_a[n:].float(), dim=1)
        distance = (student - teacher) ** 2
        unsup = (mask * distance).sum() / (self.num_classes * mask.sum() + 1e-16)
        return {"loss": sup + consistency * unsup, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
                "pred": z_a.detach(), "mask": mask, "teacher": teacher}

    def momentum(self, epoch: int) -> float:
        """``α = min(1 − 1/(e + 1), ema_max)``."""
        return min(1.0 - 1.0 / (epoch + 1), self.ema_max)

    @torch.no_grad()
    def after_step(self, net_a: nn.Module, net_b: nn.Module, epoch: int) -> None:
        ema_update(net_b, net_a, self.momentum(epoch))


class ProbabilitySlidingWindowInferer(SlidingWindowInferer):
    """DHC's sliding window (specs/dhc.md §6): window size ``roi_size``, steps ``strides``, uniform blending of
    ``softmax(network(window))``; returns class probabilities ``[B, C, D, H, W]``.

    With a :class:`~common.networks.vnet.DualVNet` as the network, ``network(window)`` is the mean of the branches'
    logits, so this is :func:`common.engines.sliding_window.dhc_sliding_window` through MONAI (same windows: the
    overlap is :func:`~common.engines.sliding_window.monai_overlap`).
    """

    def __init__(self, roi_size: Sequence[int], strides: Sequence[int] = DHC_STRIDES, sw_batch_size: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size,
                         overlap=monai_overlap(roi_size, strides), mode="constant", **kwargs)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().__call__(inputs, lambda x: torch.softmax(network(x, *args, **kwargs).float(), dim=1))


class CoTrainingTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` over labelled + unlabelled batches and two branches (module docstring).

    Args:
        unlabelled_loader: loader of ``{"image": ...}`` batches; restarted every epoch (and when exhausted).
        method: a :class:`CoTrainingMethod` (moved to the engine's device).
        optimizer_b: optimiser of branch B (stepped only when ``method.trains_b``).
        base_lr: base learning rate of the per-epoch poly schedule (None: leave the optimisers' lr alone).
        lr_power: poly exponent (0.9).
        consistency_weight: maximum λ (DHC 0.1).
        schedule_epochs: ``E`` of the poly lr and of the ramp (None: ``max_epochs``).
        args, kwargs: those of ``monai.engines.SupervisedTrainer``; ``network`` holds ``branch_a`` and
            ``branch_b`` (a :class:`~common.networks.vnet.DualVNet`), ``optimizer`` is branch A's.
    """

    def __init__(
        self,
        *args: Any,
        unlabelled_loader: DataLoader | Sequence,
        method: CoTrainingMethod,
        optimizer_b: torch.optim.Optimizer | None = None,
        base_lr: float | None = None,
        lr_power: float = 0.9,
        consistency_weight: float = 0.1,
        schedule_epochs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for name in ("branch_a", "branch_b") if method.uses_b else ("branch_a",):
            if not isinstance(getattr(self.network, name, None), nn.Module):
                raise ValueError(f"CoTrainingTrainer: method {type(method).__name__} needs a network holding "
                                 f"{name}, e.g. a DualVNet; got {type(self.network).__name__}")
        if method.trains_b and optimizer_b is None:
            raise ValueError(f"CoTrainingTrainer: method {type(method).__name__} trains branch B and needs "
                             "optimizer_b")
        if len(unlabelled_loader) == 0:
            raise ValueError("CoTrainingTrainer: the unlabelled loader is empty; at least one unlabelled case is "
                             "needed")
        self.unlabelled_loader = unlabelled_loader
        self.method = method.to(self.state.device)
        self.optimizer_b = optimizer_b
        self.base_lr = base_lr
        self.lr_power = lr_power
        self.consistency_weight = consistency_weight
        self.schedule_epochs = schedule_epochs
        self.consistency = 0.0
        self._unlabelled: Iterator | None = None
        self.add_event_handler(Events.STARTED, self._broadcast_parameters)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._broadcast_buffers)
        self.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)

    def _broadcast_parameters(self, engine: CoTrainingTrainer) -> None:
        """Multi-process runs: every rank starts from rank 0's parameters and buffers."""
        broadcast_from_rank0([*engine.network.parameters(), *engine.network.buffers()])

    def _broadcast_buffers(self, engine: CoTrainingTrainer) -> None:
        """Multi-process runs: after every step all ranks take rank 0's buffers (BatchNorm running statistics), as
        DDP does with ``broadcast_buffers=True``, so that every rank validates and saves the same network."""
        broadcast_from_rank0(engine.network.buffers())

    def _average_gradients(self) -> None:
        """Multi-process runs: average the gradients over the ranks before the steps (what DDP does, without
        wrapping the branches, so that ``state_dict`` keys stay ``branch_a.*``/``branch_b.*``)."""
        average_gradients(self.network.parameters())

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimisers stepped every iteration: A's, and B's when the method trains B."""
        return [self.optimizer] + ([self.optimizer_b] if self.method.trains_b and self.optimizer_b else [])

    def _start_epoch(self, engine: CoTrainingTrainer) -> None:
        """Per-epoch lr and λ for the 0-based epoch ``e = state.epoch - 1``; restart the unlabelled loader."""
        epoch = engine.state.epoch - 1
        horizon = self.schedule_epochs or engine.state.max_epochs
        if self.base_lr is not None:
            lr = lr_in_epoch(min(epoch, horizon), self.base_lr, horizon, self.lr_power)
            for optimizer in (self.optimizer, self.optimizer_b):
                for group in optimizer.param_groups if optimizer is not None else []:
                    group["lr"] = lr
        self.consistency = consistency_weight_in_epoch(epoch, self.consistency_weight, horizon)
        sampler = getattr(self.unlabelled_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle every epoch
            sampler.set_epoch(epoch)
        self._unlabelled = iter(self.unlabelled_loader)

    def _next_unlabelled(self) -> Mapping[str, Any]:
        if self._unlabelled is None:
            self._unlabelled = iter(self.unlabelled_loader)
        try:
            return next(self._unlabelled)
        except StopIteration:
            self._unlabelled = iter(self.unlabelled_loader)
            return next(self._unlabelled)

    def _iteration(self, engine: CoTrainingTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One co-training step; returns ``{"image", "label", "pred", "loss", "loss_sup", "loss_unsup", "lr",
        "consistency", ...method outputs}``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image_l, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if label is None:
            raise ValueError("CoTrainingTrainer: the labelled batch has no 'label'")
        image_u, _ = engine.prepare_batch({Keys.IMAGE: self._next_unlabelled()[Keys.IMAGE]}, engine.state.device,
                                          engine.non_blocking, **engine.to_kwargs)
        if image_l.shape[1:] != image_u.shape[1:]:
            raise ValueError(f"CoTrainingTrainer: labelled patches {tuple(image_l.shape)} and unlabelled patches "
                             f"{tuple(image_u.shape)} differ in shape")
        # plain tensors: a MetaTensor would route every network operation through its Python-level
        # ``__torch_function__`` (the training step needs no metadata)
        image = convert_to_tensor(torch.cat([image_l, image_u]), track_meta=False)
        label = convert_to_tensor(label, track_meta=False)
        epoch = engine.state.epoch - 1
        net_a = engine.network.branch_a
        net_b = engine.network.branch_b if self.method.uses_b else None
        engine.network.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
        with torch.autocast("cuda", enabled=use_scaler, **engine.amp_kwargs):
            result = self.method(net_a, net_b, image, label, self.consistency, epoch)
            engine.state.output[Keys.PRED] = result["pred"]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = result["loss"]
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = result["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"CoTrainingTrainer: loss is {loss.item()} at iteration {engine.state.iteration} "
                                     f"(epoch {engine.state.epoch}); lower the learning rate or check the data")
        if use_scaler:
            engine.scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._average_gradients()
        for optimizer in self.optimizers:
            if use_scaler:
                engine.scaler.step(optimizer)
            else:
                optimizer.step()
        if use_scaler:
            engine.scaler.update()
        self.method.after_step(net_a, net_b, epoch)
        output = {**{k: v for k, v in result.items() if k != "loss"}, Keys.IMAGE: image, Keys.LABEL: label,
                  Keys.LOSS: loss.detach(), "lr": self.optimizer.param_groups[0]["lr"],
                  "consistency": self.consistency}
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
