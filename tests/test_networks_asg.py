"""ASG networks (common/networks/asg.py; spec specs/asg.md §3, official_figures.md §6).

Full-size parameter counts are checked on the meta device (no memory, no init cost); behaviour with a tiny ViT
(64 px, patch 16 -> 4x4 grid, width 32, depth 2, 2 heads) and a tiny stand-in text encoder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common.networks.asg import (
    ASGModel,
    GlobalEmbedding,
    IRLDecoder,
    LocalEmbedding,
    ResNetImageEncoder,
    ViTImageEncoder,
    region_features,
    sentence_features,
)

TINY_VIT = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_ASG = {"emb_dim": 8, "proj_hidden_dim": 16, "irl_layers": 1, "irl_heads": 2, "irl_ffn": 32}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class StandInText(nn.Module):
    """Text-encoder duck type: Embedding + Linear; report = token 0, words = tokens 1..L-1."""

    def __init__(self, hidden_size: int = 24, vocab: int = 30) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab, hidden_size)
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.linear(self.embedding(input_ids)) * attention_mask.unsqueeze(-1)
        return hidden[:, 0], hidden[:, 1:]


class Output:
    def __init__(self, last_hidden_state: torch.Tensor) -> None:
        self.last_hidden_state = last_hidden_state


class StandInTagEncoder(nn.Module):
    """Tag-encoder duck type (returns ``.last_hidden_state``), with dropout so train mode is visible."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, width)
        self.dropout = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return Output(self.dropout(self.embedding(input_ids)))


def batch(b: int = 2, length: int = 12, regions: int = 3, words: int = 4):
    torch.manual_seed(3)
    ids = torch.randint(1, 30, (b, length))
    rois = torch.tensor([[[0, 0, 0, 4, 4], [0, 1, 1, 3, 2], [0, -1, -1, -1, -1]],
                         [[1, 0, 1, 2, 4], [1, -1, -1, -1, -1], [1, -1, -1, -1, -1]]], dtype=torch.float32)
    sent_index = torch.tensor([[[0, 1, -1, -1], [2, 3, 4, -1], [-1] * words],
                               [[5, -1, -1, -1], [-1] * words, [-1] * words]])
    return torch.rand(b, 3, 64, 64), ids, torch.ones_like(ids), None, rois[:, :regions], sent_index[:, :regions]


@pytest.fixture(scope="module")
def tiny_model() -> ASGModel:
    torch.manual_seed(0)
    return ASGModel(ViTImageEncoder(**TINY_VIT), StandInText(), torch.randn(5, 16), **TINY_ASG)


# ---------------------------------------------------------------- image encoders


def test_vit_b16_parameter_count_and_widths():
    with torch.device("meta"):
        encoder = ViTImageEncoder()
    assert count(encoder) == 85_798_656  # official_figures §6 (BLIP-style ViT-B/16 at 224)
    assert (encoder.global_width, encoder.local_width, encoder.grid) == (768, 768, 14)
    assert encoder.model.norm.eps == 1e-6


def test_vit_forward_returns_final_norm_cls_and_patches():
    torch.manual_seed(0)
    encoder = ViTImageEncoder(**TINY_VIT).eval()
    x = torch.rand(2, 3, 64, 64)
    global_feat, patches = encoder(x)
    assert global_feat.shape == (2, 32) and patches.shape == (2, 16, 32)  # grid = 64 // 16 = 4 -> 16 tokens
    tokens = encoder.model.forward_features(x)
    assert torch.equal(global_feat, tokens[:, 0]) and torch.equal(patches, tokens[:, 1:])
    # final LayerNorm (weight 1, bias 0 at init): every token has zero mean over channels
    assert patches.mean(-1).abs().max() < 1e-5 and global_feat.mean(-1).abs().max() < 1e-5


def test_vit_rejects_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple"):
        ViTImageEncoder(img_size=60, patch_size=16, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def vit_source() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return {k: v.clone() for k, v in ViTImageEncoder(**TINY_VIT).model.state_dict().items()}


def assert_vit_loaded(encoder: ViTImageEncoder, source: dict[str, torch.Tensor]) -> None:
    state = encoder.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items())


def test_vit_loads_timm_deit_and_asg_checkpoints(tmp_path, vit_source):
    deit = {"model": {**vit_source, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}}
    torch.save(deit, tmp_path / "deit.pth")
    assert_vit_loaded(ViTImageEncoder(**TINY_VIT, checkpoint=tmp_path / "deit.pth"), vit_source)
    lightning = {"state_dict": {**{f"img_encoder_q.model.{k}": v for k, v in vit_source.items()},
                                "img_encoder_q.global_embed.head.0.weight": torch.zeros(16, 32),
                                "irl.head.weight": torch.zeros(1, 32)}}
    torch.save(lightning, tmp_path / "asg.ckpt")
    assert_vit_loaded(ViTImageEncoder(**TINY_VIT, checkpoint=tmp_path / "asg.ckpt"), vit_source)
    torch.save(vit_source, tmp_path / "bare.pt")
    assert_vit_loaded(ViTImageEncoder(**TINY_VIT, checkpoint=tmp_path / "bare.pt"), vit_source)


def test_vit_checkpoint_errors_name_the_file(tmp_path, vit_source):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ViTImageEncoder(**TINY_VIT, checkpoint=tmp_path / "missing.pt")
    torch.save(vit_source, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="narrow.pt.*shape"):
        ViTImageEncoder(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2,
                        checkpoint=tmp_path / "narrow.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*no key"):
        ViTImageEncoder(**TINY_VIT, checkpoint=tmp_path / "other.pt")


@pytest.fixture(scope="module")
def resnet() -> ResNetImageEncoder:
    torch.manual_seed(0)
    return ResNetImageEncoder().eval()


def test_resnet_encoder_layout_and_upsampling(resnet):
    assert (resnet.grid, resnet.global_width, resnet.local_width) == (19, 2048, 1024)  # 299->150->75->38->19
    seen = {}
    hooks = [getattr(resnet.model, name).register_forward_hook(
        lambda module, inputs, output, name=name: seen.update({name: (inputs[0], output)}))
        for name in ("conv1", "layer3", "layer4")]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        global_feat, patches = resnet(x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["conv1"][0], F.interpolate(x, size=(299, 299), mode="bilinear",
                                                               align_corners=True))
    layer3 = seen["layer3"][1]
    assert global_feat.shape == (1, 2048) and patches.shape == (1, 361, 1024)
    torch.testing.assert_close(global_feat, seen["layer4"][1].mean(dim=(2, 3)))
    # row-major: token u = 19 * y + x holds layer3[:, :, y, x]
    torch.testing.assert_close(patches[0, 19 * 5 + 2], layer3[0, :, 5, 2])
    torch.testing.assert_close(patches[0, 19 * 2 + 5], layer3[0, :, 2, 5])


def test_resnet_encoder_count_depth_and_checkpoint(tmp_path, resnet):
    with torch.device("meta"):
        assert count(ResNetImageEncoder()) == 25_557_032 - 2_049_000  # torchvision resnet50 minus fc (2048*1000+1000)
        assert set(ResNetImageEncoder().model.state_dict()) | {"fc.weight", "fc.bias"} == set(
            torchvision.models.resnet50(weights=None).state_dict())  # torchvision key layout
    with pytest.raises(ValueError, match="depth 50"):
        ResNetImageEncoder(depth=18)
    # a partial torchvision state dict (stem + layer1, with the ImageNet fc): loaded non-strictly, fc ignored
    state = resnet.model.state_dict()
    source = {k: v + 1 for k, v in state.items() if k.startswith(("conv1.", "bn1.", "layer1."))}
    source.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save({"state_dict": source}, tmp_path / "r50.pth")
    loaded = ResNetImageEncoder(checkpoint=tmp_path / "r50.pth").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if not k.startswith("fc."))
    torch.save({"conv1.weight": torch.zeros(64, 1, 7, 7)}, tmp_path / "grey.pth")
    with pytest.raises(ValueError, match="grey.pth"):
        ResNetImageEncoder(checkpoint=tmp_path / "grey.pth")


# ---------------------------------------------------------------- heads and decoder


def test_projection_head_counts_and_shapes():
    # 768*2048 + 2048 (Linear) + 2*2048 (BN) + 2048*128 + 128 (Linear) + 0 (BN affine=False) = 1,841,280
    assert count(GlobalEmbedding(768)) == 1_841_280
    assert count(LocalEmbedding(768)) == 1_841_280
    assert GlobalEmbedding(6, 8, 4)(torch.rand(3, 6)).shape == (3, 4)
    assert LocalEmbedding(6, 8, 4)(torch.rand(3, 5, 6)).shape == (3, 5, 4)


def test_local_embedding_is_the_global_stack_over_batch_times_tokens():
    torch.manual_seed(0)
    local, flat = LocalEmbedding(6, 8, 4).train(), GlobalEmbedding(6, 8, 4).train()
    flat.load_state_dict({k: v.squeeze(-1) for k, v in local.state_dict().items()})
    x = torch.randn(3, 5, 6) * 2 + 1
    # BN statistics over B*N = 15 rows: identical to the global head applied to the flattened tokens
    torch.testing.assert_close(local(x), flat(x.reshape(15, 6)).reshape(3, 5, 4))


def test_irl_decoder_count_matches_official():
    decoder = IRLDecoder()
    assert count(decoder.decoder) == 25_217_536  # 4 x 6,304,000 + final LN 1,536
    assert count(decoder.head) == 769  # 768 + 1
    assert count(decoder) == 25_218_305


def test_irl_decoder_is_pre_ln_without_positions():
    torch.manual_seed(0)
    decoder = IRLDecoder(d_model=8, nhead=2, dim_feedforward=16, num_layers=1).eval()
    queries, memory = torch.randn(3, 8), torch.randn(2, 5, 8)
    logits = decoder(queries, memory)
    assert logits.shape == (2, 3)
    # hand-written pre-LN layer: q += SA(LN1 q); q += CA(LN2 q, mem); q += FFN(LN3 q) (ReLU); final LN; Linear
    layer = decoder.decoder.layers[0]
    q = queries.unsqueeze(0).expand(2, -1, -1)
    h = layer.norm1(q)
    q = q + layer.self_attn(h, h, h, need_weights=False)[0]
    h = layer.norm2(q)
    q = q + layer.multihead_attn(h, memory, memory, need_weights=False)[0]
    q = q + layer.linear2(torch.relu(layer.linear1(layer.norm3(q))))
    expected = decoder.head(decoder.decoder.norm(q)).squeeze(-1)
    torch.testing.assert_close(logits, expected)
    # no positional encoding: permuting the memory tokens leaves the logits unchanged
    torch.testing.assert_close(decoder(queries, memory[:, torch.tensor([4, 2, 0, 1, 3])]), logits)


def test_irl_decoder_init():
    torch.manual_seed(0)
    decoder = IRLDecoder(d_model=64, nhead=4, dim_feedforward=128, num_layers=2)
    layer = decoder.decoder.layers[1]
    for weight in (layer.self_attn.in_proj_weight, layer.multihead_attn.out_proj.weight, layer.linear1.weight):
        assert abs(weight.std().item() - 0.02) < 0.003 and abs(weight.mean().item()) < 0.002
    for bias in (layer.self_attn.in_proj_bias, layer.linear1.bias, layer.linear2.bias, decoder.head.bias):
        assert torch.count_nonzero(bias) == 0


# ---------------------------------------------------------------- region / sentence pooling


def test_region_features_reads_row_major_map_of_the_indexed_image():
    grid = 4
    values = torch.arange(16, dtype=torch.float32)  # token u = 4 * y + x holds value u
    patch_emb = torch.stack([values, values + 100]).unsqueeze(-1).repeat(1, 1, 2)  # [2, 16, 2]
    rois = torch.tensor([[[0, 1, 0, 3, 2], [1, 1, 0, 3, 2], [0, -1, -1, -1, -1]],
                         [[1, 0, 0, 3, 3], [0, 0, 0, 3, 3], [1, -1, -1, -1, -1]]])
    out = region_features(patch_emb, grid, rois)
    assert out.shape == (2, 3, 2)
    # box x 1..3, y 0..2 (2x2 samples at x 1.5, 2.5 / y 0.5, 1.5) on the linear map v = 4y + x: mean at the
    # centre (x 2, y 1) -> 4*1 + 2 = 6 (column-major would give 4*2 + 1 = 9); image 1 adds 100
    torch.testing.assert_close(out[0, 0], torch.tensor([6.0, 6.0]))
    torch.testing.assert_close(out[0, 1], torch.tensor([106.0, 106.0]))  # row of image 0 indexing image 1
    # box 0..3 (3x3 samples at 0.5, 1.5, 2.5 per axis): mean x = mean y = 1.5 -> 4*1.5 + 1.5 = 7.5;
    # a row of image 1 reading image 0 (column 0 is honoured, not the row's position)
    torch.testing.assert_close(out[1, 0], torch.tensor([107.5, 107.5]))
    torch.testing.assert_close(out[1, 1], torch.tensor([7.5, 7.5]))
    assert torch.count_nonzero(out[:, 2]) == 0  # padding rows


def test_region_features_constant_map_and_errors():
    patch_emb = torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1).expand(3, 9, 5)  # constant per image
    rois = torch.tensor([[[i, 0, 0, 3, 3]] for i in range(3)], dtype=torch.float32)
    torch.testing.assert_close(region_features(patch_emb, 3, rois)[:, 0, 0], torch.tensor([1.0, -2.0, 3.0]))
    with pytest.raises(ValueError, match="batch index"):
        region_features(patch_emb, 3, torch.tensor([[[3, 0, 0, 3, 3]]] * 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="grid"):
        region_features(patch_emb, 4, rois)


def test_sentence_features_mean_of_valid_words():
    word_emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])  # [1, W=4, 2]
    sent_index = torch.tensor([[[0, 2, -1], [3, -1, -1], [-1, -1, -1], [1, 7, -1], [1, 1, 3]]])
    expected = torch.tensor([[[1.5, 1.0],  # ([1,0] + [2,2]) / 2
                              [4.0, 0.0],  # [4,0] / 1
                              [0.0, 0.0],  # no word: count clamped to 1 -> 0
                              [0.0, 1.0],  # 7 >= W is not a valid entry -> [0,1] / 1
                              [4 / 3, 2 / 3]]])  # ([0,1] + [0,1] + [4,0]) / 3
    torch.testing.assert_close(sentence_features(word_emb, sent_index), expected)


# ---------------------------------------------------------------- ASGModel


def test_asg_pretrain_outputs_shapes_and_norms(tiny_model):
    tiny_model.eval()
    image, ids, mask, types, rois, sent_index = batch()
    out = tiny_model.pretrain_outputs(image, ids, mask, types, rois, sent_index)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image_emb": (2, 8), "report_emb": (2, 8), "region_emb": (2, 3, 8), "sentence_emb": (2, 3, 8),
        "tag_logits": (2, 5)}
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["report_emb"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["image_emb"], tiny_model.embed(image))
    torch.testing.assert_close(out["tag_logits"], tiny_model(image))
    # regions pool the L2-normalised patch embeddings p̂; sentences average the normalised word embeddings ŵ
    global_feat, patches = tiny_model.image_encoder(image)
    p_hat = F.normalize(tiny_model.image_local(patches), dim=-1)
    torch.testing.assert_close(out["region_emb"], region_features(p_hat, 4, rois))
    w_hat = F.normalize(tiny_model.text_local(tiny_model.text_encoder(ids, mask)[1]), dim=-1)
    torch.testing.assert_close(out["sentence_emb"], sentence_features(w_hat, sent_index))
    assert torch.count_nonzero(out["region_emb"][1, 1:]) == 0


def test_asg_backward_reaches_every_trainable_part():
    torch.manual_seed(0)
    model = ASGModel(ViTImageEncoder(**TINY_VIT), StandInText(), torch.randn(5, 16), **TINY_ASG,
                     tag_encoder=StandInTagEncoder(), tag_inputs={"input_ids": torch.randint(0, 30, (5, 3)),
                                                                 "attention_mask": torch.ones(5, 3, dtype=torch.long)})
    model.train()
    out = model.pretrain_outputs(*batch())
    sum(v.sum() for v in out.values()).backward()
    for name in ("image_encoder", "text_encoder", "image_global", "image_local", "text_global", "text_local",
                 "irl", "query_proj"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert grads and all(g is not None for g in grads), name
    assert all(not p.requires_grad and p.grad is None for p in model.tag_encoder.parameters())
    assert isinstance(model.query_proj, nn.Linear) and model.query_proj.in_features == 16  # 16 != d_model 32


def test_tag_queries_cached_or_recomputed_in_encoder_mode():
    torch.manual_seed(0)
    cached = ASGModel(ViTImageEncoder(**TINY_VIT), StandInText(), torch.randn(5, 32), **TINY_ASG)
    assert isinstance(cached.query_proj, nn.Identity)  # width already d_model
    assert "tag_queries" in cached.state_dict()
    torch.testing.assert_close(cached.train().queries(), cached.tag_queries)
    tag_encoder = StandInTagEncoder(32)
    ids = torch.randint(0, 30, (5, 3))
    model = ASGModel(ViTImageEncoder(**TINY_VIT), StandInText(), torch.zeros(5, 32), **TINY_ASG,
                     tag_encoder=tag_encoder, tag_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    model.eval()
    torch.testing.assert_close(model.queries(), tag_encoder.embedding(ids)[:, 0])  # [CLS] = position 0
    model.train()  # released behaviour: the frozen encoder follows the model's mode (dropout active)
    assert not torch.equal(model.queries(), model.queries())
    with pytest.raises(ValueError, match="together"):
        ASGModel(ViTImageEncoder(**TINY_VIT), StandInText(), torch.zeros(5, 32), tag_encoder=tag_encoder)
    with pytest.raises(ValueError, match="Q=5"):
        ASGModel(ViTImageEncoder(**TINY_VIT), StandInText(), torch.zeros(5, 32), tag_encoder=tag_encoder,
                 tag_inputs={"input_ids": ids[:4], "attention_mask": ids[:4]})


def test_asg_forward_traces(tiny_model):
    tiny_model.eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # as monai.networks.utils.convert_to_torchscript(use_trace=True) does
        traced = torch.jit.trace(tiny_model, image)
        other = torch.rand(3, 3, 64, 64)
        torch.testing.assert_close(traced(other), tiny_model(other))


def test_asg_full_size_parameter_count():
    with torch.device("meta"):
        model = ASGModel(ViTImageEncoder(), StandInText(768), torch.zeros(40, 768))
    without_text = count(model) - count(model.text_encoder)
    # ViT-B/16 85,798,656 + 4 heads x 1,841,280 + IRL 25,218,305 (official_figures §6)
    assert count(model.image_global) + count(model.image_local) + count(model.text_global) + count(
        model.text_local) == 7_365_120
    assert without_text == 85_798_656 + 7_365_120 + 25_218_305
    assert model.tag_queries.shape == (40, 768)


def test_asg_resnet_variant_uses_1024_wide_decoder():
    torch.manual_seed(0)
    model = ASGModel(ResNetImageEncoder(input_size=64), StandInText(), torch.randn(5, 768), emb_dim=8,
                     proj_hidden_dim=16, irl_layers=1, irl_ffn=32).eval()
    assert model.irl.head.in_features == 1024 and model.image_global.head[0].in_features == 2048
    assert (model.query_proj.in_features, model.query_proj.out_features) == (768, 1024)
    image, ids, mask, types, _, sent_index = batch()
    rois = torch.tensor([[[0, 0, 0, 4, 4]], [[1, 1, 1, 3, 3]]], dtype=torch.float32)  # grid 64->32->16->8->4
    with torch.no_grad():
        out = model.pretrain_outputs(image, ids, mask, types, rois, sent_index[:, :1])
    assert out["region_emb"].shape == (2, 1, 8) and out["tag_logits"].shape == (2, 5)
