"""DMTNet (Chen, Quan, Qin, IJCAI 2024) as a CD-TG host: grid prototypes and coarse query scores, the
self-matching transformation, dual hypercorrelation, the official objective, test-time self-finetuning, the text
hook, official checkpoint keys, priming and TorchScript."""

import math
import warnings

import pytest
import torch
from torch import nn

import common.networks.dmtnet as dmtnet_module
from common.networks.cdtg import TextGuidedPrototypes
from common.networks.dmtnet import (
    TSF_PARAMETERS,
    DMTNet,
    DMTNetOutput,
    apply_transform,
    coarse_query_scores,
    grid_cells,
    grid_prototypes,
    matching_transform,
    query_prototypes,
    self_matching_transform,
)
from common.networks.prototypes import resize_mask

from fewshot_host_checks import synthetic_episode

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(layers=(1, 2, 1, 2), widths=(4, 8, 8, 16))  # levels: 2 x 32 ch (8x8 at 64 px), 1 x 32 (4x4), 2 x 64 (2x2)
STAGE_CHANNELS = (32, 32, 64)
R2 = 1 / math.sqrt(2)


def tiny_net(seed: int = 0, **kwargs) -> DMTNet:
    torch.manual_seed(seed)
    return DMTNet(**TINY, **kwargs)


episode = synthetic_episode  # the support square reaches the corner, so the 2x2 layer4 grid sees foreground


def guide(alpha: float) -> TextGuidedPrototypes:
    return TextGuidedPrototypes(STAGE_CHANNELS, text_dim=8, alpha=alpha, seed=7)


def texts(batch: int = 1):
    g = torch.Generator().manual_seed(9)
    return torch.randn(batch, 8, generator=g), torch.randn(batch, 8, generator=g)


def test_resnet50_parameter_count_by_hand():
    # No published total (the paper gives none); by hand, per child: torchvision ResNet-50 incl. fc 25,557,032
    # (official_figures.md §3, PATNet's backbone); support anchors reference_layer3/2/1 = Linear(2048|1024|512, 2):
    # 2*2048+2 = 4,098, 2*1024+2 = 2,050, 2*512+2 = 1,026, and the same three again for the query anchors
    # reference_layer6/5/4; HPN learner with (4, 6, 3) correlation channels 2,573,794 (as PATNet's).
    # Total 25,557,032 + 2 * 7,174 + 2,573,794 = 28,145,174 = PATNet's 28,138,000 + 7,174.
    torch.manual_seed(0)
    net = DMTNet()
    children = {name: sum(p.numel() for p in m.parameters()) for name, m in net.named_children()}
    assert children == {"backbone": 25_557_032, "reference_layer3": 4_098, "reference_layer2": 2_050,
                        "reference_layer1": 1_026, "reference_layer6": 4_098, "reference_layer5": 2_050,
                        "reference_layer4": 1_026, "hpn_learner": 2_573_794, "cross_entropy_loss": 0, "dropout": 0}
    assert list(children) == ["backbone", "reference_layer3", "reference_layer2", "reference_layer1",
                              "reference_layer6", "reference_layer5", "reference_layer4", "hpn_learner",
                              "cross_entropy_loss", "dropout"]  # official DMTNetwork registration order
    assert sum(p.numel() for p in net.parameters()) == 28_145_174
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 14_348 + 2_573_794  # backbone frozen
    assert len(net.state_dict()) == 424 + 6  # PATNet's keys + weight and bias of 3 query anchor layers
    assert net.dropout.p == 0.2 and net.beta == 0.5 and net.grid_size == 4 and net.coarse_scale == 10.0
    # TSF: the GroupNorm (index 7 of [Conv4d, GN, ReLU] x 3) scales of the two mixing blocks, 128 values each
    tsf = dict(net.named_parameters())
    assert all(isinstance(net.get_submodule(n.rsplit(".", 1)[0]), nn.GroupNorm) for n in TSF_PARAMETERS)
    assert [tsf[n].numel() for n in TSF_PARAMETERS] == [128, 128]


def test_grid_cells_follow_the_official_index_rule():
    # side k = h // 4; starts 0, k, 2k, ... while <= h - k, plus h - k when the last cell stops short of the border:
    # 50 -> k = 12: 0, 12, 24, 36 (36 + 12 = 48 < 50) and 38;  25 -> k = 6: 0, 6, 12, 18 and 19;
    # 13 -> k = 3: 0, 3, 6, 9 and 10;  16 -> k = 4: 0, 4, 8, 12 (tiles exactly, no extra cell)
    for size, side, starts in ((50, 12, [0, 12, 24, 36, 38]), (25, 6, [0, 6, 12, 18, 19]),
                               (13, 3, [0, 3, 6, 9, 10]), (16, 4, [0, 4, 8, 12])):
        cells = grid_cells(size, size)
        assert len(cells) == len(starts) ** 2
        assert [c[1].start for c in cells[:len(starts)]] == starts  # first row of cells, left to right
        assert [c[0].start for c in cells[::len(starts)]] == starts  # first column, top to bottom
        assert all(c[0].stop - c[0].start == side and c[1].stop - c[1].start == side for c in cells)
    # a map smaller than the grid (official: side 0, crash) gets cells of side 1; rows and columns independent
    assert grid_cells(2, 8) == [(slice(r, r + 1), slice(c, c + 2)) for r in (0, 1) for c in (0, 2, 4, 6)]
    with pytest.raises(ValueError, match="grid"):
        grid_cells(8, 8, grid=0)


def test_grid_prototypes_and_coarse_query_by_hand():
    # support 2x2 map, C = 2, grid 2 -> four one-pixel cells; mask fg on the diagonal
    #   s(0,0) = (1, 0) fg   s(0,1) = (0, 1) bg   s(1,0) = (1, 1) bg   s(1,1) = (2, 0) fg
    # cell prototypes (MAP with eps 1e-6; an empty side is the zero vector):
    #   fg: (1, 0), 0, 0, (2, 0)        bg: 0, (0, 1), (1, 1), 0
    s = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]]).unsqueeze(0)  # [1, 2, 2, 2]
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    fg, bg = grid_prototypes(s, m, grid=2)
    assert fg.shape == bg.shape == (1, 4, 2)
    torch.testing.assert_close(fg[0], torch.tensor([[1.0, 0], [0, 0], [0, 0], [2, 0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(bg[0], torch.tensor([[0.0, 0], [0, 1], [1, 1], [0, 0]]), atol=1e-5, rtol=0)
    # query pixels x = (1, 1), y = (1, 0), z = (0, -1), w = (0, 1); S = 10 * mean over the 4 cells = 2.5 * sum:
    #   x: fg 2.5 (1/sqrt2 + 1/sqrt2) = 3.5355   bg 2.5 (1/sqrt2 + 1) = 4.2678        -> bg
    #   y: fg 2.5 (1 + 1) = 5                    bg 2.5 (0 + 1/sqrt2) = 1.7678        -> fg
    #   z: fg 0                                  bg 2.5 (-1 - 1/sqrt2) = -4.2678      -> fg (0 > -4.27)
    #   w: fg 0                                  bg 2.5 (1 + 1/sqrt2) = 4.2678        -> bg
    q = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [-1.0, 1.0]]]).unsqueeze(0)  # x y / z w
    scores = coarse_query_scores(q, fg, bg)
    expected = torch.tensor([[[2.5 * (R2 + 1), 2.5 * R2], [2.5 * (-1 - R2), 2.5 * (1 + R2)]],
                             [[5 * R2, 5.0], [0.0, 0.0]]])
    torch.testing.assert_close(scores[0], expected, atol=1e-5, rtol=0)
    # query prototypes from the pseudo-mask: q^f = mean(y, z) = (0.5, -0.5), q^b = mean(x, w) = (0.5, 1)
    q_fg, q_bg = query_prototypes(q, scores)
    torch.testing.assert_close(q_fg[0], torch.tensor([0.5, -0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(q_bg[0], torch.tensor([0.5, 1.0]), atol=1e-5, rtol=0)


def test_self_matching_transform_by_hand():
    # C = 2, a = 1/sqrt2. Support: p^b = (2, 0) -> c_b = (1, 0); p^f = (1, 1) -> c_f = (a, a);
    # anchors a^b = (0, 3) -> (0, 1), a^f = (4, 0) -> (1, 0).  C^ = [[1, 0], [a, a]], C^-1 = [[1, 0], [-1, sqrt2]],
    # C^-1 A^ = [[1, 0], [-1, sqrt2]] @ [[0, 1], [1, 0]] = [[0, 1], [sqrt2, -1]],  P^s = its transpose
    #   = [[0, sqrt2], [1, -1]]   (check: P^s c_b = (0, 1) = a^b, P^s c_f = (sqrt2 a, 0) = (1, 0) = a^f)
    # Query rows (q^f, q^b) = ((0, 5), (3, 0)) -> [[0, 1], [1, 0]] (its own inverse); query anchors
    # ((1, 1), (1, -1)) -> [[a, a], [a, -a]];  P^q = ([[0, 1], [1, 0]] @ [[a, a], [a, -a]])^T = [[a, a], [-a, a]]
    # P~^q = 0.5 P^q + 0.5 P^s. A pixel f = (1, 2):  P^s f = (2 sqrt2, -1),  P^q f = (3a, a),
    #   P~^q f = 0.5 (3a + 2 sqrt2, a - 1) = (2.474874, -0.146447)
    support_protos = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    query_protos = torch.tensor([[[0.0, 5.0], [3.0, 0.0]]])
    support_anchors, query_anchors = torch.tensor([[0.0, 3.0], [4.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    u, v = matching_transform(support_protos, support_anchors)
    torch.testing.assert_close((u @ v)[0], torch.tensor([[0.0, math.sqrt(2)], [1.0, -1.0]]), atol=1e-5, rtol=0)
    u, v = matching_transform(query_protos, query_anchors)
    torch.testing.assert_close((u @ v)[0], torch.tensor([[R2, R2], [-R2, R2]]), atol=1e-5, rtol=0)
    f = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    query_t, (support_t,) = self_matching_transform(f, [f], support_protos, query_protos, support_anchors,
                                                    query_anchors, beta=0.5)
    torch.testing.assert_close(query_t.flatten(), torch.tensor([0.5 * (3 * R2 + 2 * math.sqrt(2)), 0.5 * (R2 - 1)]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(support_t.flatten(), torch.tensor([2 * math.sqrt(2), -1.0]), atol=1e-5, rtol=0)
    # beta = 1: the query's own transformation alone (3a, a); beta = 0: the support's alone
    query_only, _ = self_matching_transform(f, [], support_protos, query_protos, support_anchors, query_anchors, 1.0)
    torch.testing.assert_close(query_only.flatten(), torch.tensor([3 * R2, R2]), atol=1e-5, rtol=0)
    support_only, _ = self_matching_transform(f, [], support_protos, query_protos, support_anchors, query_anchors, 0.0)
    torch.testing.assert_close(support_only, support_t)


def test_matching_transform_maps_prototypes_onto_per_episode_anchors():
    torch.manual_seed(0)
    protos, anchors = torch.randn(3, 2, 16), torch.randn(3, 2, 16)  # per-episode anchors (dropout draws)
    u, v = matching_transform(protos, anchors)
    c = protos / protos.norm(dim=-1, keepdim=True)
    a = anchors / anchors.norm(dim=-1, keepdim=True)
    mapped = apply_transform(c.transpose(1, 2).unsqueeze(2), (u, v))  # the two prototypes as a [B, C, 1, 2] map
    torch.testing.assert_close(mapped[:, :, 0, :].transpose(1, 2), a, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, 2, C\]"):
        matching_transform(torch.randn(3, 16), anchors[0])


def test_shapes_one_shot_and_official_outputs():
    net = tiny_net().eval()
    q, s, sm, qm = episode(batch=2)
    with torch.no_grad():
        logits = net(q, s, sm)
        out = net.episode_outputs(q, s, sm)
    assert logits.shape == out.logits.shape == out.background_logits.shape == (2, 2, 64, 64)
    # 64 px: levels 8x8 (x2), 4x4, 2x2 (x2)
    assert [tuple(c.shape) for c in out.coarse_scores] == [(2, 2, 8, 8)] * 2 + [(2, 2, 4, 4)] + [(2, 2, 2, 2)] * 2
    assert torch.equal(out.logits, logits)  # forward = the foreground branch, without computing the background one
    assert (out.background_logits - logits).abs().max() > 1e-4
    assert net.level_stages == (0, 0, 1, 2, 2) and net.stage_channels == STAGE_CHANNELS


def test_dual_hypercorrelation_uses_foreground_and_background_support(monkeypatch):
    net = tiny_net().eval()
    q, s, sm, _ = episode()
    seen = []
    original = dmtnet_module.hypercorrelation

    def spy(query_feat, support_feat):
        seen.append(support_feat)
        return original(query_feat, support_feat)

    monkeypatch.setattr(dmtnet_module, "hypercorrelation", spy)
    with torch.no_grad():
        net.episode_outputs(q, s, sm)
    assert len(seen) == 10  # 5 levels x (foreground branch, background branch)
    for feat_fg, feat_bg in zip(seen[:5], seen[5:]):
        # the support sides are P^s (f m) and P^s (f (1 - m)): zero where the resized mask is 0 resp. 1
        m = resize_mask(sm, tuple(feat_fg.shape[-2:]))[0, 0]
        assert feat_fg[0][:, m == 0].abs().max() == 0 and feat_fg[0][:, m > 0].abs().max() > 0
        assert feat_bg[0][:, m == 1].abs().max() == 0 and feat_bg[0][:, m < 1].abs().max() > 0


def test_loss_terms_by_hand():
    net = tiny_net()
    # query mask 4x4 with columns 0-1 foreground; the coarse level is 3x3: bilinear (aligned corners) samples
    # columns 0, 1.5, 3 -> 1, 0.5, 0, truncated to 1, 0, 0 (0.5 is not foreground): 3 fg and 6 bg cells
    qm = torch.zeros(1, 4, 4)
    qm[..., :2] = 1
    # coarse scores (0, ln 3) everywhere: p(fg) = 3/4 -> CE 0.287682 on fg cells, 1.386294 on bg cells
    # mean (3 * 0.287682 + 6 * 1.386294) / 9 = 1.020090 (a >= 0.5 threshold would give 0.653886)
    coarse = torch.stack([torch.zeros(3, 3), torch.full((3, 3), math.log(3))]).unsqueeze(0)
    zeros = torch.zeros(1, 2, 4, 4)  # logits 0: CE ln 2 = 0.693147 whatever the target
    terms = net.loss_terms(DMTNetOutput(zeros, zeros, (coarse,)), qm)
    assert terms["foreground"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["background"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["coarse"].item() == pytest.approx((3 * math.log(4 / 3) + 6 * math.log(4)) / 9, abs=1e-6)
    # L = 0.693147 + 1 * 0.693147 + 0.5 * 1.020090 = 1.896339
    total = net.training_loss(DMTNetOutput(zeros, zeros, (coarse,)), qm)
    assert total.item() == pytest.approx(2 * math.log(2) + 0.5 * 1.020090, abs=1e-5)
    # the background branch is trained against 1 - M_q: logits favouring class 1 where M_q = 0 lower its CE
    bg_logits = torch.stack([qm, 1 - qm], dim=1) * 5
    assert net.loss_terms(DMTNetOutput(zeros, bg_logits, (coarse,)), qm)["background"] < 0.01
    with pytest.raises(ValueError, match="query_mask"):
        net.loss_terms(DMTNetOutput(zeros, zeros, (coarse,)), qm[:, :3])


def test_gradient_reaches_anchors_and_learner_not_backbone():
    net = tiny_net()
    net.train()
    assert not any(m.training for m in net.backbone.modules())
    q, s, sm, qm = episode(batch=2)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    out = net.episode_outputs(q, s, sm)
    assert not any(c.requires_grad for c in out.coarse_scores)  # frozen features only: the coarse term is constant
    net.training_loss(out, qm).backward()
    for index in range(1, 7):  # support anchors 1-3 (P^s) and query anchors 4-6 (P^q)
        grad = getattr(net, f"reference_layer{index}").weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert net.hpn_learner.decoder2[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.backbone.state_dict().items())  # BN statistics untouched


def test_anchor_dropout_acts_in_training_only():
    net = tiny_net()
    q, s, sm, _ = episode()
    with torch.no_grad():
        evaluated = net.eval()(q, s, sm)
        assert torch.equal(evaluated, net(q, s, sm))
        assert not torch.equal(net.train()(q, s, sm), net(q, s, sm))
        net.dropout.p = 0.0  # the anchors are the only random part of a training pass
        assert torch.equal(net(q, s, sm), evaluated)


def test_alpha_zero_text_guide_gives_the_host_output_and_text_matters():
    q, s, sm, _ = episode(batch=2)
    ct, bt = texts(2)
    host = tiny_net().eval()
    guided_zero = tiny_net(text_guide=guide(0.0)).eval()
    guided = tiny_net(text_guide=guide(0.7)).eval()
    with torch.no_grad():
        plain = host.episode_outputs(q, s, sm)
        for fuse_grid in (False, True):
            guided_zero.fuse_grid_prototypes = guided.fuse_grid_prototypes = fuse_grid
            assert torch.equal(guided_zero(q, s, sm, ct, bt), plain.logits)  # (1 - 0) P + 0 p^t = P exactly
            out = guided.episode_outputs(q, s, sm, ct, bt)
            assert (out.logits - plain.logits).abs().max() > 1e-4
            assert (guided(q, s, sm, ct, bt.flip(0)) - out.logits).abs().max() > 1e-6  # the text itself matters
            # the grid prototypes (coarse query) stay visual by default and are text-guided with the switch
            same_coarse = all(torch.equal(a, b) for a, b in zip(out.coarse_scores, plain.coarse_scores))
            assert same_coarse != fuse_grid
    # with grid fusion the coarse term of the objective trains the text guide
    out = guided.train().episode_outputs(q, s, sm, ct, bt)
    assert all(c.requires_grad for c in out.coarse_scores)


class SpyGuide(nn.Module):
    """Stand-in text guide: records its calls and returns fixed prototypes per stage."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fg = [torch.randn(c, generator=g) for c in STAGE_CHANNELS]
        self.bg = [torch.randn(c, generator=g) for c in STAGE_CHANNELS]
        self.augment_calls, self.fuse_calls = [], []

    def augment(self, support_feats):
        self.augment_calls.append(len(support_feats))
        return support_feats

    def fuse(self, stage, support_feat, mask, proto_fg, proto_bg, class_text, background_text):
        self.fuse_calls.append((stage, tuple(support_feat.shape), tuple(mask.shape)))
        b = proto_fg.shape[0]
        return self.fg[stage].expand(b, -1), self.bg[stage].expand(b, -1)


def test_text_hook_replaces_the_support_prototypes_of_smt(monkeypatch):
    spy_guide = SpyGuide()
    net = tiny_net(text_guide=spy_guide).eval()
    q, s, sm, _ = episode()
    ct, bt = texts()
    seen = []
    original = dmtnet_module.self_matching_transform

    def spy(query_feat, support_feats, support_prototypes, query_protos, *args):
        seen.append((query_feat, support_prototypes, query_protos))
        return original(query_feat, support_feats, support_prototypes, query_protos, *args)

    monkeypatch.setattr(dmtnet_module, "self_matching_transform", spy)
    with torch.no_grad():
        net(q, s, sm, ct, bt)
    assert spy_guide.augment_calls == [5]
    assert [c[0] for c in spy_guide.fuse_calls] == [0, 0, 1, 2, 2]  # one fuse per level, whole maps
    assert [c[2] for c in spy_guide.fuse_calls] == [(1, 1, 8, 8)] * 2 + [(1, 1, 4, 4)] + [(1, 1, 2, 2)] * 2
    for (query_feat, support_protos, query_protos), stage in zip(seen, net.level_stages):
        # C^s rows are the fused (bg, fg); C^q rows are the query's own (fg, bg) from its coarse pseudo-mask
        assert torch.equal(support_protos[0, 0], spy_guide.bg[stage])
        assert torch.equal(support_protos[0, 1], spy_guide.fg[stage])
        assert not torch.equal(query_protos[0, 0], spy_guide.fg[stage])
    # grid fusion: one more fuse per grid cell, on the cell's crop (8x8 -> 16 cells of 2x2; 4x4 -> 16 of 1x1;
    # 2x2 -> 4 of 1x1)
    spy_guide.fuse_calls.clear()
    net.fuse_grid_prototypes = True
    with torch.no_grad():
        net(q, s, sm, ct, bt)
    shapes = [c[2] for c in spy_guide.fuse_calls]
    assert len(shapes) == 5 + 16 + 16 + 16 + 4 + 4
    assert shapes[1:17] == [(1, 1, 2, 2)] * 16 and shapes[-4:] == [(1, 1, 1, 1)] * 4


def test_text_guide_requires_text():
    net = tiny_net(text_guide=guide(0.7))
    q, s, sm, _ = episode()
    ct, _ = texts()
    for kwargs in ({}, {"class_text": ct}):
        with pytest.raises(ValueError, match="class_text and background_text"):
            net.finetune(q, s, sm, **kwargs)
    with pytest.raises(ValueError, match="fuse_grid_prototypes needs a text_guide"):
        tiny_net(fuse_grid_prototypes=True)


def test_tsf_changes_only_the_intended_parameters():
    net = tiny_net(text_guide=guide(0.7)).eval()
    q, s, sm, _ = episode()
    ct, bt = texts()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert [n for n, _ in net.finetune_parameters()] == list(TSF_PARAMETERS)
    losses = net.finetune(q, s, sm, ct, bt, steps=3, lr=1e-2)
    assert len(losses) == 3 and losses[-1] < losses[0]
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(TSF_PARAMETERS)  # not the anchors, the rest of the learner, the text guide, BN statistics
    assert all(p.grad is None for n, p in net.named_parameters() if n not in TSF_PARAMETERS)
    # official default: one step; K-shot supports [B, K, 3, H, W] are stacked along the batch: the official K-shot
    # step is the mean of the K support losses, i.e. the 1-shot step on the stacked batch of the K supports
    _, s2, sm2, _ = episode(seed=2)
    ct2, bt2 = texts(2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    kshot = net.finetune(q, torch.stack([s, s2], dim=1), torch.stack([sm, sm2], dim=1), ct2[:1], bt2[:1])
    kshot_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    stacked = net.finetune(torch.cat([q, q]), torch.cat([s, s2]), torch.cat([sm, sm2]), ct2[:1].expand(2, -1),
                           bt2[:1].expand(2, -1))
    assert len(kshot) == 1 and kshot == stacked
    assert all(torch.equal(v, kshot_state[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="steps must be >= 1"):
        net.finetune(q, s, sm, ct, bt, steps=0)
    with pytest.raises(ValueError, match="lr > 0"):
        net.finetune(q, s, sm, ct, bt, lr=0.0)


def test_checkpoint_round_trip_in_the_official_key_format(tmp_path):
    source = tiny_net(seed=3)
    # the official trainDDP.py saves the DistributedDataParallel model's state dict: "module." + official names
    official = {"module." + k: v for k, v in source.state_dict().items()}
    assert "module.reference_layer6.weight" in official and "module.hpn_learner.encoder_layer3to2.7.weight" in official
    path = tmp_path / "best_model.pt"
    torch.save(official, path)
    net = tiny_net(seed=4, checkpoint=path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    # a host checkpoint loads into a text-guided network and leaves the guide as built
    text_guide = guide(0.7)
    guide_before = {k: v.clone() for k, v in text_guide.state_dict().items()}
    guided = tiny_net(seed=4, checkpoint=path, text_guide=text_guide)
    assert torch.equal(guided.reference_layer4.weight, source.reference_layer4.weight)
    assert all(torch.equal(v, guide_before[k]) for k, v in guided.text_guide.state_dict().items())
    # our own CD-TG checkpoint (with text_guide.* keys) loads everything
    torch.save(guided.state_dict(), tmp_path / "cdtg.pt")
    again = tiny_net(seed=5, checkpoint=tmp_path / "cdtg.pt", text_guide=guide(0.3))
    assert all(torch.equal(v, guided.state_dict()[k]) for k, v in again.state_dict().items())
    # a wrong name is reported
    wrong = dict(official)
    wrong["module.reference_layer7.weight"] = wrong.pop("module.reference_layer6.weight")
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt.*missing.*reference_layer6\.weight.*unexpected.*reference_layer7"):
        tiny_net(checkpoint=tmp_path / "wrong.pt")


def test_primed_support_set_segments_a_query_alone():
    net = tiny_net().eval()
    keys = set(net.state_dict())
    q, s, m, _ = episode(batch=2)
    _, s2, m2, _ = episode(batch=1, seed=2)
    with torch.no_grad():
        net.set_support(s[:1], m[:1])
        primed = net(q)
        assert primed.shape == (2, 2, 64, 64)
        assert torch.equal(primed, net(q, s[:1].expand(2, -1, -1, -1), m[:1].expand(2, -1, -1)))
        explicit = [net(q[:1], s[:1], m[:1]), net(q[:1], s2, m2)]
        net.set_support(torch.cat([s[:1], s2]), torch.cat([m[:1], m2]))
        voted = net(q[:1])
    assert set(net.state_dict()) == keys  # the support set is not part of the state dict
    # K = 2: V = P_1 + P_2, kept where V / max V >= 0.5, returned one-hot
    votes = explicit[0].argmax(1) + explicit[1].argmax(1)
    expected = (votes.float() / votes.max().clamp(min=1) >= 0.5).long()
    assert voted.shape == (1, 2, 64, 64) and torch.equal(voted.argmax(1), expected)


def test_primed_text_guided_network_traces():
    net = tiny_net(text_guide=guide(0.7)).eval()
    q, s, m, _ = episode()
    q2, _, _, _ = episode(seed=3)
    ct, bt = texts()
    net.set_support(s, m, ct[0], bt[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation notice and its shape-constant notes
        traced = torch.jit.trace(net, (q,), check_trace=False)  # checked below, on another query
        with torch.jit.optimized_execution(False):  # skip the profiling executor's slow first runs
            assert torch.equal(traced(q2), net(q2))  # a different query through the traced graph


def test_bad_inputs_are_refused():
    # the shared call contract (shapes, priming, text) is tested for every host in tests/test_networks_fewshot_hosts.py
    with pytest.raises(ValueError, match="beta"):
        tiny_net(beta=1.5)
    with pytest.raises(ValueError, match="grid_size"):
        tiny_net(grid_size=0)
    with pytest.raises(ValueError, match="anchor_dropout"):
        tiny_net(anchor_dropout=1.0)
    with pytest.raises(ValueError, match=r"unknown: \['hpn_learner.nothing'\]"):
        tiny_net(tsf_parameters=("hpn_learner.nothing",))
    with pytest.raises(ValueError, match="layers"):
        DMTNet(layers=(1, 1, 1), widths=(4, 8, 8, 16))
    with pytest.raises(ValueError, match="same grid"):
        grid_prototypes(torch.randn(1, 4, 4, 4), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="prototypes must both be"):
        coarse_query_scores(torch.randn(1, 4, 2, 2), torch.randn(1, 3, 4), torch.randn(1, 3, 5))
