"""The four pre-training losses of ASG and the batch retrieval accuracy.

Li et al., "Anatomical Structure-Guided Medical Vision-Language Pre-training" (ASG), MICCAI 2024; specs/asg.md §4
(and §8 items 3, 5, 6). With a batch of ``B`` image–report pairs, ``ĝ`` the image and ``ĥ`` the report embeddings
(``[B, E]``, L2-normalised by the projection heads) and ``S = ĝ ĥᵀ / τ`` (``[B, B]``, τ = 0.07, fixed)::

    IRA   L = CE(S, I) + CE(Sᵀ, I)                                  (both directions SUMMED, not averaged)
    ARSA  A_i = v_i t_iᵀ / τ + M_i   ([R, R] per image, M = count_matrix: 0 inside the valid block, -inf across)
          L = CE over the valid rows (i, r) of A (labels count_label, -100 ignored) + the same on A_iᵀ
    IRL   L = BCE-with-logits(z, y) averaged over B x Q, y = labels with -1 -> 0
    ERL   ȳ = y / ||y||₂ (zero rows stay 0), T = row-L1-normalise(0.8 I + 0.2 ȳȳᵀ + 1e-6),
          P = softmax_row(S), Q = softmax_row(Sᵀ),
          L = ½ [½ (KL(T‖P) + KL(P‖T)) + ½ (KL(T‖Q) + KL(Q‖T))],   KL(A‖B) = 1/B Σ_ij A_ij (log A_ij - log B_ij)
    total L = 1 IRA + 1 ARSA + 5 IRL + 1 ERL

The losses take the embeddings as they are: the model L2-normalises ``ĝ``, ``ĥ`` and the patch / word embeddings,
while region (RoIAlign) and sentence (word mean) features are not re-normalised (§3.4), so nothing is normalised
here. Negatives are the local batch (no gathering across ranks), as released.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ASGLoss",
    "IGNORE_INDEX",
    "image_report_loss",
    "region_sentence_loss",
    "retrieval_accuracy",
    "soft_label_loss",
    "soft_label_targets",
    "tag_loss",
]

IGNORE_INDEX = -100
"""``count_label`` of the padding regions (rows left out of ARSA)."""
SOFT_TARGET_EPS = 1e-6
"""Added to every entry of the ERL target before the row normalisation."""


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: image_emb and report_emb must both be [B, E] of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def _check_temperature(temperature: float, name: str) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _similarity(image_emb: torch.Tensor, report_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """``S = ĝ ĥᵀ / τ``, ``[B, B]`` (row i: image i against every report)."""
    return image_emb @ report_emb.t() / temperature


def image_report_loss(image_emb: torch.Tensor, report_emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """IRA, the global InfoNCE summed over both directions: ``CE(S, I) + CE(Sᵀ, I)``.

    ``CE(X, I) = -1/B Σ_i log softmax_j(X_ij)|_{j=i}``; the pair ``i`` is the positive of row / column ``i``.

    Args:
        image_emb: ``ĝ``, ``[B, E]``.
        report_emb: ``ĥ``, ``[B, E]``.
        temperature: ``τ > 0``.

    Returns:
        scalar tensor.
    """
    _check_pair(image_emb, report_emb, "image_report_loss")
    _check_temperature(temperature, "image_report_loss")
    sim = _similarity(image_emb, report_emb, temperature)
    target = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)


def _valid_row_ce(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean CE of the rows ``valid`` of ``scores`` ``[N, R]`` (what ``ignore_index`` does, but the ignored rows,
    which may hold only -inf, never enter the softmax)."""
    return F.cross_entropy(scores[valid], labels[valid])


def region_sentence_loss(
    region_emb: torch.Tensor,
    sentence_emb: torch.Tensor,
    count_matrix: torch.Tensor,
    count_label: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """ARSA, the intra-image region↔sentence InfoNCE with the block mask of §2.5.

    ``A_i = v_i t_iᵀ / τ + M_i``; ``L = mean_{(i, r) valid} -log softmax(A_{i, r, :})_r
    + mean_{(i, r) valid} -log softmax(A_{i, :, r})_r``, a row ``(i, r)`` being valid when
    ``count_label[i, r] != -100`` (the mean runs over every valid row of the batch, as ``F.cross_entropy`` with
    ``ignore_index`` does). An image with one valid region contributes 0. A batch without a valid row gives a zero
    that keeps the graph (the released code returns NaN there, §8 item 5).

    Args:
        region_emb: ``v``, ``[B, R, E]``.
        sentence_emb: ``t``, ``[B, R, E]``.
        count_matrix: ``M``, ``[B, R, R]``, 0 / -inf.
        count_label: ``[B, R]`` int, ``r`` for the valid regions, -100 for the padding.
        temperature: ``τ > 0``.

    Returns:
        scalar tensor.
    """
    if region_emb.ndim != 3 or region_emb.shape != sentence_emb.shape:
        raise ValueError(f"region_sentence_loss: region_emb and sentence_emb must both be [B, R, E] of the same "
                         f"shape, got {tuple(region_emb.shape)} and {tuple(sentence_emb.shape)}")
    batch, regions = region_emb.shape[:2]
    if tuple(count_matrix.shape) != (batch, regions, regions):
        raise ValueError(f"region_sentence_loss: count_matrix must be [B, R, R] = {[batch, regions, regions]}, got "
                         f"{tuple(count_matrix.shape)}")
    if tuple(count_label.shape) != (batch, regions):
        raise ValueError(f"region_sentence_loss: count_label must be [B, R] = {[batch, regions]}, got "
                         f"{tuple(count_label.shape)}")
    _check_temperature(temperature, "region_sentence_loss")
    labels = count_label.reshape(-1).long()
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return region_emb.sum() * 0.0 + sentence_emb.sum() * 0.0
    mask = count_matrix.to(region_emb.dtype)
    scores = region_emb @ sentence_emb.transpose(1, 2) / temperature + mask  # [B, R, R]
    scores_t = scores.transpose(1, 2)  # = t_i v_iᵀ / τ + M_iᵀ
    return (_valid_row_ce(scores.reshape(batch * regions, regions), labels, valid)
            + _valid_row_ce(scores_t.reshape(batch * regions, regions), labels, valid))


def _binary_labels(labels: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Finding labels in {1, 0, -1} -> a new {1, 0} tensor of ``dtype`` (-1, uncertain, counts as absent)."""
    if not bool(((labels == 1) | (labels == 0) | (labels == -1)).all()):
        raise ValueError(f"{name}: labels must hold only 1, 0 and -1, got values "
                         f"{torch.unique(labels).tolist()[:8]}")
    return (labels == 1).to(dtype)


def tag_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IRL: ``BCE-with-logits(z, y)`` averaged over ``B x Q``, ``y = labels`` with -1 mapped to 0 (a new tensor;
    the batch is not modified, §8 item 3).

    Args:
        logits: ``z``, ``[B, Q]`` tag-decoder logits.
        labels: ``[B, Q]`` in {1, 0, -1}.
    """
    if logits.ndim != 2 or logits.shape != labels.shape:
        raise ValueError(f"tag_loss: logits and labels must both be [B, Q] of the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    target = _binary_labels(labels, logits.dtype, "tag_loss")
    return F.binary_cross_entropy_with_logits(logits, target)


def soft_label_targets(labels: torch.Tensor, identity_weight: float = 0.8, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """ERL target ``T = row-L1-normalise(w I + (1 - w) ȳȳᵀ + 1e-6)``, ``ȳ = y / ||y||₂`` (zero rows stay 0).

    Args:
        labels: ``[B, Q]`` in {1, 0, -1} (-1 mapped to 0 first).
        identity_weight: ``w`` (0.8).
        dtype: floating dtype of the result.

    Returns:
        ``[B, B]``, rows summing to 1.
    """
    y = F.normalize(_binary_labels(labels, dtype, "soft_label_loss"), p=2.0, dim=1)
    eye = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    target = identity_weight * eye + (1.0 - identity_weight) * (y @ y.t()) + SOFT_TARGET_EPS
    return target / target.sum(dim=1, keepdim=True)


def _symmetric_kl(log_target: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """``½ (KL(T‖P) + KL(P‖T))`` from ``log T`` and ``log P`` (``F.kl_div`` with ``reduction="batchmean"``)."""
    forward = F.kl_div(log_prob, log_target, reduction="batchmean", log_target=True)
    backward = F.kl_div(log_target, log_prob, reduction="batchmean", log_target=True)
    return 0.5 * (forward + backward)


def soft_label_loss(
    image_emb: torch.Tensor,
    report_emb: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    identity_weight: float = 0.8,
) -> torch.Tensor:
    """ERL: ``½ [½ (KL(T‖P) + KL(P‖T)) + ½ (KL(T‖Q) + KL(Q‖T))]`` with ``P = softmax_row(S)``,
    ``Q = softmax_row(Sᵀ)`` and ``T`` from :func:`soft_label_targets`.

    Args:
        image_emb: ``ĝ``, ``[B, E]``.
        report_emb: ``ĥ``, ``[B, E]``.
        labels: ``[B, Q]`` finding labels in {1, 0, -1}.
        temperature: ``τ > 0`` of ``S``.
        identity_weight: weight of ``I`` in the target (0.8).

    Returns:
        scalar tensor, >= 0.
    """
    _check_pair(image_emb, report_emb, "soft_label_loss")
    _check_temperature(temperature, "soft_label_loss")
    if labels.ndim != 2 or labels.shape[0] != image_emb.shape[0]:
        raise ValueError(f"soft_label_loss: labels must be [B, Q] with B = {image_emb.shape[0]}, got "
                         f"{tuple(labels.shape)}")
    if not 0.0 <= identity_weight <= 1.0:
        raise ValueError(f"soft_label_loss: identity_weight must be in [0, 1], got {identity_weight}")
    sim = _similarity(image_emb, report_emb, temperature)
    log_target = soft_label_targets(labels, identity_weight, sim.dtype).log()
    image_to_report = _symmetric_kl(log_target, F.log_softmax(sim, dim=1))
    report_to_image = _symmetric_kl(log_target, F.log_softmax(sim.t(), dim=1))
    return 0.5 * (image_to_report + report_to_image)


class ASGLoss(nn.Module):
    """``L = w_ira IRA + w_arsa ARSA + w_irl IRL + w_erl ERL`` (weights 1, 1, 5, 1).

    A term whose weight is 0 is not computed and is reported as 0 (ablations of the paper's Table 4).

    Args:
        temperature: ``τ`` of IRA, ARSA and ERL (0.07).
        ira, arsa, irl, erl: the weights (>= 0).
    """

    OUTPUT_KEYS = ("image_emb", "report_emb", "region_emb", "sentence_emb", "tag_logits")
    BATCH_KEYS = ("count_matrix", "count_label", "labels")

    def __init__(self, temperature: float = 0.07, ira: float = 1.0, arsa: float = 1.0, irl: float = 5.0,
                 erl: float = 1.0) -> None:
        super().__init__()
        _check_temperature(temperature, "ASGLoss")
        self.weights = {"ira": float(ira), "arsa": float(arsa), "irl": float(irl), "erl": float(erl)}
        negative = {k: w for k, w in self.weights.items() if not w >= 0}
        if negative:
            raise ValueError(f"ASGLoss: loss weights must be >= 0, got {negative}")
        self.temperature = float(temperature)

    def _term(self, name: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
              ) -> torch.Tensor:
        if name == "ira":
            return image_report_loss(outputs["image_emb"], outputs["report_emb"], self.temperature)
        if name == "arsa":
            return region_sentence_loss(outputs["region_emb"], outputs["sentence_emb"], batch["count_matrix"],
                                        batch["count_label"], self.temperature)
        if name == "irl":
            return tag_loss(outputs["tag_logits"], batch["labels"])
        return soft_label_loss(outputs["image_emb"], outputs["report_emb"], batch["labels"], self.temperature)

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """The weighted total and the unweighted terms.

        Args:
            outputs: ``ASGModel.pretrain_outputs(...)`` (``image_emb``, ``report_emb``, ``region_emb``,
                ``sentence_emb``, ``tag_logits``).
            batch: the collated batch (``count_matrix``, ``count_label``, ``labels``).

        Returns:
            ``{"loss", "ira", "arsa", "irl", "erl"}`` scalar tensors.
        """
        missing = [k for k in self.OUTPUT_KEYS if k not in outputs] + [k for k in self.BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"ASGLoss: missing keys {missing} (outputs have {sorted(outputs)}, batch has "
                             f"{sorted(batch)})")
        zero = outputs["image_emb"].new_zeros(())
        terms = {name: self._term(name, outputs, batch) if weight > 0 else zero
                 for name, weight in self.weights.items()}
        total = sum((self.weights[name] * value for name, value in terms.items() if self.weights[name] > 0), zero)
        return {"loss": total, **terms}


def retrieval_accuracy(image_emb: torch.Tensor, report_emb: torch.Tensor, topk: Sequence[int] = (1, 5)
                       ) -> dict[str, float]:
    """Image→report top-k accuracy of ``S`` in percent: the share of rows ``i`` whose own report ``i`` is among the
    ``k`` highest entries of row ``i`` (``k`` larger than ``B`` is clipped to ``B``).

    Returns:
        ``{"acc<k>": value}`` for every requested ``k``.
    """
    _check_pair(image_emb, report_emb, "retrieval_accuracy")
    if any(int(k) < 1 for k in topk):
        raise ValueError(f"retrieval_accuracy: every k must be >= 1, got {list(topk)}")
    sim = image_emb.detach() @ report_emb.detach().t()  # τ does not change the ranking
    batch = sim.shape[0]
    ranked = sim.topk(min(max(int(k) for k in topk), batch), dim=1).indices  # [B, k_max]
    hit = ranked == torch.arange(batch, device=sim.device)[:, None]
    return {f"acc{k}": 100.0 * float(hit[:, :min(int(k), batch)].any(dim=1).float().mean()) for k in topk}
