"""Inferers for networks with several output heads, and for primed few-shot hosts that fine-tune at test time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import SimpleInferer

from common.networks.fewshot_host import finetuned

__all__ = ["SummedHeadsInferer", "SelectedHeadInferer", "CAMInferer", "DecoderAndCAMInferer", "PrimedFinetuneInferer"]


class SummedHeadsInferer(SimpleInferer):
    """``SimpleInferer`` that sums a tuple or list of head outputs into one map; a tensor passes through.

    Polyp-PVT returns ``(P1, P2)`` in training mode and ``P1 + P2`` in eval mode (the official inference uses
    ``sigmoid(P1 + P2)``). MONAI Label's epistemic scoring runs a bundle's network in training mode to keep dropout
    active, so the inferer adds the heads itself: ``[B, 1, H, W]`` either way.
    """

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = network(inputs, *args, **kwargs)
        return sum(out) if isinstance(out, (tuple, list)) else out


class SelectedHeadInferer(SimpleInferer):
    """``SimpleInferer`` that keeps one output of a multi-output network, bilinearly upsampled to the input size.

    The EndoKED-WSSS network (:class:`~common.networks.toco_vit.ToCoViT`) returns ``(cls, seg, fmap, cls_aux)`` in
    training mode; validation scores its decoder, ``seg [B, K, H/16, W/16]`` (index 1), at the input's
    ``[B, K, H, W]``. A network that already returns one tensor (``seg_only=True``) passes through to the same
    upsampling.

    Args:
        index: position of the kept output in a tuple or list.
        upsample: resize the kept map to the input's spatial size (``align_corners=False``).
    """

    def __init__(self, index: int = 1, upsample: bool = True) -> None:
        super().__init__()
        self.index = index
        self.upsample = upsample

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = network(inputs, *args, **kwargs)
        out = out[self.index] if isinstance(out, (tuple, list)) else out
        if self.upsample and out.shape[2:] != inputs.shape[2:]:
            out = F.interpolate(out, size=inputs.shape[2:], mode="bilinear", align_corners=False)
        return out


class CAMInferer(SimpleInferer):
    """Normalised class activation map of a ToCo network as the prediction, ``[B, 1, H, W]`` in [0, 1].

    EndoKED-WSSS selects its checkpoint on the CAM's Dice against validation masks (the CAM threshold turns the map
    into a mask; specs/endoked.md §3.4), not on the decoder's, which only starts learning after the warm-up:
    :func:`~common.transforms.cams.multi_scale_cam` over ``scales`` (with flips), first foreground class, main CAM.

    Args:
        scales: CAM scales (1.0 alone keeps validation cheap; the pseudo-mask stage uses six).
    """

    def __init__(self, scales: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        self.scales = tuple(scales)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        from common.transforms.cams import multi_scale_cam

        cam, _ = multi_scale_cam(network, torch.as_tensor(inputs).float(), self.scales)
        return cam[:, :1]


class DecoderAndCAMInferer(SimpleInferer):
    """Both predictions of a ToCo network in one tensor, ``[B, K + 1, H, W]``: the decoder's ``K`` class logits
    (upsampled, as :class:`SelectedHeadInferer`) then the normalised main CAM (as :class:`CAMInferer`).

    WSSS validation scores both from one pass over the frames: the CAM (what the pseudo masks come from, and what
    selects the checkpoint) and the decoder (which only learns after the warm-up). The network is a
    :class:`~common.networks.toco_vit.ToCoViT` in its full forward mode.
    """

    def __init__(self, cam_scales: Sequence[float] = (1.0,)) -> None:
        super().__init__()
        self.decoder = SelectedHeadInferer(index=1)
        self.cam = CAMInferer(cam_scales)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        seg = self.decoder(inputs, network, *args, **kwargs)
        return torch.cat([seg.float(), self.cam(inputs, network)], dim=1)


class PrimedFinetuneInferer(SimpleInferer):
    """``SimpleInferer`` for a few-shot host primed with a support set (``set_support``,
    :class:`~common.networks.fewshot_host.PrimedSupport`), with the host's test-time fine-tuning.

    With ``steps > 0``, for every batch of queries the host first adapts on its primed supports as K-shot episodes
    (``network.finetune(query, S [B, K, 3, H, W], M [B, K, H, W], ..., steps=steps)``: DMTNet's TSF, IFA's
    fine-tuning, PATNet's TFI), then segments the queries, then gets its fine-tuned parameters back
    (:func:`~common.networks.fewshot_host.finetuned`), so every batch starts from the trained weights. With
    ``steps = 0`` it is ``network(inputs)``, as :class:`~monai.inferers.SimpleInferer`.

    Args:
        steps: fine-tuning steps per batch of queries (0: off).
    """

    def __init__(self, steps: int = 0) -> None:
        super().__init__()
        if int(steps) != steps or steps < 0:
            raise ValueError(f"PrimedFinetuneInferer: steps must be an integer >= 0, got {steps!r}")
        self.steps = int(steps)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.steps == 0:
            return network(inputs, *args, **kwargs)
        if not callable(getattr(network, "primed_episode", None)):
            raise ValueError(f"PrimedFinetuneInferer: {type(network).__name__} is not a few-shot host with a primed "
                             "support set (set_support)")
        supports, masks, text = network.primed_episode(inputs.shape[0])
        with finetuned(network, self.steps, inputs, supports, masks, **text):
            return network(inputs, *args, **kwargs)
