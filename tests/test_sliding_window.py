"""DHC sliding-window inference (specs/dhc.md §6, §11.2–11.3): window starts, blending, MONAI equivalence."""

import math
from itertools import product

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from common.engines.sliding_window import (
    EnsembleLogitsPredictor,
    dhc_sliding_window,
    monai_overlap,
    window_starts,
)


class ConstantLogits(nn.Module):
    """Logits ``values[c]`` at every voxel, whatever the input."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.register_buffer("values", torch.tensor(values).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values.expand(x.shape[0], -1, *x.shape[2:])


class WindowMeanLogits(nn.Module):
    """Class-0 logit 0, class-1 logit = the mean intensity of the whole window (so each window scores differently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True).expand(-1, 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(mean), mean], dim=1)


class TupleOutput(nn.Module):
    """A network returning ``(x, x)`` instead of one logits tensor."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def tiny_nets(seed: int = 0, n_classes: int = 3) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, n_classes, 3, padding=1)).eval()
            for _ in range(2)]


def test_window_starts_of_the_spec():
    assert window_starts(80, 64, 16) == [0, 16]  # ceil(16/16)+1 = 2 windows: 0, min(16, 16)
    assert window_starts(160, 128, 32) == [0, 32]  # ceil(32/32)+1 = 2 windows: 0, min(32, 32)
    # S=100, p=64, s=16: ceil(36/16)+1 = 3+1 = 4 windows: 0, 16, 32, min(48, 36) = 36 (last one clamped)
    assert window_starts(100, 64, 16) == [0, 16, 32, 36]
    assert window_starts(64, 64, 16) == [0]  # S == p: ceil(0)+1 = 1 window
    assert window_starts(65, 64, 16) == [0, 1]  # ceil(1/16)+1 = 2: 0, min(16, 1) = 1


def test_window_starts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smaller than the patch"):
        window_starts(60, 64, 16)
    with pytest.raises(ValueError, match="stride"):
        window_starts(80, 64, 0)


def test_monai_overlap_gives_the_stride_as_interval():
    assert monai_overlap((64, 128, 128), (16, 32, 32)) == (0.75, 0.75, 0.75)  # 1 - 16/64 = 1 - 32/128 = 0.75
    # p=9, s=3: 1 - 3/9 rounds to 0.6666666666666667 and int(9 * (1 - 0.6666666666666667)) = int(2.999999999999999)
    # = 2, so the half-voxel form 1 - 3.5/9 is used: int(9 * 3.5/9) = int(3.5) = 3
    o = monai_overlap((9,), (3,))[0]
    assert o == pytest.approx(1 - 3.5 / 9) and int(9 * (1 - o)) == 3
    for p in range(1, 70):
        for s in range(1, p + 1):
            assert int(p * (1 - monai_overlap((p,), (s,))[0])) == s
    with pytest.raises(ValueError, match="stride"):
        monai_overlap((16,), (17,))


def test_ensemble_softmaxes_the_mean_logits():
    predictor = EnsembleLogitsPredictor([ConstantLogits([0.0, 2.0]), ConstantLogits([0.0, -4.0])])
    probs = predictor(torch.zeros(1, 1, 2, 2, 2))
    # mean logits [0, (2 - 4)/2 = -1] -> p1 = 1 / (1 + e^1) = 0.268941; averaging the softmaxes would give
    # (sigmoid(2) + sigmoid(-4)) / 2 = (0.880797 + 0.017986) / 2 = 0.449392 instead
    assert probs.shape == (1, 2, 2, 2, 2)
    assert torch.allclose(probs[:, 1], torch.full((1, 2, 2, 2), 0.268941), atol=1e-6)
    single = EnsembleLogitsPredictor([ConstantLogits([0.0, 2.0])])(torch.zeros(1, 1, 1, 1, 1))
    assert single[0, 1].item() == pytest.approx(0.880797, abs=1e-6)  # softmax([0, 2])_1 = 1 / (1 + e^-2)


def test_uniform_blending_by_hand():
    # D = 6, window 4 along D, stride 2 -> starts [0, 2]; H = W = 2 = patch, one window in-plane
    volume = torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0, 4.0]).view(1, 1, 6, 1, 1).expand(1, 1, 6, 2, 2).contiguous()
    probs = dhc_sliding_window(volume, WindowMeanLogits(), patch=(4, 2, 2), strides=(2, 2, 2))
    # window 0 (slices 0-3) mean 0 -> p1 = 0.5; window 1 (slices 2-5) mean (0+0+4+4)/4 = 2 -> p1 = sigmoid(2) = 0.880797
    # slices 0,1: 0.5; slices 2,3 (count 2): (0.5 + 0.880797)/2 = 0.690399; slices 4,5: 0.880797
    expected = torch.tensor([0.5, 0.5, 0.690399, 0.690399, 0.880797, 0.880797]).view(1, 6, 1, 1).expand(1, 6, 2, 2)
    assert probs.shape == (1, 2, 6, 2, 2)
    assert torch.allclose(probs[:, 1], expected, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(1, 6, 2, 2), atol=1e-6)  # still a distribution after averaging


def test_padding_of_a_volume_smaller_than_the_patch():
    # D = 3 < patch 6: padded with zeros, 1 before (floor(3/2)) and 2 after, one window, output cropped back to D = 3;
    # the window mean is (1+1+1)*4 / (6*2*2) = 0.5 over the padded window -> p1 = sigmoid(0.5) = 0.622459
    probs = dhc_sliding_window(torch.ones(1, 1, 3, 2, 2), [WindowMeanLogits()], patch=(6, 2, 2), strides=(2, 2, 2))
    assert probs.shape == (1, 2, 3, 2, 2)
    assert torch.allclose(probs[:, 1], torch.full((1, 3, 2, 2), 0.622459), atol=1e-6)


def test_hand_loop_equals_monai_sliding_window_inference():
    nets = tiny_nets()
    patch, strides = (8, 16, 16), (2, 4, 4)
    overlap = monai_overlap(patch, strides)
    for shape in [(2, 1, 13, 27, 22), (1, 1, 8, 30, 16), (1, 1, 5, 20, 18)]:  # clamped last windows; one padded case
        torch.manual_seed(1)
        volume = torch.rand(shape)
        ours = dhc_sliding_window(volume, nets, patch, strides)
        with torch.no_grad():
            theirs = sliding_window_inference(volume, patch, 3, EnsembleLogitsPredictor(nets), overlap=overlap,
                                              mode="constant")
        assert ours.shape == (shape[0], 3, *shape[2:])
        assert torch.allclose(ours, torch.as_tensor(theirs), atol=1e-6), shape
        # the single-branch predictor too
        single = dhc_sliding_window(volume, nets[0], patch, strides)
        with torch.no_grad():
            theirs = sliding_window_inference(volume, patch, 2, lambda t: torch.softmax(nets[0](t), 1),
                                              overlap=overlap, mode="constant")
        assert torch.allclose(single, torch.as_tensor(theirs), atol=1e-6), shape


def test_monai_visits_the_dhc_windows():
    # DHC's full-size geometry: 80x160x160 volume, 64x128x128 windows, strides 16/32/32 -> 2x2x2 = 8 windows;
    # and 100x160x190: D starts [0,16,32,36] (4), H [0,32] (2), W ceil(62/32)+1 = 3: [0, 32, min(64, 62) = 62]
    patch = (64, 128, 128)
    for size, n_windows in [((80, 160, 160), 8), ((100, 160, 190), 24)]:
        visited = []

        def record(window: torch.Tensor, coords: list) -> torch.Tensor:
            visited.extend(tuple(s.start for s in c[2:]) for c in coords)
            return window

        sliding_window_inference(torch.zeros(1, 1, *size), patch, 4, record, overlap=monai_overlap(patch, (16, 32, 32)),
                                 mode="constant", with_coord=True)
        ours = list(product(*(window_starts(n, p, s) for n, p, s in zip(size, patch, (16, 32, 32)))))
        assert len(ours) == n_windows == math.prod(len(window_starts(n, p, s))
                                                   for n, p, s in zip(size, patch, (16, 32, 32)))
        assert sorted(visited) == sorted(ours)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        dhc_sliding_window(torch.zeros(1, 2, 8, 8, 8), tiny_nets(), (4, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="strides"):
        dhc_sliding_window(torch.zeros(1, 1, 8, 8, 8), tiny_nets(), (4, 4, 4), (5, 2, 2))
    with pytest.raises(TypeError, match="network 0"):
        EnsembleLogitsPredictor([TupleOutput()])(torch.zeros(1, 1, 2, 2, 2))

