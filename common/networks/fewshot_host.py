"""What the few-shot segmentation hosts of the CD-TG bundle share: the call contract and its input checks, the primed
support set for single-input deployment, original-checkpoint loading, and per-episode test-time fine-tuning.

The hosts (:mod:`~common.networks.patnet`, :mod:`~common.networks.qnet`, :mod:`~common.networks.pmm`,
:mod:`~common.networks.dmtnet`, :mod:`~common.networks.ifa`; specs/cdtg.md §4, §5.6-§5.7) are ``nn.Module``\\ s
called as ``logits = host(query_image [B, 3, H, W], support_image [B, 3, H, W], support_mask [B, H, W],
class_text=[B, d], background_text=[B, d])`` -> 2-class logits ``[B, 2, H, W]`` at the query size; the text
embeddings are required exactly when the host has a CD-TG ``text_guide`` (:class:`TextGuide`).

* :class:`PrimedSupport` (mixin): ``set_support(support_images [K, 3, H, W], support_masks [K, H, W], class_text
  [d], background_text [d])`` keeps a support set in non-persistent buffers (the state dict stays the official
  one), so that ``host(query_image)`` segments a query alone (inference.json, MONAI Label, TorchScript): one 1-shot
  pass per support, merged by the HSNet vote :func:`~common.networks.shot_vote.vote_shots` (K = 1: the logits;
  K > 1: the one-hot ``[B, 2, H, W]`` of the voted mask). A host with its own K-shot rule overrides
  ``_forward_primed`` and sets the class attribute ``kshot_forward = True`` (its ``forward`` takes K-shot supports
  ``[B, K, 3, H, W]`` / ``[B, K, H, W]``; the episodic evaluator then calls it once per batch instead of voting).
* :func:`check_episode_inputs`: shapes of a 1-shot call and the presence of the text embeddings, with errors that
  name the host and the tensor.
* :func:`load_host_checkpoint`: a full-model file of the original code (official key names), strictly.
* :func:`check_resnet_shape`, :func:`init_resnet_parameters`: the ResNet backbones' shape check and torchvision's
  initialisation.
* Training objective: a host whose paper trains with more than the cross-entropy of its output defines
  ``episode_loss(query_image, support_image, support_mask, query_mask, class_text=None, background_text=None) ->
  (loss, logits [B, 2, H, W])``, which :class:`common.engines.episodic.EpisodicTrainer` uses instead.
* Test-time fine-tuning: a host that adapts at test time defines ``finetune(query_image, support_image,
  support_mask, class_text=None, background_text=None, steps=N) -> list[float]`` (accepting K-shot supports
  ``[B, K, 3, H, W]`` / ``[B, K, H, W]``; :func:`shots_as_batch` turns them into ``B K`` one-shot pairs) and
  ``finetune_parameters() -> [(name, parameter)]``, the parameters it changes. :func:`finetuned` adapts, lets the
  caller predict, and restores those parameters, so that every episode starts from the trained weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.shot_vote import vote_shots
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "TextGuide",
    "check_resnet_shape",
    "init_resnet_parameters",
    "check_episode_inputs",
    "PrimedSupport",
    "load_host_checkpoint",
    "shots_as_batch",
    "supports_finetuning",
    "finetuned",
]


class TextGuide(Protocol):
    """What a host needs from a text plug-in (CD-TG's ``TextGuidedPrototypes``, specs/cdtg.md §5.6)."""

    def augment(self, support_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Support features of every level, style-augmented in training (identity otherwise)."""

    def fuse(self, stage: int, support_feat: torch.Tensor, mask: torch.Tensor, proto_fg: torch.Tensor,
             proto_bg: torch.Tensor, class_text: torch.Tensor,
             background_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused ``(foreground, background)`` prototypes ``[B, C]`` of one level of ``stage``."""


def check_resnet_shape(layers: Sequence[int], widths: Sequence[int],
                       stages: int = 4) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(layers, widths)`` as int tuples after checking that each lists ``stages`` positive values (the bottleneck
    counts and widths of layer1..layer{stages}).

    Raises:
        ValueError: a wrong count or a value < 1, naming the argument.
    """
    layers, widths = tuple(int(n) for n in layers), tuple(int(w) for w in widths)
    if len(layers) != stages or min(layers) < 1:
        raise ValueError(f"layers must be {stages} bottleneck counts >= 1 (layer1..layer{stages}), got {layers}")
    if len(widths) != stages or min(widths) < 1:
        raise ValueError(f"widths must be {stages} positive bottleneck widths (layer1..layer{stages}), got {widths}")
    return layers, widths


def init_resnet_parameters(module: nn.Module) -> None:
    """torchvision's ResNet initialisation of every submodule of ``module``: Kaiming-normal (fan_out, ReLU)
    convolution weights, BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_episode_inputs(host: nn.Module, query_image: torch.Tensor, support_image: torch.Tensor,
                         support_mask: torch.Tensor, class_text: torch.Tensor | None,
                         background_text: torch.Tensor | None) -> None:
    """Check a 1-shot call of ``host``: ``query_image`` and ``support_image`` ``[B, 3, H, W]`` alike,
    ``support_mask`` ``[B, H, W]`` or ``[B, 1, H, W]``, and both text embeddings when ``host.text_guide`` is set.

    Raises:
        ValueError: naming the host (its class name) and the offending tensor.
    """
    name = type(host).__name__
    if query_image.dim() != 4 or query_image.shape[1] != 3:
        raise ValueError(f"{name}: query_image must be [B, 3, H, W], got {tuple(query_image.shape)}")
    if support_image.shape != query_image.shape:
        raise ValueError(f"{name}: support_image {tuple(support_image.shape)} must have the query_image shape "
                         f"{tuple(query_image.shape)}")
    b, _, h, w = query_image.shape
    if support_mask.shape not in ((b, h, w), (b, 1, h, w)):
        raise ValueError(f"{name}: support_mask must be [B, H, W] = {(b, h, w)}, got {tuple(support_mask.shape)}")
    if getattr(host, "text_guide", None) is not None and (class_text is None or background_text is None):
        raise ValueError(f"{name}: a text_guide is set, so class_text and background_text [B, d] are required "
                         f"(got class_text={None if class_text is None else tuple(class_text.shape)}, "
                         f"background_text={None if background_text is None else tuple(background_text.shape)})")


class PrimedSupport:
    """Deployment mode of a host (module docstring): a support set primed with :meth:`set_support` lets
    ``forward(query_image)`` segment a query alone.

    Mixed into an ``nn.Module`` host with a ``text_guide`` attribute, which ends its constructor with
    :meth:`_finish_init` and starts its ``forward`` with ``if self._primed_call(support_image, support_mask): return
    self._forward_primed(query_image)``.
    """

    text_guide: TextGuide | None

    def _finish_init(self, checkpoint: str | os.PathLike | None, support: Mapping[str, torch.Tensor] | None) -> None:
        """End of a host constructor: the non-persistent support buffers, then an original checkpoint
        (:func:`load_host_checkpoint`) and a primed support set (:meth:`set_support`), each when given."""
        for key in ("support_images", "support_masks", "class_text", "background_text"):
            self.register_buffer(key, None, persistent=False)
        if checkpoint is not None:
            load_host_checkpoint(self, checkpoint)
        if support is not None:
            self.set_support(**support)

    def _empty_supports(self, support_masks: torch.Tensor) -> list[int]:
        """Indices of the supports ``[K, H, W]`` without foreground (here: without a non-zero pixel)."""
        return [i for i in range(support_masks.shape[0]) if not support_masks[i].any()]

    def set_support(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                    class_text: torch.Tensor | None = None, background_text: torch.Tensor | None = None) -> None:
        """Prime the network with a support set for single-input calls ``forward(query_image)``.

        Args:
            support_images: ``[K, 3, H, W]`` normalised support images (the query size).
            support_masks: ``[K, H, W]`` binary masks, none of them empty.
            class_text, background_text: ``[d]`` text embeddings of the class and the background (text guide only,
                then required).
        """
        name = type(self).__name__
        if support_images.dim() != 4 or support_images.shape[1] != 3:
            raise ValueError(f"{name}.set_support: support_images must be [K, 3, H, W], got "
                             f"{tuple(support_images.shape)}")
        k, _, h, w = support_images.shape
        if tuple(support_masks.shape) != (k, h, w):
            raise ValueError(f"{name}.set_support: support_masks must be [K, H, W] = {(k, h, w)}, got "
                             f"{tuple(support_masks.shape)}")
        empty = self._empty_supports(support_masks)
        if empty:
            raise ValueError(f"{name}.set_support: support masks {empty} are empty (no foreground pixel)")
        if self.text_guide is not None and (class_text is None or background_text is None):
            raise ValueError(f"{name}.set_support: the network has a text guide, so class_text and background_text "
                             "[d] are required")
        device = next(self.parameters()).device
        images, masks = support_images.float().to(device), support_masks.float().to(device)
        self._check_support_set(images, masks)
        self.support_images, self.support_masks = images, masks
        self.class_text = None if class_text is None else class_text.float().to(device)
        self.background_text = None if background_text is None else background_text.float().to(device)

    def _check_support_set(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> None:
        """A host's own check of a support set ``[K, 3, H, W]`` / ``[K, H, W]`` (on the network's device) before it
        is primed: raise ``ValueError`` for a set the host cannot use (here: none)."""

    def _primed_call(self, support_image: torch.Tensor | None, support_mask: torch.Tensor | None) -> bool:
        """Whether a ``forward`` call uses the primed support set (neither support tensor given).

        Raises:
            ValueError: only one of the two given.
        """
        if support_image is None and support_mask is None:
            return True
        if support_image is None or support_mask is None:
            raise ValueError(f"{type(self).__name__}: give both support_image and support_mask, or neither (primed "
                             "support set)")
        return False

    def primed_episode(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The primed support set as a batch of K-shot episodes: supports ``[batch, K, 3, H, W]``, masks
        ``[batch, K, H, W]`` and the text embeddings ``[batch, d]`` as ``forward`` keywords (empty without text);
        expanded views, no copies.

        Raises:
            ValueError: nothing primed.
        """
        if self.support_images is None:
            raise ValueError(f"{type(self).__name__}: no support given and none primed; call set_support(...) or "
                             "pass support_image and support_mask")
        supports = self.support_images.unsqueeze(0).expand(batch, -1, -1, -1, -1)
        masks = self.support_masks.unsqueeze(0).expand(batch, -1, -1, -1)
        text = {}
        if self.class_text is not None and self.background_text is not None:
            text = {"class_text": self.class_text.expand(batch, -1),
                    "background_text": self.background_text.expand(batch, -1)}
        return supports, masks, text

    def _forward_primed(self, query_image: torch.Tensor) -> torch.Tensor:
        """One 1-shot pass per primed support and the HSNet vote (module docstring)."""
        supports, masks, text = self.primed_episode(query_image.shape[0])
        shots = [self(query_image, supports[:, k], masks[:, k], **text) for k in range(supports.shape[1])]
        if len(shots) == 1:
            return shots[0]
        voted = vote_shots(torch.stack([logits.argmax(dim=1) for logits in shots]))
        return F.one_hot(voted, 2).permute(0, 3, 1, 2).to(shots[0].dtype)


def load_host_checkpoint(network: nn.Module, path: str | os.PathLike) -> None:
    """Load an original full-model checkpoint (``torch.save(model.state_dict())`` of the official code, official key
    names; wrappers and ``module.`` prefixes as :func:`~common.utils.checkpoints.read_state_dict` accepts) strictly
    into a host network.

    A file without ``text_guide.*`` keys loads into a network with a text guide, whose plug-in keeps its weights; a
    file with them (a checkpoint of the guided network) loads them too.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unreadable file, or missing / unexpected / shape-mismatched keys (named).
    """
    state = read_state_dict(path)
    guide = getattr(network, "text_guide", None)
    if guide is not None and not any(k.startswith("text_guide.") for k in state):
        state = {**state, **{f"text_guide.{k}": v for k, v in guide.state_dict().items()}}
    load_state_dict_strict(network, state, path)


def shots_as_batch(query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                   class_text: torch.Tensor | None = None, background_text: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """K-shot episodes as ``B K`` one-shot pairs, episode-major: ``support_image [B, K, 3, H, W]`` ->
    ``[B K, 3, H, W]``, ``support_mask [B, K, H, W]`` -> ``[B K, H, W]``, and ``query_image [B, 3, H, W]`` and the
    text ``[B, d]`` repeated K times. One-shot inputs (``support_image [B, 3, H, W]``) are returned as they are.

    Raises:
        ValueError: a 5-D ``support_image`` whose ``support_mask`` is not ``[B, K, H, W]``.
    """
    if support_image.dim() != 5:
        return query_image, support_image, support_mask, class_text, background_text
    b, k = support_image.shape[:2]
    if tuple(support_mask.shape) != (b, k, *support_image.shape[-2:]):
        raise ValueError(f"K-shot support_mask must be [B, K, H, W] = {(b, k, *support_image.shape[-2:])} for "
                         f"support_image {tuple(support_image.shape)}, got {tuple(support_mask.shape)}")

    def repeat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.repeat_interleave(k, dim=0)

    return (repeat(query_image), support_image.flatten(0, 1), support_mask.flatten(0, 1), repeat(class_text),
            repeat(background_text))


def supports_finetuning(network: nn.Module) -> bool:
    """Whether ``network`` has test-time fine-tuning (``finetune`` and ``finetune_parameters``)."""
    return callable(getattr(network, "finetune", None)) and callable(getattr(network, "finetune_parameters", None))


@contextmanager
def finetuned(network: nn.Module, steps: int, query_image: torch.Tensor, support_image: torch.Tensor,
              support_mask: torch.Tensor, class_text: torch.Tensor | None = None,
              background_text: torch.Tensor | None = None) -> Iterator[list[float]]:
    """Per-episode test-time fine-tuning: ``network.finetune(..., steps=steps)`` on entry, then, on exit, the
    parameters of ``network.finetune_parameters()`` get their values back (and lose the gradients the steps left).

    ``steps = 0`` does nothing (the body runs with the network as it is). The supports may be 1-shot
    ``[B, 3, H, W]`` / ``[B, H, W]`` or K-shot ``[B, K, 3, H, W]`` / ``[B, K, H, W]``: each host's ``finetune``
    treats the K shots as its paper does. Yields the losses ``finetune`` returned (empty for ``steps = 0``).

    Raises:
        ValueError: ``steps < 0``, or ``steps > 0`` for a network without fine-tuning (named).
    """
    if steps < 0:
        raise ValueError(f"finetune steps must be >= 0, got {steps}")
    if steps == 0:
        yield []
        return
    if not supports_finetuning(network):
        raise ValueError(f"{type(network).__name__} has no test-time fine-tuning (no finetune / finetune_parameters);"
                         f" finetune steps must be 0, got {steps}")
    params = [p for _, p in network.finetune_parameters()]
    saved = [p.detach().clone() for p in params]
    try:
        yield network.finetune(query_image, support_image, support_mask, class_text=class_text,
                               background_text=background_text, steps=steps)
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
                param.grad = None
