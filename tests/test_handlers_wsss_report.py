"""WSSSEvaluationReport: per-frame decoder and CAM Dice of an evaluator run, checked by hand on 4x8 frames.

A toy network stands in for the ToCo ViT: its CAM is the (normalised) red channel and its decoder's foreground logit
the (normalised) green channel, so both masks follow from the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, NormalizeIntensityd, Resized, \
    ScaleIntensityRanged
from PIL import Image
from torch import nn

from common.engines.inferers import SelectedHeadInferer
from common.handlers.wsss_report import WSSSEvaluationReport, decoder_mask
from common.transforms.io import LoadPolypImaged

from conftest import read_csv


class RedCAMGreenSeg(nn.Module):
    """``cam = cam_aux = red``; default forward ``(cls, seg, fmap, cls_aux)`` with ``seg = [0, green]``."""

    def forward(self, x: torch.Tensor, cam_only: bool = False) -> tuple[torch.Tensor, ...]:
        if cam_only:
            return x[:, :1], x[:, :1]
        seg = torch.cat([torch.zeros_like(x[:, 1:2]), x[:, 1:2]], dim=1)
        return x[:, 0, 0, :1], seg, x, x[:, 0, 0, :1]


def _write(folder: Path, name: str, red_cols: slice, green_cols: slice, gt_cols: slice) -> dict[str, str]:
    """A 4x8 RGB PNG (red / green 255 on the given columns, 0 elsewhere) and its 0/255 mask."""
    image = np.zeros((4, 8, 3), np.uint8)
    image[:, red_cols, 0] = 255
    image[:, green_cols, 1] = 255
    mask = np.zeros((4, 8), np.uint8)
    mask[:, gt_cols] = 255
    paths = {"image": str(folder / f"{name}.png"), "label": str(folder / f"{name}_mask.png")}
    Image.fromarray(image).save(paths["image"])
    Image.fromarray(mask).save(paths["label"])
    return paths


def _evaluator(data: list[dict[str, str]], handler: WSSSEvaluationReport, network: nn.Module,
               **kwargs) -> SupervisedEvaluator:
    transform = Compose([
        LoadPolypImaged(keys=["image", "label"], reverse_indexing=False),
        EnsureChannelFirstd(keys=["image", "label"]),
        Resized(keys="image", spatial_size=(8, 8), mode="bilinear"),  # network input 8x8, masks back at 4x8
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        NormalizeIntensityd(keys="image", subtrahend=[0.485, 0.456, 0.406], divisor=[0.229, 0.224, 0.225],
                            channel_wise=True),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32),
    ])
    loader = DataLoader([transform(d) for d in data], batch_size=2)
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network,
                               inferer=SelectedHeadInferer(index=1), val_handlers=[handler], **kwargs)


def test_decoder_mask_by_hand():
    # argmax over [[1, 0], [0, 1]] (class 0) and [[0, 2], [2, 0]] (class 1) = [[0, 1], [1, 0]]; nearest to 4x4
    # repeats every value over a 2x2 block
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [2.0, 0.0]]])
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    assert np.array_equal(decoder_mask(pred, (4, 4)), expected)
    with pytest.raises(ValueError, match=r"\[K, h, w\] with K >= 2"):
        decoder_mask(torch.zeros(1, 2, 2), (4, 4))


def test_report_scores_decoder_and_cam_by_hand(tmp_path):
    # frame a: red on columns 4-7, green on 5-6, ground truth on 4-5 (4 rows each, |G| = 8)
    #   CAM: normalised red (1 - .485) / .229 = 2.249 on 4-7, -2.118 elsewhere -> ReLU, min-max ~ 1 on 4-7, 0
    #   elsewhere -> > 0.65: |P| = 16, |P∩G| = 8 -> Dice (2*8 + 1) / (16 + 8 + 1) = 17/25 = 0.68
    #   decoder: logit 1 = normalised green, 2.43 on 5-6 and -2.04 elsewhere, logit 0 = 0 -> foreground 5-6:
    #   |P| = 8, |P∩G| = 4 (column 5) -> (2*4 + 1) / (8 + 8 + 1) = 9/17
    # frame b: black, empty ground truth: CAM 0 / (0 + 1e-5) = 0 and logit 1 < 0 -> both empty -> (0 + 1) / (0 + 1) = 1
    data = [_write(tmp_path, "a", slice(4, 8), slice(5, 7), slice(4, 6)),
            _write(tmp_path, "b", slice(0, 0), slice(0, 0), slice(0, 0))]
    network = RedCAMGreenSeg()
    report = WSSSEvaluationReport(network, tmp_path / "out", cam_threshold=0.65, cam_scales=(1.0,), size=8)
    evaluator = _evaluator(data, report, network)
    evaluator.run()
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [(r["image"], r["mask"], r["polyp"]) for r in rows] == [
        (data[0]["image"], data[0]["label"], "1"), (data[1]["image"], data[1]["label"], "0")]
    assert [float(r["decoder_dice"]) for r in rows] == pytest.approx([9 / 17, 1.0], abs=1e-6)
    assert [float(r["cam_dice"]) for r in rows] == pytest.approx([17 / 25, 1.0], abs=1e-6)
    metrics = evaluator.state.metrics
    assert metrics["decoder_dice"] == pytest.approx((9 / 17 + 1) / 2)  # 13/17
    assert metrics["cam_dice"] == pytest.approx((0.68 + 1) / 2)  # 0.84
    assert metrics["polyp_decoder_dice"] == pytest.approx(9 / 17)  # frame a only
    assert metrics["polyp_cam_dice"] == pytest.approx(0.68)


def test_report_threshold_is_strict(tmp_path):
    # frame b is black: its CAM is 0 everywhere; P = CAM > 0 is empty (CAM >= 0 would be all 32 pixels, Dice
    # (0 + 1) / (32 + 0 + 1) = 1/33); with an empty ground truth (0 + 1) / (0 + 0 + 1) = 1
    data = [_write(tmp_path, "b", slice(0, 0), slice(0, 0), slice(0, 0))]
    network = RedCAMGreenSeg()
    report = WSSSEvaluationReport(network, tmp_path, cam_threshold=0.0, cam_scales=(1.0,), size=8)
    _evaluator(data, report, network).run()
    assert report.rows[0]["cam_dice"] == 1.0


def test_report_refuses_bad_input(tmp_path):
    network = RedCAMGreenSeg()
    with pytest.raises(ValueError, match="cam_threshold must be in"):
        WSSSEvaluationReport(network, tmp_path, cam_threshold=1.5)
    data = [_write(tmp_path, "a", slice(4, 8), slice(5, 7), slice(4, 6))]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(data[0]["label"])  # mask 4x4, image 4x8
    report = WSSSEvaluationReport(network, tmp_path / "out", cam_scales=(1.0,), size=8)
    with pytest.raises(ValueError, match=f"mask {data[0]['label']} is"):
        _evaluator(data, report, network).run()
    report = WSSSEvaluationReport(network, tmp_path / "out", cam_scales=(1.0,), size=8)
    evaluator = _evaluator([_write(tmp_path, "b", slice(0, 0), slice(0, 0), slice(0, 0))], report, network,
                           decollate=False)  # a batch-level output has no per-frame items
    with pytest.raises(ValueError, match="decollated"):
        evaluator.run()


def test_validation_dice_inputs_split_the_decoder_and_cam_channels():
    from common.handlers.wsss_report import cam_dice_inputs, decoder_dice_inputs

    # one 1x3 frame: decoder logits favour class 1 at pixels 1-2, the CAM (channel 2) is 0.9, 0.7, 0.6
    pred = torch.tensor([[[2.0, 0.0, 0.0]], [[1.0, 1.0, 3.0]], [[0.9, 0.7, 0.6]]])
    label = torch.tensor([[[1.0, 1.0, 0.0]]])
    cams, labels = cam_dice_inputs(0.65)([{"pred": pred, "label": label}])
    assert cams[0].tolist() == [[[1.0, 1.0, 0.0]]] and labels[0] is label  # 0.9 > 0.65, 0.7 > 0.65, 0.6 is not
    decoded, _ = decoder_dice_inputs()([{"pred": pred, "label": label}])
    # argmax over the 2 decoder channels only (the CAM channel is ignored): 2 > 1, 0 < 1, 0 < 3 -> [0, 1, 1]
    assert decoded[0].tolist() == [[[0.0, 1.0, 1.0]]]
    with pytest.raises(ValueError, match="decollated"):
        cam_dice_inputs()({"pred": pred})
