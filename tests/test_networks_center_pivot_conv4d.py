"""Center-pivot 4D convolution against a dense 4D convolution whose kernel is zero off the two pivot planes
(specs/cdtg.md §4.5, §7.3 item 1)."""

import pytest
import torch
import torch.nn.functional as F

from common.networks.center_pivot_conv4d import CenterPivotConv4d

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(conv: CenterPivotConv4d, x: torch.Tensor) -> torch.Tensor:
    """Naive 4D convolution ``Y(y) = sum_δ W4[δ] Xpad(y * s + δ) + b1 + b2`` with
    ``W4[δq, centre_s] = W1[δq]`` and ``W4[centre_q, δs] += W2[δs]``, all other kernel taps zero."""
    w1, w2 = conv.conv1.weight, conv.conv2.weight  # [O, C, khq, kwq], [O, C, khs, kws]
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    w4 = torch.zeros(w1.shape[0], w1.shape[1], *k)
    w4[:, :, :, :, k[2] // 2, k[3] // 2] += w1
    w4[:, :, k[0] // 2, k[1] // 2, :, :] += w2
    xp = F.pad(x, (p[3], p[3], p[2], p[2], p[1], p[1], p[0], p[0]))  # F.pad pads the last dim first
    n = [(x.shape[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(4)]
    y = torch.zeros(x.shape[0], w1.shape[0], *n)
    for a in range(k[0]):
        for b in range(k[1]):
            for c in range(k[2]):
                for d in range(k[3]):
                    window = xp[:, :, a:a + s[0] * (n[0] - 1) + 1:s[0], b:b + s[1] * (n[1] - 1) + 1:s[1],
                                c:c + s[2] * (n[2] - 1) + 1:s[2], d:d + s[3] * (n[3] - 1) + 1:s[3]]
                    y += torch.einsum("oc,bcijkl->boijkl", w4[:, :, a, b, c, d], window)
    bias = conv.conv1.bias + conv.conv2.bias
    return y + bias.view(1, -1, 1, 1, 1, 1)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((6, 6, 6, 6), (3, 3, 3, 3), (1, 1, 1, 1), (1, 1, 1, 1)),
        ((5, 6, 7, 5), (3, 3, 3, 3), (1, 1, 2, 2), (1, 1, 1, 1)),  # HSNet squeeze stride (1, 1, 2, 2)
        ((6, 6, 6, 6), (5, 5, 5, 5), (1, 1, 4, 4), (2, 2, 2, 2)),  # squeeze3/squeeze2 first layer: k5, stride 4
        ((5, 6, 7, 5), (3, 5, 3, 5), (2, 1, 1, 2), (1, 2, 0, 1)),  # strided query dims, unpadded support height
    ],
)
def test_matches_dense_pivot_kernel(shape, kernel, stride, padding):
    torch.manual_seed(0)
    conv = CenterPivotConv4d(2, 3, kernel, stride, padding)
    x = torch.randn(2, 2, *shape)
    y = conv(x)
    ref = dense_reference(conv, x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_strided_support_keeps_ceil_positions():
    # 13^4 (layer4 correlation at 400 px) with k 3, stride (1,1,2,2), padding 1: support 13 -> ceil(13/2) = 7,
    # then 7 -> 4 -> 2; query dims stay 13
    conv = CenterPivotConv4d(3, 4, (3,) * 4, (1, 1, 2, 2), (1,) * 4)
    x = torch.randn(1, 3, 13, 13, 13, 13)
    assert conv(x).shape == (1, 4, 13, 13, 7, 7)
    # k 5, stride 4, padding 2 on a 25^4 input (layer3 at 400 px): ceil(25/4) = 7
    conv5 = CenterPivotConv4d(3, 4, (5,) * 4, (1, 1, 4, 4), (2,) * 4)
    assert conv5(torch.randn(1, 3, 9, 9, 25, 25)).shape == (1, 4, 9, 9, 7, 7)


def test_one_instance_runs_at_two_resolutions():
    # the reference caches its support indices on the first call; ours must not (official_figures.md §3 quirk)
    torch.manual_seed(1)
    conv = CenterPivotConv4d(2, 2, (3,) * 4, (1, 1, 2, 2), (1,) * 4)
    for shape in [(6, 6, 6, 6), (5, 4, 9, 7), (6, 6, 6, 6)]:
        x = torch.randn(1, 2, *shape)
        torch.testing.assert_close(conv(x), dense_reference(conv, x), rtol=1e-4, atol=1e-5)


def test_bias_free_and_gradients():
    conv = CenterPivotConv4d(2, 3, (3,) * 4, (1,) * 4, (1,) * 4, bias=False)
    assert conv.conv1.bias is None and conv.conv2.bias is None
    # an all-zero input gives an all-zero output without biases
    assert conv(torch.zeros(1, 2, 4, 4, 4, 4)).abs().max().item() == 0.0
    x = torch.randn(1, 2, 4, 4, 4, 4, requires_grad=True)
    conv(x).sum().backward()
    assert conv.conv1.weight.grad.abs().sum() > 0 and conv.conv2.weight.grad.abs().sum() > 0
    assert x.grad.shape == x.shape


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="4 entries"):
        CenterPivotConv4d(1, 1, (3, 3, 3), (1,) * 4, (1,) * 4)
    with pytest.raises(ValueError, match="odd"):
        CenterPivotConv4d(1, 1, (2, 3, 3, 3), (1,) * 4, (1,) * 4)
    with pytest.raises(ValueError, match="padding"):
        CenterPivotConv4d(1, 1, (3,) * 4, (1,) * 4, (2, 1, 1, 1))
    conv = CenterPivotConv4d(1, 1, (3,) * 4, (1,) * 4, (1,) * 4)
    with pytest.raises(ValueError, match=r"\[B, C, Hq, Wq, Hs, Ws\]"):
        conv(torch.zeros(1, 1, 4, 4))
