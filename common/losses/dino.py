"""DINO self-distillation loss with teacher centering and sharpening.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021, Eq. (1)-(4);
as used by Sparsam (Nielsen et al., Bioengineering 2023; specs/sparsam.md §4), including Sparsam's first-batch
initialisation of the centre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.utils.distributed import all_reduce_sum

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over all cross-view pairs.

    With ``V_t`` teacher (global) views ``t_g``, ``V_s`` student views ``s_v`` (the first ``V_t`` student views are
    the same crops as the teacher's), ``K`` output dimensions and centre ``c`` ``[1, K]``::

        P_t,g     = softmax((t_g - c) / tau_t)          (teacher detached)
        log P_s,v = log_softmax(s_v / tau_s)
        L = 1 / n_pairs * sum_{g < V_t} sum_{v < V_s, v != g} mean_batch( -sum_K P_t,g * log P_s,v )

    with ``n_pairs = V_t * V_s - min(V_t, V_s)`` (12 for Sparsam's 2 global + 5 local views).

    Centre: ``c <- m * c + (1 - m) * mean_{rows}(t)`` over all teacher rows of the batch; in a multi-process run
    each rank keeps its own centre from its own rows (Sparsam, the default) or, with ``all_reduce_center``, the
    mean is taken over the rows of every rank (original DINO), so that all ranks share one centre. While ``c`` is
    all zero (fresh module), the current batch mean is used as the centre *and* stored by the next update
    (Sparsam's initialisation; original DINO starts from ``c = 0``).

    Centre updates: :meth:`forward` calls :meth:`update_center` itself, after computing the loss and under
    ``no_grad``, **only in training mode** (the original updates after every loss call). ``loss.eval()`` freezes
    the centre, e.g. for a validation pass. The centre is a persistent buffer, so it is saved in and restored
    from ``state_dict`` (Sparsam checkpoints the loss for this reason).

    Args:
        out_dim: ``K``, the projection-head output size.
        n_global_views: ``V_t``, number of teacher views (2).
        student_temp: ``tau_s`` (0.1).
        center_momentum: ``m`` (0.9).
        all_reduce_center: average the batch centre over the ranks (DINO) instead of per rank (Sparsam).
    """

    center: torch.Tensor

    def __init__(
        self, out_dim: int, n_global_views: int = 2, student_temp: float = 0.1, center_momentum: float = 0.9,
        all_reduce_center: bool = False,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim}")
        if n_global_views < 1:
            raise ValueError(f"DINOLoss: n_global_views must be >= 1, got {n_global_views}")
        if student_temp <= 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.n_global_views = n_global_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.all_reduce_center = all_reduce_center
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _check(self, name: str, out: torch.Tensor) -> None:
        if out.ndim != 2 or out.shape[1] != self.out_dim:
            raise ValueError(f"DINOLoss: {name} must have shape [rows, {self.out_dim}], got {tuple(out.shape)}")

    def _batch_center(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """``mean_rows(teacher_out)`` ``[1, K]`` (float32, no gradient); with ``all_reduce_center`` in a
        multi-process run, the mean over the rows of every rank (the global batch)."""
        rows = teacher_out.detach().float()
        if not self.all_reduce_center:
            return rows.mean(dim=0, keepdim=True)
        total = all_reduce_sum(torch.cat([rows.sum(dim=0, keepdim=True), rows.new_full((1, 1), rows.shape[0])], 1))
        return total[:, :-1] / total[:, -1:]

    def _current_center(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """The stored centre, or the batch mean ``[1, K]`` while the stored centre is all zero."""
        if torch.any(self.center != 0):
            return self.center
        return self._batch_center(teacher_out)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """
        Args:
            student_out: ``[V_s * B, K]`` student logits, view-major (rows ``v*B .. (v+1)*B - 1`` are view ``v``).
            teacher_out: ``[V_t * B, K]`` teacher logits of the global views, same order; detached here.
            teacher_temp: ``tau_t`` at the current iteration (from a schedule, e.g.
                :func:`common.utils.schedules.linear_warmup_constant`).

        Returns:
            scalar loss (float32).
        """
        self._check("student_out", student_out)
        self._check("teacher_out", teacher_out)
        if teacher_temp <= 0:
            raise ValueError(f"DINOLoss: teacher_temp must be > 0, got {teacher_temp}")
        n_t = self.n_global_views
        if teacher_out.shape[0] == 0 or teacher_out.shape[0] % n_t:
            raise ValueError(
                f"DINOLoss: teacher_out has {teacher_out.shape[0]} rows, not a positive multiple of "
                f"n_global_views={n_t}"
            )
        batch = teacher_out.shape[0] // n_t
        if student_out.shape[0] % batch:
            raise ValueError(
                f"DINOLoss: student_out has {student_out.shape[0]} rows, not a multiple of the batch size {batch} "
                f"implied by teacher_out ({teacher_out.shape[0]} rows / {n_t} views)"
            )
        n_s = student_out.shape[0] // batch
        n_pairs = n_t * n_s - min(n_t, n_s)
        if n_pairs == 0:
            raise ValueError(f"DINOLoss: no cross-view pair with {n_t} teacher and {n_s} student view(s)")

        teacher_out = teacher_out.detach().float()
        center = self._current_center(teacher_out)
        p_teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).reshape(n_t, batch * self.out_dim)
        log_p_student = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        log_p_student = log_p_student.reshape(n_s, batch * self.out_dim)
        # cross[g, v] = -sum_{b, k} P_t,g[b, k] * log P_s,v[b, k] / B  (batch-mean cross-entropy of each pair)
        cross = -(p_teacher @ log_p_student.T) / batch
        same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=cross.device)
        loss = cross.masked_fill(same_view, 0.0).sum() / n_pairs
        if self.training:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean_rows(teacher_out)``; ``c <- mean_rows(teacher_out)`` while ``c`` is all zero.

        Args:
            teacher_out: ``[rows, K]`` teacher logits (all views of the batch).
        """
        self._check("teacher_out", teacher_out)
        batch_center = self._batch_center(teacher_out)
        if torch.any(self.center != 0):
            batch_center = self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
        self.center.copy_(batch_center)
