"""DINOHead, MultiCropWrapper and optimiser helpers (specs/sparsam.md §3, §5, §10 items 3-5)."""

import pytest
import timm
import torch
from timm.models.xcit import Xcit
from torch import nn

from common.networks.dino_head import DINOHead, MultiCropWrapper, cancel_last_layer_gradients, dino_param_groups


def _magnitude(head: DINOHead) -> torch.Tensor:
    return head.last_layer.parametrizations.weight.original0


def test_head_output_dim_and_frozen_magnitude():
    torch.manual_seed(0)
    head = DINOHead(in_dim=8, out_dim=32, hidden_dim=16, bottleneck_dim=4, n_layers=4)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 32)
    g = _magnitude(head)
    assert g.shape == (32, 1) and torch.all(g == 1) and not g.requires_grad
    # g = 1: W_k = v_k / ||v_k|| has unit rows, and the input to the last layer is unit-norm, so |out| <= 1
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32), atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6
    out.sum().backward()
    assert g.grad is None
    assert head.last_layer.parametrizations.weight.original1.grad is not None


def test_head_magnitude_trainable_without_norm_last_layer():
    head = DINOHead(in_dim=8, out_dim=32, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert torch.all(_magnitude(head) == 1) and _magnitude(head).requires_grad


def test_head_layers_and_init():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=8, hidden_dim=512, bottleneck_dim=16, n_layers=4)
    kinds = [type(m).__name__ for m in head.mlp]
    # 4 Linear layers 64 -> 512 -> 512 -> 512 -> 16 with GELU between, no BatchNorm
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [(m.in_features, m.out_features) for m in head.mlp[::2]] == [(64, 512), (512, 512), (512, 512), (512, 16)]
    big = head.mlp[2].weight  # 262,144 samples of N(0, 0.02^2) truncated at +-2 (i.e. at 100 sigma: no effect)
    assert big.std().item() == pytest.approx(0.02, rel=0.02) and all(torch.all(m.bias == 0) for m in head.mlp[::2])
    assert [type(m).__name__ for m in DINOHead(4, 8, 6, 3, n_layers=1).mlp] == ["Linear"]
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(4, 8, 6, 3, n_layers=0)


class _CountingBackbone(nn.Module):
    """Fake backbone: records input shapes; feature = per-image channel means, scaled ``[n, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3)) * self.scale


def test_multicrop_runs_backbone_once_per_resolution_group():
    backbone = _CountingBackbone()
    wrapper = MultiCropWrapper(backbone)  # identity head: output = backbone features
    views = [torch.full((2, 3, 8, 8), 0.0), torch.full((2, 3, 8, 8), 1.0)]
    views += [torch.full((2, 3, 4, 4), 2.0 + i) for i in range(3)]
    out = wrapper(views)
    # 2 global views in one call, 3 local views in another
    assert backbone.calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    # view-major rows: view v has value v in every feature
    assert out[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    # groups are consecutive runs: 8, 4, 8 -> three calls
    backbone.calls.clear()
    wrapper([views[0], views[2], views[1]])
    assert backbone.calls == [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 8, 8)]


def test_multicrop_bad_input():
    wrapper = MultiCropWrapper(_CountingBackbone())
    with pytest.raises(ValueError, match="empty"):
        wrapper([])
    with pytest.raises(ValueError, match="view 1"):
        wrapper([torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)])


def test_tiny_xcit_multicrop_forward():
    torch.manual_seed(0)
    backbone = Xcit(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, cls_attn_layers=1, eta=1.0,
        tokens_norm=True, num_classes=0,
    )
    student = MultiCropWrapper(backbone, DINOHead(48, out_dim=128, hidden_dim=64, bottleneck_dim=16, n_layers=4))
    views = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2)] + [torch.rand(2, 3, 16, 16) * 2 - 1 for _ in range(2)]
    out = student(views)
    assert out.shape == (4 * 2, 128) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert backbone.cls_token.grad is not None


def test_param_groups_and_last_layer_gradient_cancelling():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    model = MultiCropWrapper(backbone, DINOHead(5, out_dim=8, hidden_dim=6, bottleneck_dim=3, n_layers=2))
    decayed, not_decayed = dino_param_groups(model)

    def ids(params) -> set[int]:
        return {id(p) for p in params}

    head = model.projection_head
    # decayed: Linear(4,5).weight, mlp Linear(5,6).weight, Linear(6,3).weight, last-layer direction v (all 2-D)
    assert ids(decayed["params"]) == ids(
        [backbone[0].weight, head.mlp[0].weight, head.mlp[2].weight, head.last_layer.parametrizations.weight.original1]
    )
    # not decayed: 3 Linear biases + LayerNorm weight and bias (1-D); frozen magnitude g left out entirely
    assert ids(not_decayed["params"]) == ids(
        [backbone[0].bias, backbone[1].weight, backbone[1].bias, head.mlp[0].bias, head.mlp[2].bias]
    )
    assert not_decayed["weight_decay"] == 0.0 and "weight_decay" not in decayed
    optimiser = torch.optim.AdamW([decayed, not_decayed], lr=1e-3, weight_decay=0.04)
    assert [group["weight_decay"] for group in optimiser.param_groups] == [0.04, 0.0]

    model(torch.randn(2, 4)).sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    cancel_last_layer_gradients(model)
    assert head.last_layer.parametrizations.weight.original1.grad is None
    assert head.mlp[0].weight.grad is not None and backbone[0].weight.grad is not None
    with pytest.raises(ValueError, match="last_layer"):
        cancel_last_layer_gradients(backbone)


def test_xcit_s12_plus_head_matches_official_parameter_count():
    # Official figures (specs/official_figures.md §5, IPMI-ICNS-UKE/sparsam@9457ae3 create_dino_gym defaults):
    # total 52,376,512, trainable 52,310,976, 393 state-dict keys; backbone 25,828,032; head 26,548,480.
    # The official last layer uses legacy weight_norm (weight_g [65536, 1] + weight_v [65536, 256]); torch's
    # parametrisation stores the same two tensors as original0 / original1, so counts and key count are equal:
    # 65,536 + 16,777,216 = 16,842,752, of which g (65,536) is frozen -> 52,376,512 - 65,536 = 52,310,976.
    with torch.device("meta"):  # shapes only: no memory, no init time
        backbone = timm.create_model("xcit_small_12_p8_224", pretrained=False, num_classes=0)
        model = MultiCropWrapper(backbone, DINOHead(384, 65536, 2048, 256, n_layers=4))

    def count(module: nn.Module, trainable: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    assert count(model) == 52_376_512
    assert count(model, trainable=True) == 52_310_976
    assert count(model.backbone) == 25_828_032
    # head: 384*2048+2048 + 2*(2048*2048+2048) + 2048*256+256 = 9,705,728 (mlp) + 16,842,752 (last layer)
    assert count(model.projection_head.mlp) == 9_705_728
    assert count(model.projection_head) == 26_548_480
    assert len(model.state_dict()) == 393
