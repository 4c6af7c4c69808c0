"""ASG pre-training losses and the segmentation MixedLoss by hand (specs/asg.md §4, §6.4, §8 items 3, 5, 6;
§10 items 5-8, 11).

Embeddings are chosen so that ``S = ĝ ĥᵀ / τ`` has entries that exponentiate by hand (ĝ = I makes ``S = ĥᵀ / τ``).
"""

from __future__ import annotations

import math

import pytest
import torch

from common.losses.asg import (ASGLoss, image_report_loss, region_sentence_loss, retrieval_accuracy,
                               soft_label_loss, soft_label_targets, tag_loss)
from common.losses.cxr_segmentation import MixedFocalDiceLoss

LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)
R = 3  # regions per image in the ARSA examples


def softplus(x: float) -> float:
    """log(1 + e^x): the CE of a 2-way row whose wrong entry exceeds the right one by x."""
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------------------------------- IRA


def test_ira_2x2_tau_half_sums_both_directions():
    # ĝ0 = (1, 0), ĝ1 = (0, 1); ĥ0 = (1, 0), ĥ1 = (0.6, 0.8); τ = 0.5
    # S = [[1, 0.6], [0, 0.8]] / 0.5 = [[2, 1.2], [0, 1.6]]
    # rows (image -> report): row 0 label 0: log(1 + e^(1.2 - 2)) = softplus(-0.8) = 0.371101
    #                         row 1 label 1: log(1 + e^(0 - 1.6)) = softplus(-1.6) = 0.183901   mean 0.277501
    # cols (report -> image): col 0 = [2, 0] label 0: softplus(-2) = 0.126928
    #                         col 1 = [1.2, 1.6] label 1: softplus(-0.4) = 0.513015            mean 0.319972
    # IRA = 0.277501 + 0.319972 = 0.597472 (the SUM; the mean of the two would be 0.298736)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    report = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expected = (softplus(-0.8) + softplus(-1.6)) / 2 + (softplus(-2.0) + softplus(-0.4)) / 2
    assert expected == pytest.approx(0.597472, abs=1e-6)
    assert image_report_loss(image, report, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_ira_3x3_tau_one():
    # ĝ = I, ĥ = Sᵀ so that S = [[ln4, 0, 0], [0, 0, ln2], [0, 0, 0]]
    # rows: row 0 label 0: -log(4 / (4 + 1 + 1)) = ln 1.5; row 1 label 1: -log(1 / (1 + 1 + 2)) = ln 4;
    #       row 2 label 2: -log(1 / 3) = ln 3                       -> mean (ln 1.5 + ln 4 + ln 3) / 3 = ln 18 / 3
    # cols: col 0 = [ln4, 0, 0] label 0: ln 1.5; col 1 = [0, 0, 0] label 1: ln 3;
    #       col 2 = [0, ln2, 0] label 2: -log(1 / 4) = ln 4        -> mean ln 18 / 3
    # IRA = 2 ln 18 / 3 = 1.926915
    sim = torch.tensor([[LN4, 0.0, 0.0], [0.0, 0.0, LN2], [0.0, 0.0, 0.0]])
    loss = image_report_loss(torch.eye(3), sim.t().contiguous(), temperature=1.0)
    assert loss.item() == pytest.approx(2 * math.log(18.0) / 3, rel=1e-6)
    assert loss.item() == pytest.approx(1.926915, abs=1e-6)


def test_ira_default_temperature():
    # τ = 0.07 (default); ĝ = I, ĥ0 = (0.6, 0.8), ĥ1 = (0, 1): S = [[0.6, 0], [0.8, 1]] / 0.07
    # rows: row 0 = [8.571, 0] label 0: softplus(-0.6/0.07) = 0.000189
    #       row 1 = [11.429, 14.286] label 1: softplus(-0.2/0.07) = 0.055844
    # cols: col 0 = [8.571, 11.429] label 0: softplus(+0.2/0.07) = 2.912987
    #       col 1 = [0, 14.286] label 1: softplus(-1/0.07) = 6.2e-7
    # IRA = (0.000189 + 0.055844) / 2 + (2.912987 + 6.2e-7) / 2 = 1.484510
    image = torch.eye(2, dtype=torch.float64)
    report = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    t = 0.07
    expected = (softplus(-0.6 / t) + softplus(-0.2 / t)) / 2 + (softplus(0.2 / t) + softplus(-1 / t)) / 2
    assert expected == pytest.approx(1.484510, abs=1e-6)
    assert image_report_loss(image, report).item() == pytest.approx(expected, rel=1e-9)


def test_ira_perfect_diagonal_goes_to_zero_as_tau_shrinks():
    # ĝ = ĥ = I3: every row and column is [1/τ, 0, 0] up to order -> CE = log(1 + 2 e^(-1/τ));
    # IRA = 2 log(1 + 2 e^(-1/τ))
    eye = torch.eye(3, dtype=torch.float64)
    taus = [1.0, 0.5, 0.1, 0.05, 0.01]
    losses = [image_report_loss(eye, eye, temperature=t).item() for t in taus]
    for t, value in zip(taus, losses):
        assert value == pytest.approx(2 * math.log1p(2 * math.exp(-1 / t)), rel=1e-9)
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert losses[0] == pytest.approx(2 * math.log1p(2 / math.e), rel=1e-9)  # 1.097 at τ = 1
    assert losses[-1] < 1e-40  # 4 e^-100


def test_ira_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        image_report_loss(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        image_report_loss(torch.eye(2), torch.eye(2), temperature=0.0)


# --------------------------------------------------------------------------------------------------- ARSA


def block_mask(n: int, regions: int = R) -> tuple[torch.Tensor, torch.Tensor]:
    """count_matrix and count_label of §2.5 for ``n`` valid regions (test-side, written from the spec)."""
    matrix = torch.full((regions, regions), float("-inf"))
    cut = max(n, 1)  # n = 0: the [0:1, 0:1] and [1:, 1:] blocks are 0
    matrix[:cut, :cut] = 0.0
    matrix[cut:, cut:] = 0.0
    label = torch.tensor([r if r < n else -100 for r in range(regions)])
    return matrix, label


def arsa_batch(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    matrices, labels = zip(*(block_mask(n) for n in counts))
    return torch.stack(matrices), torch.stack(labels)


def arsa_example() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0: 2 valid regions, v = [(1, 0), (0, 1)], t = [(ln3, ln3), (0, 0)]; image 1: 1 valid region.
    Padding rows hold arbitrary large values (they must not matter)."""
    region = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [7.0, -3.0]],
                           [[0.5, 2.0], [4.0, 4.0], [-6.0, 1.0]]])
    sentence = torch.tensor([[[LN3, LN3], [0.0, 0.0], [5.0, 5.0]],
                             [[1.0, -1.0], [3.0, 9.0], [2.0, -8.0]]])
    return region, sentence


def test_arsa_by_hand_mean_over_valid_rows_of_the_batch():
    # τ = 1. Image 0 valid block A = v tᵀ = [[ln3, 0], [ln3, 0]] (the padding column is masked by -inf):
    #   region -> sentence rows: row 0 label 0: -log(3 / (3 + 1)) = ln(4/3); row 1 label 1: -log(1 / 4) = ln 4
    #   sentence -> region rows of Aᵀ = [[ln3, ln3], [0, 0]]: row 0 label 0: -log(3 / 6) = ln 2; row 1 label 1: ln 2
    # Image 1 (n = 1): its one valid row has a single finite entry -> CE 0 in both directions
    # 3 valid rows in the batch: L = (ln(4/3) + ln4 + 0) / 3 + (ln2 + ln2 + 0) / 3 = ln(64/3) / 3 = 1.020090
    # (the same direction twice would give 2 ln(16/3) / 3 = 1.115985)
    region, sentence = arsa_example()
    matrix, label = arsa_batch([2, 1])
    loss = region_sentence_loss(region, sentence, matrix, label, temperature=1.0)
    assert loss.item() == pytest.approx(math.log(64 / 3) / 3, rel=1e-6)
    assert loss.item() == pytest.approx(1.020090, abs=1e-6)


def test_arsa_default_temperature():
    # one image, 2 valid regions, v = t = I2 (third row padding): block = I / 0.07
    # each of the 2 rows, both directions: log(1 + e^(-1/0.07)); mean over rows -> L = 2 softplus(-1/0.07) = 1.2497e-6
    region = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]]], dtype=torch.float64)
    matrix, label = arsa_batch([2])
    loss = region_sentence_loss(region, region.clone(), matrix.double(), label)
    assert loss.item() == pytest.approx(2 * softplus(-1 / 0.07), rel=1e-6)


def test_arsa_ignored_rows_and_masked_columns_do_not_matter():
    torch.manual_seed(0)
    region, sentence = arsa_example()
    matrix, label = arsa_batch([2, 1])
    base = region_sentence_loss(region, sentence, matrix, label, temperature=1.0)
    pad = label == -100  # [B, R]
    region2, sentence2 = region.clone(), sentence.clone()
    region2[pad] = torch.randn(int(pad.sum()), 2) * 10
    sentence2[pad] = torch.randn(int(pad.sum()), 2) * 10
    moved = region_sentence_loss(region2, sentence2, matrix, label, temperature=1.0)
    assert moved.item() == pytest.approx(base.item(), rel=1e-7)
    # and no gradient reaches the padding rows (no cross-block softmax mass)
    region3, sentence3 = region.clone().requires_grad_(), sentence.clone().requires_grad_()
    region_sentence_loss(region3, sentence3, matrix, label, temperature=1.0).backward()
    assert torch.all(region3.grad[pad] == 0) and torch.all(sentence3.grad[pad] == 0)
    assert torch.any(region3.grad[~pad] != 0)


def test_arsa_minus_inf_block_stops_cross_block_mass():
    # without the mask, image 0's rows see the padding column [7, -3]·... / [5, 5]: a different, larger loss
    region, sentence = arsa_example()
    matrix, label = arsa_batch([2, 1])
    masked = region_sentence_loss(region, sentence, matrix, label, temperature=1.0)
    unmasked = region_sentence_loss(region, sentence, torch.zeros_like(matrix), label, temperature=1.0)
    assert unmasked.item() > masked.item() + 1.0
    # with the mask, the image with n = 1 is exactly 0 even though its padding rows hold big scores
    single = region_sentence_loss(region[1:], sentence[1:], matrix[1:], label[1:], temperature=1.0)
    assert single.item() == 0.0


def test_arsa_single_region_images_give_zero():
    torch.manual_seed(1)
    matrix, label = arsa_batch([1, 1])
    loss = region_sentence_loss(torch.randn(2, R, 4), torch.randn(2, R, 4), matrix, label)
    assert loss.item() == 0.0


def test_arsa_all_invalid_batch_is_zero_with_finite_gradient():
    torch.manual_seed(2)
    matrix, label = arsa_batch([0, 0])
    region = torch.randn(2, R, 4, requires_grad=True)
    sentence = torch.randn(2, R, 4, requires_grad=True)
    loss = region_sentence_loss(region, sentence, matrix, label)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(region.grad).all() and torch.isfinite(sentence.grad).all()


def test_arsa_rejects_bad_shapes():
    matrix, label = arsa_batch([2])
    with pytest.raises(ValueError, match="count_matrix"):
        region_sentence_loss(torch.zeros(1, R, 2), torch.zeros(1, R, 2), matrix[:, :2], label)
    with pytest.raises(ValueError, match="count_label"):
        region_sentence_loss(torch.zeros(1, R, 2), torch.zeros(1, R, 2), matrix, label[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        region_sentence_loss(torch.zeros(1, R, 2), torch.zeros(1, R, 3), matrix, label)


# --------------------------------------------------------------------------------------------------- IRL


def test_tag_loss_2x2_with_uncertain_label():
    # z = [[0, ln3], [ln3, 0]], labels [[1, -1], [0, 1]] -> y = [[1, 0], [0, 1]]
    # z = 0, y = 1: -log σ(0) = ln 2;  z = ln3, y = 0: -log(1 - 3/4) = ln 4   (twice each)
    # mean over B x Q = 4: (2 ln2 + 2 ln4) / 4 = 1.5 ln 2 = 1.039721
    logits = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    labels = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    before = labels.clone()
    assert tag_loss(logits, labels).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    assert torch.equal(labels, before)  # -1 -> 0 done functionally, the batch is untouched


def test_tag_loss_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="1, 0 and -1"):
        tag_loss(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="same shape"):
        tag_loss(torch.zeros(1, 2), torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------------- ERL


def test_erl_by_hand_uniform_prediction_identical_labels():
    # labels (1, 0, -1) and (1, 0, 0): with -1 -> 0 both are (1, 0, 0), ȳ = (1, 0, 0), Soft = all ones
    # T = row-normalise(0.8 I + 0.2 + 1e-6) = [[1, 0.2], [0.2, 1]] / 1.2 = [[5/6, 1/6], [1/6, 5/6]] (up to 1e-6)
    # ĝ = (1, 0) twice, ĥ = (0, 1) twice -> S = 0 -> P = Q = all 1/2
    # KL(T‖P) = 5/6 ln(5/3) + 1/6 ln(1/3) = 0.242586 (both rows alike; batchmean = the row value)
    # KL(P‖T) = 1/2 ln(0.5 / (5/6)) + 1/2 ln(0.5 / (1/6)) = 1/2 ln 1.8 = 0.293893
    # L = 1/2 [1/2 (0.242586 + 0.293893) + 1/2 (same for Q)] = 0.268240
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    report = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    expected = 0.5 * ((5 / 6) * math.log(5 / 3) + (1 / 6) * math.log(1 / 3) + 0.5 * math.log(1.8))
    assert expected == pytest.approx(0.268240, abs=1e-6)
    assert soft_label_loss(image, report, labels).item() == pytest.approx(expected, abs=2e-6)


def test_erl_by_hand_asymmetric_similarity():
    # same labels as above (T = [[5/6, 1/6], [1/6, 5/6]]); τ = 1, ĝ = I, ĥ = Sᵀ with S = [[ln3, 0], [ln3, 0]]
    # P = softmax_row(S): both rows (3/4, 1/4);  Q = softmax_row(Sᵀ = [[ln3, ln3], [0, 0]]): both rows (1/2, 1/2)
    # KL(T‖P) = 1/2 [5/6 ln((5/6)/(3/4)) + 1/6 ln((1/6)/(1/4)) + 1/6 ln((1/6)/(3/4)) + 5/6 ln((5/6)/(1/4))]
    #         = 1/2 [5/6 ln(10/9) + 1/6 ln(2/3) + 1/6 ln(2/9) + 5/6 ln(10/3)] = 0.386427
    # KL(P‖T) = 1/2 [3/4 ln(0.9) + 1/4 ln(1.5) + 3/4 ln(4.5) + 1/4 ln(0.3)] = 0.424705
    # Q terms as in the uniform example: 0.242586 + 0.293893 = 0.536479
    # L = 1/2 [1/2 (0.386427 + 0.424705) + 1/2 0.536479] = 0.336903 (Q = P would give 0.405566 instead)
    sim = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = soft_label_loss(torch.eye(2), sim.t().contiguous(), labels, temperature=1.0)
    assert loss.item() == pytest.approx(0.336903, abs=2e-6)


def test_erl_by_hand_l2_normalised_overlap():
    # labels (1, 1, 0) and (1, 0, 0): ȳ0 = (1, 1, 0)/√2, ȳ1 = (1, 0, 0) -> Soft = [[1, 1/√2], [1/√2, 1]]
    # T row 0 = (0.8 + 0.2 + 1e-6, 0.2/√2 + 1e-6) / sum = (1.000001, 0.141422) / 1.141423 = (0.876100, 0.123900);
    # row 1 = (0.123900, 0.876100)
    # τ = 1, ĝ = I, ĥ = S = [[ln3, 0], [0, 0]] (symmetric): P = Q: row 0 = (3/4, 1/4), row 1 = (1/2, 1/2)
    # KL(T‖P) = 1/2 [0.8761 ln(0.8761/0.75) + 0.1239 ln(0.1239/0.25) + 0.1239 ln(0.1239/0.5) + 0.8761 ln(0.8761/0.5)]
    #         = 0.183850
    # KL(P‖T) = 1/2 [0.75 ln(0.75/0.8761) + 0.25 ln(0.25/0.1239) + 0.5 ln(0.5/0.1239) + 0.5 ln(0.5/0.8761)] = 0.238036
    # L = 1/2 (0.183850 + 0.238036) = 0.210943
    t0, t1 = 0.876100, 0.123900
    kl_tp = 0.5 * (t0 * math.log(t0 / 0.75) + t1 * math.log(t1 / 0.25) + t1 * math.log(t1 / 0.5)
                   + t0 * math.log(t0 / 0.5))
    kl_pt = 0.5 * (0.75 * math.log(0.75 / t0) + 0.25 * math.log(0.25 / t1) + 0.5 * math.log(0.5 / t1)
                   + 0.5 * math.log(0.5 / t0))
    assert (kl_tp, kl_pt) == pytest.approx((0.183850, 0.238036), abs=2e-6)
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    target = soft_label_targets(labels)
    assert target[0].tolist() == pytest.approx([t0, t1], abs=1e-6)
    assert target[1].tolist() == pytest.approx([t1, t0], abs=1e-6)
    sim = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    loss = soft_label_loss(torch.eye(2), sim, labels, temperature=1.0)
    assert loss.item() == pytest.approx(0.210943, abs=5e-6)


def test_erl_zero_labels_give_identity_dominant_target():
    # all-zero tag vectors stay zero (no NaN): T = (0.8 I + 1e-6) / (0.8 + 2e-6) -> diagonal 0.9999988, off 1.25e-6
    target = soft_label_targets(torch.zeros(2, 5))
    assert torch.isfinite(target).all()
    diag, off = 0.800001 / 0.800002, 1e-6 / 0.800002
    assert target.flatten().tolist() == pytest.approx([diag, off, off, diag], rel=1e-6)


@pytest.mark.parametrize("labels", [torch.zeros(3, 4), torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 3)])
def test_erl_is_zero_when_softmax_s_equals_t(labels):
    # with zero or identical label rows, T is symmetric with equal row sums, so S = log T gives
    # softmax_row(S) = T and softmax_row(Sᵀ) = T: every KL vanishes. τ = 1, ĝ = log T, ĥ = I -> S = log T.
    target = soft_label_targets(labels, dtype=torch.float64)
    loss = soft_label_loss(target.log(), torch.eye(3, dtype=torch.float64), labels, temperature=1.0)
    assert abs(loss.item()) < 1e-12


def test_erl_is_non_negative_on_random_input():
    torch.manual_seed(3)
    for _ in range(5):
        image = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        report = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        labels = torch.randint(-1, 2, (4, 6)).float()
        assert soft_label_loss(image, report, labels).item() > 0


# --------------------------------------------------------------------------------------------------- ASGLoss


def model_outputs(batch: int = 2, emb: int = 4, tags: int = 5, seed: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "image_emb": torch.nn.functional.normalize(torch.randn(batch, emb, generator=gen), dim=1),
        "report_emb": torch.nn.functional.normalize(torch.randn(batch, emb, generator=gen), dim=1),
        "region_emb": torch.randn(batch, R, emb, generator=gen),
        "sentence_emb": torch.randn(batch, R, emb, generator=gen),
        "tag_logits": torch.randn(batch, tags, generator=gen),
    }
    return {k: v.requires_grad_() for k, v in outputs.items()}


def loss_batch(tags: int = 5) -> dict[str, torch.Tensor]:
    matrix, label = arsa_batch([2, 3])
    return {"count_matrix": matrix, "count_label": label,
            "labels": torch.tensor([[1.0, 0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 1.0, -1.0, 0.0]])[:, :tags]}


def test_asg_loss_weights_1_1_5_1():
    outputs, batch = model_outputs(), loss_batch()
    terms = ASGLoss()(outputs, batch)
    assert set(terms) == {"loss", "ira", "arsa", "irl", "erl"}
    ira = image_report_loss(outputs["image_emb"], outputs["report_emb"])
    arsa = region_sentence_loss(outputs["region_emb"], outputs["sentence_emb"], batch["count_matrix"],
                                batch["count_label"])
    irl = tag_loss(outputs["tag_logits"], batch["labels"])
    erl = soft_label_loss(outputs["image_emb"], outputs["report_emb"], batch["labels"])
    for name, value in (("ira", ira), ("arsa", arsa), ("irl", irl), ("erl", erl)):
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6)
        assert value.item() > 0
    assert terms["loss"].item() == pytest.approx((ira + arsa + 5 * irl + erl).item(), rel=1e-6)
    terms["loss"].backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in outputs.values())


def test_asg_loss_zero_weight_skips_the_term():
    outputs, batch = model_outputs(), loss_batch()
    outputs["tag_logits"] = torch.zeros(7)  # would fail tag_loss if it were computed
    terms = ASGLoss(irl=0.0, erl=0.0)(outputs, batch)
    assert terms["irl"].item() == 0.0 and terms["erl"].item() == 0.0
    assert terms["loss"].item() == pytest.approx((terms["ira"] + terms["arsa"]).item(), rel=1e-6)
    assert terms["ira"].item() > 0 and terms["arsa"].item() > 0


def test_asg_loss_rejects_missing_keys_and_negative_weights():
    outputs, batch = model_outputs(), loss_batch()
    del batch["count_label"]
    with pytest.raises(ValueError, match="count_label"):
        ASGLoss()(outputs, batch)
    with pytest.raises(ValueError, match="irl"):
        ASGLoss(irl=-1.0)


# --------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_accuracy_top_k_by_hand():
    # ĝ = I, ĥ = Sᵀ with every row of S = [3, 2, 1]:
    # row 0 (own 0) ranks first; row 1 (own 1) second; row 2 (own 2) third
    # acc1 = 1/3, acc2 = 2/3, acc5 -> k clipped to B = 3 -> 3/3 (in percent)
    sim = torch.tensor([[3.0, 2.0, 1.0]] * 3)
    scores = retrieval_accuracy(torch.eye(3), sim.t().contiguous(), topk=(1, 2, 5))
    assert scores == pytest.approx({"acc1": 100 / 3, "acc2": 200 / 3, "acc5": 100.0})
    assert set(retrieval_accuracy(torch.eye(3), torch.eye(3))) == {"acc1", "acc5"}
    with pytest.raises(ValueError, match="k must be >= 1"):
        retrieval_accuracy(torch.eye(3), torch.eye(3), topk=(0,))


# --------------------------------------------------------------------------------------------------- segmentation


def test_mixed_focal_dice_loss_one_image_two_pixels():
    # logits [0, ln3], y = [1, 0] -> p = [1/2, 3/4]
    # focal: pixel 0 p_t = 1/2: (1/2)^2 * ln 2 = 0.25 ln2; pixel 1 p_t = 1/4: (3/4)^2 * ln 4 = 1.125 ln2
    #        mean = 0.6875 ln2 = 0.476539
    # Dice = (2 * 0.5 + 1) / (1.25 + 1 + 1) = 2 / 3.25 -> -log = ln 1.625 = 0.485508
    # L = 10 * 0.476539 + 0.485508 = 5.250895
    logits = torch.tensor([0.0, LN3]).reshape(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert MixedFocalDiceLoss()(logits, target).item() == pytest.approx(5.250895, abs=1e-5)
    assert MixedFocalDiceLoss(focal_weight=0.0)(logits, target).item() == pytest.approx(math.log(1.625), rel=1e-6)


def test_mixed_focal_dice_loss_dice_over_the_whole_batch():
    # image 0 as above; image 1: logits [ln3, -ln3], y = [1, 1] -> p = [3/4, 1/4]
    # focal: 0.25 ln2, 1.125 ln2 (image 0); (1/4)^2 ln(4/3) = 0.0625 ln(4/3), (3/4)^2 ln4 = 0.5625 ln4 (image 1)
    #        mean over 4 pixels = 0.437712
    # Dice over the batch: Σpy = 0.5 + 0.75 + 0.25 = 1.5, Σp = 2.25, Σy = 3 -> (3 + 1) / (2.25 + 3 + 1) = 0.64
    # (the mean of per-image Dice would be (2/3.25 + 2.5/3.5)/2 = 0.664835 instead)
    # L = 10 * 0.437712 - ln 0.64 = 4.377120 + 0.446287 = 4.823407
    logits = torch.tensor([[0.0, LN3], [LN3, -LN3]]).reshape(2, 1, 1, 2)
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    assert MixedFocalDiceLoss()(logits, target).item() == pytest.approx(4.823407, abs=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        MixedFocalDiceLoss()(logits, target[:1])
