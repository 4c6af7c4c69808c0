"""EndoKED's pseudo-label rounds: train Polyp-PVT on the current pseudo masks, predict, box, refine, repeat.

Wang et al., arXiv 2310.11173 (specs/endoked.md §4.3-§4.5)::

    labels_0 = CAM -> box -> refiner                                    (WSSS bundle, configs/pseudolabel.json)
    for k in 1..K:
        model_k  = Polyp-PVT trained from scratch on (filtered_{k-1}, labels_{k-1})       (configs/train.json)
        r        = sigmoid(P1 + P2) of model_k at native size, min-max normalised per image
        labels_k = largest box of {r >= 0.01} passing the four filters -> refiner        (§4.4)

Every round builds a fresh network (the original retrains from ImageNet initialisation, no warm start) through the
bundle's own ``train.json`` with ``pseudo_labels`` pointing at the previous round, so a round is exactly what
``python -m monai.bundle run --config_file configs/train.json --pseudo_labels <dir>`` does. The image set of
every round is the round-0 candidate list (accepted and rejected images of ``labels_0``, in label-name order), so an
image keeps its label name and may come back after a rejection: the geometric filter is re-run each round.

Output::

    output_dir/round_<k>/models/model.pt        the round's network (best validation epoch)
    output_dir/round_<k>/eval/                  its TensorBoard logs
    output_dir/round_<k>/pseudo_masks/          labels_k (see common.engines.pseudo_masks)
    output_dir/rounds.csv                       round, accepted, images, coverage, pseudo-mask Dice
    output_dir/rounds.png                       the same as a curve
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from common.engines.pseudo_masks import PseudoMaskResult, generate_pseudo_masks
from common.networks.box_refiners import BoxRefiner
from common.utils.files import write_csv

__all__ = ["polyp_pvt_prob_fn", "candidate_images", "bundle_trainer", "run_rounds", "ROUND_COLUMNS"]

logger = logging.getLogger(__name__)

ROUND_COLUMNS = ("round", "accepted", "images", "coverage", "pseudo_mask_dice", "dice_images", "pseudo_masks")


def polyp_pvt_prob_fn(network: torch.nn.Module, image_size: int = 352, normalize_imagenet: bool = False,
                      device: str | torch.device = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``(H, W, 3)`` uint8 RGB frame -> ``(H, W)`` float32 Polyp-PVT probability ``sigmoid(up(P1 + P2))``.

    The frame is scaled to [0, 1], resized to ``image_size``^2 (bilinear, as the bundle's ``Resized``),
    optionally ImageNet-normalised (EndoKED-SEG trains without), and the summed head logits are upsampled back to
    ``H x W`` (bilinear, ``align_corners=False``) before the sigmoid (§4.4). Min-max normalisation and the 0.01
    threshold are left to :func:`~common.engines.pseudo_masks.generate_pseudo_masks`.
    """
    device = torch.device(device)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def prob(image: np.ndarray) -> np.ndarray:
        network.eval()
        height, width = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        if normalize_imagenet:
            x = (x - mean) / std
        out = network(x)
        logits = sum(out) if isinstance(out, (tuple, list)) else out
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[0, 0].cpu().numpy().astype(np.float32)

    return prob


def candidate_images(pseudo_dir: str | os.PathLike) -> list[str]:
    """Every image of a pseudo-label folder, accepted (``filtered.csv``) or rejected (``rejected.csv``), in
    label-name order (the positive list's order, which fixes the label names of the next rounds).

    Raises:
        FileNotFoundError: the folder or one of its two lists is missing (named).
        ValueError: the lists hold no image.
    """
    pseudo_dir = Path(pseudo_dir)
    rows: list[tuple[str, str]] = []
    for name, image_col, label_col in (("filtered.csv", "filtered_img_path", "filtered_label_name"),
                                       ("rejected.csv", "img_path", "label_name")):
        path = pseudo_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"pseudo-label folder {pseudo_dir} has no {name}: give the output folder of "
                                    "the WSSS bundle's configs/pseudolabel.json (or of a previous round)")
        with open(path, newline="") as f:
            rows += [(row[label_col], row[image_col]) for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"pseudo-label folder {pseudo_dir} lists no image in filtered.csv or rejected.csv")
    return [image for _, image in sorted(rows)]


def bundle_trainer(config_file: str | os.PathLike, bundle_root: str | os.PathLike,
                   overrides: Mapping[str, Any] | None = None) -> Callable[[dict[str, Any]], torch.nn.Module]:
    """``round overrides -> network``: a fresh ``ConfigWorkflow`` of the bundle's ``train.json`` per call (a new
    network, optimiser and data pipeline every round), run to the end, with its best checkpoint
    (``<ckpt_dir>/model.pt``) loaded back into the network it returns.

    Args:
        config_file: the segmentation bundle's ``configs/train.json``.
        bundle_root: its root (``metadata.json`` is read from ``configs/`` beside ``config_file``).
        overrides: top-level ids applied to every round (``epochs``, ``batch_size``, ...), below the round's own.
    """
    from monai.bundle import ConfigWorkflow

    from common.utils.checkpoints import read_state_dict

    config_file = Path(config_file)

    def train(round_overrides: dict[str, Any]) -> torch.nn.Module:
        workflow = ConfigWorkflow(config_file=str(config_file), meta_file=str(config_file.parent / "metadata.json"),
                                  logging_file=False, workflow_type="train", bundle_root=str(bundle_root),
                                  **{**dict(overrides or {}), **round_overrides})
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        network = workflow.parser.get_parsed_content("network")
        network.load_state_dict(read_state_dict(Path(round_overrides["ckpt_dir"]) / "model.pt"))
        return network

    return train


def _plot_rounds(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    rounds = [int(r["round"]) for r in rows]
    ax.plot(rounds, [float(r["coverage"]) for r in rows], "o-", label="coverage (accepted / images)")
    if all(r["pseudo_mask_dice"] != "" for r in rows):
        ax.plot(rounds, [float(r["pseudo_mask_dice"]) for r in rows], "s-", label="pseudo-mask Dice vs ground truth")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _row(k: int, result: PseudoMaskResult) -> dict[str, Any]:
    return {"round": k, "accepted": result.n_accepted, "images": result.n_images, "coverage": f"{result.coverage:.4f}",
            "pseudo_mask_dice": "" if result.mean_dice is None else f"{result.mean_dice:.4f}",
            "dice_images": result.n_dice, "pseudo_masks": str(result.out_dir)}


def _dice_of(pseudo_dir: Path) -> tuple[float | None, int]:
    path = pseudo_dir / "pseudo_mask_dice.csv"
    if not path.is_file():
        return None, 0
    with open(path, newline="") as f:
        dices = [float(row["dice"]) for row in csv.DictReader(f) if row["dice"]]
    return (float(np.mean(dices)) if dices else None), len(dices)


def run_rounds(
    pseudo_labels: str | os.PathLike | None,
    rounds: int,
    output_dir: str | os.PathLike,
    train_workflow: Callable[[dict[str, Any]], torch.nn.Module],
    refiner: BoxRefiner,
    threshold: float = 0.01,
    area_range: tuple[float, float] = (0.01, 0.35),
    max_components: int = 3,
    gt_paths: Mapping[str, str] | None = None,
    image_size: int = 352,
    normalize_imagenet: bool = False,
    device: str | torch.device = "cpu",
    overlay_count: int = 8,
) -> list[dict[str, Any]]:
    """Run ``rounds`` pseudo-label rounds starting from ``pseudo_labels`` (module docstring).

    Args:
        pseudo_labels: round-0 folder (``filtered.csv``, ``rejected.csv``, ``labels/``).
        rounds: number of rounds ``K`` (>= 1).
        output_dir: folder of the rounds (see the module docstring).
        train_workflow: ``overrides -> trained network``: runs the segmentation bundle's ``train.json`` with the
            given top-level overrides (``pseudo_labels``, ``ckpt_dir``, ``output_dir``) and returns its network with
            the best checkpoint loaded (:func:`bundle_trainer`).
        refiner: box refiner of the new masks (§4.4: none in the released run, SAM optional).
        threshold: prompt threshold on the min-max normalised probability (``>=``, §4.4: 0.01).
        area_range, max_components: the box filter.
        gt_paths: image -> ground-truth mask, for the per-round pseudo-mask Dice (images without one are skipped).
        image_size, normalize_imagenet: the network's input (as in ``train.json``).
        device: where the predictions run.
        overlay_count: overlay figures per round.

    Returns:
        one row per round (round 0 = the starting masks) as written to ``rounds.csv``; the loop stops early, with a
        warning, after a round that accepts no frame.

    Raises:
        ValueError: no ``pseudo_labels``, ``rounds < 1``, or a round-0 folder without any accepted mask.
    """
    if pseudo_labels is None:
        raise ValueError("pseudo_labels is not set: pass --pseudo_labels <folder>, the output of the WSSS bundle's "
                         "configs/pseudolabel.json (filtered.csv, rejected.csv, labels/)")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    current = Path(pseudo_labels)
    images = candidate_images(current)
    gt = {image: str(gt_paths[image]) for image in images if gt_paths and image in gt_paths}
    n_accepted = sum(1 for _ in open(current / "filtered.csv")) - 1
    if n_accepted == 0:
        raise ValueError(f"round 0 ({current}) has no accepted pseudo mask (every frame failed the box filter, see "
                         "rejected.csv): nothing to train Polyp-PVT on")
    dice0, n_dice0 = _dice_of(current)
    rows = [{"round": 0, "accepted": n_accepted, "images": len(images), "coverage": f"{n_accepted / len(images):.4f}",
             "pseudo_mask_dice": "" if dice0 is None else f"{dice0:.4f}", "dice_images": n_dice0,
             "pseudo_masks": str(current)}]
    logger.info("round 0: %d of %d images have pseudo masks (%s)", n_accepted, len(images), current)
    for k in range(1, rounds + 1):
        round_dir = output_dir / f"round_{k}"
        logger.info("round %d/%d: training Polyp-PVT on %s", k, rounds, current)
        network = train_workflow({"pseudo_labels": str(current), "ckpt_dir": str(round_dir / "models"),
                                  "output_dir": str(round_dir / "eval")})
        prob_fn = polyp_pvt_prob_fn(network, image_size, normalize_imagenet, device)
        result = generate_pseudo_masks(images, prob_fn, refiner, round_dir / "pseudo_masks", threshold=threshold,
                                       threshold_inclusive=True, min_max_normalise=True, area_range=area_range,
                                       max_components=max_components, gt_paths=gt or None,
                                       overlay_count=overlay_count, progress=False)
        rows.append(_row(k, result))
        logger.info("round %d/%d: %d of %d accepted, pseudo-mask Dice %s", k, rounds, result.n_accepted,
                    result.n_images, rows[-1]["pseudo_mask_dice"] or ("n/a (no ground truth)" if not gt else "n/a (no accepted frame)"))
        write_csv(output_dir / "rounds.csv", ROUND_COLUMNS, rows)
        _plot_rounds(rows, output_dir / "rounds.png")
        if result.n_accepted == 0 and k < rounds:
            logger.warning("round %d accepted no frame (see %s): stopping before round %d, nothing to train on", k,
                           result.rejected_csv, k + 1)
            break
        current = result.out_dir
    return rows
