"""Tests of URPC's losses (common/losses/urpc.py) and of the URPC method (common/engines/dhc_baselines/urpc.py)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data import Dataset
from torch.utils.data import DataLoader

from common.engines.co_training import CoTrainingTrainer, RepeatedRandomSampler
from common.engines.dhc_baselines.urpc import URPC
from common.losses.urpc import DeepSupervisionLoss, URPCConsistency, pyramid_divergence
from common.networks.branches import Branches
from common.networks.unet_ds import UNetDS3D
from common.networks.vnet import VNet

pytestmark = pytest.mark.usefixtures("one_thread")

C = 3
PATCH = (16, 32, 32)
LN3 = math.log(3.0)


def _logits(*values: tuple[float, ...]) -> torch.Tensor:
    """Voxels' logit vectors -> ``[1, C, V]`` (one patch, V voxels)."""
    return torch.tensor(values, dtype=torch.float32).T.unsqueeze(0)


# two heads x two classes; voxel A: head 1 softmax([0, ln 3]) = [0.25, 0.75], head 2 softmax([0, 0]) = [0.5, 0.5];
# voxel B: both heads [0.5, 0.5]
HEAD_1 = _logits((0.0, LN3), (0.0, 0.0))
HEAD_2 = _logits((0.0, 0.0), (0.0, 0.0))


# ---------------------------------------------------------------- consistency, by hand


def test_divergence_is_kl_of_the_mean_from_each_head() -> None:
    probs = torch.stack([torch.softmax(HEAD_1, 1), torch.softmax(HEAD_2, 1)])
    mean, divergence = pyramid_divergence(probs)
    # voxel A: p̄ = ([0.25, 0.75] + [0.5, 0.5]) / 2 = [0.375, 0.625]; voxel B: [0.5, 0.5]
    torch.testing.assert_close(mean, _logits((0.375, 0.625), (0.5, 0.5)))
    assert divergence.shape == (2, 1, 1, 2)
    # D_1,A = 0.375 ln(0.375/0.25) + 0.625 ln(0.625/0.75) = 0.375*0.405465 + 0.625*(-0.182322) = 0.038098
    # D_2,A = 0.375 ln(0.375/0.5)  + 0.625 ln(0.625/0.5)  = 0.375*(-0.287682) + 0.625*0.223144 = 0.031584
    # (KL(p̄ || p_s); the reverse KL(p_1 || p̄) = 0.25 ln(0.25/0.375) + 0.75 ln(0.75/0.625) = 0.035375 would fail)
    # voxel B: p̄ = p_s -> 0
    torch.testing.assert_close(divergence[:, 0, 0, 0], torch.tensor([0.038098, 0.031584]), atol=1e-6, rtol=0)
    assert torch.equal(divergence[:, 0, 0, 1], torch.zeros(2))


def test_rectified_consistency_by_hand() -> None:
    loss = URPCConsistency()([HEAD_1, HEAD_2])
    # w = exp(-D): w_1,A = exp(-0.038098) = 0.962618, w_2,A = exp(-0.031584) = 0.968910, w_s,B = 1
    # squared error at A: (0.375 - 0.25)^2 = (0.625 - 0.75)^2 = 0.015625 for head 1, (0.375 - 0.5)^2 = 0.015625 both
    #   classes for head 2; at B: 0
    # head 1: mean over U*C*V = 1*2*2 = 4 elements: 0.962618 * 2 * 0.015625 / 4 = 0.0075205
    #         / (mean weight (0.962618 + 1) / 2 = 0.981309 + 1e-8) = 0.0076637, + mean D 0.038098 / 2 = 0.019049
    #         L_1 = 0.026713
    # head 2: 0.968910 * 0.03125 / 4 = 0.0075696 / 0.984455 = 0.0076892, + 0.031584 / 2 = 0.015792 -> L_2 = 0.023481
    # L = (0.026713 + 0.023481) / 2 = 0.025097
    assert loss.item() == pytest.approx(0.025097, abs=2e-6)


def test_one_voxel_weight_cancels() -> None:
    # one voxel: w_s * (mean over C of the squared error) / (w_s + 1e-8) = 0.015625, so L_s = 0.015625 + D_s and
    # L = (0.015625 + 0.038098 + 0.015625 + 0.031584) / 2 = 0.050466
    loss = URPCConsistency()([HEAD_1[..., :1], HEAD_2[..., :1]])
    assert loss.item() == pytest.approx(0.050466, abs=2e-6)


def test_identical_heads_give_exactly_zero() -> None:
    torch.manual_seed(0)
    head = torch.randn(2, 4, 4, 4, 4)
    assert URPCConsistency()([head, head, head, head]).item() == 0.0
    assert URPCConsistency()([head, head.clone()]).item() == 0.0


def test_consistency_gradient_is_finite_even_for_saturated_heads() -> None:
    # softmax([0, 200]) underflows to exactly [0, 1]; ln 0 would make the loss infinite
    heads = [torch.tensor([[[0.0], [200.0]]], requires_grad=True), torch.zeros(1, 2, 1, requires_grad=True)]
    loss = URPCConsistency()(heads)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(h.grad).all() for h in heads)
    assert heads[1].grad.abs().sum() > 0  # the saturated head's softmax has zero slope, the other one learns


@pytest.mark.parametrize(
    ("heads", "match"),
    [
        ([torch.zeros(1, 2, 4)], "at least 2"),
        (torch.zeros(2, 1, 2, 4), "sequence"),
        ([torch.zeros(1, 2, 4), torch.zeros(1, 2, 8)], "one shape"),
        ([torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)], "C >= 2"),
    ],
)
def test_bad_heads_are_named(heads, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        URPCConsistency()(heads)


def test_bad_eps_is_named() -> None:
    with pytest.raises(ValueError, match="eps"):
        URPCConsistency(eps=0.0)


# ---------------------------------------------------------------- deep supervision, by hand


def test_deep_supervision_is_half_ce_plus_dice_averaged_over_heads() -> None:
    label = torch.tensor([[1, 0]])  # [L=1, V=2]
    loss = DeepSupervisionLoss()([HEAD_1, HEAD_2], label)
    # head 1: p = [0.25, 0.75] (label 1), [0.5, 0.5] (label 0)
    #   CE = (-ln 0.75 - ln 0.5) / 2 = (0.287682 + 0.693147) / 2 = 0.490415
    #   Dice of class 1 (no background): (2 * 0.75 + 1e-8) / (0.75 + 0.5 + 1 + 1e-8 + 1e-8) = 0.666667 -> -0.666667
    #   ½ (0.490415 - 0.666667) = -0.088126
    # head 2: p = 0.5 everywhere: CE = ln 2 = 0.693147; Dice (2 * 0.5) / (1 + 1) = 0.5 -> ½ (0.693147 - 0.5) = 0.096574
    # mean over the heads: (-0.088126 + 0.096574) / 2 = 0.004224
    assert loss.item() == pytest.approx(0.004224, abs=2e-6)


# ---------------------------------------------------------------- the method


def _tiny_net() -> UNetDS3D:
    torch.manual_seed(0)
    return UNetDS3D(1, C, feature_scale=16)


def _batch(n_labelled: int = 2, n_unlabelled: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(n_labelled + n_unlabelled, 1, *PATCH, generator=gen)
    return image, torch.randint(0, C, (n_labelled, 1, *PATCH), generator=gen)


def test_method_loss_is_finite_with_gradient_and_combines_the_parts() -> None:
    net, method = _tiny_net(), URPC(C)
    assert method.uses_b is False and method.trains_b is False
    assert len(method.state_dict()) == 0  # no iteration-dependent state
    image, label = _batch()
    result = method(net, None, image, label, consistency=0.1, epoch=0)
    assert torch.isfinite(result["loss"]) and result["loss_unsup"] > 0
    torch.testing.assert_close(result["loss"].detach(), result["loss_sup"] + 0.1 * result["loss_unsup"])
    result["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(p.grad.abs().sum() > 0 for p in net.heads.parameters())  # every head is supervised


def test_method_parts_match_the_losses_and_pred_is_the_finest_head() -> None:
    net, method = _tiny_net().eval(), URPC(C)  # eval: no dropout, so the heads are reproducible
    image, label = _batch()
    with torch.no_grad():
        result = method(net, None, image, label, consistency=0.5, epoch=3)
        heads = net.forward_heads(image)
        assert torch.equal(result["pred"], net(image))
        torch.testing.assert_close(result["loss_sup"], DeepSupervisionLoss()([h[:2] for h in heads], label))
        torch.testing.assert_close(result["loss_unsup"], URPCConsistency()([h[2:] for h in heads]))


def test_method_without_unlabelled_patches_has_zero_consistency() -> None:
    image, label = _batch(2, 0)
    result = URPC(C)(_tiny_net(), None, image, label, consistency=0.1, epoch=0)
    assert result["loss_unsup"].item() == 0.0 and torch.equal(result["loss"].detach(), result["loss_sup"])


def test_method_bad_inputs_are_named() -> None:
    image, label = _batch()
    with pytest.raises(ValueError, match="forward_heads"):
        URPC(C)(VNet(1, C, 2), None, image, label, 0.1, 0)
    with pytest.raises(ValueError, match="num_classes=4"):
        URPC(4)(_tiny_net(), None, image, label, 0.1, 0)
    with pytest.raises(ValueError, match="labelled patches"):
        URPC(C)(_tiny_net(), None, image[:1], label, 0.1, 0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        URPC(1)


def test_one_training_iteration_in_the_co_training_trainer() -> None:
    image, label = _batch(2, 2)
    labelled = [{"image": image[i], "label": label[i]} for i in range(2)]
    unlabelled = [{"image": image[2 + j]} for j in range(2)]
    net = Branches(_tiny_net(), branches="A")  # the container CoTrainingTrainer expects (branch_a only)
    before = [p.detach().clone() for p in net.parameters()]
    engine = CoTrainingTrainer(
        device=torch.device("cpu"), max_epochs=1, network=net, loss_function=None, decollate=False,
        train_data_loader=DataLoader(Dataset(labelled), batch_size=2, sampler=RepeatedRandomSampler(2, 2)),
        unlabelled_loader=DataLoader(Dataset(unlabelled), batch_size=2),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=3e-5),
        method=URPC(C), base_lr=0.03, consistency_weight=0.1,
    )
    engine.run()
    assert engine.state.iteration == 1 and math.isfinite(engine.state.output["loss"].item())
    assert engine.state.output["pred"].shape == (4, C, *PATCH)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
