"""MultiScaleTrainer: one optimiser step per scale, sizes rounded to multiples of 32, gradients clamped."""

import pytest
import torch
from torch import nn

from common.engines.multiscale_trainer import MultiScaleTrainer, rescaled_size


def test_rescaled_sizes_by_hand():
    # round(352 * 0.75 / 32) * 32 = round(8.25) * 32 = 256;  round(352 * 1.25 / 32) * 32 = round(13.75) * 32 = 448
    assert rescaled_size((352, 352), 0.75) == (256, 256)
    assert rescaled_size((352, 352), 1.0) == (352, 352)
    assert rescaled_size((352, 352), 1.25) == (448, 448)
    # Python rounds halves to even, as the original code does: 64 * 1.25 / 32 = 2.5 -> 2 -> 64; 96 * 1.25 / 32 = 3.75 -> 128
    assert rescaled_size((64, 96), 1.25) == (64, 128)


class Recorder(nn.Module):
    """A 1x1 convolution that records the spatial size of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[2:]))
        return self.conv(x)


def _mean_output(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1000 * mean(pred): d/dw = 1000 * mean(x) (inputs in [0, 1]: about 500), d/db = 1000; all far above 0.5."""
    return 1000.0 * pred.mean()


def _trainer(net: nn.Module, lr: float, **kwargs) -> MultiScaleTrainer:
    data = [{"image": torch.rand(2, 3, 128, 128), "label": (torch.rand(2, 1, 128, 128) > 0.5).float()}]
    return MultiScaleTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                             optimizer=torch.optim.SGD(net.parameters(), lr=lr), decollate=False,
                             loss_function=_mean_output, **kwargs)


def test_one_step_per_scale_and_rate_one_reported():
    net = Recorder()
    trainer = _trainer(net, lr=0.0)
    steps = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(1) or original(*a, **k)
    trainer.run()
    # 128 * 0.75 / 32 = 3 -> 96;  128 * 1.25 / 32 = 5 -> 160
    assert net.sizes == [(96, 96), (128, 128), (160, 160)]
    assert len(steps) == 3
    assert trainer.state.output["image"].shape[2:] == (128, 128)  # the rate-1 pass is the one reported


def test_gradients_are_clamped_elementwise():
    # Every gradient element exceeds 0.5 (see _mean_output), so after the clamp one SGD step (lr 1) moves every
    # parameter by exactly 0.5 (a single scale, so a single step).
    net = Recorder()
    before = [p.detach().clone() for p in net.parameters()]
    _trainer(net, lr=1.0, scales=(1.0,), grad_clip_value=0.5).run()
    for old, new in zip(before, net.parameters()):
        assert torch.allclose((old - new).abs(), torch.full_like(old, 0.5))


def test_no_scales_is_refused():
    with pytest.raises(ValueError, match="scales"):
        _trainer(Recorder(), lr=0.0, scales=())


def test_summed_heads_inferer_adds_a_tuple_and_passes_a_tensor():
    from common.engines.inferers import SummedHeadsInferer

    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert torch.equal(SummedHeadsInferer()(x, lambda t: (t, 2 * t)), 3 * x)  # P1 + P2 = x + 2x
    assert torch.equal(SummedHeadsInferer()(x, lambda t: t + 1), x + 1)


def test_selected_head_inferer_keeps_one_output_at_input_size():
    from common.engines.inferers import SelectedHeadInferer

    x = torch.zeros(1, 1, 4, 4)
    seg = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]] at 1/2 of the input
    out = SelectedHeadInferer(index=1)(x, lambda t: ("cls", seg))
    assert out.shape == (1, 1, 4, 4)
    # bilinear x2 with align_corners=False: output pixel 0 samples input coordinate -0.25 -> clamped to 0
    # (value 0); output pixel 1 samples 0.25 -> 0.75*0 + 0.25*1 = 0.25 along the row
    assert out[0, 0, 0, :2].tolist() == [0.0, 0.25]
    assert torch.equal(SelectedHeadInferer(upsample=False)(x, lambda t: seg), seg)  # a single tensor passes through


def test_cam_inferer_returns_the_normalised_main_cam():
    from common.engines.inferers import CAMInferer

    class Ramp(torch.nn.Module):
        """cam_only forward of a ToCo network: (cam_aux, cam); the main CAM is the column index 0..3."""

        def forward(self, x, cam_only=False):
            cam = torch.arange(4.0).expand(x.shape[0], 1, 4, 4).clone()
            return -cam, cam

    out = CAMInferer(scales=(1.0,))(torch.zeros(1, 3, 4, 4), Ramp())
    # flip max: max(c, 3 - c) over columns 0..3 = [3, 2, 2, 3]; min-max: (v - 2) / (1 + 1e-5) ~ [1, 0, 0, 1]
    assert out.shape == (1, 1, 4, 4)
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 0.0, 0.0, 1.0]), atol=1e-4)


def test_decoder_and_cam_inferer_stacks_the_decoder_logits_and_the_cam():
    from common.engines.inferers import DecoderAndCAMInferer

    class Toy(torch.nn.Module):
        def forward(self, x, cam_only=False):
            if cam_only:
                cam = torch.arange(4.0).expand(x.shape[0], 1, 4, 4).clone()
                return -cam, cam
            return "cls", torch.ones(x.shape[0], 2, 2, 2), "fmap", "cls_aux"

    out = DecoderAndCAMInferer()(torch.zeros(1, 3, 4, 4), Toy())
    # channels 0-1: the 2x2 decoder map of ones upsampled to 4x4 (still ones); channel 2: the CAM of the ramp
    # (flip max [3, 2, 2, 3], min-max -> [1, 0, 0, 1])
    assert out.shape == (1, 3, 4, 4) and torch.equal(out[0, :2], torch.ones(2, 4, 4))
    assert torch.allclose(out[0, 2, 0], torch.tensor([1.0, 0.0, 0.0, 1.0]), atol=1e-4)
