"""CD-TG plug-in (specs/cdtg.md §5.4-§5.6, §7.3 items 5 and 6): SGU closed form, fusion, ADaIN."""

import math

import pytest
import torch
from torch import nn

from common.networks.cdtg import (STYLE_KINDS, FeatureStyleAugment, SemanticGuidedUnit, TextGuidedPrototypes,
                                  adain)
from common.networks.prototypes import masked_average_pool


def _randomise(module: nn.Module) -> nn.Module:
    # default init zeroes the attention biases and sets LN to (1, 0): draw everything so no term hides
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def test_sgu_closed_form_equals_multihead_attention():
    torch.manual_seed(0)
    sgu = _randomise(SemanticGuidedUnit(channels=16, text_dim=12, heads=4))
    feats, text = torch.randn(2, 16, 5, 4), torch.randn(2, 12)
    closed, literal = sgu(feats, text), sgu(feats, text, literal=True)
    assert closed.shape == (2, 16, 5, 4)
    assert torch.allclose(closed, literal, atol=1e-5)
    # the closed form by hand: u = W_o (W_v MLP(e) + b_v) + b_o, then LayerNorm over the channels at every x
    w_v, b_v = sgu.attention.in_proj_weight[32:], sgu.attention.in_proj_bias[32:]
    u = sgu.attention.out_proj.weight @ (w_v @ sgu.text_mlp(text)[0] + b_v) + sgu.attention.out_proj.bias
    x = feats[0, :, 2, 3] + u
    expected = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5) * sgu.norm.weight + sgu.norm.bias
    assert torch.allclose(closed[0, :, 2, 3], expected, atol=1e-5)


def test_sgu_query_and_key_weights_get_no_gradient():
    sgu = _randomise(SemanticGuidedUnit(8, 4, heads=2))
    sgu(torch.randn(1, 8, 3, 3), torch.randn(1, 4)).sum().backward()
    grad = sgu.attention.in_proj_weight.grad
    assert grad[:16].abs().sum() == 0  # W_q, W_k rows
    assert grad[16:].abs().sum() > 0  # W_v rows


def test_sgu_refuses_bad_shapes():
    with pytest.raises(ValueError, match="divisible by heads"):
        SemanticGuidedUnit(12, 4, heads=8)
    sgu = SemanticGuidedUnit(8, 4, heads=2)
    with pytest.raises(ValueError, match=r"features must be \[B, 8"):
        sgu(torch.randn(1, 6, 3, 3), torch.randn(1, 4))
    with pytest.raises(ValueError, match="text must be"):
        sgu(torch.randn(1, 8, 3, 3), torch.randn(1, 5))


def test_sgu_parameter_count_by_hand():
    # C = d = 512: MLP 512*512 + 512 + 512*512 + 512 = 525,312; in_proj 3*512*512 + 3*512 = 787,968;
    # out_proj 512*512 + 512 = 262,656; LayerNorm 2*512 = 1,024; total 1,576,960
    assert sum(p.numel() for p in SemanticGuidedUnit(512, 512).parameters()) == 1_576_960
    # ResNet-50 stages (512, 1024, 2048) with d = 512, per stage C: 512C + C + C^2 + C + 3C^2 + 3C + C^2 + C + 2C
    # = 5C^2 + 520C -> 1,576,960 + 5,775,360 (C=1024: 5,242,880 + 532,480) + 22,036,480 (C=2048: 20,971,520
    # + 1,064,960) = 29,388,800
    guide = TextGuidedPrototypes((512, 1024, 2048), text_dim=512)
    assert sum(p.numel() for p in guide.parameters()) == 29_388_800
    assert set(guide.sgu.keys()) == {"0", "1", "2"}
    assert sum(p.numel() for p in TextGuidedPrototypes((512, 1024, 2048), guided_stages=(0,)).parameters()) \
        == 1_576_960


def _guide_with_known_units(alpha: float) -> TextGuidedPrototypes:
    guide = TextGuidedPrototypes((4, 8), text_dim=3, alpha=alpha, heads=2, style_augment=False)
    return _randomise(guide)


def test_fuse_is_the_convex_mix_per_episode_and_level():
    torch.manual_seed(1)
    guide = _guide_with_known_units(alpha=0.25)
    feat = torch.randn(2, 8, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0  # episode 0: top half; episode 1: one soft pixel
    mask[1, 0, 3, 3] = 0.5
    p_f, p_b = torch.randn(2, 8), torch.randn(2, 8)
    cls, bg = torch.randn(2, 3), torch.randn(2, 3)
    fused_f, fused_b = guide.fuse(1, feat, mask, p_f, p_b, cls, bg)
    unit = guide.sgu["1"]
    for b in range(2):  # each episode alone gives the same result: nothing is averaged across the batch
        t_f = masked_average_pool(unit(feat[b:b + 1], cls[b:b + 1]), mask[b:b + 1])[0]
        t_b = masked_average_pool(unit(feat[b:b + 1], bg[b:b + 1]), 1 - mask[b:b + 1])[0]
        assert torch.allclose(fused_f[b], 0.75 * p_f[b] + 0.25 * t_f, atol=1e-5)
        assert torch.allclose(fused_b[b], 0.75 * p_b[b] + 0.25 * t_b, atol=1e-5)
    # alpha = 0 keeps the visual prototypes, alpha = 1 gives the text prototypes only
    guide.alpha = 0.0
    assert torch.allclose(guide.fuse(1, feat, mask, p_f, p_b, cls, bg)[0], p_f)
    guide.alpha = 1.0
    t_f0 = masked_average_pool(unit(feat, cls), mask)
    assert torch.allclose(guide.fuse(1, feat, mask, p_f, p_b, cls, bg)[0], t_f0, atol=1e-6)


def test_unguided_stage_and_bad_text():
    guide = TextGuidedPrototypes((4, 8), text_dim=3, heads=2, guided_stages=(1,))
    assert list(guide.sgu.keys()) == ["1"]
    p_f, p_b = torch.randn(1, 4), torch.randn(1, 4)
    out = guide.fuse(0, torch.randn(1, 4, 2, 2), torch.ones(1, 1, 2, 2), p_f, p_b, torch.randn(1, 3),
                     torch.randn(1, 3))
    assert out[0] is p_f and out[1] is p_b
    with pytest.raises(ValueError, match="dimension 5 but text_dim is 3"):
        guide.fuse(1, torch.randn(1, 8, 2, 2), torch.ones(1, 1, 2, 2), torch.randn(1, 8), torch.randn(1, 8),
                   torch.randn(1, 5), torch.randn(1, 3))
    with pytest.raises(ValueError, match="background_text has dimension 4"):
        guide.fuse(1, torch.randn(1, 8, 2, 2), torch.ones(1, 1, 2, 2), torch.randn(1, 8), torch.randn(1, 8),
                   torch.randn(1, 3), torch.randn(1, 4))
    with pytest.raises(ValueError, match="stage 2 out of range"):
        guide.fuse(2, torch.randn(1, 8, 2, 2), torch.ones(1, 1, 2, 2), p_f, p_b, torch.randn(1, 3),
                   torch.randn(1, 3))
    with pytest.raises(ValueError, match="guided_stages"):
        TextGuidedPrototypes((4, 8), guided_stages=(2,))
    with pytest.raises(ValueError, match="alpha"):
        guide.alpha = 1.5


def test_adain_by_hand():
    # F = [1, 2, 3, 4]: mu 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, sigma 1.290994
    # S = [0, 0, 2, 2]: mu 1, unbiased var 4/3, sigma 1.154701
    # F'(1) = 1.154701 * (1 - 2.5) / (1.290994 + 1e-5) + 1 = 0.894420 * (-1.5) + 1 = -0.341630
    # (without the eps the ratio would be sqrt(4/5) = 0.894427 and F'(1) = -0.341641)
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    s = torch.tensor([0.0, 0.0, 2.0, 2.0]).view(1, 1, 2, 2)
    ratio = math.sqrt(4 / 3) / (math.sqrt(5 / 3) + 1e-5)
    expected = torch.tensor([ratio * (v - 2.5) + 1.0 for v in (1.0, 2.0, 3.0, 4.0)]).view(1, 1, 2, 2)
    assert torch.allclose(adain(f, s), expected, atol=1e-6)
    assert adain(f, s)[0, 0, 0, 0].item() == pytest.approx(-0.341630, abs=2e-6)
    # where sigma(F) is comparable to eps the unbiased std shows: F = 1e-5 [1, 2, 3, 4], sigma_F = 1.290994e-5,
    # F'(1) = 1.154701 * (-1.5e-5) / (1.290994e-5 + 1e-5) + 1 = -1.732051e-5 / 2.290994e-5 + 1 = 0.243974
    # (biased std would give 1.0 * (-1.5e-5) / (1.118034e-5 + 1e-5) + 1 = 0.291796)
    assert adain(f * 1e-5, s)[0, 0, 0, 0].item() == pytest.approx(0.243974, abs=1e-5)
    with pytest.raises(ValueError, match="unbiased std"):
        adain(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


@pytest.mark.parametrize("kind", STYLE_KINDS)
def test_style_augment_takes_the_style_statistics(kind):
    aug = FeatureStyleAugment(0.3).train()
    torch.manual_seed(2)
    feats = torch.randn(2, 6, 5, 5) * 2 + 1
    torch.manual_seed(3)
    style = aug.stylise(feats, kind)
    torch.manual_seed(3)
    out = aug(feats, kind)
    mu_o, sd_o = out.flatten(2).mean(2), out.flatten(2).std(2)
    mu_s, sd_s = style.flatten(2).mean(2), style.flatten(2).std(2)
    assert torch.allclose(mu_o, mu_s, atol=1e-5)
    assert torch.allclose(sd_o, sd_s, rtol=1e-4, atol=1e-6)  # sigma_S * sigma_F / (sigma_F + 1e-5)


def test_styles_by_hand():
    aug = FeatureStyleAugment(0.3)
    torch.manual_seed(4)
    feats = torch.randn(1, 3, 4, 4)
    # contrast: ReLU(1.3 F); low_contrast: mu + 0.3 (F - mu)
    assert torch.allclose(aug.stylise(feats, "contrast"), torch.relu(1.3 * feats))
    mu = feats.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(aug.stylise(feats, "low_contrast"), mu + 0.3 * (feats - mu))
    # noise: F + 0.3 N(0, 1) from the global RNG
    torch.manual_seed(5)
    noise = torch.randn_like(feats)
    torch.manual_seed(5)
    assert torch.allclose(aug.stylise(feats, "noise"), feats + 0.3 * noise)
    # boundary: F + 0.3 DW(F), DW a fresh default-initialised depthwise 3x3 conv (with bias) each call
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    torch.manual_seed(7)
    assert torch.allclose(aug.stylise(feats, "boundary"), feats + 0.3 * conv(feats), atol=1e-6)
    assert not torch.allclose(aug.stylise(feats, "boundary"), aug.stylise(feats, "boundary"))
    with pytest.raises(ValueError, match="unknown style"):
        aug.stylise(feats, "blur")


def test_style_augment_is_identity_in_eval_and_seeded():
    aug = FeatureStyleAugment()
    feats = torch.randn(2, 4, 6, 6)
    assert aug.eval()(feats) is feats
    aug.train()
    torch.manual_seed(11)
    first = [aug(feats) for _ in range(6)]
    torch.manual_seed(11)
    second = [aug(feats) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.allclose(a, first[0]) for a in first[1:])  # the draws differ between calls


def test_guide_augment_only_when_training_with_the_flag():
    feats = [torch.randn(1, 4, 3, 3), torch.randn(1, 8, 2, 2)]
    guide = TextGuidedPrototypes((4, 8), text_dim=3, heads=2)
    assert all(a is b for a, b in zip(guide.eval().augment(feats), feats))
    torch.manual_seed(0)
    out = guide.train().augment(feats)
    assert len(out) == 2 and not torch.allclose(out[0], feats[0])
    guide.style_augment = False
    assert all(a is b for a, b in zip(guide.augment(feats), feats))
