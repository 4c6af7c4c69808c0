"""Debiased pseudo labels (DePL) for the CPS baseline of DHC, and the masked cross-entropy they feed.

Wang, Wu, Lian & Yu, "Debiased Learning from Naturally Imbalanced Pseudo-Labels", CVPR 2022; used as the "depl"
baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised
Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §9, row "depl"). Each co-training branch keeps its own
estimate ``q̂`` of its (biased) mean prediction, a *voxel-wise* map ``[1, C, d, h, w]`` over the patch, and removes
it from its logits before the arg-max (counterfactual / logit-adjusted pseudo labels)::

    p̃ = softmax(z − τ ln q̂)                 (channel-wise softmax, q̂ broadcast over the batch)
    ŷ = argmax_c p̃,   m = [max_c p̃ ≥ t]     (τ = 1, t = 0.9 in DHC's train_depl.py)
    q̂ ← μ q̂ + (1 − μ) mean_b softmax(z_u)_b (μ = 0.99; z_u = the branch's logits on the unlabelled patches)

Order within one iteration (as in the original training script): the pseudo labels and masks of **all** patches
(labelled and unlabelled) are made with the q̂ of the *previous* iteration, and q̂ is updated afterwards from the
unlabelled patches only. :meth:`DebiasedPseudoLabels.pseudo_labels` therefore never touches q̂; the caller runs
``pseudo_labels`` first, then ``update``.

The state lives in a buffer, so ``state_dict``/``load_state_dict`` restore it and ``.to(device)`` moves it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.utils.distributed import all_reduce_sum

__all__ = ["DebiasedPseudoLabels", "masked_cross_entropy"]


class DebiasedPseudoLabels(nn.Module):
    """Voxel-wise debiased pseudo labels of one branch (module docstring, specs/dhc.md §9 "depl").

    * buffer ``qhat`` ``[1, C, *patch_size]``, initialised to ``1 / C`` (so the first labels are the plain arg-max);
    * :meth:`update` ``(z_u)``: ``q̂ ← μ q̂ + (1 − μ) mean_b softmax(z_u)`` (detached, float32; on several ranks the
      mean is over the global unlabelled batch: the per-rank sums and counts are all-reduced);
    * :meth:`pseudo_labels` ``(z)``: ``p̃ = softmax(z − τ ln q̂)``; labels ``argmax_c p̃`` ``[N, *patch]`` int64 and
      mask ``max_c p̃ ≥ threshold`` ``[N, *patch]`` bool.

    Because ``softmax(z − τ ln q̂) ∝ p / q̂^τ`` (``p = softmax(z)``), a class the branch already predicts often at a
    voxel (large ``q̂_c``) is down-weighted there.

    Args:
        num_classes: C, including background.
        patch_size: spatial shape of the training patches (e.g. ``(64, 128, 128)``); q̂ has this shape.
        momentum: EMA momentum μ of q̂ (0.99).
        tau: debiasing strength τ >= 0 (1.0; τ = 0 gives the plain arg-max and softmax confidence).
        threshold: confidence threshold t in [0, 1] of the mask (0.9).
    """

    def __init__(
        self,
        num_classes: int,
        patch_size: Sequence[int],
        momentum: float = 0.99,
        tau: float = 1.0,
        threshold: float = 0.9,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DebiasedPseudoLabels: num_classes must be >= 2, got {num_classes}")
        patch = tuple(int(s) for s in patch_size)
        if not patch or any(s < 1 for s in patch):
            raise ValueError(f"DebiasedPseudoLabels: patch_size must be a non-empty sequence of sizes >= 1, "
                             f"got {tuple(patch_size)}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"DebiasedPseudoLabels: momentum must lie in [0, 1], got {momentum}")
        if tau < 0:
            raise ValueError(f"DebiasedPseudoLabels: tau must be >= 0, got {tau}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"DebiasedPseudoLabels: threshold must lie in [0, 1], got {threshold}")
        self.num_classes = num_classes
        self.patch_size = patch
        self.momentum = momentum
        self.tau = tau
        self.threshold = threshold
        self.register_buffer("qhat", torch.full((1, num_classes, *patch), 1.0 / num_classes))

    def _check(self, logits: torch.Tensor, name: str) -> None:
        if logits.ndim != 2 + len(self.patch_size) or logits.shape[1] != self.num_classes \
                or tuple(logits.shape[2:]) != self.patch_size or logits.shape[0] < 1:
            raise ValueError(f"DebiasedPseudoLabels.{name}: logits must be [N >= 1, {self.num_classes}, "
                             f"{', '.join(map(str, self.patch_size))}], got {tuple(logits.shape)}")

    @torch.no_grad()
    def update(self, logits_unlabelled: torch.Tensor) -> torch.Tensor:
        """One EMA step ``q̂ ← μ q̂ + (1 − μ) mean_b softmax(z_u)_b``.

        Args:
            logits_unlabelled: ``[U, C, *patch_size]`` logits of this branch on the unlabelled patches (detached
                here; AMP half precision is cast to float32).

        Returns:
            a copy of the new q̂ ``[1, C, *patch_size]``.
        """
        self._check(logits_unlabelled, "update")
        probs = torch.softmax(logits_unlabelled.detach().to(self.qhat.dtype), dim=1)
        total = all_reduce_sum(probs.sum(dim=0, keepdim=True))
        count = all_reduce_sum(torch.tensor(float(probs.shape[0]), dtype=probs.dtype, device=probs.device))
        self.qhat.mul_(self.momentum).add_((1.0 - self.momentum) * (total / count))
        return self.get_qhat()

    @torch.no_grad()
    def debiased_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``p̃ = softmax(z − τ ln q̂)`` over the class axis, float32 ``[N, C, *patch_size]`` (detached)."""
        self._check(logits, "debiased_probabilities")
        return torch.softmax(logits.detach().to(self.qhat.dtype) - self.tau * torch.log(self.qhat), dim=1)

    @torch.no_grad()
    def pseudo_labels(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Debiased hard pseudo labels and their confidence mask (q̂ is not changed; call before :meth:`update`).

        Args:
            logits: ``[N, C, *patch_size]`` logits of this branch (DHC: all labelled + unlabelled patches).

        Returns:
            ``(labels, mask)``: int64 ``[N, *patch_size]`` = ``argmax_c p̃`` and bool ``[N, *patch_size]`` =
            ``max_c p̃ >= threshold``.
        """
        confidence, labels = self.debiased_probabilities(logits).max(dim=1)
        return labels.long(), confidence >= self.threshold

    def get_qhat(self) -> torch.Tensor:
        """Current q̂ ``[1, C, *patch_size]`` (a detached copy)."""
        return self.qhat.detach().clone()


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, normalise: str = "mask"
) -> torch.Tensor:
    """Cross-entropy on the voxels kept by ``mask`` (DePL's pseudo-label loss).

    ``ℓ_i = −log softmax(z_i)_{y_i}``;  ``normalise="mask"``: ``L = Σ_i m_i ℓ_i / max(Σ_i m_i, 1)`` (mean over the
    kept voxels); ``normalise="all"``: ``L = Σ_i m_i ℓ_i / #voxels`` (what DHC's ``WeightedCrossEntropyLoss`` with a
    weight map computes). With every voxel masked out both give exactly 0, still attached to ``logits`` (zero
    gradient, never NaN).

    Args:
        logits: ``[N, C, *spatial]`` (cast to float32).
        labels: ``[N, *spatial]`` or ``[N, 1, *spatial]`` class indices in ``[0, C)``.
        mask: same shape as ``labels``, bool or 0/1 (detached).
        normalise: ``"mask"`` or ``"all"``.

    Returns:
        scalar loss.
    """
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"masked_cross_entropy: logits must be [N, C, *spatial] with C >= 2, "
                         f"got {tuple(logits.shape)}")
    if normalise not in ("mask", "all"):
        raise ValueError(f"masked_cross_entropy: normalise must be 'mask' or 'all', got {normalise!r}")
    expected = (logits.shape[0], *logits.shape[2:])
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if mask.ndim == logits.ndim and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(labels.shape) != expected or tuple(mask.shape) != expected:
        raise ValueError(f"masked_cross_entropy: labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must be "
                         f"{expected} (or with a singleton channel) for logits {tuple(logits.shape)}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"masked_cross_entropy: labels must lie in [0, {logits.shape[1]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    per_voxel = F.cross_entropy(logits.float(), labels, reduction="none")
    weight = mask.detach().to(per_voxel.dtype)
    total = (per_voxel * weight).sum()
    if normalise == "all":
        return total / per_voxel.numel()
    return total / weight.sum().clamp_min(1.0)
