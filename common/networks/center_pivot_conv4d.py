"""Center-pivot 4D convolution of HSNet, the building block of PATNet's hypercorrelation learner.

Min et al., "Hypercorrelation Squeeze for Few-Shot Segmentation" (HSNet, ICCV 2021), §3.3 (center-pivot 4D
convolution); PATNet (Lei et al., ECCV 2022) reuses it unchanged (specs/cdtg.md §4.5). A dense 4D kernel
``W[δ_q, δ_s]`` is replaced by its two "center-pivot" planes: ``W[δ_q, 0] = W1[δ_q]`` and ``W[0, δ_s] = W2[δ_s]``.
For an input ``X [B, C_in, Hq, Wq, Hs, Ws]``::

    Y(x_q, x_s) = sum_{δ in N(k_q)} W1[δ] X(x_q + δ, x_s) + b1  +  sum_{δ in N(k_s)} W2[δ] X(x_q, x_s + δ) + b2

i.e. a 2D convolution over the query dims (child ``conv1``) evaluated at every kernel-centre support position of
the strided output, plus a 2D convolution over the support dims (child ``conv2``) evaluated at every kernel-centre
query position. With stride ``s`` and padding ``k // 2`` both branches keep ``ceil(H / s)`` positions (branch 1 picks
support positions ``0, s, 2s, ...``). Output ``[B, C_out, Hq', Wq', Hs', Ws']``.

Unlike the reference implementation, the selected positions are recomputed on every call (nothing is cached), so
one instance runs at any input resolution.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CenterPivotConv4d"]


def _centres(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """``(first, count)``: input index of the kernel centre of output position 0, and the number of output
    positions of a 1D convolution with these settings; output ``i`` is centred on input ``first + i * stride``."""
    return kernel // 2 - padding, (size + 2 * padding - kernel) // stride + 1


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D convolution ``[B, C_in, Hq, Wq, Hs, Ws] -> [B, C_out, Hq', Wq', Hs', Ws']``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``(k_hq, k_wq, k_hs, k_ws)``, odd sizes (``conv1`` uses the first two, ``conv2`` the last two).
        stride: ``(s_hq, s_wq, s_hs, s_ws)``; HSNet strides only the support dims, ``(1, 1, s, s)``.
        padding: ``(p_hq, p_wq, p_hs, p_ws)``, each at most ``k // 2`` so that every kernel centre lies inside the
            input (HSNet uses ``k // 2``).
        bias: learnable biases ``b1`` (of ``conv1``) and ``b2`` (of ``conv2``).

    Raises:
        ValueError: a tuple that does not have four entries, an even kernel size, a stride < 1, or a padding that is
            negative or larger than ``k // 2``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int, int],
                 stride: tuple[int, int, int, int], padding: tuple[int, int, int, int], bias: bool = True) -> None:
        super().__init__()
        kernel_size, stride, padding = tuple(kernel_size), tuple(stride), tuple(padding)
        for name, value in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
            if len(value) != 4:
                raise ValueError(f"CenterPivotConv4d: {name} must have 4 entries (hq, wq, hs, ws), got {value}")
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f"CenterPivotConv4d: kernel_size must be odd (a kernel needs a centre), got {kernel_size}")
        if any(s < 1 for s in stride):
            raise ValueError(f"CenterPivotConv4d: stride must be >= 1, got {stride}")
        if any(p < 0 or p > k // 2 for p, k in zip(padding, kernel_size)):
            raise ValueError(f"CenterPivotConv4d: padding must lie in [0, k // 2] per dim, got {padding} for "
                             f"kernel_size {kernel_size}")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size[:2], stride=stride[:2], padding=padding[:2],
                               bias=bias)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size[2:], stride=stride[2:], padding=padding[2:],
                               bias=bias)

    def _grid(self, sizes: tuple[int, int], dims: slice) -> list[tuple[int, int]]:
        return [_centres(n, k, s, p) for n, k, s, p in
                zip(sizes, self.kernel_size[dims], self.stride[dims], self.padding[dims])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C_in, Hq, Wq, Hs, Ws] -> [B, C_out, Hq', Wq', Hs', Ws']``."""
        if x.dim() != 6:
            raise ValueError(f"CenterPivotConv4d expects [B, C, Hq, Wq, Hs, Ws], got shape {tuple(x.shape)}")
        b, c, hq, wq, hs, ws = x.shape
        (f_hq, n_hq), (f_wq, n_wq) = self._grid((hq, wq), slice(0, 2))
        (f_hs, n_hs), (f_ws, n_ws) = self._grid((hs, ws), slice(2, 4))
        if min(n_hq, n_wq, n_hs, n_ws) < 1:
            raise ValueError(f"CenterPivotConv4d: input {tuple(x.shape)} is smaller than kernel {self.kernel_size}")

        # branch 1: 2D conv over the query dims at the output's support kernel centres
        x1 = x[..., f_hs::self.stride[2], f_ws::self.stride[3]][..., :n_hs, :n_ws]
        x1 = x1.permute(0, 4, 5, 1, 2, 3).reshape(b * n_hs * n_ws, c, hq, wq)
        y1 = self.conv1(x1)
        y1 = y1.view(b, n_hs, n_ws, -1, n_hq, n_wq).permute(0, 3, 4, 5, 1, 2)

        # branch 2: 2D conv over the support dims at the output's query kernel centres
        x2 = x[:, :, f_hq::self.stride[0], f_wq::self.stride[1]][:, :, :n_hq, :n_wq]
        x2 = x2.permute(0, 2, 3, 1, 4, 5).reshape(b * n_hq * n_wq, c, hs, ws)
        y2 = self.conv2(x2)
        y2 = y2.view(b, n_hq, n_wq, -1, n_hs, n_ws).permute(0, 3, 1, 2, 4, 5)
        return (y1 + y2).contiguous()
