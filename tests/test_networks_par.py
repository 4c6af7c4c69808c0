"""PAR: hand-computed propagation steps, edge awareness, and agreement with a per-pixel loop."""

from __future__ import annotations

import math

import pytest
import torch

from common.networks.par import PAR, dilated_neighbours

pytestmark = pytest.mark.usefixtures("one_thread")

# With one dilation d = 1 the 8 neighbour distances are [r2, 1, r2, 1, 1, r2, 1, r2] (r2 = sqrt 2): mean
# (4 * 1.414214 + 4) / 8 = 1.207107, deviations +-0.207107, unbiased std sqrt(8 * 0.0428932 / 7) = 0.221406.
# Position affinity p = -(delta / 0.221406 / 0.3)^2 = -226.67 (axial), -453.33 (diagonal), so its softmax is
# 1/4 on each axial neighbour and e^-226.67 ~ 0 on the diagonals: the position term adds 0.01 / 4 = 0.0025 to the
# weight of every axial neighbour.
AXIAL_POS = 0.0025


def test_neighbour_order_and_replicate_padding():
    x = torch.arange(9.0).view(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    nb = dilated_neighbours(x, (1, 2))
    assert nb.shape == (1, 1, 16, 3, 3)
    # centre pixel (value 4), dilation 1, row-major offsets: 0 1 2 / 3 . 5 / 6 7 8
    assert nb[0, 0, :8, 1, 1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    # corner (0, 0), dilation 2: offsets (-2,-2) (-2,0) (-2,2) (0,-2) (0,2) (2,-2) (2,0) (2,2), clamped to the image
    # -> (0,0) (0,0) (0,2) (0,0) (0,2) (2,0) (2,0) (2,2) = 0 0 2 0 2 6 6 8
    assert nb[0, 0, 8:, 0, 0].tolist() == [0, 0, 2, 0, 2, 6, 6, 8]


def test_constant_image_one_iteration_by_hand():
    par = PAR(dilations=(1,), num_iter=1)
    # constant image: |I_i - I_j| = 0 and sigma_i = 0 -> a_ij = 0 -> appearance softmax 1/8 for every neighbour;
    # A = 1/8 + 0.0025 = 0.1275 (axial), 0.125 (diagonal)
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 0, 0] = 1.0
    out = par(torch.full((1, 3, 3, 3), 0.4), mask)[0, 0]
    # (0,0): replicate padding makes (0,0) its own up-left (diag), up (axial) and left (axial) neighbour:
    #   0.125 + 0.1275 + 0.1275 = 0.38
    # (0,1): (0,0) is its left (axial) and up-left (diag, clamped) neighbour: 0.1275 + 0.125 = 0.2525
    # (1,1): (0,0) is its up-left diagonal: 0.125;  (2,2), (1,2), (2,1), (0,2), (2,0): (0,0) not a neighbour: 0
    expected = torch.tensor([[0.38, 0.2525, 0.0], [0.2525, 0.125, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_strong_edge_blocks_propagation_one_iteration_by_hand():
    par = PAR(dilations=(1,), num_iter=1)
    img = torch.zeros(1, 3, 4, 4)
    img[..., 2:] = 1.0  # columns 0-1 black, columns 2-3 white
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0  # foreground on the black region ...
    mask[0, 0, 1, 0] = 0.0  # ... with a hole at (1, 0)
    out = par(img, mask)[0, 0]
    # hole (1,0): all 8 neighbours are black -> 1/8 each; all have mask 1 except its replicated left neighbour
    # (itself, axial): 8 * 0.125 + 4 * 0.0025 - 0.1275 = 1.01 - 0.1275 = 0.8825
    assert out[1, 0].item() == pytest.approx(0.8825, abs=1e-6)
    # boundary (r,2): 3 black neighbours (mask 1) and 5 white (mask 0); neighbour intensities 3 x 0, 5 x 1 ->
    # unbiased std sqrt((3 * 0.625^2 + 5 * 0.375^2) / 7) = 0.517549 -> a = -(1 / 0.517549 / 0.3)^2 = -41.48 for the
    # black ones -> appearance weight e^-41.48 / 5 ~ 2e-19; only the position term of the axial black neighbour
    # (r,1) passes: 0.0025 x 1  (a plain 3x3 mean would give 3/8 = 0.375)
    assert torch.allclose(out[:, 2], torch.full((4,), AXIAL_POS), atol=1e-6)
    # (1,1): 5 black neighbours with weight 1/5: (0,0) (0,1) (2,0) (2,1) are 1, (1,0) is 0 -> 4/5; position term:
    # axial (0,1) and (2,1) are 1 -> + 2 x 0.0025 = 0.805
    assert out[1, 1].item() == pytest.approx(0.805, abs=1e-6)
    assert torch.all(out[:, 3] == 0.0)  # white interior: all neighbours have mask 0


def test_every_row_of_the_affinity_sums_to_one_plus_w2():
    torch.manual_seed(0)
    par = PAR()  # default: 6 dilations, 10 iterations, w2 = 0.01
    out = par(torch.rand(1, 3, 20, 20), torch.full((1, 2, 20, 20), 1.0))
    # sum_j A_ij = 1 + 0.01, so a constant map is multiplied by 1.01 per step: 1.01^10 = 1.1046221
    assert torch.allclose(out, torch.full_like(out, 1.1046221), atol=1e-5)


def _loop_par(img: torch.Tensor, mask: torch.Tensor, dilations, num_iter, w1=0.3, w2=0.01) -> torch.Tensor:
    """Independent per-pixel implementation of the module docstring's equations (slow, tiny inputs only)."""
    _, c, h, w = img.shape
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    nbrs = [(d * dy, d * dx, d * math.hypot(dy, dx)) for d in dilations for dy, dx in offsets]
    dist = torch.tensor([n[2] for n in nbrs], dtype=torch.float64)
    pos = torch.softmax(-((dist / dist.std() / w1) ** 2), 0)
    aff = torch.zeros(h, w, len(nbrs), dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            vals = torch.stack([img[0, :, min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)]
                                for oy, ox, _ in nbrs], dim=1).double()  # [C, K]
            sigma = vals.std(dim=1, keepdim=True)
            a = -(((vals - img[0, :, y, x, None].double()).abs() / (sigma + 1e-8) / w1) ** 2).mean(0)
            aff[y, x] = torch.softmax(a, 0) + w2 * pos
    m = mask[0].double()
    for _ in range(num_iter):
        new = torch.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for k, (oy, ox, _) in enumerate(nbrs):
                    new[:, y, x] += aff[y, x, k] * m[:, min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)]
        m = new
    return m


def test_matches_per_pixel_loop():
    torch.manual_seed(1)
    img, mask = torch.rand(1, 3, 5, 6), torch.rand(1, 2, 5, 6)
    out = PAR(dilations=(1, 2), num_iter=2)(img, mask)[0]
    assert torch.allclose(out.double(), _loop_par(img, mask, (1, 2), 2), atol=1e-5)


def test_default_par_removes_isolated_noise_without_crossing_the_edge():
    torch.manual_seed(2)
    img = torch.full((1, 3, 32, 32), 0.2)
    img[..., 16:] = 0.8  # strong vertical edge between columns 15 and 16
    img += 0.01 * torch.rand_like(img)  # mild texture
    fg = torch.zeros(32, 32)
    fg[:, :16] = 1.0
    noisy = fg.clone()
    noisy[5, 4] = noisy[20, 10] = 0.0  # background speckles inside the foreground region
    noisy[8, 25] = noisy[27, 18] = 1.0  # foreground speckles inside the background region
    noisy[:, 16] = 1.0  # the foreground bleeds one column across the edge (a typical CAM blur)
    masks = torch.stack([1.0 - noisy, noisy])[None]  # [bg, fg]
    refined = PAR()(img, masks).argmax(dim=1)[0]
    # within each region the speckles are outvoted by their same-intensity neighbours, and the bled column follows
    # the bright region it belongs to: the refined argmax is exactly the region map
    assert torch.equal(refined, fg.long())


def test_masks_are_resized_to_the_image():
    par = PAR(num_iter=10)
    out = par(torch.rand(2, 3, 16, 16), torch.full((2, 1, 8, 8), 0.3))
    # bilinear resize of a constant is the constant; then x 1.01^10: 0.3 * 1.1046221 = 0.3313866
    assert out.shape == (2, 1, 16, 16)
    assert torch.allclose(out, torch.full_like(out, 0.3313866), atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="same B"):
        PAR()(torch.rand(2, 3, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="masks"):
        PAR()(torch.rand(1, 3, 8, 8), torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="dilations"):
        PAR(dilations=())
    with pytest.raises(ValueError, match="dilations"):
        PAR(dilations=(1, 0))
    with pytest.raises(ValueError, match="num_iter"):
        PAR(num_iter=-1)
