"""Downstream heads over the ASG image encoder (common/networks/cxr_heads.py; spec specs/asg.md §6.2, §6.4).

Tiny ViT (64 px, patch 16 -> 4x4 grid, width 32, depth 2, 2 heads); the ResNet-50 paths run at 64 px.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.asg import ASGModel, ResNetImageEncoder, ViTImageEncoder
from common.networks.cxr_heads import LinearProbe, ResNetUNetSegmenter, SETRSegmenter, load_encoder_weights

TINY_VIT = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


class StandInText(nn.Module):
    """Text-encoder duck type for building an ASGModel."""

    hidden_size = 24

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, 24)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.embedding(input_ids)
        return hidden[:, 0], hidden[:, 1:]


def vit() -> ViTImageEncoder:
    torch.manual_seed(0)
    return ViTImageEncoder(**TINY_VIT)


@pytest.fixture(scope="module")
def resnet() -> ResNetImageEncoder:
    torch.manual_seed(0)
    return ResNetImageEncoder(input_size=64)


def assert_frozen_in_eval(encoder: nn.Module) -> None:
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_linear_probe_head_on_cls_with_frozen_encoder():
    probe = LinearProbe(vit(), num_classes=5).train()
    assert probe.training and probe.head.training
    assert_frozen_in_eval(probe.encoder)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    x = torch.rand(2, 3, 64, 64)
    logits = probe(x)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, probe.head(probe.encoder(x)[0]))  # feature = final-LN [CLS]
    logits.sum().backward()
    assert probe.head[1].weight.grad is not None
    assert all(p.grad is None for p in probe.encoder.parameters())


def test_linear_probe_resnet_keeps_batchnorm_statistics(resnet):
    probe = LinearProbe(resnet, num_classes=3, dropout=0.5).train()
    assert probe.head[1].in_features == 2048 and probe.head[0].p == 0.5
    before = resnet.model.bn1.running_mean.clone()
    assert probe(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert torch.equal(resnet.model.bn1.running_mean, before)  # encoder ran in eval mode
    assert_frozen_in_eval(resnet)


def test_setr_segmenter_shapes_and_freezing():
    seg = SETRSegmenter(vit()).train()
    assert_frozen_in_eval(seg.encoder)
    assert seg.proj.in_features == seg.proj.out_features == 32
    convs = [m for m in seg.decoder if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64]
    ups = [m for m in seg.decoder if isinstance(m, nn.Upsample)]
    assert len(ups) == 4 and all(u.scale_factor == 2 and u.align_corners for u in ups)
    x = torch.rand(2, 3, 64, 64)
    logits = seg(x)
    assert logits.shape == (2, 1, 64, 64)  # grid 4 -> 8 -> 16 -> 32 -> 64 = input size, no resize
    logits.mean().backward()
    assert all(p.grad is None for p in seg.encoder.parameters())
    assert seg.proj.weight.grad is not None and seg.out.weight.grad is not None


def test_setr_resizes_to_input_and_can_train_encoder():
    torch.manual_seed(0)
    encoder = ViTImageEncoder(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    seg = SETRSegmenter(encoder, channels=(8, 8, 8, 8), out_channels=2, freeze_encoder=False).train()
    logits = seg(torch.rand(1, 3, 32, 32))
    assert logits.shape == (1, 2, 32, 32)  # grid 4 * 16 = 64 px, resized to 32
    assert seg.encoder.training
    logits.sum().backward()
    assert encoder.model.patch_embed.proj.weight.grad is not None


def test_setr_dropout_before_last_conv():
    seg = SETRSegmenter(vit(), channels=(8, 8, 8, 8), dropout=0.5)
    assert isinstance(seg.dropout, nn.Dropout2d) and seg.dropout.p == 0.5
    x = torch.rand(1, 3, 64, 64)
    seg.train()
    assert not torch.equal(seg(x), seg(x))  # channel dropout is active in train mode
    seg.eval()
    assert torch.equal(seg(x), seg(x))


def test_resnet_unet_copies_encoder_weights_and_freezes(resnet):
    with torch.no_grad():
        resnet.model.layer4[2].bn3.running_var.fill_(2.0)  # non-default, so a copy is distinguishable
    seg = ResNetUNetSegmenter(resnet, dropout=0.1).train()
    source = resnet.model.state_dict()
    copied = seg.unet.encoder.state_dict()
    assert set(copied) == {k for k in source if not k.startswith("fc.")}
    assert all(torch.equal(copied[k], source[k]) for k in copied)
    assert_frozen_in_eval(seg.unet.encoder)
    assert seg.unet.decoder.training
    before = seg.unet.encoder.bn1.running_mean.clone()
    logits = seg(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1, 64, 64)
    assert torch.equal(seg.unet.encoder.bn1.running_mean, before)
    logits.mean().backward()
    assert all(p.grad is None for p in seg.unet.encoder.parameters())
    assert any(p.grad is not None for p in seg.unet.decoder.parameters())


def test_load_encoder_weights_from_asg_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = ASGModel(vit(), StandInText(), torch.randn(3, 32), emb_dim=8, proj_hidden_dim=16, irl_layers=1,
                     irl_heads=2, irl_ffn=16)
    with torch.no_grad():
        model.image_encoder.model.cls_token.fill_(0.25)  # differs from a fresh encoder's init
    torch.save({"model": model.state_dict()}, tmp_path / "asg.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    source = model.image_encoder.state_dict()
    for name in ("asg.pt", "bare.pt"):
        torch.manual_seed(2)
        encoder = load_encoder_weights(ViTImageEncoder(**TINY_VIT), tmp_path / name)
        loaded = encoder.state_dict()
        assert set(loaded) == set(source) and all(torch.equal(loaded[k], v) for k, v in source.items()), name


def test_load_encoder_weights_errors(tmp_path):
    model = ASGModel(vit(), StandInText(), torch.randn(3, 32), emb_dim=8, proj_hidden_dim=16, irl_layers=1,
                     irl_heads=2, irl_ffn=16)
    torch.save({"model": model.state_dict()}, tmp_path / "asg.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_encoder_weights(vit(), tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="asg.pt.*'backbone.'"):
        load_encoder_weights(vit(), tmp_path / "asg.pt", prefix="backbone.")
    wider = ViTImageEncoder(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="asg.pt.*shape"):
        load_encoder_weights(wider, tmp_path / "asg.pt")
    deeper = ViTImageEncoder(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="asg.pt.*missing"):
        load_encoder_weights(deeper, tmp_path / "asg.pt")
