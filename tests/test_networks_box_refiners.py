"""Box refiners: GrabCut on a synthetic disc, SAM plumbing with a tiny real Sam, checkpoint checks, the factory."""

from functools import partial

import numpy as np
import pytest
import segment_anything
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from common.networks import box_refiners
from common.networks.box_refiners import (
    GrabCutBoxRefiner,
    SamBoxRefiner,
    ThresholdRefiner,
    make_box_refiner,
    sam_variant_of_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sam() -> Sam:
    """specs/endoked.md §8 item 1: the real SAM classes at 140,819 parameters, input 256, random weights."""
    torch.manual_seed(0)
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=256, patch_size=16, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
            global_attn_indexes=(1,), out_chans=32,
        ),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(
            transformer_dim=32, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
    ).eval()


def disc_image(h: int = 96, w: int = 96, centre=(48, 48), radius: int = 20):
    """Bright disc on a dark, textured background (uniform noise 20..90 per channel); returns (image, disc)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    image = rng.integers(20, 90, (h, w, 3)).astype(np.uint8)
    image[disc] = rng.integers(160, 240, (int(disc.sum()), 3)).astype(np.uint8)
    return image, disc


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_tiny_sam_has_the_spec_parameter_count():
    assert sum(p.numel() for p in tiny_sam().parameters()) == 140_819  # specs/endoked.md §8 item 1


def test_grabcut_recovers_the_disc_inside_the_box():
    image, disc = disc_image()
    box = (22, 22, 75, 75)  # disc spans 28..68 in x and y; 6 px margin
    mask = GrabCutBoxRefiner()(image, box, disc)
    assert mask.shape == (96, 96) and mask.dtype == bool
    assert dice(mask, disc) > 0.8
    outside = np.ones_like(mask)
    outside[22:75, 22:75] = False
    assert not mask[outside].any()


def test_grabcut_box_without_background_is_a_clear_error():
    image, _ = disc_image()
    with pytest.raises(ValueError, match=r"GrabCut failed for box \(0, 0, 96, 96\)"):
        GrabCutBoxRefiner()(image, (0, 0, 96, 96), None)


@pytest.mark.parametrize("box", [(10, 10, 10, 20), (10, 10, 97, 20), (-1, 0, 5, 5), (1, 2, 3)])
def test_bad_boxes_are_rejected(box):
    image, _ = disc_image()
    with pytest.raises(ValueError, match="box"):
        GrabCutBoxRefiner()(image, box, None)


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        GrabCutBoxRefiner()(np.zeros((8, 8, 3), np.float32), (1, 1, 4, 4), None)


def test_threshold_refiner_returns_the_whole_map():
    image = np.zeros((6, 8, 3), np.uint8)
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 1:3] = 1
    m[4, 6] = 7  # a second blob outside the box is kept: the map itself is the mask
    out = ThresholdRefiner()(image, (1, 1, 3, 3), m)
    assert out.dtype == bool and out.sum() == 5 and out[4, 6]
    with pytest.raises(ValueError, match="does not match the image size"):
        ThresholdRefiner()(image, (1, 1, 3, 3), m[:5])


@pytest.fixture(scope="module")
def sam_refiner() -> SamBoxRefiner:
    return SamBoxRefiner(checkpoint=None, sam=tiny_sam())


def test_sam_refiner_mask_at_native_size_with_transformed_box(sam_refiner, monkeypatch):
    seen = {}
    predict, predict_torch = sam_refiner.predictor.predict, sam_refiner.predictor.predict_torch

    def spy_predict(**kwargs):
        seen["predict"] = kwargs
        return predict(**kwargs)

    def spy_predict_torch(*args, **kwargs):
        seen["boxes"] = (kwargs["boxes"] if "boxes" in kwargs else args[2]).clone()  # SAM passes it by position
        return predict_torch(*args, **kwargs)

    monkeypatch.setattr(sam_refiner.predictor, "predict", spy_predict)
    monkeypatch.setattr(sam_refiner.predictor, "predict_torch", spy_predict_torch)
    image = np.random.default_rng(1).integers(0, 256, (288, 384, 3)).astype(np.uint8)
    mask = sam_refiner(image, (30, 60, 150, 120), None)
    assert mask.shape == (288, 384) and mask.dtype == bool
    assert seen["predict"]["point_coords"] is None and seen["predict"]["point_labels"] is None
    assert seen["predict"]["multimask_output"] is False
    np.testing.assert_array_equal(seen["predict"]["box"], [30, 60, 150, 120])
    # ResizeLongestSide(256): 384x288 -> 256x192, both axes scaled by 256/384 = 192/288 = 2/3:
    # (30, 60, 150, 120) * 2/3 = (20, 40, 100, 80)
    np.testing.assert_allclose(seen["boxes"].numpy().reshape(-1, 4), [[20, 40, 100, 80]], atol=1e-4)


def test_sam_union_of_boxes_uses_the_image_size(sam_refiner, monkeypatch):
    seen = {}

    def fake_predict_torch(point_coords, point_labels, boxes=None, multimask_output=True, **kwargs):
        seen["boxes"], seen["multimask"] = boxes.clone(), multimask_output
        masks = torch.zeros(2, 1, 288, 384, dtype=torch.bool)
        masks[0, 0, :10, :10] = True  # 100 px
        masks[1, 0, 5:15, 5:15] = True  # 100 px, 25 shared -> union 175 px
        return masks, torch.zeros(2, 1), torch.zeros(2, 1, 64, 64)

    monkeypatch.setattr(sam_refiner.predictor, "predict_torch", fake_predict_torch)
    image = np.zeros((288, 384, 3), np.uint8)
    union = sam_refiner.union_of_boxes(image, [(30, 60, 150, 120), (0, 3, 384, 288)])
    assert union.shape == (288, 384) and union.dtype == bool and union.sum() == 175
    assert seen["multimask"] is False
    # x * 256/384 and y * 192/288, i.e. both * 2/3: (0, 3, 384, 288) -> (0, 2, 256, 192)
    np.testing.assert_allclose(seen["boxes"].numpy(), [[20, 40, 100, 80], [0, 2, 256, 192]], atol=1e-4)


def fake_sam_state(blocks: int, width: int) -> dict:
    """Only the entries the variant check reads: one small tensor per block and a pos_embed of the right width."""
    state = {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(blocks)}
    state["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, width)
    return state


def test_variant_of_state_dict():
    assert sam_variant_of_state_dict(fake_sam_state(12, 768)) == ("vit_b", 12, 768)
    assert sam_variant_of_state_dict(fake_sam_state(32, 1280)) == ("vit_h", 32, 1280)
    assert sam_variant_of_state_dict(fake_sam_state(5, 100)) == (None, 5, 100)
    with pytest.raises(ValueError, match="not a Segment Anything state dict"):
        sam_variant_of_state_dict({"weight": torch.zeros(1)})


@pytest.fixture
def no_sam_build(monkeypatch):
    """Fail the test if any registry builder is called (no huge model may be built for a bad checkpoint)."""
    def forbidden(checkpoint=None):
        raise AssertionError("a SAM model was built")
    for name in list(segment_anything.sam_model_registry):
        monkeypatch.setitem(segment_anything.sam_model_registry, name, forbidden)


@pytest.mark.usefixtures("no_sam_build")
@pytest.mark.parametrize("model_type", ["vit_h", "default"])
def test_wrong_variant_checkpoint_is_named(tmp_path, model_type):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(fake_sam_state(12, 768), path)
    with pytest.raises(ValueError) as err:
        SamBoxRefiner(str(path), model_type=model_type)
    message = str(err.value)
    assert str(path) in message and repr(model_type) in message
    assert "32 blocks x 1280" in message and "12 blocks x 768" in message and "looks like vit_b" in message


@pytest.mark.usefixtures("no_sam_build")
def test_unknown_variant_and_non_sam_files(tmp_path):
    odd, other, junk = tmp_path / "odd.pth", tmp_path / "resnet.pth", tmp_path / "junk.pth"
    torch.save(fake_sam_state(5, 100), odd)
    torch.save({"conv.weight": torch.zeros(1)}, other)
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="5 blocks x 100, which looks like no known SAM variant"):
        SamBoxRefiner(str(odd), model_type="vit_l")
    with pytest.raises(ValueError, match=f"{other}.*not a Segment Anything state dict"):
        SamBoxRefiner(str(other))
    with pytest.raises(ValueError, match=f"{junk} cannot be read"):
        SamBoxRefiner(str(junk))
    with pytest.raises(ValueError, match="unknown model_type 'vit_x'"):
        SamBoxRefiner(str(odd), model_type="vit_x")


def test_missing_checkpoint_and_no_checkpoint():
    with pytest.raises(FileNotFoundError, match="nowhere/sam_vit_h.pth"):
        SamBoxRefiner("/nowhere/sam_vit_h.pth")
    with pytest.raises(ValueError, match="give a SAM checkpoint"):
        SamBoxRefiner(None)


def test_matching_checkpoint_is_loaded(tmp_path, monkeypatch):
    # Pretend the tiny SAM is "vit_b" (2 blocks x 48) so that the file path is exercised without a big model.
    monkeypatch.setitem(box_refiners.SAM_VARIANTS, "vit_b", (2, 48))
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam())
    source = tiny_sam()
    with torch.no_grad():
        source.mask_decoder.iou_token.weight.fill_(0.25)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    refiner = SamBoxRefiner(str(path), model_type="vit_b")
    assert torch.all(refiner.sam.mask_decoder.iou_token.weight == 0.25)


def test_factory(tmp_path):
    assert isinstance(make_box_refiner("grabcut"), GrabCutBoxRefiner)
    assert isinstance(make_box_refiner("threshold"), ThresholdRefiner)
    with pytest.raises(ValueError, match='kind "sam" needs sam_checkpoint'):
        make_box_refiner("sam")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        make_box_refiner("sam", sam_checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown kind 'medsam'"):
        make_box_refiner("medsam")
