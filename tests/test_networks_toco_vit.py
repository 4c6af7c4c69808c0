"""ToCoViT: official parameter figures (ViT-B), forward modes and shapes (tiny ViT), EMA teacher, weights."""

from __future__ import annotations

import pytest
import timm
import torch

from common.networks.toco_vit import ASPP, ToCoViT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, proj_hidden_dim=64, proj_bottleneck_dim=16)


def _count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@pytest.fixture(scope="module")
def tiny() -> ToCoViT:
    torch.manual_seed(0)
    return ToCoViT(**TINY).eval()


def test_official_parameter_figures_vit_b():
    # expected values: specs/official_figures.md §4a (zwyang6/ENDOKED@69167ce model_seg_neg.network,
    # vit_base_patch16_224, num_classes=2, init_momentum=0.99, aux_layer=-2)
    model = ToCoViT()
    assert _count(model) == 99_742_448
    assert _count(model, trainable=True) == 93_031_152
    assert len(model.state_dict()) == 178
    children = {name: (_count(c), _count(c, trainable=True)) for name, c in model.named_children()}
    assert children == {
        "encoder": (86_567_656, 86_416_360),
        "proj_head": (6_558_976, 6_557_952),
        "proj_head_t": (6_558_976, 0),
        "decoder": (55_304, 55_304),
        "classifier": (768, 768),
        "aux_classifier": (768, 768),
    }
    enc = dict(model.encoder.named_children())
    assert [_count(enc[n]) for n in ("patch_embed", "pos_drop", "blocks", "norm", "head")] == [
        590_592, 0, 85_054_464, 1_536, 769_000]
    assert model.encoder.cls_token.numel() == 768 and model.encoder.pos_embed.numel() == 151_296
    # frozen: pos_embed (151,296) + last-layer magnitude g (1,024): 86,567,656 - 86,416,360 = 151,296 and
    # 6,558,976 - 6,557,952 = 1,024
    assert not model.encoder.pos_embed.requires_grad
    assert not model.proj_head.last_layer.parametrizations.weight.original0.requires_grad
    groups = model.param_groups()
    assert [sum(p.numel() for p in g) for g in groups] == [86_529_256, 38_400, 6_560_512, 55_304]


def test_forward_modes_shapes_tiny_224(tiny):
    # 224 / 16 = 14 tokens per side; K = 2 classes -> K - 1 = 1 classifier output; D = 64
    x = torch.randn(2, 3, 224, 224)
    cam_aux, cam = tiny(x, cam_only=True)
    assert cam_aux.shape == cam.shape == (2, 1, 14, 14)
    assert not cam.requires_grad and not cam_aux.requires_grad
    cls, seg, fmap, cls_aux = tiny(x)
    assert cls.shape == cls_aux.shape == (2, 1)
    assert seg.shape == (2, 2, 14, 14) and fmap.shape == (2, 64, 14, 14)
    crops = [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)] + [torch.randn(2, 3, 112, 112)] * 8
    outputs = tiny(x, crops=crops, n_iter=5)
    # teacher: 2 global views x B=2 -> 4 rows; student: (2 + 8) views x B=2 -> 20 rows; out_dim 1024
    assert [tuple(o.shape) for o in outputs[4:]] == [(4, 1024), (20, 1024)]


def test_seg_only_is_the_released_forward(tiny):
    # the released EndoKED forward returns the decoder output only: the same seg as the full forward, same weights
    x = torch.randn(1, 3, 224, 224)
    released = ToCoViT(**TINY, seg_only=True).eval()
    released.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        seg = released(x)
        assert torch.equal(seg, tiny(x)[1]) and seg.shape == (1, 2, 14, 14)
        assert released(x, cam_only=True)[1].shape == (1, 1, 14, 14)


def test_forward_448_token_grid(tiny):
    # 448 / 16 = 28 tokens per side, 28 * 28 = 784 tokens (official_figures §4a shapes at 448, D = 64 here)
    x = torch.randn(1, 3, 448, 448)
    cls_tok, tokens, aux = tiny.forward_features(x)
    assert cls_tok.shape == (1, 64) and tokens.shape == aux.shape == (1, 784, 64)
    cls, seg, fmap, cls_aux = tiny(x)
    assert seg.shape == (1, 2, 28, 28) and fmap.shape == (1, 64, 28, 28) and cls.shape == (1, 1)


def test_cam_and_logits_follow_the_equations(tiny):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cam_aux, cam = tiny(x, cam_only=True)
        cls, seg, fmap, cls_aux = tiny(x)
        _, tokens, _ = tiny.forward_features(x)
    w = tiny.classifier.weight.view(-1)  # [64]
    # cam = W_cls * F (1x1 conv, no bias); F is the token sequence in row-major (h, w) = (4, 6) order
    assert torch.allclose(cam[:, 0], torch.einsum("d,bdhw->bhw", w, fmap), atol=1e-5)
    assert torch.allclose(fmap[:, :, 2, 5], tokens[:, 2 * 6 + 5], atol=0)
    # cls = W_cls . GMP(F): the classifier on the channel-wise spatial maximum, not the maximum of the CAM
    assert torch.allclose(cls[:, 0], fmap.amax(dim=(2, 3)) @ w, atol=1e-5)
    assert cls_aux.shape == (2, 1) and cam_aux.shape == (2, 1, 4, 6)


def test_aux_tokens_are_taken_before_the_final_norm():
    torch.manual_seed(1)
    model = ToCoViT(**TINY).eval()
    with torch.no_grad():
        model.encoder.norm.weight.zero_()
        model.encoder.norm.bias.fill_(7.0)  # LayerNorm output = 0 * x_hat + 7 = 7 everywhere
        cls_tok, tokens, aux = model.forward_features(torch.randn(1, 3, 32, 32))
    assert torch.all(cls_tok == 7.0) and torch.all(tokens == 7.0)
    assert not torch.allclose(aux, torch.full_like(aux, 7.0))  # block -2 output, not normalised
    model.aux_layer = -1  # the last block's tokens are replaced by their final-norm version
    with torch.no_grad():
        assert torch.all(model.forward_features(torch.randn(1, 3, 32, 32))[2] == 7.0)


def test_position_embedding_is_frozen_and_resized(tiny):
    assert not tiny.encoder.pos_embed.requires_grad
    # 14 x 14 grid: used as stored
    assert tiny._position_embedding(14, 14) is tiny.encoder.pos_embed
    model = ToCoViT(**TINY)
    with torch.no_grad():
        model.encoder.pos_embed[:, 1:] = torch.arange(64.0)  # every patch position holds channel index c
    resized = model._position_embedding(28, 7)
    # bicubic interpolation of a spatially constant map is that constant: channel c stays c at all 28 * 7 tokens
    assert resized.shape == (1, 1 + 196, 64)
    assert torch.allclose(resized[0, 1:], torch.arange(64.0).expand(196, 64), atol=1e-4)
    assert torch.equal(resized[0, 0], model.encoder.pos_embed[0, 0])


def test_ema_teacher_update_and_gradients():
    torch.manual_seed(2)
    model = ToCoViT(**TINY, init_momentum=0.99)
    assert all(torch.equal(a, b) for a, b in zip(model.proj_head.parameters(), model.proj_head_t.parameters()))
    with torch.no_grad():
        model.proj_head.mlp[0].bias.fill_(1.0)
        model.proj_head_t.mlp[0].bias.fill_(0.0)
    crops = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32), torch.randn(1, 3, 16, 16)]
    outputs = model(torch.randn(1, 3, 32, 32), crops=crops, n_iter=0)
    # one EMA step: 0.99 * 0 + (1 - 0.99) * 1 = 0.01
    assert torch.allclose(model.proj_head_t.mlp[0].bias, torch.full((64,), 0.01))
    out_t, out_s = outputs[4:]
    assert out_t.shape == (2, 1024) and out_s.shape == (3, 1024)
    assert not out_t.requires_grad
    sum(o.sum() for o in outputs).backward()
    assert model.proj_head.mlp[0].weight.grad is not None and model.classifier.weight.grad is not None
    assert all(p.grad is None for p in model.proj_head_t.parameters())
    model(torch.randn(1, 3, 32, 32), crops=crops)
    # second step: 0.99 * 0.01 + 0.01 * 1 = 0.0199
    assert torch.allclose(model.proj_head_t.mlp[0].bias, torch.full((64,), 0.0199))


def test_param_groups_tiny():
    model = ToCoViT(**TINY)
    groups = model.param_groups()
    # encoder norms: 3 blocks x (norm1 + norm2) x (64 + 64) + final norm 128 = 768 + 128 = 896
    assert sum(p.numel() for p in groups[1]) == 896
    # decoder: 4 branches x (64 * 2 * 3 * 3 + 2) = 4 x 1154 = 4616
    assert sum(p.numel() for p in groups[3]) == 4616
    assert sum(p.numel() for p in groups[0]) == _count(model.encoder) - 896
    # classifiers 2 x 64, then the student head; the teacher head is in no group
    assert groups[2][0] is model.classifier.weight and groups[2][1] is model.aux_classifier.weight
    assert sum(p.numel() for p in groups[2]) == 128 + _count(model.proj_head)
    ids = {id(p) for g in groups for p in g}
    assert not ids & {id(p) for p in model.proj_head_t.parameters()}


def test_aspp_sums_dilated_branches():
    aspp = ASPP(1, 1, dilations=(1, 2))
    with torch.no_grad():
        for conv in (aspp.c0, aspp.c1):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # centre tap: identity
        aspp.c0.bias.fill_(0.5)
        aspp.c1.bias.fill_(0.25)
        x = torch.arange(16.0).view(1, 1, 4, 4)
        # identity + 0.5 + identity + 0.25 = 2 x + 0.75
        assert torch.allclose(aspp(x), 2 * x + 0.75)
    assert [n for n, _ in ToCoViT(**TINY).decoder.named_children()] == ["c0", "c1", "c2", "c3"]
    assert ToCoViT(**TINY).decoder.c3.dilation == (24, 24)


def test_double_input_is_cast(tiny):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tiny(x.double(), cam_only=True)[1], tiny(x, cam_only=True)[1])


def test_loads_timm_checkpoint_and_official_head_keys(tmp_path):
    torch.manual_seed(3)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000,
                                  embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    model = ToCoViT(**TINY, pretrained_path=path)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    # an official full checkpoint names the weight-normed layer weight_g / weight_v: it loads strictly
    official = {}
    for key, value in model.state_dict().items():
        key = key.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        official[key.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")] = value
    assert "proj_head.last_layer.weight_g" in official
    ToCoViT(**TINY).load_state_dict(official, strict=True)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ToCoViT(**TINY, pretrained_path=tmp_path / "missing.pth")
    state = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=64, depth=2, num_heads=2,
                              mlp_ratio=2.0).state_dict()  # depth 2: blocks.2.* missing
    path = tmp_path / "depth2.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"depth2\.pth.*missing key"):
        ToCoViT(**TINY, pretrained_path=path)


def test_bad_arguments_and_inputs(tiny):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="num_classes"):
        ToCoViT(**TINY, num_classes=1)
    with pytest.raises(ValueError, match="aux_layer"):
        ToCoViT(**TINY, aux_layer=3)
    with pytest.raises(ValueError, match="2 global views"):
        tiny(torch.randn(1, 3, 32, 32), crops=[torch.randn(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="global crops must be"):
        tiny(torch.randn(1, 3, 32, 32), crops=[torch.randn(1, 3, 32, 32), torch.randn(1, 3, 48, 48)])
