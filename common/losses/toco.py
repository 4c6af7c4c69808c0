"""Losses of ToCo / EndoKED-WSSS: patch token contrast, class token contrast and the two-class Dice loss.

Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation" (ToCo), CVPR 2023, Eq. (3)-(7); the
forms below are those of the EndoKED-WSSS code (Wang et al., arXiv 2310.11173; specs/endoked.md §3.4 step 5).
The segmentation cross-entropy is ``torch.nn.CrossEntropyLoss(ignore_index=255)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["CTCLoss", "PTCLoss", "TwoClassDiceLoss"]


class PTCLoss(_Loss):
    """Patch token contrast: pull same-label tokens together, push different-label tokens apart.

    With ``C_ij = |cos(f_i, f_j)|`` between the tokens of the final feature map and the affinity target ``T``
    (:func:`common.transforms.cams.label_to_affinity_mask`), sums over the whole batch::

        L_ptc = 0.5 (1 - sum_{T=1} C / (N_1 + 1)) + 0.5 sum_{T=0} C / (N_0 + 1)

    where ``N_1``, ``N_0`` count the pairs with ``T = 1`` and ``T = 0``; other values (ignored pairs) do not count.
    """

    def forward(self, fmap: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
        """
        Args:
            fmap: ``[B, D, h, w]`` token features.
            affinity: ``[B, N, N]`` targets in {0, 1, ignore}, ``N = h * w``.

        Returns:
            scalar loss.
        """
        if fmap.ndim != 4:
            raise ValueError(f"PTCLoss: fmap must be [B, D, h, w], got shape {tuple(fmap.shape)}")
        b, _, h, w = fmap.shape
        if affinity.shape != (b, h * w, h * w):
            raise ValueError(f"PTCLoss: affinity must be [B, N, N] = {(b, h * w, h * w)} for fmap "
                             f"{tuple(fmap.shape)}, got {tuple(affinity.shape)}")
        tokens = F.normalize(fmap.float().flatten(2), p=2, dim=1, eps=1e-8)
        cosine = torch.bmm(tokens.transpose(1, 2), tokens).abs()
        positive, negative = (affinity == 1).float(), (affinity == 0).float()
        pull = 1.0 - (positive * cosine).sum() / (positive.sum() + 1.0)
        push = (negative * cosine).sum() / (negative.sum() + 1.0)
        return 0.5 * pull + 0.5 * push


class CTCLoss(_Loss):
    """Class token contrast with negative local crops (EndoKED ``CTCLoss_neg``).

    With teacher projections ``t_g`` of the ``G`` (= 2) global views and student projections ``s_k`` of all ``V``
    views (2 global + local crops), ``e_gk = exp(t_g . s_k / tau)``, the positive crops ``P`` (flag 1) and the
    negative crops ``N`` (flag 0) of an image::

        l = sum_{k in P} sum_g -log(e_gk / (e_gk + sum_{n in N} e_gn + 1e-4))
            + sum_g -log(1 / (1 + sum_{n in N} e_gn + 1e-4))
        L_ctc = mean_over_images( l / (G (|P| + 1e-4)) )

    The second term is added once per image whatever ``P`` is (a ``for ... else`` in the original).

    Args:
        temperature: ``tau`` (0.5).
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"CTCLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_out: ``[V * B, E]``, view-major (rows ``v * B + b``), as the network concatenates its views.
            teacher_out: ``[G * B, E]``, view-major.
            flags: ``[B, V]`` crop flags (1 positive, 0 negative).

        Returns:
            scalar loss.
        """
        if flags.ndim != 2 or student_out.ndim != 2 or teacher_out.ndim != 2:
            raise ValueError(f"CTCLoss: need student_out [V*B, E], teacher_out [G*B, E] and flags [B, V]; got "
                             f"{tuple(student_out.shape)}, {tuple(teacher_out.shape)}, {tuple(flags.shape)}")
        b, v = flags.shape
        if student_out.shape[0] != v * b or teacher_out.shape[0] % b or student_out.shape[1] != teacher_out.shape[1]:
            raise ValueError(f"CTCLoss: student_out {tuple(student_out.shape)} and teacher_out "
                             f"{tuple(teacher_out.shape)} do not fit flags {tuple(flags.shape)} (B={b}, V={v})")
        student = student_out.float().reshape(v, b, -1).transpose(0, 1)  # [B, V, E]
        teacher = teacher_out.float().reshape(-1, b, student.shape[-1]).transpose(0, 1)  # [B, G, E]
        n_teacher = teacher.shape[1]
        similarity = torch.exp(torch.bmm(teacher, student.transpose(1, 2)) / self.temperature)  # [B, G, V]
        positive = (flags == 1).float()[:, None, :]
        negative_sum = (similarity * (flags == 0).float()[:, None, :]).sum(dim=2, keepdim=True)  # [B, G, 1]
        pos_terms = -torch.log(similarity / (similarity + negative_sum + 1e-4))
        per_image = (pos_terms * positive).sum(dim=(1, 2)) + torch.log(1.0 + negative_sum + 1e-4).sum(dim=(1, 2))
        return (per_image / n_teacher / (positive.sum(dim=(1, 2)) + 1e-4)).mean()


class TwoClassDiceLoss(_Loss):
    """Soft Dice over the softmax of segmentation logits, with ignored pixels (EndoKED-WSSS ``DiceLoss``).

    With ``p = softmax(z)``, one-hot targets ``t`` (pixels labelled ``ignore_index`` have ``t = 0`` for every
    class but keep their ``p``), sums over the whole batch::

        L_dice = mean_c [ 1 - (2 sum p_c t_c + eps) / (sum p_c^2 + sum t_c^2 + eps) ],   eps = 1e-5

    Args:
        num_classes: channels of the logits (2: background, polyp).
        smooth: ``eps``.
    """

    def __init__(self, num_classes: int = 2, smooth: float = 1e-5) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"TwoClassDiceLoss: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: ``[B, C, H, W]``.
            labels: ``[B, H, W]`` integer labels in ``{0..C-1}`` or the ignore value (any other value).

        Returns:
            scalar loss.
        """
        if logits.ndim != 4 or logits.shape[1] != self.num_classes or labels.shape != (logits.shape[0],
                                                                                          *logits.shape[2:]):
            raise ValueError(f"TwoClassDiceLoss: need logits [B, {self.num_classes}, H, W] and labels [B, H, W]; got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        prob = logits.float().softmax(dim=1)
        classes = torch.arange(self.num_classes, device=labels.device)[None, :, None, None]
        target = (labels[:, None] == classes).float()
        dims = (0, 2, 3)
        dice = (2.0 * (prob * target).sum(dims) + self.smooth) / (
            (prob * prob).sum(dims) + (target * target).sum(dims) + self.smooth)
        return (1.0 - dice).mean()
