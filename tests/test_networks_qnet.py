"""Q-Net host (common/networks/qnet.py): ADNet's thresholded cosine, the query-informed threshold and prototype
refinement by hand, the image-grid MAP, the CD-TG hook, training loss, official checkpoints, counts."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common.networks.qnet as qnet_module
from common.networks.cdtg import TextGuidedPrototypes
from common.networks.patnet import build_resnet_backbone
from common.networks.qnet import (QNet, anomaly_probability, build_dilated_resnet, query_threshold, refine_prototype,
                                  upsampled_masked_average_pool)

from fewshot_host_checks import synthetic_episode

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), channels=16)  # layer3 128 ch, layer4 256 ch


def tiny_net(seed: int = 0, **kwargs) -> QNet:
    torch.manual_seed(seed)
    return QNet(**{**TINY, **kwargs})


episode = partial(synthetic_episode, support="centre")


def test_anomaly_probability_by_hand():
    # prototype p = (2, 0); pixels f1 = (3, 0) (cos 1), f2 = (1, 1) (cos 1/sqrt 2), f3 = (0, 5) (cos 0)
    # q = 1 - sigmoid(0.5 (-20 cos - T)) = sigmoid(10 cos + T / 2)
    # T = -10: sigmoid(5) = 0.993307, sigmoid(2.071068) = 0.888059, sigmoid(-5) = 0.006693   (boundary cos = 0.5)
    # T = -16: sigmoid(2) = 0.880797, sigmoid(-0.928932) = 0.283141, sigmoid(-8) = 0.000335  (boundary cos = 0.8)
    feats = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 5.0]]).view(1, 2, 1, 3).repeat(2, 1, 1, 1)
    proto = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    prob = anomaly_probability(feats, proto, torch.tensor([-10.0, -16.0]))
    expected = torch.tensor([[0.993307, 0.888059, 0.006693], [0.880797, 0.283141, 0.000335]])
    torch.testing.assert_close(prob[:, 0], expected, atol=2e-6, rtol=0)
    # the scale enters: with scale 10 and T = -10 the first pixel gives sigmoid(5 - 5) = 0.5
    assert anomaly_probability(feats[:1], proto[:1], torch.tensor([-10.0]), scale=10.0)[0, 0, 0].item() == \
        pytest.approx(0.5, abs=1e-7)


def test_query_threshold_by_hand():
    # layer4 [1, 2, 2, 2]: channel 0 = (1, 2, 3, 6) -> mean 3; channel 1 = (0, 0, 4, 4) -> mean 2
    # fc: W = [[1, 0], [0, 1], [1, 1]], b = (0, 0, -1) -> (3, 2, 4)
    # head: w = (0.5, -1, 0.25), b = -2 -> 1.5 - 2 + 1 - 2 = -1.5
    layer4 = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0]]).view(1, 2, 2, 2)
    fc, head = nn.Linear(2, 3), nn.Linear(3, 1)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        fc.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
        head.weight.copy_(torch.tensor([[0.5, -1.0, 0.25]]))
        head.bias.fill_(-2.0)
    assert query_threshold(layer4, fc, head).tolist() == [-1.5]


def test_threshold_comes_from_the_query_only():
    net = tiny_net(refine_steps=0).eval()
    q, s, m, _ = episode()
    q2, s2, _, _ = episode(seed=7)
    with torch.no_grad():
        t1 = net._episode(q, s, m, None, None).threshold
        t2 = net._episode(q, s2, m, None, None).threshold  # another support: same threshold
        t3 = net._episode(q2, s, m, None, None).threshold  # another query: another threshold
        trunk = net.encoder.backbone
        x = q
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = trunk[name](x)
        manual = net.encoder.reduce1d(trunk["fc"](x.mean(dim=(2, 3))))[:, 0]
    assert torch.equal(t1, t2) and not torch.allclose(t1, t3)
    torch.testing.assert_close(t1, manual)


def test_prototype_refinement_one_step_by_hand():
    # query features on a 1 x 3 grid: f(x1) = (1, 0), f(x2) = (0.5, 1), f(x3) = (0, 2); prototype P = (a, b) =
    # (0.8, 0.2), |P| = 0.824621; cos with P: x1 0.970143, x2 0.6 / (0.824621 * 1.118034) = 0.650791, x3 0.242536
    # q = sigmoid(10 cos + T / 2):  T = -16: 0.846, 0.184, 0.004 -> foreground {x1}
    #                               T = -10: 0.991, 0.819, 0.071 -> foreground {x1, x2}
    # Rebuilt map F~: the foreground pixels take P. min 0 and max 2 come from x3 (background) in both maps, so
    # N(F) = sigmoid(F / 2) and no gradient goes through min / max.
    # BCE(input x = N(f), target t = N(F~)) per element: dL/dt = -logit(x) = -f / 2, mean over 6 elements, and
    # dt/dP = sigmoid'(P / 2) / 2:
    #   T = -16: dL/da = -(1/6) (f(x1)_1 / 2 = 0.5) sigmoid'(0.4) / 2 = -0.010011
    #            dL/db = -(1/6) (f(x1)_2 / 2 = 0) ... = 0                      -> b stays 0.2 exactly
    #   T = -10: dL/db = -(1/6) (0 + f(x2)_2 / 2 = 0.5) sigmoid'(0.1) / 2 = -0.010391   -> b moves too
    # First Adam step: P -= lr g / (|g| + 1e-8): a = 0.8 + 0.01 * 0.010011 / (0.010011 + 1e-8) = 0.80999999,
    # b (T = -10) = 0.2 + 0.01 * 0.010391 / (0.010391 + 1e-8) = 0.20999999
    feats = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0]]).view(1, 2, 1, 3)
    proto = torch.tensor([[0.8, 0.2]])
    refined = refine_prototype(feats, proto, torch.tensor([-16.0]), steps=1, lr=0.01)
    assert refined[0, 0].item() == pytest.approx(0.80999999, abs=1e-7)
    assert refined[0, 1] == proto[0, 1] and not refined.requires_grad  # unchanged to the bit
    both = refine_prototype(feats, proto, torch.tensor([-10.0]), steps=1, lr=0.01)
    assert both[0, 0].item() == pytest.approx(0.80999999, abs=1e-7)
    assert both[0, 1].item() == pytest.approx(0.20999999, abs=1e-7)
    # episodes are independent: a batch of the two gives each episode's own result
    batch = refine_prototype(feats.repeat(2, 1, 1, 1), proto.repeat(2, 1), torch.tensor([-16.0, -10.0]), 1, 0.01)
    torch.testing.assert_close(batch, torch.cat([refined, both]))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        refine_prototype(feats, proto, torch.tensor([-10.0]), steps=0)


def test_refinement_runs_at_evaluation_only():
    q, s, m, _ = episode()
    net = tiny_net(refine_steps=3)
    with torch.no_grad():
        refined = net.eval()(q, s, m)
        net.refine_steps = 0
        plain = net(q, s, m)
    with torch.inference_mode():  # the refinement's own autograd also runs under inference mode
        net.refine_steps = 3
        assert torch.equal(net(q, s, m), refined)
    assert (refined - plain).abs().max() > 1e-6
    with torch.no_grad():  # training mode (batch statistics): no refinement
        trained_mode = net.train()(q, s, m)
        net.refine_steps = 0
        assert torch.equal(net(q, s, m), trained_mode)


def test_upsampled_map_by_hand_and_equals_the_literal_upsampling():
    # features [a, b] = [4, 8] on 1 x 2, bilinear (align_corners=False) to 1 x 4 samples at source x = -0.25 (clamped
    # to 0), 0.25, 0.75, 1.25 (clamped to 1): 4, 5, 7, 8; mask (1, 1, 0, 0): (4 + 5) / (2 + 1e-5) = 4.4999775
    feats = torch.tensor([4.0, 8.0]).view(1, 1, 1, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    assert upsampled_masked_average_pool(feats, mask).item() == pytest.approx(4.4999775, abs=1e-6)
    torch.manual_seed(0)
    feats, mask = torch.randn(2, 5, 7, 9), (torch.rand(2, 30, 40) > 0.5).float()
    literal = (F.interpolate(feats, size=(30, 40), mode="bilinear") * mask[:, None]).sum(dim=(2, 3)) \
        / (mask.sum(dim=(1, 2))[:, None] + 1e-5)
    torch.testing.assert_close(upsampled_masked_average_pool(feats, mask), literal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upsampled_masked_average_pool(feats, mask[:, None]), literal, atol=1e-5, rtol=1e-5)


def test_dual_path_shapes_and_logits():
    net = tiny_net(refine_steps=0).eval()
    q, s, m, _ = episode(batch=2)
    with torch.no_grad():
        down2, down3, tau = net.encoder(q)
        logits = net(q, s, m)
    # stride 4 (layer2 and layer3 dilated) and stride 8 (layer4 strided) at 64 px
    assert down2.shape == (2, 16, 16, 16) and down3.shape == (2, 16, 8, 8) and tau.shape == (2,)
    assert logits.shape == (2, 2, 64, 64)
    # log-probabilities: softmax gives [1 - q, q] back, which sum to 1
    torch.testing.assert_close(logits.exp().sum(dim=1), torch.ones(2, 64, 64))
    with pytest.raises(ValueError, match="path_weights"):
        tiny_net(path_weights=(1.0,))


class FixedForeground(nn.Module):
    """Stand-in text guide: records its calls and returns a fixed foreground prototype per stage."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fg = [torch.randn(channels, generator=g) for _ in range(2)]
        self.calls = []

    def augment(self, support_feats):
        self.calls.append(("augment", len(support_feats)))
        return support_feats

    def fuse(self, stage, support_feat, mask, proto_fg, proto_bg, class_text, background_text):
        self.calls.append(("fuse", stage, tuple(support_feat.shape), tuple(mask.shape)))
        return self.fg[stage].expand(proto_fg.shape[0], -1), torch.full_like(proto_bg, float("nan"))


def test_text_hook_replaces_the_foreground_prototype(monkeypatch):
    guide = FixedForeground(16)
    net = tiny_net(refine_steps=0, text_guide=guide).eval()
    q, s, m, _ = episode()
    seen = []

    def spy(features, prototype, threshold, scale=20.0):
        seen.append(prototype)
        return anomaly_probability(features, prototype, threshold, scale)

    monkeypatch.setattr(qnet_module, "anomaly_probability", spy)
    with torch.no_grad():
        logits = net(q, s, m, torch.zeros(1, 4), torch.zeros(1, 4))
    # one augment with both paths; fuse per path on its grid (16 x 16 and 8 x 8) with the resized mask
    assert guide.calls == [("augment", 2), ("fuse", 0, (1, 16, 16, 16), (1, 1, 16, 16)),
                           ("fuse", 1, (1, 16, 8, 8), (1, 1, 8, 8))]
    # the fused foreground prototypes are the ones compared with the query; the (NaN) background is not used
    assert torch.equal(seen[0][0], guide.fg[0]) and torch.equal(seen[1][0], guide.fg[1])
    assert torch.isfinite(logits).all()


def text_guide(alpha: float) -> TextGuidedPrototypes:
    return TextGuidedPrototypes((16, 16), text_dim=8, alpha=alpha, heads=2, seed=3)


def test_alpha_zero_is_the_host_and_text_matters():
    q, s, m, _ = episode()
    ct, bt, ct2 = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(2))
    net = tiny_net(refine_steps=2, text_guide=text_guide(0.0)).eval()
    with torch.no_grad():
        guided = net(q, s, m, ct, bt)
        net.text_guide.alpha = 0.7
        with_text = net(q, s, m, ct, bt)
        other_text = net(q, s, m, ct2, bt)
        net.text_guide = None
        host = net(q, s, m)
    assert torch.equal(guided, host)  # (1 - 0) P + 0 p^t = P exactly, refinement included
    assert (with_text - host).abs().max() > 1e-4 and (with_text - other_text).abs().max() > 1e-4


def test_training_loss_terms_and_gradients():
    net = tiny_net().train()
    q, s, m, qm = episode(batch=2)
    out = net.training_loss(q, s, m, qm)
    # query loss: NLL of the log-probabilities weighted 0.1 (background) / 1 (foreground)
    nll = -out["logits"].gather(1, qm.long()[:, None])[:, 0]
    w = 0.1 + 0.9 * qm
    torch.testing.assert_close(out["query_loss"], (w * nll).sum() / w.sum())
    assert out["align_loss"].item() > 0
    torch.testing.assert_close(out["loss"], out["query_loss"] + out["align_loss"])
    out["loss"].backward()
    enc = net.encoder
    for p in (enc.backbone["conv1"].weight, enc.backbone["fc"].weight, enc.reduce1.weight, enc.reduce2.weight,
              enc.reduce1d.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # the official training updates the whole encoder


def test_alignment_loss_is_zero_for_an_empty_predicted_query():
    net = tiny_net().train()
    with torch.no_grad():  # T = -1e4: q = sigmoid(10 cos - 5000) = 0 everywhere
        net.encoder.reduce1d.weight.zero_()
        net.encoder.reduce1d.bias.fill_(-1e4)
    q, s, m, qm = episode()
    assert net.training_loss(q, s, m, qm)["align_loss"].item() == 0.0


def test_frozen_backbone_gets_no_gradient_and_keeps_statistics():
    guide = text_guide(0.7)
    net = tiny_net(freeze_backbone=True, text_guide=guide).train()
    trunk = [net.encoder.backbone[n] for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    assert not any(m.training for t in trunk for m in t.modules()) and net.encoder.reduce1.training
    before = {k: v.clone() for k, v in net.encoder.backbone.state_dict().items()}
    q, s, m, qm = episode()
    ct, bt = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(2))
    net.training_loss(q, s, m, qm, ct, bt)["loss"].backward()
    assert all(p.grad is None for t in trunk for p in t.parameters())
    after = net.encoder.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics untouched
    for p in (net.encoder.backbone["fc"].weight, net.encoder.reduce1.weight, net.encoder.reduce1d.weight,
              guide.sgu["0"].text_mlp[0].weight, guide.sgu["1"].text_mlp[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_primed_support_set_segments_a_query_alone():
    net = tiny_net(refine_steps=0).eval()
    keys = set(net.state_dict())
    q, s, m, _ = episode(seed=1)
    _, s2, m2, _ = episode(seed=2)
    m2 = m2.roll(8, dims=2)
    with torch.no_grad():
        explicit = [net(q, s, m), net(q, s2, m2)]
        net.set_support(s, m)
        assert torch.equal(net(q), explicit[0])
        net.set_support(torch.cat([s, s2]), torch.cat([m, m2]))
        voted = net(q)
    assert set(net.state_dict()) == keys
    votes = explicit[0].argmax(1) + explicit[1].argmax(1)
    expected = (votes.float() / votes.max().clamp(min=1) >= 0.5).long()
    assert torch.equal(voted.argmax(1), expected) and voted.shape == (1, 2, 64, 64)


def test_trace_of_the_primed_network():
    q, s, m, _ = episode()
    net = tiny_net(refine_steps=0, support={"support_images": s, "support_masks": m}).eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, q)
        q2 = episode(seed=9)[0]
        torch.testing.assert_close(traced(q2), net(q2))


def test_official_checkpoint_round_trip(tmp_path):
    source = tiny_net(seed=4)
    state = source.state_dict()
    for key in ("encoder.backbone.conv1.weight", "encoder.backbone.layer4.0.downsample.0.weight",
                "encoder.backbone.fc.weight", "encoder.reduce1.weight", "encoder.reduce2.weight",
                "encoder.reduce1d.weight", "encoder.reduce1d.bias"):
        assert key in state
    path = tmp_path / "qnet.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel prefix is stripped
    loaded = tiny_net(seed=5, checkpoint=path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    # a guided network loads the host file; its plug-in keeps its own weights
    guide = text_guide(0.7)
    guide_state = {k: v.clone() for k, v in guide.state_dict().items()}
    guided = tiny_net(seed=5, checkpoint=path, text_guide=guide)
    assert torch.equal(guided.encoder.reduce1.weight, state["encoder.reduce1.weight"])
    assert all(torch.equal(v, guide.state_dict()[k]) for k, v in guide_state.items())
    renamed = dict(state)
    renamed["encoder.reduce_1.weight"] = renamed.pop("encoder.reduce1.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"renamed\.pth.*missing key\(s\), e\.g\. \['encoder\.reduce1\.weight'\].*"
                                         r"unexpected key\(s\), e\.g\. \['encoder\.reduce_1\.weight'\]"):
        tiny_net(checkpoint=tmp_path / "renamed.pth")
    with pytest.raises(FileNotFoundError):
        tiny_net(checkpoint=tmp_path / "missing.pth")


def test_backbone_weight_files(tmp_path):
    torch.manual_seed(8)
    resnet = build_dilated_resnet((1, 1, 1, 1), (8, 16, 32, 64))
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    net = tiny_net(backbone_weights=tmp_path / "resnet.pth")
    assert all(torch.equal(v, net.encoder.backbone.state_dict()[k]) for k, v in resnet.state_dict().items())
    # torchvision DeepLabV3 layout: backbone.* (no fc) + classifier.*; fc keeps its initialisation
    deeplab = {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    deeplab["classifier.4.weight"] = torch.zeros(21, 256, 1, 1)
    torch.save(deeplab, tmp_path / "deeplab.pth")
    fresh = tiny_net(seed=6)
    net = tiny_net(seed=6, backbone_weights=tmp_path / "deeplab.pth")
    assert torch.equal(net.encoder.backbone["layer3"][0].conv2.weight, resnet.layer3[0].conv2.weight)
    assert torch.equal(net.encoder.backbone["fc"].weight, fresh.encoder.backbone["fc"].weight)
    deeplab.pop("backbone.layer4.0.conv1.weight")
    torch.save(deeplab, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*missing key\(s\), e\.g\. \['layer4\.0\.conv1\.weight'\]"):
        tiny_net(backbone_weights=tmp_path / "partial.pth")
    # a ResNet without dilation has the same shapes (dilation changes no weight): PATNet's builder output loads
    torch.save(build_resnet_backbone((1, 1, 1, 1), (8, 16, 32, 64)).state_dict(), tmp_path / "plain.pth")
    tiny_net(backbone_weights=tmp_path / "plain.pth")


def test_full_size_parameter_count():
    # No published figure (neither paper gives one); by hand: torchvision ResNet-101 44,549,160
    # (conv1 9,408 + bn1 128 + layer1 215,808 + layer2 1,219,584 + layer3 26,090,496 + layer4 14,964,736
    # + fc 2,049,000) + reduce1 1024 * 512 = 524,288 + reduce2 2048 * 512 = 1,048,576 + reduce1d 1000 + 1 = 1,001
    # = 46,123,025; state dict: ResNet-101's 626 keys + 4
    torch.manual_seed(0)
    net = QNet()
    children = {n: sum(p.numel() for p in m.parameters()) for n, m in net.encoder.backbone.named_children()}
    assert children == {"conv1": 9_408, "bn1": 128, "relu": 0, "maxpool": 0, "layer1": 215_808,
                        "layer2": 1_219_584, "layer3": 26_090_496, "layer4": 14_964_736, "avgpool": 0,
                        "fc": 2_049_000}
    heads = {n: sum(p.numel() for p in getattr(net.encoder, n).parameters()) for n in ("reduce1", "reduce2",
                                                                                       "reduce1d")}
    assert heads == {"reduce1": 524_288, "reduce2": 1_048_576, "reduce1d": 1_001}
    assert sum(p.numel() for p in net.parameters()) == 46_123_025
    assert len(net.state_dict()) == 630 and [n for n, _ in net.named_children()] == ["encoder"]
    assert net.encoder.backbone["layer3"][1].conv2.dilation == (4, 4)  # layer2 and layer3 dilated, not strided


def test_bad_inputs_are_refused():
    # the shared call contract (shapes, priming, text) is tested for every host in tests/test_networks_fewshot_hosts.py
    with pytest.raises(ValueError, match="refine_steps"):
        tiny_net(refine_steps=-1)
    with pytest.raises(ValueError, match="layers"):
        QNet(layers=(1, 1, 1), widths=(8, 16, 32, 64))
