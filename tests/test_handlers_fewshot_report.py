"""Few-shot report: example figures and the target x shot x model x α sweep on 4x4 synthetic episodes.

Stand-in networks (contract §2 call signature): ``SupportMaskNet`` predicts the support mask (no text guide);
``ThresholdTextNet`` has a ``text_guide`` whose ``alpha`` is its threshold: foreground where the query's channel 0
exceeds α, so α changes the prediction. Query channel 0 is ``column / 4`` (0, 0.25, 0.5, 0.75).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.engines.episodic import EpisodicEvaluator
from common.handlers.fewshot_report import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESULT_COLUMNS,
    FewShotExamples,
    FewShotSweep,
    write_episode_figure,
)

from conftest import read_csv

pytestmark = pytest.mark.usefixtures("one_thread")


class SupportMaskNet(nn.Module):
    def forward(self, q, s, m, class_text=None, background_text=None):
        return torch.stack([1 - m, m], dim=1)


class Guide(nn.Module):
    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha


class ThresholdTextNet(nn.Module):
    """Foreground logit ``q[:, 0] - α``, background 0; needs the text tensors like a CD-TG network."""

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.text_guide = Guide(alpha)
        self.alphas_seen: list[float] = []

    def forward(self, q, s, m, class_text=None, background_text=None):
        if class_text is None or background_text is None:
            raise ValueError("text needed")
        self.alphas_seen.append(self.text_guide.alpha)
        fg = q[:, 0] - self.text_guide.alpha
        return torch.stack([torch.zeros_like(fg), fg], dim=1)


def _cols(*cols: int) -> torch.Tensor:
    m = torch.zeros(4, 4)
    m[:, list(cols)] = 1
    return m


class ToyEpisodes(Dataset):
    """Episodes of ``classes`` (name, ground-truth columns), cycled; supports = columns 1-2."""

    def __init__(self, classes: list[tuple[str, tuple[int, ...]]], n: int, shot: int) -> None:
        self.class_names = [c for c, _ in classes]
        self.classes, self.n, self.shot = classes, n, shot

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        c = i % len(self.classes)
        query = torch.zeros(3, 4, 4)
        query[0] = torch.arange(4.0) / 4  # channel 0 = column / 4
        return {"query_image": query, "query_mask": _cols(*self.classes[c][1]), "query_ignore": torch.zeros(4, 4),
                "support_images": torch.zeros(self.shot, 3, 4, 4), "support_masks": _cols(1, 2).repeat(self.shot, 1, 1),
                "class_id": c, "class_name": self.classes[c][0], "query_name": f"q{i}", "episode": i,
                "class_text": torch.ones(3), "background_text": torch.zeros(3)}


def test_examples_are_kept_and_denormalised(tmp_path: Path) -> None:
    data = ToyEpisodes([("disc", (2, 3))], 4, 2)
    examples = FewShotExamples(n_examples=3)
    evaluator = EpisodicEvaluator("cpu", DataLoader(data, batch_size=2), SupportMaskNet(), val_handlers=[examples])
    evaluator.run()
    ex = examples.examples
    assert len(ex["pred"]) == 3 and ex["query_name"] == ["q0", "q1", "q2"] and ex["class_name"] == ["disc"] * 3
    # de-normalised query: x * std + mean, clipped to [0, 1]; pixel (0, 3) has x = (0.75, 0, 0)
    expected = np.clip(np.array([0.75, 0.0, 0.0]) * IMAGENET_STD + np.array(IMAGENET_MEAN), 0, 1)
    assert ex["query_image"][0].shape == (4, 4, 3)
    np.testing.assert_allclose(ex["query_image"][0][0, 3], expected, atol=1e-6)
    assert ex["pred"][0].dtype == bool and ex["pred"][0][:, 1:3].all() and not ex["pred"][0][:, [0, 3]].any()
    assert ex["label"][0][:, 2:].all() and not ex["ignore"][0].any()
    evaluator.run()  # a second run starts afresh
    assert len(examples.examples["pred"]) == 3

    figure = {**{k: v for k, v in ex.items() if k != "pred"}, "pred/A": ex["pred"], "pred/B": ex["label"]}
    path = write_episode_figure(figure, tmp_path / "fig.png", "toy")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:  # 5 columns x 3 rows of 2.2 x 2.5 inch cells (+ 0.5 inch) at 100 dpi
        assert image.size == (1100, 800)
    with pytest.raises(ValueError, match="pred"):
        write_episode_figure({k: v for k, v in ex.items() if k != "pred"}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="equal length"):
        write_episode_figure({**ex, "label": ex["label"][:2]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sweep_rows_files_and_alpha(tmp_path: Path) -> None:
    toy = [("disc", (2, 3)), ("ring", (3,))]
    targets = {"toy": lambda shot: ToyEpisodes(toy, 4, shot),
               "one": lambda shot: ToyEpisodes([("blob", (2, 3))], 2, shot)}
    text_net = ThresholdTextNet(alpha=0.5)
    sweep = FewShotSweep(targets, [1, 2], {"base": SupportMaskNet(), "text": text_net}, alphas=[0.25, 0.6],
                         device="cpu", output_dir=tmp_path, batch_size=2, n_examples=2)
    rows = sweep.run()
    assert len(rows) == 2 * 2 * 3  # targets x shots x (base + 2 alphas)
    assert text_net.text_guide.alpha == 0.5 and set(text_net.alphas_seen) == {0.25, 0.6}  # set, then restored

    csv_rows = read_csv(tmp_path / "fewshot_results.csv")
    assert list(csv_rows[0]) == [*RESULT_COLUMNS, "iou/disc", "iou/ring", "iou/blob"]
    got = {(r["target"], r["shot"], r["model"], r["alpha"]): r for r in csv_rows}
    assert len(got) == 12 and {r["episodes"] for r in csv_rows if r["target"] == "toy"} == {"4"}
    # the base network predicts the support mask, columns 1-2, whatever K (identical supports vote the same)
    #   blob / disc (G = columns 2-3): I = 4, U = 12 -> 33.33; ring (G = column 3): I = 0 -> 0; toy mIoU = 16.67
    base = got[("toy", "1", "base", "")]
    assert float(base["iou/disc"]) == pytest.approx(100 / 3) and float(base["iou/ring"]) == 0.0
    assert float(base["miou"]) == pytest.approx(100 / 6) and base["iou/blob"] == ""
    assert float(got[("one", "2", "base", "")]["miou"]) == pytest.approx(100 / 3)
    # text net, α = 0.25: P = columns 2-3 (0.5, 0.75 > 0.25): blob 100; disc 100, ring I = 4, U = 8 -> 50
    # α = 0.6: P = column 3: blob 4 / 8 = 50; disc 50, ring 100
    assert float(got[("one", "1", "text", "0.25")]["miou"]) == pytest.approx(100.0)
    assert float(got[("one", "1", "text", "0.6")]["miou"]) == pytest.approx(50.0)
    low, high = got[("toy", "2", "text", "0.25")], got[("toy", "2", "text", "0.6")]
    assert (float(low["iou/disc"]), float(low["iou/ring"])) == pytest.approx((100.0, 50.0))
    assert (float(high["iou/disc"]), float(high["iou/ring"])) == pytest.approx((50.0, 100.0))
    # FB-IoU, blob at α = 0.6: fg 4 / 8; bg P0 = 12, G0 = 8, I = 8, U = 12 -> 100 (1/2 + 2/3) / 2 = 58.33
    assert float(got[("one", "1", "text", "0.6")]["fbiou"]) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)

    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["alpha_sweep.png", "examples_one_1shot.png", "examples_one_2shot.png", "examples_toy_1shot.png",
                    "examples_toy_2shot.png"]
    for name in pngs:
        with Image.open(tmp_path / name) as image:
            image.verify()
    with Image.open(tmp_path / "examples_toy_1shot.png") as image:  # 3 + 3 prediction columns, 2 rows
        assert image.size == (round(2.2 * 6 * 100), round((2.5 * 2 + 0.5) * 100))  # 1320 x 550
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_single_alpha_writes_no_alpha_plot_and_bad_arguments(tmp_path: Path) -> None:
    targets = {"one": lambda shot: ToyEpisodes([("blob", (2, 3))], 2, shot)}
    rows = FewShotSweep(targets, [1], {"text": ThresholdTextNet(alpha=0.25)}, output_dir=tmp_path).run()
    assert [(r["model"], r["alpha"], r["miou"]) for r in rows] == [("text", 0.25, pytest.approx(100.0))]
    assert not (tmp_path / "alpha_sweep.png").exists() and (tmp_path / "examples_one_1shot.png").exists()
    with pytest.raises(ValueError, match="alphas"):
        FewShotSweep(targets, [1], {"text": ThresholdTextNet()}, alphas=[1.5])
    with pytest.raises(ValueError, match="shots"):
        FewShotSweep(targets, [0], {"text": ThresholdTextNet()})
    with pytest.raises(ValueError, match="file name"):
        FewShotSweep({"a/b": targets["one"]}, [1], {"text": ThresholdTextNet()})
