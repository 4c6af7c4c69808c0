"""IFA host (Nie et al., CVPR 2024; common/networks/ifa.py): bi-directional prediction by hand, SSP prototypes,
counts, CD-TG hook, losses, fine-tuning, checkpoints, priming and tracing."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.networks.cdtg import TextGuidedPrototypes
from common.networks.ifa import (IFANet, _flip_rotate, build_ifa_backbone, ifa_resnet50, predict_query,
                                 predict_support, self_support_prototypes, similarity_logits)
from common.networks.patnet import build_resnet_backbone
from common.networks.prototypes import masked_average_pool

from fewshot_host_checks import synthetic_episode

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(layers=(1, 1, 2), widths=(4, 8, 16))  # features 4 * 16 = 64 channels at stride 8; one dilated layer3 block
TEXT_DIM = 6


def tiny_net(seed: int = 0, **kwargs) -> IFANet:
    torch.manual_seed(seed)
    return IFANet(**TINY, **kwargs)


episode = synthetic_episode


def texts(batch: int = 1, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_DIM, generator=g), torch.randn(batch, TEXT_DIM, generator=g)


def guide(alpha: float) -> TextGuidedPrototypes:
    # seeded: building it does not advance torch's global generator, so the host gets the same weights either way
    return TextGuidedPrototypes((64,), text_dim=TEXT_DIM, alpha=alpha, heads=4, seed=7)


def test_bidirectional_prediction_by_hand():
    """One BFP iteration on 1 x 4 grids of 2-d features (tau = 10, SSP thresholds 0.7 / 0.6)."""
    # support s = [(4,0), (0,2), (0,1), (0,3)], mask [1, 1, 0, 0]: the 2nd pixel is labelled foreground but looks
    # like the background. MAP: P^f = ((4,0) + (0,2)) / 2 = (2, 1), P^b = ((0,1) + (0,3)) / 2 = (0, 2)
    support = torch.tensor([[4.0, 0, 0, 0], [0, 2, 1, 3]]).view(1, 1, 2, 1, 4)
    mask = torch.tensor([1.0, 1, 0, 0]).view(1, 1, 1, 4)
    torch.testing.assert_close(masked_average_pool(support[0], mask, 1e-5)[0], torch.tensor([2.0, 1.0]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(masked_average_pool(support[0], 1 - mask, 1e-5)[0], torch.tensor([0.0, 2.0]),
                               atol=1e-4, rtol=0)
    p_f, p_b = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1), torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    # query q = [(3,0), (1,1), (0,2), (0,4)]; |P^f| = sqrt 5 = 2.23607
    query = torch.tensor([[3.0, 1, 0, 0], [0, 1, 2, 4]]).view(1, 2, 1, 4)

    # --- support -> query. O^0_q = 10 [cos(q, P^b), cos(q, P^f)]:
    # q1: [0, 10 * 2/2.23607 = 8.944] -> p_f = sigmoid(8.944) > 0.7: foreground
    # q2: [7.071, 10 * 3/(2.23607 * 1.41421) = 9.487] -> p_f = sigmoid(2.416) = 0.918 > 0.7: foreground
    # q3, q4: [10, 10 * 1/2.23607 = 4.472] -> p_b = sigmoid(5.528) = 0.996 > 0.6: background
    # self-support: s^f = ((3,0) + (1,1)) / 2 = (2, 0.5), s^b = ((0,2) + (0,4)) / 2 = (0, 3); the background
    # features are parallel, so every position attends to both with equal weight: a^b(x) = (0, 3) everywhere
    # Q^f = (P^f + s^f) / 2 = (2, 0.75), Q^b = 0.3 (0,3) + 0.7 (0,3) = (0, 3);  |Q^f| = sqrt 4.5625 = 2.13600
    # O^1_q: q1 [0, 10 * 2/2.136 = 9.3633]; q2 [7.0711, 10 * 2.75/(2.136 * 1.41421) = 9.1036];
    #        q3, q4 [10, 10 * 0.75/2.136 = 3.5112]
    pred = predict_query(query, p_f, p_b, refine=True)
    torch.testing.assert_close(pred.proto_fg.flatten(), torch.tensor([2.0, 0.75]))
    torch.testing.assert_close(pred.proto_bg, torch.tensor([0.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 1, 4))
    expected_q = torch.tensor([[0.0, 7.0711, 10, 10], [9.3633, 9.1036, 3.5112, 3.5112]])
    torch.testing.assert_close(pred.logits[0, :, 0], expected_q, atol=1e-3, rtol=0)
    # refinement: SSP on O^1_q selects the same regions (q2: sigmoid(2.0325) = 0.884), so Q' = Q;
    # Q''^f = 0.5 (2,1) + 0.2 (2,0.75) + 0.3 (2,0.75) = (2, 0.875), Q''^b = 0.5 (0,2) + 0.5 (0,3) = (0, 2.5)
    # |Q''^f| = 2.18303; O^ref = 0.7 * 10 [cos(q, Q''^b), cos(q, Q''^f)] + 0.3 O^1_q:
    # q1 fg 7 * 2/2.18303 + 0.3 * 9.3633 = 6.4131 + 2.8090 = 9.2221
    # q2 fg 7 * 2.875/(2.18303 * 1.41421) + 0.3 * 9.1036 = 6.5188 + 2.7311 = 9.2499; bg 4.9497 + 2.1213 = 7.0711
    # q3 fg 7 * 0.875/2.18303 + 0.3 * 3.5112 = 2.8057 + 1.0534 = 3.8591
    expected_ref = torch.tensor([[0.0, 7.0711, 10, 10], [9.2221, 9.2499, 3.8591, 3.8591]])
    torch.testing.assert_close(pred.refined[0, :, 0], expected_ref, atol=1e-3, rtol=0)
    assert pred.logits.argmax(1).flatten().tolist() == [1, 1, 0, 0]

    # --- query -> support. O^0_s = 10 [cos(s, Q^b), cos(s, Q^f)]:
    # s1 (4,0): fg 9.3633 -> foreground; s2 (0,2), s3, s4: [10, 3.5112] -> p_b = sigmoid(6.489) = 0.998: background
    # u^f = (4, 0), u^b = mean((0,2), (0,1), (0,3)) = (0, 2), c^b = (0, 2) (parallel again)
    # R^f = (P^f + u^f) / 2 = (3, 0.5), R^b = (0, 2);  |R^f| = sqrt 9.25 = 3.04138
    # O^1_s: s1 [0, 10 * 3/3.04138 = 9.8639]; s2..s4 [10, 10 * 0.5/3.04138 = 1.6440]
    back = predict_support(support, pred.proto_fg, pred.proto_bg, p_f)
    expected_s = torch.tensor([[0.0, 10, 10, 10], [9.8639, 1.6440, 1.6440, 1.6440]])
    torch.testing.assert_close(back.logits[0, 0, :, 0], expected_s, atol=1e-3, rtol=0)
    # the back-predicted support mask misses the labelled pixel s2, which the support loss then penalises
    assert back.logits.argmax(2).flatten().tolist() == [1, 0, 0, 0]
    torch.testing.assert_close(back.proto_fg.flatten(), torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(back.proto_bg, torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 1, 4))

    # --- IFA iteration 2 starts from (R^f, R^b): q2 is still foreground (10 (3.5/(3.04138 * 1.41421) - 0.70711)
    # = 1.066 -> 0.744 > 0.7), so Q^f_2 = ((3, 0.5) + (2, 0.5)) / 2 = (2.5, 0.5), |Q^f_2| = 2.54951:
    # O^2_q fg: q1 10 * 2.5/2.54951 = 9.8058, q2 10 * 3/(2.54951 * 1.41421) = 8.3205, q3 10 * 0.5/2.54951 = 1.9612
    second = predict_query(query, back.proto_fg, back.proto_bg)
    torch.testing.assert_close(second.proto_fg.flatten(), torch.tensor([2.5, 0.5]))
    torch.testing.assert_close(second.logits[0, 1, 0], torch.tensor([9.8058, 8.3205, 1.9612, 1.9612]), atol=1e-3,
                               rtol=0)


def test_self_support_prototypes_by_hand():
    # features f1 = (1,0), f2 = (0,1), f3 = (1,1); logits [bg, fg]: f1, f2 [5, 0] -> p_b = 0.9933; f3 [0, 5]
    feats = torch.tensor([[1.0, 0, 1], [0, 1, 1]]).view(1, 2, 1, 3)
    logits = torch.tensor([[5.0, 5, 0], [0, 0, 5]]).view(1, 2, 1, 3)
    ss = self_support_prototypes(feats, logits)
    assert ss.fg_region.flatten().tolist() == [0, 0, 1] and ss.bg_region.flatten().tolist() == [1, 1, 0]
    torch.testing.assert_close(ss.fg[0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(ss.bg[0], torch.tensor([0.5, 0.5]))
    # a^b(x) = sum_{y in {f1, f2}} softmax_y(2 cos(x, y)) F(y):
    # x = f1: cos 1 and 0 -> weights e^2 / (e^2 + 1) = 0.88080 and 0.11920 -> (0.88080, 0.11920)
    # x = f2: mirrored -> (0.11920, 0.88080); x = f3: cos 0.70711 both -> equal weights -> (0.5, 0.5)
    w = math.exp(2) / (math.exp(2) + 1)
    expected = torch.tensor([[w, 1 - w, 0.5], [1 - w, w, 0.5]])
    torch.testing.assert_close(ss.bg_local[0, :, 0], expected, atol=1e-5, rtol=0)
    # nothing above the thresholds (p = sigmoid(0.1 .. 0.3) < 0.7, p_b < 0.6): top-k fallback, here k = 1 -> f2
    flat = torch.tensor([[0.0, 0, 0], [0.1, 0.3, 0.2]]).view(1, 2, 1, 3)
    ss = self_support_prototypes(feats, flat, top_k=1)
    torch.testing.assert_close(ss.fg[0], torch.tensor([0.0, 1.0]))  # largest p_f: f2
    torch.testing.assert_close(ss.bg[0], torch.tensor([1.0, 0.0]))  # largest p_b: f1
    # the default k = 12 is capped at the 3 positions: the mean of all features (2/3, 2/3)
    torch.testing.assert_close(self_support_prototypes(feats, flat).fg[0], torch.tensor([2 / 3, 2 / 3]))


def test_query_prototype_mixing_by_hand():
    # the features of the test above, P^f = (1, 1) and a background map P^b = [(1,0), (0,1), (-1,-1)]:
    # O^0_q: f1, f2 [10, 7.071] -> p_b = sigmoid(2.929) = 0.949: background; f3 [-10, 10]: foreground, so
    # s^f = (1, 1), s^b = (0.5, 0.5) and a^b = [(w, 1-w), (1-w, w), (0.5, 0.5)] with w = e^2 / (e^2 + 1) = 0.880797
    # Q^f = ((1,1) + (1,1)) / 2 = (1, 1); Q^b(x) = 0.3 s^b + 0.7 a^b(x): f1 (0.15 + 0.616558, 0.15 + 0.083442)
    # = (0.766558, 0.233442), f2 mirrored, f3 (0.5, 0.5)
    # O^1_q(f1) = 10 [0.766558 / sqrt(0.642106) = 0.956625, cos((1,0), (1,1)) = 0.707107]; f3 [10, 10]
    feats = torch.tensor([[1.0, 0, 1], [0, 1, 1]]).view(1, 2, 1, 3)
    p_b = torch.tensor([[1.0, 0, -1], [0, 1, -1]]).view(1, 2, 1, 3)
    pred = predict_query(feats, torch.ones(1, 2, 1, 1), p_b)
    torch.testing.assert_close(pred.proto_fg.flatten(), torch.tensor([1.0, 1.0]))
    expected_bg = torch.tensor([[0.766558, 0.233442, 0.5], [0.233442, 0.766558, 0.5]])
    torch.testing.assert_close(pred.proto_bg[0, :, 0], expected_bg, atol=1e-5, rtol=0)
    expected = torch.tensor([[9.56625, 9.56625, 10.0], [7.07107, 7.07107, 10.0]])
    torch.testing.assert_close(pred.logits[0, :, 0], expected, atol=1e-4, rtol=0)


def test_back_prediction_pairs_each_shot_with_its_episode():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(2, 3, 4, 2, 2, generator=g)  # B = 2 episodes, K = 3 shots
    q_fg, q_bg, p_f = torch.randn(2, 4, 1, 1, generator=g), torch.randn(2, 4, 2, 2, generator=g), torch.randn(
        2, 4, 1, 1, generator=g)
    batched = predict_support(support, q_fg, q_bg, p_f)
    for b in range(2):
        alone = predict_support(support[b:b + 1], q_fg[b:b + 1], q_bg[b:b + 1], p_f[b:b + 1])
        torch.testing.assert_close(batched.logits[b], alone.logits[0])
        torch.testing.assert_close(batched.proto_bg[b], alone.proto_bg[0])


def test_similarity_logits_by_hand():
    # F = (3, 4): cos with P^b = (1, 0) is 0.6, with a local P^f map (0, 2) is 0.8 -> 10 * [0.6, 0.8]
    feats = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    out = similarity_logits(feats, torch.tensor([0.0, 2.0]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([6.0, 8.0]))


def test_official_resnet50_counts():
    # no published figure (the paper gives none); by hand, SSP's deep-stem ResNet-50 without layer4:
    # layer0: convs 3*64*9 = 1,728 + 64*64*9 = 36,864 + 64*128*9 = 73,728; BN 2*64 + 2*64 + 2*128 = 512 -> 112,832
    # layer1 (in 128): block 1 convs 128*64 + 64*64*9 + 64*256 + down 128*256 = 94,208, BN 2*(64+64+256+256) = 1,280;
    #   blocks 2-3: 256*64 + 36,864 + 64*256 = 69,632 + BN 768 -> 95,488 + 2 * 70,400 = 236,288
    # layer2 (in 256, width 128): convs 376,832 + 3 * 278,528 = 1,212,416, BN 2,560 + 3 * 1,536 = 7,168 -> 1,219,584
    # layer3 (in 512, width 256): convs 1,507,328 + 5 * 1,114,112 = 7,077,888, BN 5,120 + 5 * 3,072 -> 7,098,368
    torch.manual_seed(0)
    net = ifa_resnet50()
    children = {name: sum(p.numel() for p in m.parameters()) for name, m in net.named_children()}
    assert children == {"layer0": 112_832, "layer1": 236_288, "layer2": 1_219_584, "layer3": 7_098_368}
    assert sum(p.numel() for p in net.parameters()) == 8_667_072
    # trained (and fine-tuned): the layer2 + layer3 convolution weights, 1,212,416 + 7,077,888
    assert sum(p.numel() for _, p in net.finetune_parameters()) == 8_290_304
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 8_290_304
    # keys: layer0 3 convs + 3 BN * 5 = 18; a block 18 (+6 with downsample): 18 + 60 + 78 + 114 = 270
    keys = list(net.state_dict())
    assert len(keys) == 270 and keys[:2] == ["layer0.0.0.weight", "layer0.0.1.weight"]
    assert {"layer0.0.6.weight", "layer0.1.running_var", "layer1.0.downsample.0.weight",
            "layer3.5.bn3.weight"} <= set(keys)
    assert net.feature_channels == 1024
    # layer3 is dilated: stride 1 everywhere, dilation 2 after its first block
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer3[0].downsample[0].stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in net.layer3[1:])
    assert net.layer2[0].conv2.stride == (2, 2)


def test_features_are_stride_8_pre_relu_layer3():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net.extract_features(x)
        full = net.layer3(net.layer2(net.layer1(net.layer0(x))))
    assert feats.shape == (2, 64, 8, 8)  # 64 / 8: stem 2, max-pool 2, layer2 2, layer3 dilated
    torch.testing.assert_close(torch.relu(feats), full)  # torchvision's block ends with the ReLU we leave out
    assert feats.min() < 0


def test_forward_shapes_kshot_and_priming():
    net = tiny_net().eval()
    q, s, sm, _ = episode(batch=2)
    _, s2, sm2, _ = episode(batch=2, seed=3)
    keys = set(net.state_dict())
    with torch.no_grad():
        one = net(q, s, sm)
        assert one.shape == (2, 2, 64, 64)
        # K shots share the mean prototypes; two copies of one support give exactly the 1-shot output
        assert torch.equal(net(q, torch.stack([s, s], 1), torch.stack([sm, sm], 1)), one)
        two = net(q, torch.stack([s, s2], 1), torch.stack([sm, sm2], 1))
        assert two.shape == (2, 2, 64, 64) and not torch.equal(two, one)
        # primed: the same computation as the explicit call of the same batch size
        net.set_support(s[:1], sm[:1])
        assert torch.equal(net(q[:1]), net(q[:1], s[:1], sm[:1]))
        net.set_support(torch.cat([s[:1], s2[:1]]), torch.cat([sm[:1], sm2[:1]]))
        assert torch.equal(net(q[:1]), net(q[:1], torch.stack([s[:1], s2[:1]], 1), torch.stack([sm[:1], sm2[:1]], 1)))
        torch.testing.assert_close(net(q[:1]), two[:1])
        assert net(q).shape == (2, 2, 64, 64)  # one primed set, a batch of two queries
    assert set(net.state_dict()) == keys


def test_text_guide_alpha_zero_exact_and_text_changes_output():
    q, s, sm, _ = episode(batch=2)
    ct, bt = texts(batch=2)
    plain = tiny_net().eval()
    zero = tiny_net(text_guide=guide(0.0)).eval()
    with torch.no_grad():
        host = plain(q, s, sm)
        assert torch.equal(zero(q, s, sm, ct, bt), host)
        assert torch.equal(tiny_net(text_guide=guide(0.0), fuse_query_prototypes=True).eval()(q, s, sm, ct, bt), host)
        guided = tiny_net(text_guide=guide(0.7)).eval()(q, s, sm, ct, bt)
        other = tiny_net(text_guide=guide(0.7)).eval()(q, s, sm, *texts(batch=2, seed=9))
    assert (guided - host).abs().max() > 1e-3 and (guided - other).abs().max() > 1e-3


class RecordingGuide(nn.Module):
    """Wraps the real plug-in and records the ``fuse`` calls."""

    def __init__(self, alpha: float):
        super().__init__()
        self.inner = guide(alpha)
        self.calls = []

    def augment(self, support_feats):
        return self.inner.augment(support_feats)

    def fuse(self, stage, support_feat, mask, proto_fg, proto_bg, class_text, background_text):
        self.calls.append((stage, tuple(support_feat.shape), tuple(mask.shape), tuple(class_text.shape)))
        return self.inner.fuse(stage, support_feat, mask, proto_fg, proto_bg, class_text, background_text)


def test_where_fuse_is_called():
    q, s, sm, _ = episode(batch=2)
    _, s2, sm2, _ = episode(batch=2, seed=3)
    ct, bt = texts(batch=2)
    rec = RecordingGuide(0.5)
    net = tiny_net(text_guide=rec).eval()
    with torch.no_grad():
        support_only = net(q, torch.stack([s, s2], 1), torch.stack([sm, sm2], 1), ct, bt)
    # once, on the support side: stage 0, the B * K = 4 shots, their masks on the 8 x 8 grid, texts per shot
    assert rec.calls == [(0, (4, 64, 8, 8), (4, 1, 8, 8), (4, TEXT_DIM))]
    rec.calls.clear()
    net.fuse_query_prototypes = True
    with torch.no_grad():
        both = net(q, torch.stack([s, s2], 1), torch.stack([sm, sm2], 1), ct, bt)
    # plus the query's self-support prototypes, before and after refinement, with the query region as mask
    assert rec.calls[1:] == [(0, (2, 64, 8, 8), (2, 1, 8, 8), (2, TEXT_DIM))] * 2
    assert (both - support_only).abs().max() > 1e-4


def test_text_required_and_bad_inputs():
    q, s, sm, qm = episode()
    net = tiny_net(text_guide=guide(0.5))
    with pytest.raises(ValueError, match="class_text and background_text"):
        net(q, s, sm)
    with pytest.raises(ValueError, match=r"class_text must be \[B=1, d\]"):
        net(q, s, sm, torch.zeros(2, TEXT_DIM), torch.zeros(1, TEXT_DIM))
    with pytest.raises(ValueError, match="dimension 5 but text_dim is 6"):
        net(q, s, sm, torch.zeros(1, 5), torch.zeros(1, TEXT_DIM))
    # the shared call contract is tested for every host in tests/test_networks_fewshot_hosts.py; IFA's own checks:
    net = tiny_net()
    with pytest.raises(ValueError, match="support_mask"):
        net(q, torch.stack([s, s], 1), sm)  # K = 2 supports need [B, 2, H, W] masks
    with pytest.raises(ValueError, match=r"support masks \[0\] are empty"):  # only ignored (255) pixels: no foreground
        net.set_support(s, torch.full_like(sm, 255.0))
    with pytest.raises(ValueError, match="query_mask"):
        net.training_loss(q, s, sm, qm[:, :32])
    with pytest.raises(ValueError, match="iterations"):
        net.training_loss(q, s, sm, qm, iterations=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        net.finetune(q, s, sm, steps=0)
    with pytest.raises(ValueError, match="stem"):
        IFANet(**TINY, stem="resnet_d")
    with pytest.raises(ValueError, match="layers"):
        IFANet(layers=(1, 1, 1, 1), widths=(4, 8, 8))


def test_training_loss_is_the_weighted_sum():
    """Rebuild the objective for T = 2 from the public pieces: the weights 1, 1, 1, 0.2, 0.4, 0.1, 0.1."""
    net = tiny_net().eval()  # eval: no style augmentation, BN frozen anyway
    q, s, sm, qm = episode()
    qm[0, :2, :2] = 255  # ignored pixels
    with torch.no_grad():
        loss1 = net.training_loss(q, s, sm, qm)
        full1 = net.training_loss(q, s, sm, qm, include_output_term=True)
        full2 = net.training_loss(q, s, sm, qm, iterations=2, include_output_term=True)
        # the output term is CE(forward(...), M_q)
        torch.testing.assert_close(full1 - loss1, F.cross_entropy(net(q, s, sm), qm.long(), ignore_index=255))
        fq, fs = net.extract_features(q), net.extract_features(s)
        m_s = F.interpolate(sm[:, None], size=(8, 8), mode="bilinear", align_corners=True)
        m_q = F.interpolate((qm == 1).float()[:, None], size=(8, 8), mode="bilinear", align_corners=True)
        m_qb = F.interpolate((qm == 0).float()[:, None], size=(8, 8), mode="bilinear", align_corners=True)
        p_f, p_b = (masked_average_pool(fs, m, 1e-5)[..., None, None] for m in (m_s, 1 - m_s))

        def ce(logits, mask):
            up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True)
            return F.cross_entropy(up, mask.long(), ignore_index=255)

        it1 = predict_query(fq, p_f, p_b, refine=True)
        back1 = predict_support(fs[:, None], it1.proto_fg, it1.proto_bg, p_f)
        it2 = predict_query(fq, back1.proto_fg, back1.proto_bg)
        back2 = predict_support(fs[:, None], it2.proto_fg, it2.proto_bg, back1.proto_fg)
        self_q = similarity_logits(fq, *(masked_average_pool(fq, m, 1e-5)[..., None, None] for m in (m_q, m_qb)))
        expected = (ce(it1.refined, qm) + ce(it1.logits, qm) + ce(self_q, qm)
                    + 0.2 * ce(similarity_logits(fs, p_f, p_b), sm) + 0.4 * ce(back1.logits[:, 0], sm)
                    + 0.1 * ce(it2.logits, qm) + 0.1 * ce(back2.logits[:, 0], sm))
    torch.testing.assert_close(full2, expected, atol=1e-5, rtol=1e-5)
    # without refinement the output is O^1_q itself (no second query term)
    net.refine = False
    with torch.no_grad():
        unrefined = net.training_loss(q, s, sm, qm, include_output_term=True)
    torch.testing.assert_close(unrefined, expected - ce(it1.refined, qm) - 0.1 * (ce(it2.logits, qm)
                                                                                  + ce(back2.logits[:, 0], sm)))


def test_gradients_reach_layer2_layer3_and_plug_in_only():
    net = tiny_net(text_guide=guide(0.5))
    net.train()
    assert not any(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    q, s, sm, qm = episode(batch=2)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.training_loss(q, s, sm, qm, *texts(batch=2), include_output_term=True).backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n, _ in net.finetune_parameters()} <= trained
    assert all(n.startswith(("layer2.", "layer3.", "text_guide.")) for n in trained)
    assert not any(".bn" in n or "downsample.1" in n for n in trained)  # BatchNorm frozen
    assert all(p.grad is None for p in (*net.layer0.parameters(), *net.layer1.parameters()))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # running statistics untouched


def test_source_training_steps_reduce_the_loss():
    net = tiny_net()
    net.train()
    q, s, sm, qm = episode()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = net.training_loss(q, s, sm, qm, include_output_term=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_finetune_adapts_layer2_layer3_convolutions_on_the_support():
    net = tiny_net().eval()
    q, s, sm, _ = episode()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():  # the self-episode (support as query) that fine-tuning is supervised by
        start = net.training_loss(s, s, sm, sm, iterations=3, include_output_term=True).item()
    losses = net.finetune(q, s, sm, steps=8, lr=5e-3, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    changed = {k for k in before if not torch.equal(before[k], net.state_dict()[k])}
    assert changed == {n for n, _ in net.finetune_parameters()}  # conv weights of layer2/3; BN stats unchanged
    with torch.no_grad():
        assert net.training_loss(s, s, sm, sm, iterations=3, include_output_term=True).item() < start
    # the query is not read: another query gives the same adaptation
    net.load_state_dict(before)
    again = net.finetune(torch.randn_like(q), s, sm, steps=8, lr=5e-3, generator=torch.Generator().manual_seed(0))
    assert again == losses


def test_pseudo_query_flips_image_and_mask_alike():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 6, 6)
    mask = (image[0] > 0).float()
    seen = set()
    for _ in range(20):
        out_image, out_mask = _flip_rotate(image, mask, g)
        assert torch.equal(out_mask, (out_image[0] > 0).float())
        seen.add(tuple(out_image[0].flatten().tolist()))
    assert len(seen) > 4  # several of the 8 flip/rotation results occur
    wide = torch.randn(3, 4, 6)
    for _ in range(10):  # non-square: rotations by 0 or 180 degrees only, the shape is kept
        assert _flip_rotate(wide, wide[0], g)[0].shape == (3, 4, 6)


def test_checkpoint_round_trip_in_official_format(tmp_path):
    source = tiny_net(seed=4)
    state = source.state_dict()
    assert "layer0.0.0.weight" in state and "layer3.1.conv2.weight" in state
    torch.save(state, tmp_path / "ifa.pth")
    loaded = tiny_net(seed=5, checkpoint=tmp_path / "ifa.pth")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # DataParallel prefix and a wrapper are accepted
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert torch.equal(tiny_net(seed=5, checkpoint=tmp_path / "wrapped.pth").layer2[0].conv1.weight,
                       state["layer2.0.conv1.weight"])
    # a host checkpoint loads into a text-guided network (guide untouched); a full one loads everything
    guided = tiny_net(seed=5, text_guide=guide(0.5), checkpoint=tmp_path / "ifa.pth")
    assert torch.equal(guided.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(guided.text_guide.sgu["0"].norm.weight, guide(0.5).sgu["0"].norm.weight)
    torch.save(guided.state_dict(), tmp_path / "guided.pth")
    assert "text_guide.sgu.0.norm.weight" in torch.load(tmp_path / "guided.pth")
    tiny_net(seed=6, text_guide=guide(0.5), checkpoint=tmp_path / "guided.pth")
    # a wrong key is named
    bad = dict(state)
    bad["layer0.0.9.weight"] = bad.pop("layer0.0.6.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*missing key\(s\), e\.g\. \['layer0\.0\.6\.weight'\].*"
                                         r"unexpected key\(s\), e\.g\. \['layer0\.0\.9\.weight'\]"):
        tiny_net(checkpoint=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        tiny_net(checkpoint=tmp_path / "missing.pth")


def test_backbone_weights_in_resnet_formats(tmp_path):
    # torchvision format (PATNet's ImageNet file): layer4 / fc are skipped, conv1 / bn1 become layer0.0 / layer0.1
    tv = build_resnet_backbone((1, 1, 2, 1), (4, 8, 16, 8)).state_dict()
    torch.save(tv, tmp_path / "tv.pth")
    net = tiny_net(seed=3, stem="torchvision", backbone_weights=tmp_path / "tv.pth")
    assert torch.equal(net.layer0[0].weight, tv["conv1.weight"]) and torch.equal(net.layer0[1].bias, tv["bn1.bias"])
    assert torch.equal(net.layer3[1].conv2.weight, tv["layer3.1.conv2.weight"])
    # SSP's deep-stem format: conv1.{0,1,3,4,6}
    trunk = build_ifa_backbone(**TINY)
    ssp = {k.replace("layer0.0.", "conv1.").replace("layer0.1.", "bn1."): v for k, v in trunk.state_dict().items()}
    ssp["fc.weight"] = torch.zeros(3, 3)
    torch.save(ssp, tmp_path / "ssp.pth")
    net = tiny_net(seed=3, backbone_weights=tmp_path / "ssp.pth")
    assert torch.equal(net.layer0[0][6].weight, ssp["conv1.6.weight"])
    # the torchvision file does not fit the deep stem: the keys are named
    with pytest.raises(ValueError, match=r"tv\.pth.*missing.*layer0\.0\.0\.weight"):
        tiny_net(backbone_weights=tmp_path / "tv.pth")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_primed_network_traces_in_eval_mode():
    net = tiny_net().eval()
    _, s, sm, _ = episode(batch=2)
    net.set_support(s, sm)
    with torch.no_grad():
        traced = torch.jit.trace(net, (torch.randn(1, 3, 64, 64),))
        query = torch.randn(1, 3, 64, 64)
        assert torch.equal(traced(query), net(query))
