"""Tests of SS-Net's losses, memory bank (common/losses/ssnet.py) and its DHC baseline method
(common/engines/dhc_baselines/ssnet.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from common.engines.dhc_baselines.ssnet import SSNet
from common.losses.ssnet import (
    PrototypeMemory,
    class_separation_loss,
    frozen_batchnorm_stats,
    kl_distance,
    soft_dice_distance,
    vat_loss,
)
from common.networks.vnet import VNet
from common.networks.vnet_ssnet import SSNetVNet


def _linear(weight: list[float], bias: float = 0.0) -> nn.Linear:
    layer = nn.Linear(len(weight), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


class _Recorder(nn.Module):
    """Logits ``(0, x)`` per voxel (a 1x1x1 convolution with weights 0 and 1); remembers every input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.conv(x)


# ---------------------------------------------------------------- distances

def test_soft_dice_distance_by_hand() -> None:
    # one sample, two voxels: q = (0.8, 0.2) with label 0, q = (0.4, 0.6) with label 1
    probs = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).view(1, 2, 1, 1, 2)
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 1, 2)
    # D_0 = 2 * 0.8 / (1.2 + 1) = 0.727273;  D_1 = 2 * 0.6 / (0.8 + 1) = 0.666667;  -(D_0 + D_1) / 2 = -0.696970
    assert soft_dice_distance(probs, onehot).item() == pytest.approx(-0.696970, abs=1e-6)
    assert soft_dice_distance(onehot, onehot).item() == pytest.approx(-1.0, abs=1e-6)


def test_kl_distance_by_hand() -> None:
    p = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).view(1, 2, 1, 1, 2)
    q = torch.tensor([[0.25, 0.5], [0.75, 0.5]]).view(1, 2, 1, 1, 2)
    # voxel 1: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147 - 0.405465) = 0.143841
    # voxel 2: 1 ln(1/0.5) + 0 (0 ln 0 = 0) = 0.693147;  mean = 0.418494
    assert kl_distance(q, p).item() == pytest.approx(0.418494, abs=1e-6)


def test_distances_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 4\).*\(1, 3, 4\)"):
        soft_dice_distance(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="kl_distance"):
        kl_distance(torch.zeros(2, 4), torch.zeros(2, 4))


# ---------------------------------------------------------------- VAT

def _vat_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = 0 on 2 samples x 2 voxels, p = softmax(0, 0) = 0.5 everywhere, initial directions (3, 4) and (-4, 3)."""
    image = torch.zeros(2, 1, 1, 1, 2)
    target = torch.full((2, 2, 1, 1, 2), 0.5)
    direction = torch.tensor([[3.0, 4.0], [-4.0, 3.0]]).view(2, 1, 1, 1, 2)
    return image, target, direction


def test_vat_direction_dice_by_hand() -> None:
    image, target, direction = _vat_batch()
    net = _Recorder()
    lds = vat_loss(net, image, target, xi=10.0, epsilon=10.0, distance="dice", direction=direction)
    # unit directions (0.6, 0.8) and (-0.8, 0.6) -> probed logits x + ξd = (6, 8) and (-8, 6)
    probe = net.inputs[0].view(2, 2)
    torch.testing.assert_close(probe, torch.tensor([[6.0, 8.0], [-8.0, 6.0]]), rtol=0, atol=1e-5)
    # With q_v = σ(r_v) and S = Σ_v q_v over the 4 voxels: Σ p_1 = Σ p_0 = 2, so D_1 = S/(S+2), D_0 = (4-S)/(6-S)
    # and Dist = -(D_0 + D_1)/2;  dDist/dS = -[1/(S+2)² - 1/(6-S)²] = 0.070666 > 0 at S = 2.995055,
    # so ∂Dist/∂r_v = 0.0707 σ'(r_v): σ'(6) = 0.0024665, σ'(8) = σ'(-8) = 0.00033524 (norm 0.0024892)
    # sample 1: (0.0024665, 0.00033524) / 0.0024892 = (0.990889, 0.134678); sample 2 mirrored: (0.134678, 0.990889)
    # (the adversarial direction flips the sign of sample 2's first voxel); r_adv = 10 * direction
    r_adv = net.inputs[-1].view(2, 2)
    torch.testing.assert_close(r_adv, torch.tensor([[9.90889, 1.34678], [1.34678, 9.90889]]), rtol=0, atol=1e-4)
    # LDS: q = σ(9.90889) = 0.999950, σ(1.34678) = 0.793602 -> S = 2 (0.999950 + 0.793602) = 3.587105
    # D_1 = 3.587105 / 5.587105 = 0.642033;  D_0 = 0.412895 / 2.412895 = 0.171120;  LDS = -0.406577
    assert lds.item() == pytest.approx(-0.406577, abs=1e-5)
    assert len(net.inputs) == 2  # one power iteration + the final pass (p(x) is given, not recomputed)


def test_vat_direction_kl_by_hand() -> None:
    image, target, direction = _vat_batch()
    net = _Recorder()
    vat_loss(net, image, target, distance="kl", direction=direction)
    # ∂KL(p‖q)/∂r_v = (q_1v - p_1v) / 4 (4 voxels in the mean): sample 1 (σ(6) - 0.5, σ(8) - 0.5)
    # = (0.497527, 0.499665) -> unit (0.705590, 0.708621); sample 2 (σ(-8) - 0.5, σ(6) - 0.5) -> (-0.708621, 0.705590)
    torch.testing.assert_close(net.inputs[-1].view(2, 2),
                               torch.tensor([[7.05590, 7.08621], [-7.08621, 7.05590]]), rtol=0, atol=1e-4)


def test_vat_gradient_reaches_parameters_only_through_final_pass() -> None:
    image, target, direction = _vat_batch()
    net = _Recorder()
    lds = vat_loss(net, image, target, direction=direction)
    assert net.conv.weight.grad is None  # the power iteration differentiates with respect to d only
    lds.backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_vat_leaves_batchnorm_statistics_untouched() -> None:
    torch.manual_seed(0)
    net = VNet(1, 3, n_filters=4).train()
    image = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        target = torch.softmax(net(image), dim=1)  # one ordinary pass: num_batches_tracked = 1
    before = copy.deepcopy(net.state_dict())
    lds = vat_loss(net, image, target)
    assert torch.isfinite(lds)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # no running_mean / running_var / counter moved
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    assert bns and all(m.track_running_stats for m in bns)  # flags restored
    with torch.no_grad():
        net(image)
    assert int(bns[0].num_batches_tracked) == 2  # ordinary passes update again afterwards


def test_frozen_batchnorm_stats_restores_after_error() -> None:
    bn = nn.BatchNorm1d(2)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_batchnorm_stats(bn):
            assert not bn.track_running_stats
            raise RuntimeError("boom")
    assert bn.track_running_stats


def test_vat_bad_arguments() -> None:
    image, target, direction = _vat_batch()
    net = _Recorder()
    with pytest.raises(ValueError, match="xi and epsilon"):
        vat_loss(net, image, target, xi=0.0)
    with pytest.raises(ValueError, match="power_iterations"):
        vat_loss(net, image, target, power_iterations=0)
    with pytest.raises(ValueError, match="distance must be one of"):
        vat_loss(net, image, target, distance="l2")
    with pytest.raises(ValueError, match="target"):
        vat_loss(net, image, target[:1])
    with pytest.raises(ValueError, match="direction"):
        vat_loss(net, image, target, direction=direction[:1])


# ---------------------------------------------------------------- class separation

def _separation_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # class 1: z_a = (1, 0), z_b = (1, 1); class 0: two features but an empty bank (skipped, still counted in 1/C)
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 0])
    bank = torch.zeros(2, 2, 2)
    bank[1] = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: m_1 = (1, 0), m_2 = (0, 1)
    return features, labels, bank, torch.tensor([0, 2])


def test_class_separation_loss_by_hand() -> None:
    features, labels, bank, count = _separation_example()
    selectors = [_linear([0.0, 0.0]), _linear([0.0, 1.0])]  # S_1(z) = z[1]
    loss = class_separation_loss(features, labels, bank, count, selectors)
    # dist = 1 - cos: z_a -> (0, 1); z_b -> (1 - 1/√2, 1 - 1/√2) = (0.292893, 0.292893)
    # s = (σ(0), σ(1)) = (0.5, 0.731059); w = 2 s / Σ s = (0.812309, 1.187691)
    # mean_ij w_i dist_ij = (0.812309 + 2 * 0.292893 * 1.187691) / 4 = 0.377011;  / C = 2 -> 0.188505
    assert loss.item() == pytest.approx(0.188505, abs=1e-6)


def test_class_separation_loss_memory_weights_by_hand() -> None:
    features, labels, bank, count = _separation_example()
    selectors = [_linear([0.0, 0.0]), _linear([0.0, 1.0])]
    memory_selectors = [_linear([0.0, 0.0]), _linear([1.0, 0.0])]  # on normalised memory: σ(1), σ(0)
    loss = class_separation_loss(features, labels, bank, count, selectors, memory_selectors)
    # w' = 2 (0.731059, 0.5) / 1.231059 = (1.187691, 0.812309); pairs w_i w'_j dist_ij:
    # (a, 2): 0.812309 * 0.812309 * 1 = 0.659846;  (b, 1): 1.187691 * 1.187691 * 0.292893 = 0.413158;
    # (b, 2): 1.187691 * 0.812309 * 0.292893 = 0.282575;  sum / 4 / 2 = 0.169447
    assert loss.item() == pytest.approx(0.169447, abs=1e-6)


def test_class_separation_loss_gradients_and_skips() -> None:
    features, labels, bank, count = _separation_example()
    features.requires_grad_(True)
    selectors = [_linear([0.0, 0.0]), _linear([0.0, 1.0])]
    class_separation_loss(features, labels, bank, count, selectors).backward()
    assert features.grad[:2].abs().sum() > 0 and features.grad[2:].abs().sum() == 0  # class 0 skipped
    # the selector reads detached features: the features' gradient is that of the distances with the weights
    # w = (0.812309, 1.187691) held constant
    reference = features.detach()[:2].clone().requires_grad_(True)
    dist = 1.0 - nn.functional.normalize(reference, dim=1) @ torch.eye(2)  # bank (1, 0), (0, 1)
    (torch.tensor([[0.812309], [1.187691]]) * dist).mean().div(2).backward()
    torch.testing.assert_close(features.grad[:2], reference.grad, rtol=0, atol=1e-6)
    assert selectors[1].weight.grad.abs().sum() > 0 and selectors[0].weight.grad is None
    # one feature of a class, or one bank entry, is not enough: the loss is 0
    assert class_separation_loss(features[:1], labels[:1], bank, count, selectors).item() == 0.0
    assert class_separation_loss(features, labels, bank, torch.tensor([0, 1]), selectors).item() == 0.0


def test_class_separation_loss_bad_inputs() -> None:
    features, labels, bank, count = _separation_example()
    selectors = [_linear([0.0, 0.0]), _linear([0.0, 1.0])]
    with pytest.raises(ValueError, match=r"features must be \[V, 2\]"):
        class_separation_loss(features[:, :1], labels, bank, count, selectors)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        class_separation_loss(features, torch.tensor([1, 1, 0, 2]), bank, count, selectors)
    with pytest.raises(ValueError, match="selectors"):
        class_separation_loss(features, labels, bank, count, selectors[:1])


# ---------------------------------------------------------------- memory bank

class _Forbidden(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a class with at most K features must not be ranked")


@pytest.mark.parametrize(("keep_highest", "expected"), [(False, [[1.0, 0.0], [2.0, 0.0]]),
                                                         (True, [[3.0, 0.0], [2.0, 0.0]])])
def test_memory_update_by_hand(keep_highest: bool, expected: list[list[float]]) -> None:
    memory = PrototypeMemory(3, size=2, feature_dim=2, keep_highest=keep_highest)
    memory.bank[0] = torch.tensor([[9.0, 9.0], [8.0, 8.0]])
    memory.bank[2] = torch.tensor([[7.0, 7.0], [6.0, 6.0]])
    memory.count.copy_(torch.tensor([2, 0, 2]))
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 7.0], [2.0, 0.0]])
    labels = torch.tensor([1, 1, 2, 1])
    # S_1(z) = z[0] - 2: scores σ(-1), σ(1), σ(0) for (1,0), (3,0), (2,0); ascending (1,0), (2,0), (3,0)
    # original (ascending sort, first K = 2): (1,0), (2,0); keep_highest: (3,0), (2,0)
    memory.update(features, labels, [_Forbidden(), _linear([1.0, 0.0], -2.0), _Forbidden()])
    torch.testing.assert_close(memory.bank[1], torch.tensor(expected))
    # class 2: one feature <= K, stored unranked and replacing both old entries; class 0 absent: kept
    torch.testing.assert_close(memory.bank[2], torch.tensor([[0.0, 7.0], [0.0, 0.0]]))
    torch.testing.assert_close(memory.bank[0], torch.tensor([[9.0, 9.0], [8.0, 8.0]]))
    assert memory.count.tolist() == [2, 2, 1]
    assert set(memory.state_dict()) == {"bank", "count"}


def test_memory_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size >= 2"):
        PrototypeMemory(3, size=1)
    memory = PrototypeMemory(3, size=2, feature_dim=2)
    with pytest.raises(ValueError, match=r"labels must be \[V\] = \[2\]"):
        memory.update(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long), [_linear([0.0, 0.0])] * 3)
    with pytest.raises(ValueError, match="2 selectors for 3 classes"):
        memory.update(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), [_linear([0.0, 0.0])] * 2)


# ---------------------------------------------------------------- the method

def _method_setup(seed: int = 0) -> tuple[SSNetVNet, torch.Tensor, torch.Tensor]:
    """Tiny SSNetVNet (f = 4, C = 3), 2 labelled + 2 unlabelled 16^3 patches; the labels are the network's own
    arg-max in train mode (deterministic without dropout), so every predicted foreground voxel is correct and feeds
    the bank."""
    torch.manual_seed(seed)
    net = SSNetVNet(1, 3, n_filters=4).train()
    image = torch.randn(4, 1, 16, 16, 16)
    probe = copy.deepcopy(net)
    with torch.no_grad():
        label = probe(image).argmax(dim=1, keepdim=True)[:2]
    return net, image, label


def test_method_forward_finite_with_gradients_and_bank() -> None:
    net, image, label = _method_setup()
    method = SSNet(3, feature_dim=8, memory_size=4)
    assert {"memory.bank", "memory.count"} <= set(method.state_dict())
    out = method(net, None, image, label, 0.1, 0)
    for key in ("loss", "loss_sup", "loss_unsup", "loss_vat", "loss_sep_labelled", "loss_sep_unlabelled"):
        assert torch.isfinite(out[key]), key
    assert out["pred"].shape == (4, 3, 16, 16, 16) and not out["pred"].requires_grad
    # loss = sup + λ (LDS + 0.1 (sep_l + sep_u)), sup = minus a mean Dice in [-1, 0]
    expected = out["loss_sup"] + 0.1 * (out["loss_vat"] + 0.1 * (out["loss_sep_labelled"] + out["loss_sep_unlabelled"]))
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    # sup = -(1/C) Σ_c (2 Σ p g + 1e-8) / (Σ p + Σ g + 2e-8) on the 2 labelled patches, background included
    probs = torch.softmax(out["pred"][:2], dim=1)
    onehot = nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    dims = (0, 2, 3, 4)
    dice = (2 * (probs * onehot).sum(dims) + 1e-8) / (probs.sum(dims) + onehot.sum(dims) + 2e-8)
    assert out["loss_sup"].item() == pytest.approx(-dice.mean().item(), abs=1e-6)
    assert torch.equal(out["pseudo"], out["pred"][2:].argmax(dim=1))  # unlabelled classes: plain arg-max
    assert not method.memory.keep_highest and not method.weight_memory  # the original's choices by default
    # the bank was fed with up to K = 4 projected features of each predicted foreground class, never background
    predicted = set(label.unique().tolist())
    assert method.memory.count[0] == 0
    assert all(int(method.memory.count[c]) == (4 if c in predicted else 0) for c in (1, 2))
    assert method.memory.bank.abs().sum() > 0
    out["loss"].backward()
    for name, module in (("vnet", net.block_one), ("projection", net.projection_head),
                         ("prediction", net.prediction_head), ("selector", net.class_selectors[max(predicted)])):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None for p in net.memory_selectors.parameters())  # original: memory weights are 1


def test_method_with_memory_weights_trains_memory_selectors() -> None:
    net, image, label = _method_setup()
    method = SSNet(3, feature_dim=8, memory_size=4, weight_memory=True, keep_highest=True, vat_distance="kl")
    method(net, None, image, label, 0.1, 0)  # first call only fills the bank
    out = method(net, None, image, label, 0.1, 0)
    out["loss"].backward()
    fg = int(label.max())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.memory_selectors[fg].parameters())


def test_method_batchnorm_moves_once_per_iteration() -> None:
    # the VAT passes are frozen and p(x) comes from the training pass: each BatchNorm3d counts exactly one batch
    net, image, label = _method_setup()
    SSNet(3, feature_dim=8, memory_size=4)(net, None, image, label, 0.1, 0)
    counts = {int(m.num_batches_tracked) for m in net.modules() if isinstance(m, nn.BatchNorm3d)}
    assert counts == {1}
    assert net.projection_head.training  # eval-mode projection for the bank restored the mode


def test_method_zero_consistency_leaves_dice_only() -> None:
    net, image, label = _method_setup()
    out = SSNet(3, feature_dim=8, memory_size=4)(net, None, image, label, 0.0, 0)
    assert out["loss"].item() == pytest.approx(out["loss_sup"].item(), abs=1e-7)
    assert SSNet.uses_b is False and SSNet.trains_b is False


def test_method_bad_inputs() -> None:
    net, image, label = _method_setup()
    method = SSNet(3, feature_dim=8)
    with pytest.raises(ValueError, match="must be an SSNetVNet"):
        method(VNet(1, 3, n_filters=4), None, image, label, 0.1, 0)
    with pytest.raises(ValueError, match="feature_dim 8.*feature_dim=64"):
        SSNet(3)(net, None, image, label, 0.1, 0)
    with pytest.raises(ValueError, match=r"label \[L, 1, D, H, W\]"):
        method(net, None, image, label[:, 0], 0.1, 0)
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 3\)"):
        method(net, None, image, label + 3, 0.1, 0)
    with pytest.raises(ValueError, match="contrastive_weight"):
        SSNet(3, contrastive_weight=-1.0)
    with pytest.raises(ValueError, match="vat_distance"):
        SSNet(3, vat_distance="mse")
    with pytest.raises(ValueError, match="epsilon"):
        SSNet(3, epsilon=0.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SSNet(1)
