"""DePL debiased pseudo labels and the masked CE against values worked out by hand (specs/dhc.md §9 "depl")."""

import io
import math

import pytest
import torch

from common.losses.debiased_pseudo_labels import DebiasedPseudoLabels, masked_cross_entropy

C = 3
PATCH = (1, 1, 2)  # two voxels per patch


def logits_from(probs: list[list[list[float]]]) -> torch.Tensor:
    """``probs[n][voxel]`` = class probabilities -> logits ``[N, C, 1, 1, 2]`` with softmax(logits) = probs."""
    p = torch.tensor(probs, dtype=torch.float64)  # [N, 2, C]
    return p.log().permute(0, 2, 1).reshape(len(probs), C, *PATCH).float()


def qhat_voxels(module: DebiasedPseudoLabels) -> torch.Tensor:
    """q̂ as [voxel, C]."""
    return module.get_qhat().reshape(C, 2).T


def test_init_uniform_gives_plain_argmax_and_softmax_confidence():
    depl = DebiasedPseudoLabels(C, PATCH)
    assert depl.qhat.shape == (1, C, *PATCH)
    assert torch.allclose(depl.qhat, torch.full_like(depl.qhat, 1 / 3))
    # q̂ = 1/3: softmax(z - ln 1/3) = softmax(z + ln 3) = softmax(z), so labels = argmax p, conf = max p
    # voxel0 p = [.2, .7, .1] -> 1, conf .7 < .9 -> False;  voxel1 p = [.02, .03, .95] -> 2, conf .95 -> True
    labels, mask = depl.pseudo_labels(logits_from([[[0.2, 0.7, 0.1], [0.02, 0.03, 0.95]]]))
    assert labels.dtype == torch.int64 and mask.dtype == torch.bool
    assert labels.shape == (1, *PATCH) and mask.shape == (1, *PATCH)
    assert labels.flatten().tolist() == [1, 2]
    assert mask.flatten().tolist() == [False, True]


def test_ema_over_two_updates():
    depl = DebiasedPseudoLabels(C, PATCH, momentum=0.99)
    # U = 2 unlabelled patches; voxel0: [.6, .2, .2] and [.2, .6, .2] -> mean [.4, .4, .2]
    #                           voxel1: [.1, .1, .8] and [.1, .3, .6] -> mean [.1, .2, .7]
    z_u = logits_from([[[0.6, 0.2, 0.2], [0.1, 0.1, 0.8]], [[0.2, 0.6, 0.2], [0.1, 0.3, 0.6]]])
    # step 1: q = .99 * 1/3 + .01 * mean = .33 + .01 mean
    #   voxel0 [.334, .334, .332], voxel1 [.331, .332, .337]
    out = depl.update(z_u)
    assert torch.allclose(qhat_voxels(depl), torch.tensor([[0.334, 0.334, 0.332], [0.331, 0.332, 0.337]]), atol=1e-6)
    assert torch.allclose(out, depl.qhat) and out.data_ptr() != depl.qhat.data_ptr()
    # step 2: q = .99 q + .01 mean:  voxel0 [.33066 + .004, .33066 + .004, .32868 + .002] = [.33466, .33466, .33068]
    #                                voxel1 [.32769 + .001, .32868 + .002, .33363 + .007] = [.32869, .33068, .34063]
    depl.update(z_u)
    expected = torch.tensor([[0.33466, 0.33466, 0.33068], [0.32869, 0.33068, 0.34063]])
    assert torch.allclose(qhat_voxels(depl), expected, atol=1e-6)
    assert torch.allclose(qhat_voxels(depl).sum(1), torch.ones(2), atol=1e-6)  # stays a distribution per voxel


def test_debiased_labels_and_mask_by_hand():
    depl = DebiasedPseudoLabels(C, PATCH, momentum=0.0)  # μ = 0: q̂ = mean softmax of the last update
    # q̂: voxel0 [.8, .1, .1], voxel1 [.25, .25, .5]
    depl.update(logits_from([[[0.8, 0.1, 0.1], [0.25, 0.25, 0.5]]]))
    assert torch.allclose(qhat_voxels(depl), torch.tensor([[0.8, 0.1, 0.1], [0.25, 0.25, 0.5]]), atol=1e-6)
    # p̃ ∝ p / q̂ (τ = 1)
    # voxel0 p = [.6, .3, .1]:  p/q = [.75, 3, 1], sum 4.75 -> p̃ = [.157895, .631579, .210526]: label 1 (plain
    #         arg-max would be 0), conf .6316 < .9 -> False
    # voxel1 p = [.05, .9, .05]: p/q = [.2, 3.6, .1], sum 3.9 -> p̃ = [.051282, .923077, .025641]: 1, .923 -> True
    z = logits_from([[[0.6, 0.3, 0.1], [0.05, 0.9, 0.05]]])
    probs = depl.debiased_probabilities(z).reshape(C, 2).T
    assert torch.allclose(probs, torch.tensor([[0.75, 3, 1], [0.2, 3.6, 0.1]]) / torch.tensor([[4.75], [3.9]]),
                          atol=1e-6)
    labels, mask = depl.pseudo_labels(z)
    assert labels.flatten().tolist() == [1, 1]
    assert mask.flatten().tolist() == [False, True]
    # q̂ untouched by pseudo_labels
    assert torch.allclose(qhat_voxels(depl), torch.tensor([[0.8, 0.1, 0.1], [0.25, 0.25, 0.5]]), atol=1e-6)
    # τ = 2: p̃ ∝ p / q̂²; voxel0 [.6/.64, .3/.01, .1/.01] = [.9375, 30, 10], sum 40.9375 -> conf 30/40.9375 = .732824
    depl.tau = 2.0
    conf0 = depl.debiased_probabilities(z)[0, :, 0, 0, 0]
    assert math.isclose(float(conf0.max()), 30 / 40.9375, rel_tol=1e-5) and int(conf0.argmax()) == 1
    # threshold .7 now keeps voxel0
    depl.threshold = 0.7
    assert depl.pseudo_labels(z)[1].flatten().tolist() == [True, True]


def test_qhat_broadcasts_over_a_batch_of_four():
    depl = DebiasedPseudoLabels(C, PATCH, momentum=0.0)
    depl.update(logits_from([[[0.8, 0.1, 0.1], [0.25, 0.25, 0.5]]]))
    z = logits_from([[[0.6, 0.3, 0.1], [0.05, 0.9, 0.05]]] * 4)
    labels, mask = depl.pseudo_labels(z)
    assert labels.shape == (4, *PATCH)
    assert labels.reshape(4, 2).tolist() == [[1, 1]] * 4 and mask.reshape(4, 2).tolist() == [[False, True]] * 4


def test_state_dict_round_trip():
    depl = DebiasedPseudoLabels(C, PATCH)
    depl.update(logits_from([[[0.6, 0.2, 0.2], [0.1, 0.1, 0.8]]]))
    buffer = io.BytesIO()
    torch.save(depl.state_dict(), buffer)
    buffer.seek(0)
    other = DebiasedPseudoLabels(C, PATCH)
    other.load_state_dict(torch.load(buffer))
    assert list(depl.state_dict()) == ["qhat"]
    assert torch.equal(other.qhat, depl.qhat)
    z = torch.randn(2, C, *PATCH)
    assert all(torch.equal(a, b) for a, b in zip(other.pseudo_labels(z), depl.pseudo_labels(z)))


# masked CE: 4 voxels, logits = log p:  v0 p=[.5,.25,.25] y=0, v1 p=[.2,.6,.2] y=1, v2 p=[.1,.1,.8] y=2,
# v3 p=[.25,.25,.5] y=2 -> ℓ = [ln 2, -ln .6, -ln .8, ln 2] = [.693147, .510826, .223144, .693147]
CE_PROBS = [[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]], [[0.1, 0.1, 0.8], [0.25, 0.25, 0.5]]]
CE_LABELS = torch.tensor([0, 1, 2, 2]).reshape(2, *PATCH)
CE_MASK = torch.tensor([True, False, True, False]).reshape(2, *PATCH)


def test_masked_cross_entropy_by_hand():
    z = logits_from(CE_PROBS).requires_grad_(True)
    # kept v0, v2: (ln 2 - ln .8) / 2 = (.693147 + .223144) / 2 = .458146
    loss = masked_cross_entropy(z, CE_LABELS, CE_MASK)
    assert math.isclose(float(loss.detach()), (math.log(2) - math.log(0.8)) / 2, rel_tol=1e-5)
    # "all": same sum over the 4 voxels -> .916291 / 4 = .229073
    assert math.isclose(float(masked_cross_entropy(z, CE_LABELS, CE_MASK, normalise="all").detach()),
                        (math.log(2) - math.log(0.8)) / 4, rel_tol=1e-5)
    # [N, 1, *spatial] labels and a float mask give the same value
    same = masked_cross_entropy(z, CE_LABELS.unsqueeze(1), CE_MASK.float().unsqueeze(1))
    assert math.isclose(float(same.detach()), float(loss.detach()), rel_tol=1e-6)
    loss.backward()
    # masked-out voxels get no gradient
    grad = z.grad.reshape(2, C, 2)
    assert torch.all(grad[0, :, 1] == 0) and torch.all(grad[1, :, 1] == 0) and grad[0, :, 0].abs().sum() > 0


def test_masked_cross_entropy_all_masked_out_is_zero_with_gradient():
    z = logits_from(CE_PROBS).requires_grad_(True)
    for normalise in ("mask", "all"):
        loss = masked_cross_entropy(z, CE_LABELS, torch.zeros_like(CE_MASK), normalise=normalise)
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grad).all() and torch.all(grad == 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_classes=1, patch_size=PATCH), dict(num_classes=C, patch_size=()),
     dict(num_classes=C, patch_size=(1, 0, 2)), dict(num_classes=C, patch_size=PATCH, momentum=1.5),
     dict(num_classes=C, patch_size=PATCH, tau=-1.0), dict(num_classes=C, patch_size=PATCH, threshold=1.2)],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        DebiasedPseudoLabels(**kwargs)


def test_bad_inputs():
    depl = DebiasedPseudoLabels(C, PATCH)
    with pytest.raises(ValueError, match="logits must be"):
        depl.update(torch.randn(2, C + 1, *PATCH))
    with pytest.raises(ValueError, match="logits must be"):
        depl.pseudo_labels(torch.randn(2, C, 1, 2, 2))  # wrong patch shape
    z = logits_from(CE_PROBS)
    with pytest.raises(ValueError, match="must be"):
        masked_cross_entropy(z, CE_LABELS, CE_MASK[:1])
    with pytest.raises(ValueError, match="labels must lie"):
        masked_cross_entropy(z, CE_LABELS + 1, CE_MASK)
    with pytest.raises(ValueError, match="normalise"):
        masked_cross_entropy(z, CE_LABELS, CE_MASK, normalise="sum")
    with pytest.raises(ValueError, match="logits must be"):
        masked_cross_entropy(torch.randn(4, C), CE_LABELS, CE_MASK)
