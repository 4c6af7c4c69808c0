"""PMMs host (common/networks/pmm.py): EM of the prototype mixtures and P-Conv by hand, the mixture adapter over
CD-TG's fuse, the mixture-size check, backbone and grid, official checkpoints, counts."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from common.networks.cdtg import TextGuidedPrototypes
from common.networks.patnet import build_resnet_backbone
from common.networks.pmm import PMMNet, PrototypeMixture, em_prototypes, fuse_mixture

from fewshot_host_checks import synthetic_episode

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(layers=(1, 1, 1), widths=(8, 16, 32), channels=16)  # layer2 64 ch + layer3 128 ch -> 16


def tiny_net(seed: int = 0, **kwargs) -> PMMNet:
    torch.manual_seed(seed)
    return PMMNet(**{**TINY, **kwargs})


episode = partial(synthetic_episode, support="centre")


def texts(n: int = 2, dim: int = 8, seed: int = 2):
    return torch.randn(n, 1, dim, generator=torch.Generator().manual_seed(seed))


def test_em_one_step_by_hand():
    # samples x1 = (1, 0), x2 = (0, 1), x3 = (-1, 0), x4 = (0, 0) (a masked-out position); means mu1 = (1, 0),
    # mu2 = (0, 1); kappa = ln 3 so that exp(kappa * 1) = 3, exp(kappa * 0) = 1, exp(-kappa) = 1/3
    # E: x1 (3, 1) -> (3/4, 1/4); x2 (1, 3) -> (1/4, 3/4); x3 (1/3, 1) -> (1/4, 3/4); x4 (1, 1) -> (1/2, 1/2)
    # M: mu1 ~ 3/4 (1, 0) + 1/4 (0, 1) + 1/4 (-1, 0) = (1/2, 1/4) -> (2, 1) / sqrt 5 = (0.894427, 0.447214)
    #    mu2 ~ 1/4 (1, 0) + 3/4 (0, 1) + 3/4 (-1, 0) = (-1/2, 3/4) -> (-2, 3) / sqrt 13 = (-0.554700, 0.832050)
    # x4 adds nothing; the division by sum_i z_ik (1.75, 2.25) only shows through the eps of the normalisation:
    # |v1| = 0.559017 / 1.75 = 0.319438 -> factor |v1| / (|v1| + 1e-6) = 0.99999687;
    # |v2| = 0.901388 / 2.25 = 0.400617 -> 0.99999750
    samples = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).unsqueeze(0)
    init = torch.eye(2)
    mu = em_prototypes(samples, init, kappa=math.log(3.0), iterations=1)
    unit = torch.tensor([[2.0, 1.0], [-2.0, 3.0]]) / torch.tensor([[5.0 ** 0.5], [13.0 ** 0.5]])
    torch.testing.assert_close(mu[0], unit * torch.tensor([[0.99999687], [0.99999750]]), atol=2e-7, rtol=0)
    # kappa matters: a hard assignment (kappa = 100) gives mu1 ~ (1, 0) and mu2 ~ (0, 1) + (-1, 0) + (0, 0)/2
    # -> (-1, 1) / sqrt 2 (x4 splits evenly but is zero)
    hard = em_prototypes(samples, init, kappa=100.0, iterations=1)
    torch.testing.assert_close(hard[0], torch.tensor([[1.0, 0.0], [-0.707107, 0.707107]]), atol=1e-5, rtol=0)
    # the means stay unit vectors over iterations and do not depend on the batch neighbours
    many = em_prototypes(torch.cat([samples, torch.randn(1, 2, 4)]), init, kappa=20.0, iterations=10)
    torch.testing.assert_close(many.norm(dim=2), torch.ones(2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(many[:1], em_prototypes(samples, init, kappa=20.0, iterations=10))


def test_p_conv_by_hand():
    # k = 2, foreground means (1, 0), (0, 1); background (-1, 0), (0, -1); query pixel x = (ln 2, 0):
    # dot products (ln 2, 0, -ln 2, 0) -> exp (2, 1, 1/2, 1), sum 4.5 -> P_f = 3 / 4.5 = 2/3, P_b = 1.5 / 4.5 = 1/3
    pmm = PrototypeMixture(2, k=2)
    query = torch.tensor([math.log(2.0), 0.0]).view(1, 2, 1, 1)
    fg = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    bg = -fg
    prob = pmm.probability_map(query, fg, bg)
    torch.testing.assert_close(prob.flatten(), torch.tensor([1 / 3, 2 / 3]))


def test_mixture_initialisation_is_seeded_and_not_saved():
    a, b, c = PrototypeMixture(16, seed=0), PrototypeMixture(16, seed=0), PrototypeMixture(16, seed=1)
    assert a.mu.shape == (16, 3) and torch.equal(a.mu, b.mu) and not torch.equal(a.mu, c.mu)
    torch.testing.assert_close(a.mu.norm(dim=0), torch.ones(3), atol=1e-5, rtol=0)
    assert len(a.state_dict()) == 0 and "PMMs.mu" not in tiny_net().state_dict()
    # the global generator is not consumed: two networks built from the same seed are equal
    assert torch.equal(tiny_net(em_seed=5).layer9.weight, tiny_net(em_seed=6).layer9.weight)


class ShiftGuide(nn.Module):
    """Stand-in text guide: fuse returns (1 - a) P + a t with fixed t per region, and records its calls."""

    def __init__(self, channels: int, alpha: float = 0.25):
        super().__init__()
        self.alpha = alpha
        self.t_fg, self.t_bg = torch.full((channels,), 2.0), torch.full((channels,), -3.0)
        self.calls = []

    def augment(self, support_feats):
        self.calls.append(("augment", len(support_feats)))
        return support_feats

    def fuse(self, stage, support_feat, mask, proto_fg, proto_bg, class_text, background_text):
        self.calls.append(("fuse", stage, tuple(support_feat.shape), tuple(mask.shape)))
        a = self.alpha
        return (1 - a) * proto_fg + a * self.t_fg, (1 - a) * proto_bg + a * self.t_bg


def test_fuse_mixture_fuses_every_component():
    # P^f_i <- 0.75 P^f_i + 0.25 * 2 and P^b_i <- 0.75 P^b_i + 0.25 * (-3) for each of the k = 3 components
    guide = ShiftGuide(4)
    fg, bg = torch.arange(24.0).view(2, 3, 4), -torch.arange(24.0).view(2, 3, 4)
    feat, mask = torch.randn(2, 4, 5, 5), torch.ones(2, 1, 5, 5)
    fused_fg, fused_bg = fuse_mixture(guide, 0, feat, mask, fg, bg, torch.zeros(2, 1), torch.zeros(2, 1))
    torch.testing.assert_close(fused_fg, 0.75 * fg + 0.5)
    torch.testing.assert_close(fused_bg, 0.75 * bg - 0.75)
    assert guide.calls == [("fuse", 0, (2, 4, 5, 5), (2, 1, 5, 5))] * 3
    # with the real plug-in: component i equals its own fuse call
    real = TextGuidedPrototypes((4,), text_dim=3, heads=2, alpha=0.4, seed=1)
    ct, bt = torch.randn(2, 3), torch.randn(2, 3)
    fused_fg, fused_bg = fuse_mixture(real, 0, feat, mask, fg, bg, ct, bt)
    for i in range(3):
        f_i, b_i = real.fuse(0, feat, mask, fg[:, i], bg[:, i], ct, bt)
        assert torch.equal(fused_fg[:, i], f_i) and torch.equal(fused_bg[:, i], b_i)


def test_fused_mixtures_feed_p_match_and_p_conv(monkeypatch):
    guide = ShiftGuide(16)
    net = tiny_net(text_guide=guide).eval()
    q, s, m, _ = episode()
    seen = {}
    estimate, probability_map = net.PMMs.estimate, net.PMMs.probability_map

    def spy_estimate(features, mask):
        seen["em"] = estimate(features, mask)
        return seen["em"]

    def spy_map(query, proto_fg, proto_bg):
        seen["p_conv"] = (proto_fg, proto_bg)
        return probability_map(query, proto_fg, proto_bg)

    def spy_match(module, args):
        seen.setdefault("p_match", []).append(args[0][:, 16:, 0, 0])

    monkeypatch.setattr(net.PMMs, "estimate", spy_estimate)
    monkeypatch.setattr(net.PMMs, "probability_map", spy_map)
    net.layer55.register_forward_pre_hook(spy_match)
    ct, bt = texts()
    with torch.no_grad():
        net(q, s, m, ct, bt)
    em_fg, em_bg = seen["em"]
    # 64 px -> 9 x 9 grid; one augment, k = 3 fuse calls at stage 0
    assert guide.calls == [("augment", 1)] + [("fuse", 0, (1, 16, 9, 9), (1, 1, 9, 9))] * 3
    torch.testing.assert_close(seen["p_conv"][0], 0.75 * em_fg + 0.5)
    torch.testing.assert_close(seen["p_conv"][1], 0.75 * em_bg - 0.75)
    # P-Match: layer55 sees the query features concatenated with each fused foreground prototype
    assert len(seen["p_match"]) == 3
    for i, tiled in enumerate(seen["p_match"]):
        torch.testing.assert_close(tiled, 0.75 * em_fg[:, i] + 0.5)


def test_alpha_zero_is_the_host_and_text_matters():
    q, s, m, _ = episode()
    ct, bt, ct2 = texts(3)
    net = tiny_net(text_guide=TextGuidedPrototypes((16,), text_dim=8, alpha=0.0, heads=2, seed=3)).eval()
    with torch.no_grad():
        guided = net(q, s, m, ct, bt)
        net.text_guide.alpha = 0.7
        with_text, other_text = net(q, s, m, ct, bt), net(q, s, m, ct2, bt)
        net.text_guide = None
        host = net(q, s, m)
    assert torch.equal(guided, host)  # (1 - 0) P_i + 0 p^t = P_i exactly for every component
    assert (with_text - host).abs().max() > 1e-4 and (with_text - other_text).abs().max() > 1e-4


def test_a_support_set_too_small_for_the_mixture_is_refused_at_priming():
    net = tiny_net().train()
    q, s, _, _ = episode()
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    # one pixel at (0, 0) of 64 px: the aligned-corner resize to 9 x 9 samples rows / cols 0, 7.875, 15.75, ...,
    # so only grid position (0, 0) is > 0: 1 foreground position < k = 3
    dot = torch.zeros(1, 64, 64)
    dot[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"support foreground of episodes \[0\] covers \[1\] positions of the 9x9 "
                                         r"feature grid: too small for the mixture size k = 3"):
        net.set_support(s, dot)
    with pytest.raises(ValueError, match=r"support background of episodes \[0\] covers \[0\] positions.*too small"):
        net.set_support(s, torch.ones(1, 64, 64))
    # nothing was primed, the probe pass left the BatchNorm statistics and the training mode as they were
    assert net.support_images is None and net.training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())
    # k = 1 accepts the single position
    small = tiny_net(k=1).eval()
    small.set_support(s, dot)
    assert small(q).shape == (1, 2, 64, 64)


def test_an_episode_with_a_tiny_support_runs_as_the_official_code():
    # training and evaluation episodes are not refused: EM runs on the one non-zero sample and the zero samples
    net = tiny_net().eval()
    q, s, _, _ = episode()
    dot = torch.zeros(1, 64, 64)
    dot[0, 0, 0] = 1
    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 0, 0] = 1  # the aligned-corner resize of the dot (see above)
    feat = net.extract_features(s)
    fg, _ = net.PMMs.estimate(feat, mask)
    # one non-zero sample x = F(0, 0): the M-step sum of a mean is a multiple of x, so every mean is 0 or points
    # along x (normalise(v) = v / (|v| + 1e-6) keeps the direction); at least one is not 0, as the E-step's rows
    # sum to 1
    x = feat[0, :, 0, 0]
    norms = fg[0].norm(dim=1)
    assert norms.max() > 0.5
    for mean, size in zip(fg[0], norms):
        assert size < 1e-6 or torch.nn.functional.cosine_similarity(mean, x, dim=0) > 1 - 1e-5
    assert torch.isfinite(net(q, s, dot)).all()


def test_grid_and_shapes():
    net = tiny_net().eval()
    with torch.no_grad():
        # 321 px (the paper's size): conv1 / 2 -> 161, ceil-mode max-pool -> 81, layer2 / 2 -> 41 (layer3 dilated)
        assert net.extract_features(torch.randn(1, 3, 321, 321)).shape == (1, 16, 41, 41)
        q, s, m, _ = episode(batch=2)
        assert net.extract_features(q).shape == (2, 16, 9, 9)
        assert net(q, s, m).shape == (2, 2, 64, 64)
    assert net.model_res.layer3[0].conv2.dilation == (2, 2) and net.model_res.layer2[0].conv1.stride == (2, 2)


def test_gradients_follow_the_official_training():
    guide = TextGuidedPrototypes((16,), text_dim=8, heads=2, seed=3)
    net = tiny_net(text_guide=guide).train()
    q, s, m, qm = episode()
    running = net.model_res.bn1.running_mean.clone()
    ct, bt = texts()
    nn.functional.cross_entropy(net(q, s, m, ct, bt), qm.long()).backward()
    # backbone convolutions train, its BatchNorm affine parameters are frozen, its statistics update
    assert net.model_res.layer3[0].conv2.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad
               for mod in net.model_res.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters())
    assert not torch.equal(running, net.model_res.bn1.running_mean)
    for p in (net.layer5[0].weight, net.layer55[0].weight, net.residule1[1].weight, net.layer9.weight,
              guide.sgu["0"].text_mlp[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # the plug-in trains through P-Match


def test_frozen_backbone():
    net = tiny_net(freeze_backbone=True).train()
    assert not any(mod.training for mod in net.model_res.modules()) and net.layer5.training
    before = {k: v.clone() for k, v in net.model_res.state_dict().items()}
    q, s, m, qm = episode()
    nn.functional.cross_entropy(net(q, s, m), qm.long()).backward()
    assert all(p.grad is None for p in net.model_res.parameters())
    assert all(torch.equal(v, net.model_res.state_dict()[k]) for k, v in before.items())
    assert net.layer5[0].weight.grad.abs().sum() > 0


def test_primed_support_and_trace():
    net = tiny_net().eval()
    keys = set(net.state_dict())
    q, s, m, _ = episode(seed=1)
    _, s2, m2, _ = episode(seed=2)
    m2 = m2.roll(8, dims=2)
    with torch.no_grad():
        explicit = [net(q, s, m), net(q, s2, m2)]
        net.set_support(s, m)
        assert torch.equal(net(q), explicit[0])
        traced = torch.jit.trace(net, q)
        q2 = episode(seed=9)[0]
        torch.testing.assert_close(traced(q2), net(q2))
        net.set_support(torch.cat([s, s2]), torch.cat([m, m2]))
        voted = net(q)
    assert set(net.state_dict()) == keys
    votes = explicit[0].argmax(1) + explicit[1].argmax(1)
    expected = (votes.float() / votes.max().clamp(min=1) >= 0.5).long()
    assert torch.equal(voted.argmax(1), expected) and voted.shape == (1, 2, 64, 64)


def test_official_checkpoint_round_trip(tmp_path):
    state = tiny_net(seed=4).state_dict()
    for key in ("model_res.conv1.weight", "model_res.layer1.0.downsample.1.running_mean",
                "model_res.layer3.0.conv2.weight", "layer5.0.weight", "layer5.1.running_var", "layer55.0.bias",
                "layer56.1.weight", "layer6.layer6_0.0.weight", "layer6.layer6_4.0.bias", "layer7.0.weight",
                "layer9.weight", "residule1.1.weight", "residule3.3.bias"):
        assert key in state
    torch.save({"state_dict": state}, tmp_path / "pmm.pth")
    loaded = tiny_net(seed=5, checkpoint=tmp_path / "pmm.pth")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    guided = tiny_net(seed=5, checkpoint=tmp_path / "pmm.pth",
                      text_guide=TextGuidedPrototypes((16,), text_dim=8, heads=2))
    assert torch.equal(guided.layer9.weight, state["layer9.weight"])
    renamed = dict(state)
    renamed["residual1.1.weight"] = renamed.pop("residule1.1.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"renamed\.pth.*missing key\(s\), e\.g\. \['residule1\.1\.weight'\].*"
                                         r"unexpected key\(s\), e\.g\. \['residual1\.1\.weight'\]"):
        tiny_net(checkpoint=tmp_path / "renamed.pth")


def test_backbone_weight_file(tmp_path):
    # a torchvision ResNet file (layer4 and fc included) loads into the layer1..3 backbone: the stride position
    # (1x1 here, 3x3 in torchvision) changes no weight shape
    torch.manual_seed(8)
    resnet = build_resnet_backbone((1, 1, 1, 1), (8, 16, 32, 64))
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    net = tiny_net(backbone_weights=tmp_path / "resnet.pth")
    for key, value in net.model_res.state_dict().items():
        assert torch.equal(value, resnet.state_dict()[key])
    partial = {k: v for k, v in resnet.state_dict().items() if k != "layer3.0.downsample.1.running_var"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing key\(s\), e\.g\. \['layer3\.0\.downsample\.1\.running_var'\]"):
        tiny_net(backbone_weights=tmp_path / "partial.pth")


def test_full_size_parameter_count():
    # No per-module figure is published; by hand: backbone = torchvision ResNet-50 without layer4 and fc:
    #   25,557,032 - 14,964,736 - 2,049,000 = 8,543,296 (conv1 9,408 + bn1 128 + layer1 215,808 + layer2 1,219,584
    #   + layer3 7,098,368)
    # layer5 1536*256*9 + 256 + 2*256 = 3,539,712; layer55 512*256*9 + 256 + 512 = 1,180,416;
    # layer56 256*256*9 + 256 + 512 = 590,592; layer6 2 * (256*256 + 256) + 3 * (256*256*9 + 256) = 1,901,824;
    # layer7 1280*256 + 256 + 512 = 328,448; layer9 256*2 + 2 = 514;
    # residule1 258*256*9 + 256 + 256*256*9 + 256 = 1,184,768; residule2 = residule3 = 2 * (589,824 + 256) = 1,180,160
    # head 11,086,594; total 19,629,890; trainable without the backbone's BatchNorm affine parameters
    # (2 * (64 + 3*(64+64+256) + 256 + 4*(128+128+512) + 512 + 6*(256+256+1024) + 1024) = 30,592): 19,599,298
    torch.manual_seed(0)
    net = PMMNet()
    children = {n: sum(p.numel() for p in m.parameters()) for n, m in net.named_children()}
    assert children == {"model_res": 8_543_296, "layer5": 3_539_712, "layer55": 1_180_416, "layer56": 590_592,
                        "layer6": 1_901_824, "layer7": 328_448, "layer9": 514, "residule1": 1_184_768,
                        "residule2": 1_180_160, "residule3": 1_180_160, "PMMs": 0}
    assert sum(p.numel() for p in net.parameters()) == 19_629_890
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 19_599_298
    assert len(net.state_dict()) == 310


def test_bad_inputs_are_refused():
    # the shared call contract (shapes, priming, text) is tested for every host in tests/test_networks_fewshot_hosts.py
    with pytest.raises(ValueError, match="layers"):
        PMMNet(layers=(1, 1), widths=(8, 16, 32))
    with pytest.raises(ValueError, match="iterations"):
        PrototypeMixture(4, iterations=0)
