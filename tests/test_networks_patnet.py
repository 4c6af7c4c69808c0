"""PATNet (specs/cdtg.md §4.1-§4.7, §5.6; official_figures.md §3): official counts and shapes, anchor
transformation, hypercorrelation, frozen backbone, text hook, tiny-backbone training."""

import pytest
import torch
from torch import nn
from torchvision.models.resnet import ResNet

import common.networks.patnet as patnet_module
from common.networks.patnet import (
    PATNet,
    anchor_transform,
    apply_anchor_transform,
    build_resnet_backbone,
    extract_bottleneck_features,
    hypercorrelation,
    patnet_resnet50,
)
from common.networks.prototypes import resize_mask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(layers=(1, 2, 1, 2), widths=(4, 8, 8, 16))  # 2 + 1 + 2 = 5 levels; channels 32, 32, 64


def tiny_net(seed: int = 0, **kwargs) -> PATNet:
    torch.manual_seed(seed)
    return PATNet(**TINY, **kwargs)


def episode(size: int = 64, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    q, s = torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)
    sm, qm = torch.zeros(batch, size, size), torch.zeros(batch, size, size)
    sm[:, size // 4:, size // 4:] = 1  # reaches the corner, so the 2x2 layer4 grid (64 px) sees foreground
    qm[:, size // 8:5 * size // 8, size // 4:3 * size // 4] = 1
    return q, s, sm, qm


@pytest.fixture(scope="module")
def resnet50_patnet() -> PATNet:
    torch.manual_seed(0)
    return patnet_resnet50()


def test_official_resnet50_counts(resnet50_patnet):
    # official_figures.md §3 (slei109/PATNet PATNetwork('resnet50'), torchvision resnet50(weights=None))
    net = resnet50_patnet
    children = {name: sum(p.numel() for p in m.parameters()) for name, m in net.named_children()}
    assert children == {"backbone": 25_557_032, "reference_layer3": 4_098, "reference_layer2": 2_050,
                        "reference_layer1": 1_026, "hpn_learner": 2_573_794, "cross_entropy_loss": 0}
    assert sum(p.numel() for p in net.parameters()) == 28_138_000
    assert len(net.state_dict()) == 424
    # the backbone is frozen (contract), so only the 2,580,968 "Learnable # param." of the official logger train
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 2_580_968
    assert net.stage_channels == (512, 1024, 2048)
    assert net.level_stages == (0,) * 4 + (1,) * 6 + (2,) * 3


def test_resnet50_feature_shapes_at_400(resnet50_patnet):
    # official_figures.md §3 backbone_feat_shapes_400: 4 x [1, 512, 50, 50], 6 x [1, 1024, 25, 25],
    # 3 x [1, 2048, 13, 13] (400 / 8 = 50, 400 / 16 = 25, ceil(400 / 32) = 13)
    feats = resnet50_patnet.extract_features(torch.randn(1, 3, 400, 400))
    assert [tuple(f.shape) for f in feats] == ([(1, 512, 50, 50)] * 4 + [(1, 1024, 25, 25)] * 6
                                              + [(1, 2048, 13, 13)] * 3)
    assert all(not f.requires_grad for f in feats)


def test_features_are_pre_relu_bottleneck_outputs():
    torch.manual_seed(0)
    backbone = build_resnet_backbone(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = extract_bottleneck_features(backbone, x)
        stem = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        out2 = backbone.layer2(backbone.layer1(stem))
        out4 = backbone.layer4(backbone.layer3(out2))
    assert len(feats) == 5  # layers (1, 2, 1, 2): layer2 2 + layer3 1 + layer4 2; layer1 unused
    # torchvision's own block ends with ReLU(out + identity): applying ReLU to our last feature of a stage gives it
    torch.testing.assert_close(torch.relu(feats[1]), out2)
    torch.testing.assert_close(torch.relu(feats[-1]), out4)
    assert feats[1].min() < 0  # taken before the ReLU
    assert [f.shape[1] for f in feats] == [32, 32, 32, 64, 64]  # 4 x widths (8, 8, 8, 16, 16)


def test_anchor_transform_maps_prototypes_onto_anchors():
    torch.manual_seed(0)
    p_f, p_b, anchors = torch.randn(3, 16), torch.randn(3, 16), torch.randn(2, 16)
    u, v = anchor_transform(p_f, p_b, anchors)
    t = u @ v  # T = (pinv(C^) A^)^T, [3, 16, 16]
    c_f, c_b = p_f / p_f.norm(dim=1, keepdim=True), p_b / p_b.norm(dim=1, keepdim=True)
    a_b, a_f = anchors / anchors.norm(dim=1, keepdim=True)
    torch.testing.assert_close(torch.einsum("bij,bj->bi", t, c_f), a_f.expand(3, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.einsum("bij,bj->bi", t, c_b), a_b.expand(3, -1), atol=1e-4, rtol=0)
    # applied per pixel: a [B, C, 1, 2] map holding (c_f, c_b) becomes (a_f, a_b)
    mapped = apply_anchor_transform(torch.stack([c_f, c_b], dim=-1)[:, :, None, :], (u, v))
    torch.testing.assert_close(mapped[:, :, 0, 0], a_f.expand(3, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(mapped[:, :, 0, 1], a_b.expand(3, -1), atol=1e-4, rtol=0)


def test_hypercorrelation_is_clamped_cosine_by_hand():
    # query pixels q1 = (3, 4), q2 = (0, -1); support pixels s1 = (0, 2), s2 = (1, 1)
    # cos(q1, s1) = 8 / (5 * 2) = 0.8          cos(q1, s2) = 7 / (5 * sqrt 2) = 0.98995
    # cos(q2, s1) = -2 / (1 * 2) = -1 -> 0     cos(q2, s2) = -1 / sqrt 2 -> 0
    q = torch.tensor([[3.0, 0.0], [4.0, -1.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[0.0, 1.0], [2.0, 1.0]]).view(1, 2, 1, 2)
    corr = hypercorrelation(q, s)
    assert corr.shape == (1, 1, 2, 1, 2)
    expected = torch.tensor([[0.8, 7 / (5 * 2 ** 0.5)], [0.0, 0.0]])
    torch.testing.assert_close(corr[0, 0, :, 0, :], expected, atol=1e-5, rtol=0)


def test_tiny_forward_backward_reaches_anchors_only():
    net = tiny_net()
    net.train()
    q, s, sm, qm = episode(batch=2)
    logits = net(q, s, sm)
    assert logits.shape == (2, 2, 64, 64)
    net.cross_entropy_loss(logits, qm.long()).backward()
    for stage in (1, 2, 3):
        grad = getattr(net, f"reference_layer{stage}").weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())
    assert net.hpn_learner.decoder2[-1].weight.grad.abs().sum() > 0


def test_correlation_pyramid_follows_blocks_per_stage():
    net = tiny_net()
    assert net.level_stages == (0, 0, 1, 2, 2)
    assert net.stage_channels == (32, 32, 64)
    q, s, sm, _ = episode()
    with torch.no_grad():
        pyramid = net.correlation_pyramid(net.extract_features(q), net.extract_features(s), sm)
    # 64 px: layer2 8x8, layer3 4x4, layer4 2x2; channels = levels per stage (2, 1, 2)
    assert [tuple(c.shape) for c in pyramid] == [(1, 2, 8, 8, 8, 8), (1, 1, 4, 4, 4, 4), (1, 2, 2, 2, 2, 2)]
    assert net.hpn_learner.encoder_layer2[0].conv1.in_channels == 2
    assert net.hpn_learner.encoder_layer3[0].conv1.in_channels == 1
    # support features are masked (f~ = f * m): where the resized mask is 0 the support feature is the zero vector,
    # whose cosine with anything is 0 / (0 + eps) = 0; the mask [16:, 16:] of 64 px resized with aligned corners
    # to 8x8 samples rows 0, 9, 18, ... so rows/cols 0-1 are 0; to 4x4 (0, 21, ...) and 2x2 (0, 63) row/col 0 is 0
    for corr in pyramid:
        m = resize_mask(sm, tuple(corr.shape[-2:]))[0, 0]
        assert corr[..., m == 0].abs().max() == 0 and corr[..., m > 0].abs().max() > 0


def test_one_instance_two_resolutions():
    net = tiny_net().eval()
    out = {}
    with torch.no_grad():
        for size in (64, 96, 64):
            q, s, sm, _ = episode(size)
            out.setdefault(size, []).append(net(q, s, sm))
    assert out[96][0].shape == (1, 2, 96, 96)
    torch.testing.assert_close(out[64][0], out[64][1])


class FixedPrototypes(nn.Module):
    """Stand-in text guide: records its calls and returns fixed prototypes per stage."""

    def __init__(self, stage_channels):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fg = [torch.randn(c, generator=g) for c in stage_channels]
        self.bg = [torch.randn(c, generator=g) for c in stage_channels]
        self.scale = nn.Parameter(torch.ones(()))
        self.augment_calls, self.fuse_calls = [], []

    def augment(self, support_feats):
        self.augment_calls.append(len(support_feats))
        return support_feats

    def fuse(self, stage, support_feat, mask, proto_fg, proto_bg, class_text, background_text):
        self.fuse_calls.append((stage, tuple(support_feat.shape), tuple(mask.shape), class_text, background_text))
        b = proto_fg.shape[0]
        return self.scale * self.fg[stage].expand(b, -1), self.scale * self.bg[stage].expand(b, -1)


def test_text_hook_replaces_prototypes(monkeypatch):
    guide = FixedPrototypes((32, 32, 64))
    net = tiny_net(text_guide=guide).eval()
    assert [n for n, _ in net.named_children()][-1] == "text_guide" and "text_guide.scale" in net.state_dict()
    q, s, sm, _ = episode()
    ct, bt = torch.randn(1, 7), torch.randn(1, 7)

    seen = []

    def spy(proto_fg, proto_bg, anchors, eps=1e-6):
        result = anchor_transform(proto_fg, proto_bg, anchors, eps)
        seen.append((proto_fg, proto_bg, anchors, result))
        return result

    monkeypatch.setattr(patnet_module, "anchor_transform", spy)
    with torch.no_grad():
        guided = net(q, s, sm, ct, bt)
    assert guide.augment_calls == [5]  # once, with all 5 support levels
    assert [c[0] for c in guide.fuse_calls] == [0, 0, 1, 2, 2]
    assert [c[2] for c in guide.fuse_calls] == [(1, 1, 8, 8)] * 2 + [(1, 1, 4, 4)] + [(1, 1, 2, 2)] * 2
    assert all(c[3] is ct and c[4] is bt for c in guide.fuse_calls)
    # the fused prototypes (not the visual ones) enter C^, so T maps them onto the anchors
    for (p_f, p_b, anchors, (u, v)), stage in zip(seen, net.level_stages):
        torch.testing.assert_close(p_f[0], guide.fg[stage])
        c_f = guide.fg[stage] / guide.fg[stage].norm()
        a_f = anchors[1] / anchors[1].norm()
        torch.testing.assert_close((u @ v)[0] @ c_f, a_f, atol=1e-4, rtol=0)
    # without the hook (same weights) the visual prototypes are used and the logits change
    net.text_guide = None
    with torch.no_grad():
        plain = net(q, s, sm)
    assert (guided - plain).abs().max() > 1e-4


def test_text_guide_requires_text():
    net = tiny_net(text_guide=FixedPrototypes((32, 32, 64)))
    q, s, sm, _ = episode()
    with pytest.raises(ValueError, match="class_text and background_text"):
        net(q, s, sm)
    with pytest.raises(ValueError, match="class_text and background_text"):
        net(q, s, sm, class_text=torch.zeros(1, 7))


def test_loss_decreases_on_one_episode():
    net = tiny_net()
    net.train()
    q, s, sm, qm = episode()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = net.cross_entropy_loss(net(q, s, sm), qm.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_backbone_stays_frozen_in_training():
    net = tiny_net()
    net.train()
    assert net.training and net.hpn_learner.training
    assert not any(m.training for m in net.backbone.modules())
    assert not any(p.requires_grad for p in net.backbone.parameters())
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    q, s, sm, qm = episode()
    net.cross_entropy_loss(net(q, s, sm), qm.long()).backward()
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics untouched


def test_backbone_weights_file(tmp_path):
    source = build_resnet_backbone(**TINY)
    path = tmp_path / "tiny_resnet.pt"
    torch.save(source.state_dict(), path)
    net = tiny_net(seed=3, backbone_weights=str(path))
    assert isinstance(net.backbone, ResNet)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.backbone.state_dict().items())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tiny_net(backbone_weights=tmp_path / "missing.pt")
    partial = dict(source.state_dict())
    partial.pop("fc.weight")
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*1 missing keys \['fc.weight'\]"):
        tiny_net(backbone_weights=tmp_path / "partial.pt")
    torch.save(build_resnet_backbone((1, 2, 1, 2), (4, 8, 8, 8)).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="narrow.pt.*shape mismatches"):
        tiny_net(backbone_weights=tmp_path / "narrow.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list"):
        tiny_net(backbone_weights=tmp_path / "list.pt")


def test_bad_inputs_are_refused():
    net = tiny_net()
    q, s, sm, _ = episode()
    with pytest.raises(ValueError, match="query_image"):
        net(q[:, :1], s, sm)
    with pytest.raises(ValueError, match="support_image"):
        net(q, s[..., :32], sm)
    with pytest.raises(ValueError, match="support_mask"):
        net(q, s, sm[:, :32])
    with pytest.raises(ValueError, match="layers"):
        PATNet(layers=(1, 1, 1), widths=(4, 8, 8, 16))


def test_test_time_finetuning_moves_layer2_anchors_only():
    net = tiny_net().eval()
    q, s, sm, _ = episode()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses = net.finetune_anchors(q, s, sm, steps=4, lr=1e-2)
    assert len(losses) == 4 and all(l >= 0 for l in losses)
    after = net.state_dict()
    # the KL is summed over the layer2 levels only, so only A_1 (reference_layer1) receives a gradient
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"reference_layer1.weight"}
    assert losses[-1] < losses[0]


def test_primed_support_set_segments_a_query_alone():
    """Deployment mode: K = 1 gives the explicit 1-shot logits; K = 2 the one-hot of the max-normalised vote of the
    two explicit 1-shot masks; the support tensors are not part of the state dict."""
    net = tiny_net().eval()
    keys = set(net.state_dict())
    q, s, m, _ = episode(batch=1, seed=1)
    _, s2, m2, _ = episode(batch=1, seed=2)
    with torch.no_grad():
        explicit = [net(q, s, m), net(q, s2, m2)]
        net.set_support(s, m)
        assert torch.equal(net(q), explicit[0])
        net.set_support(torch.cat([s, s2]), torch.cat([m, m2]))
        voted = net(q)
    assert set(net.state_dict()) == keys
    # two votes per pixel at most: V = P_1 + P_2, kept where V / max V >= 0.5
    votes = explicit[0].argmax(1) + explicit[1].argmax(1)
    expected = (votes.float() / votes.max().clamp(min=1) >= 0.5).long()
    assert torch.equal(voted.argmax(1), expected) and voted.shape == (1, 2, *q.shape[-2:])


def test_primed_support_errors_and_dropout():
    net = tiny_net().eval()
    q, s, m, _ = episode(batch=1)
    with pytest.raises(ValueError, match="none primed"):
        net(q)
    with pytest.raises(ValueError, match=r"support masks \[0\] are empty"):
        net.set_support(s, torch.zeros_like(m))
    with pytest.raises(ValueError, match="dropout"):
        PATNet(**TINY, dropout=1.0)
    # dropout on the correlations acts in training mode only: two training passes differ, eval passes do not
    noisy = tiny_net(dropout=0.5)
    with torch.no_grad():
        assert torch.equal(noisy.eval()(q, s, m), noisy(q, s, m))
        assert not torch.equal(noisy.train()(q, s, m), noisy(q, s, m))
