"""ToCo / EndoKED-WSSS weakly supervised training as a MONAI ``SupervisedTrainer``, and the CAM predictor.

Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation" (ToCo), CVPR 2023; EndoKED-WSSS
(Wang et al., arXiv 2310.11173) trains a ToCo ViT on image-level polyp labels (specs/endoked.md §3.4, §6). One
ignite iteration is one step of the original loop, with the 0-based counter ``n = state.iteration - 1``:

1. ``(A, A_aux) = multi_scale_cam(x)`` over ``cam_scales`` with flips (no gradient);
2. ROI map from ``A_aux`` (0 / 1 / 2 at ``low`` / ``high``); ``crop_num`` local crops of the local view, flagged
   negative where the ROI is mostly background;
3. ``cls, seg, fmap, cls_aux, out_t, out_s = network(x, crops=[x, global view, local crops], n_iter=n)`` (the
   network updates its EMA teacher head inside);
4. losses, with ``y`` the image label and ``MLSM`` the multilabel soft margin (mean BCE with logits)::

       L = MLSM(cls, y) + MLSM(cls_aux, y) + w_ptc L_ptc + w_ctc L_ctc
           [+ w_seg CE(seg, Y) + w_dice Dice(seg, Y)   when n > seg_warmup_iters]

   ``L_ptc`` on the tokens of ``fmap`` with labels from ``A_aux`` resized to the token grid (``ignore_mid``);
   ``L_ctc`` from ``out_t, out_s`` and the crop flags; ``Y`` = PAR-refined labels (0 / 1 / 255) of the aux CAM
   while ``n < aux_to_main_iter``, of the main CAM afterwards; ``seg`` is upsampled bilinearly to ``Y``;
5. backward (``GradScaler`` under AMP on CUDA), gradients averaged over the ranks of a multi-process run, optimiser
   step, learning-rate scheduler step.

Multi-process runs (``torch.distributed`` initialised, e.g. under ``torchrun``) keep the network unwrapped (no DDP,
so that ``state_dict`` keys and the ``cam_only`` / ``crops`` forward modes stay as they are): every rank starts from
rank 0's parameters and buffers (broadcast when the run starts) and every step uses the gradients averaged over
the ranks, ``g <- (1 / R) sum_r g_r`` (:func:`common.utils.distributed.average_gradients`), so the ranks stay in
step as with DDP. In a single process both are no-ops.

Batches are dictionaries of tensors (``common/transforms/toco_views.py``): ``"image"`` ``[B, 3, S, S]`` normalised
main view, ``"image_raw"`` the same crop in [0, 1] (PAR's input), ``"global_view"`` and ``"local_image"``
``[B, 3, S, S]`` normalised, ``"label"`` ``[B, 1]`` float image-level class (1 polyp, 0 none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from common.losses.toco import CTCLoss, PTCLoss, TwoClassDiceLoss
from common.transforms.cams import (
    cam_to_label,
    cam_to_roi_mask,
    crop_from_roi,
    label_to_affinity_mask,
    multi_scale_cam,
    refine_cams_with_par,
    valid_cam,
)
from common.engines.optimiser_step import backward_and_step
from common.utils.distributed import broadcast_from_rank0

__all__ = ["PSEUDO_LABEL_CAM_SCALES", "TRAIN_CAM_SCALES", "ToCoTrainer", "cam_predictor"]

TRAIN_CAM_SCALES = (1.0, 0.5, 0.75, 1.25, 1.5)
"""CAM scales of the training step (``dist_train_seg_neg_ALL.py:64``)."""

PSEUDO_LABEL_CAM_SCALES = (1.0, 0.5, 0.75, 1.25, 1.5, 1.75)
"""CAM scales of the CAM -> box -> SAM pseudo-mask stage (``a3...SAM_byCAM.py:66``)."""


class ToCoTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` running the ToCo step of the module docstring.

    Args:
        par: pixel-adaptive refinement ``par(images01 [N, 3, h, w], masks [N, K, h, w]) -> [N, K, h, w]``
            (:class:`common.networks.par.PAR`).
        lr_scheduler: stepped once per iteration after the optimiser (e.g.
            :class:`common.utils.poly_warmup.PolyWarmupLR`); None: constant learning rates.
        cam_scales: scales of the multi-scale CAM.
        high, low: ROI / pseudo-label thresholds and PAR background levels (0.75, 0.25).
        bkg: background threshold of the reported CAM label ``"cam_label"`` (0.45, ToCo's validation threshold).
        ignore_index: uncertain pixels and tokens (255).
        crop_num, crop_size, crop_margin, neg_crop_ratio: local crops (8, 112, 56, 0.25).
        temperature: CTC temperature (0.5).
        w_ptc, w_ctc, w_seg, w_dice: loss weights (0.2, 0.0, 0.1, 0.1; EndoKED "ALL" run).
        seg_warmup_iters: the segmentation terms join when ``n > seg_warmup_iters`` (1000); before, PAR is not run.
        aux_to_main_iter: refined labels come from the aux CAM while ``n < aux_to_main_iter`` (12000).
        par_down_scale: PAR resolution divisor (2).
        seed: seed of the crop-centre generator.
        raw_key, global_key, local_key: batch keys of the [0, 1] image, the second global view, the local view.
        args, kwargs: those of ``monai.engines.SupervisedTrainer``; ``network`` is a
            :class:`common.networks.toco_vit.ToCoViT`; ``loss_function`` is the segmentation loss on the refined
            labels (default ``CrossEntropyLoss(ignore_index=ignore_index)``); ``decollate`` defaults to False (the
            output mixes per-batch scalars and maps).
    """

    def __init__(
        self,
        *args: Any,
        par: nn.Module,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        cam_scales: Sequence[float] = TRAIN_CAM_SCALES,
        high: float = 0.75,
        low: float = 0.25,
        bkg: float = 0.45,
        ignore_index: int = 255,
        crop_num: int = 8,
        crop_size: int = 112,
        crop_margin: int = 56,
        neg_crop_ratio: float = 0.25,
        temperature: float = 0.5,
        w_ptc: float = 0.2,
        w_ctc: float = 0.0,
        w_seg: float = 0.1,
        w_dice: float = 0.1,
        seg_warmup_iters: int = 1000,
        aux_to_main_iter: int = 12000,
        par_down_scale: int = 2,
        seed: int = 0,
        raw_key: str = "image_raw",
        global_key: str = "global_view",
        local_key: str = "local_image",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("loss_function", nn.CrossEntropyLoss(ignore_index=ignore_index))
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        if not 0.0 <= low <= high <= 1.0 or not 0.0 <= bkg <= 1.0:
            raise ValueError(f"ToCoTrainer: need 0 <= low <= high <= 1 and 0 <= bkg <= 1, got low={low}, high={high}, "
                             f"bkg={bkg}")
        weights = {"w_ptc": w_ptc, "w_ctc": w_ctc, "w_seg": w_seg, "w_dice": w_dice}
        if any(v < 0 for v in weights.values()):
            raise ValueError(f"ToCoTrainer: loss weights must be >= 0, got {weights}")
        if seg_warmup_iters < 0 or aux_to_main_iter < 0:
            raise ValueError(f"ToCoTrainer: seg_warmup_iters and aux_to_main_iter must be >= 0, got "
                             f"{seg_warmup_iters} and {aux_to_main_iter}")
        if not cam_scales:
            raise ValueError("ToCoTrainer: cam_scales must name at least one scale")
        self.par = par.to(self.state.device) if isinstance(par, nn.Module) else par
        self.lr_scheduler = lr_scheduler
        self.cam_scales = tuple(float(s) for s in cam_scales)
        self.high, self.low, self.bkg, self.ignore_index = high, low, bkg, ignore_index
        self.crop_num, self.crop_size, self.crop_margin = crop_num, crop_size, crop_margin
        self.neg_crop_ratio = neg_crop_ratio
        self.w_ptc, self.w_ctc, self.w_seg, self.w_dice = w_ptc, w_ctc, w_seg, w_dice
        self.seg_warmup_iters, self.aux_to_main_iter = seg_warmup_iters, aux_to_main_iter
        self.par_down_scale = par_down_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.raw_key, self.global_key, self.local_key = raw_key, global_key, local_key
        self.ptc_loss = PTCLoss()
        self.ctc_loss = CTCLoss(temperature)
        self.dice_loss = TwoClassDiceLoss()
        self.add_event_handler(Events.STARTED, self._broadcast_parameters)

    def _broadcast_parameters(self, engine: ToCoTrainer) -> None:
        """Multi-process runs: every rank starts from rank 0's parameters and buffers (a no-op in one process)."""
        broadcast_from_rank0([*engine.network.parameters(), *engine.network.buffers()])

    def _extra(self, engine: ToCoTrainer, batchdata: dict[str, Any], key: str, shape: torch.Size) -> torch.Tensor:
        if key not in batchdata:
            raise ValueError(f"ToCoTrainer: the batch has no {key!r} entry (keys: {sorted(batchdata)}); the ToCo views "
                             "transform provides it")
        value = convert_to_tensor(batchdata[key], track_meta=False).to(engine.state.device,
                                                                       non_blocking=engine.non_blocking).float()
        if value.shape != shape:
            raise ValueError(f"ToCoTrainer: batch[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)} "
                             "(that of batch['image'])")
        return value

    def _seg_losses(self, engine: ToCoTrainer, n_iter: int, image01: torch.Tensor, label: torch.Tensor,
                    cams: torch.Tensor, cams_aux: torch.Tensor, segs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(L_seg, L_dice, refined labels [B, H, W])`` on the PAR-refined aux (early) or main CAM labels."""
        source = cams_aux if n_iter < self.aux_to_main_iter else cams
        pseudo = refine_cams_with_par(self.par, image01, valid_cam(source, label), label, self.high, self.low,
                                      self.ignore_index, self.par_down_scale)
        segs = F.interpolate(segs.float(), size=pseudo.shape[1:], mode="bilinear", align_corners=False)
        if bool((pseudo != self.ignore_index).any()):
            seg_loss = engine.loss_function(segs, pseudo)
        else:  # every pixel uncertain: cross-entropy would be 0 / 0
            seg_loss = segs.sum() * 0.0
        return seg_loss, self.dice_loss(segs, pseudo), pseudo

    def _iteration(self, engine: ToCoTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One ToCo step (module docstring); returns ``{"image", "label", "pred" (cls logits), "loss", "loss_cls",
        "loss_cls_aux", "loss_ptc", "loss_ctc", "loss_seg", "loss_dice", "lr", "flags", "cam_label"}`` plus
        ``"pseudo_label"`` once the segmentation terms are on (``loss_seg``/``loss_dice`` are 0 before)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        n_iter = engine.state.iteration - 1
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if label is None:
            raise ValueError("ToCoTrainer: the batch has no 'label' (the image-level class, [B, 1])")
        # plain tensors: a MetaTensor would route every network operation through its Python ``__torch_function__``
        image = convert_to_tensor(image, track_meta=False).float()
        label = convert_to_tensor(label, track_meta=False).float().reshape(image.shape[0], -1)
        image01 = self._extra(engine, batchdata, self.raw_key, image.shape)
        global_view = self._extra(engine, batchdata, self.global_key, image.shape)
        local_image = self._extra(engine, batchdata, self.local_key, image.shape)
        network = engine.network
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        lr = engine.optimizer.param_groups[0]["lr"]
        with torch.autocast("cuda", enabled=use_scaler, **engine.amp_kwargs):
            cams, cams_aux = multi_scale_cam(network, image, self.cam_scales)
            roi = cam_to_roi_mask(cams_aux, label, self.low, self.high)
            local_crops, flags = crop_from_roi(local_image, roi, self.crop_num, self.crop_size, self.crop_margin,
                                               self.generator, self.neg_crop_ratio)
            cls, segs, fmap, cls_aux, out_t, out_s = network(image, crops=[image, global_view, *local_crops],
                                                             n_iter=n_iter)
            engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label, Keys.PRED: cls}
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = {
                "loss_cls": F.multilabel_soft_margin_loss(cls.float(), label),
                "loss_cls_aux": F.multilabel_soft_margin_loss(cls_aux.float(), label),
                "loss_ctc": self.ctc_loss(out_s, out_t, flags),
            }
            token_cams = F.interpolate(cams_aux, size=fmap.shape[2:], mode="bilinear", align_corners=False)
            token_labels = cam_to_label(token_cams, label, self.low, self.high, True, self.ignore_index, self.bkg)
            terms["loss_ptc"] = self.ptc_loss(fmap, label_to_affinity_mask(token_labels, self.ignore_index))
            loss = terms["loss_cls"] + terms["loss_cls_aux"] + self.w_ptc * terms["loss_ptc"] \
                + self.w_ctc * terms["loss_ctc"]
            extra: dict[str, torch.Tensor] = {}
            if n_iter > self.seg_warmup_iters:
                terms["loss_seg"], terms["loss_dice"], extra["pseudo_label"] = self._seg_losses(
                    engine, n_iter, image01, label, cams, cams_aux, segs)
                loss = loss + self.w_seg * terms["loss_seg"] + self.w_dice * terms["loss_dice"]
            else:
                terms["loss_seg"] = terms["loss_dice"] = loss.new_zeros(())
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"ToCoTrainer: loss is {loss.item()} at iteration {engine.state.iteration} "
                                     f"({ {k: float(v) for k, v in terms.items()} }); lower the learning rate or "
                                     "check the data")
        backward_and_step(engine, loss, network.parameters(), use_scaler)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        output = {
            Keys.IMAGE: image, Keys.LABEL: label, Keys.PRED: cls.detach(), Keys.LOSS: loss.detach(),
            **{k: v.detach() for k, v in terms.items()}, "lr": lr, "flags": flags,
            "cam_label": cam_to_label(cams, label, self.low, self.high, False, self.ignore_index, self.bkg),
            **extra,
        }
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


def cam_predictor(
    network: nn.Module, scales: Sequence[float] = PSEUDO_LABEL_CAM_SCALES, size: int = 448
) -> Callable[[np.ndarray], np.ndarray]:
    """CAM of a trained ToCo network on one RGB frame, at the frame's size (specs/endoked.md §3.6 steps 1-2).

    The returned callable maps ``image`` (uint8 ``[H, W, 3]`` RGB) to the main CAM (the first foreground class,
    the image label taken as positive): ``x = Normalize_ImageNet(image / 255)`` resized bilinearly to
    ``size x size``, :func:`~common.transforms.cams.multi_scale_cam` over ``scales`` with flips, upsampled
    bilinearly to ``(H, W)``; float32 ``[H, W]`` in [0, 1]. The pseudo-mask stage thresholds it at 0.65. The
    network runs in ``eval()`` mode, then gets its previous mode back.

    Args:
        network: a :class:`common.networks.toco_vit.ToCoViT` (``cam_only`` forward).
        scales: CAM scales (1.0, 0.5, 0.75, 1.25, 1.5, 1.75).
        size: network input side (448).
    """
    if size < 1 or not scales:
        raise ValueError(f"cam_predictor: need size >= 1 and at least one scale, got size={size}, scales={scales}")
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)

    def predict(image: np.ndarray) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"cam_predictor: expected a uint8 RGB array [H, W, 3], got "
                             f"{getattr(image, 'dtype', type(image))} of shape {getattr(image, 'shape', None)}")
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
        x = F.interpolate((x - mean) / std, size=(size, size), mode="bilinear", align_corners=False).to(device)
        was_training = network.training
        network.eval()
        try:
            cam, _ = multi_scale_cam(network, x, scales)
        finally:
            network.train(was_training)
        cam = F.interpolate(cam[:, :1], size=image.shape[:2], mode="bilinear", align_corners=False)
        return cam[0, 0].clamp(0.0, 1.0).cpu().numpy().astype(np.float32)

    return predict
