"""The few-shot segmentation hosts of the CD-TG bundle by name: how to build each from the bundle's ids, what its
text guide needs, whether it fine-tunes at test time, where its checkpoints go and what it is called in reports.

Hosts (specs/cdtg.md §4, §5.6-§5.7; each module's docstring has the paper, the equations and the deviations):

========  ===========  =========================================  ========================  =======================
name      display      network                                    backbone (paper)          test-time steps
========  ===========  =========================================  ========================  =======================
patnet    PATNet       :class:`~common.networks.patnet.PATNet`    ResNet-50 (3, 4, 6, 3)    0 (TFI, off by default)
qnet      Q-Net        :class:`~common.networks.qnet.QNet`        ResNet-101 (3, 4, 23, 3)  none
pmm       PMM          :class:`~common.networks.pmm.PMMNet`       ResNet-50 layer1..3       none
dmtnet    DMTNet       :class:`~common.networks.dmtnet.DMTNet`    ResNet-50 (3, 4, 6, 3)    1 (TSF)
ifa       IFA          :class:`~common.networks.ifa.IFANet`       ResNet-50 layer1..3       20 (IFA fine-tuning)
========  ===========  =========================================  ========================  =======================

The bundle describes every backbone by the bottleneck counts and widths of a ResNet's layer1..layer4
(``backbone_layers``, ``backbone_widths``; ``None`` = the paper's, widths ``(64, 128, 256, 512)``); the hosts cut
after layer3 (PMM, IFA) take the first three entries. The text guide of a host is built for the channels of the
feature maps it fuses (:func:`text_stage_channels`): one semantic-guided unit per entry, in the host's stage order.

Checkpoint folders (:func:`checkpoint_folder`, relative to the bundle root): the default, PATNet + CD-TG, trains
into ``models`` (``models/model.pt`` is what inference and MONAI Label load); every other combination into
``models/<host>`` (no text) or ``models/<host>_cdtg`` (with the text guide), e.g. ``models/patnet``,
``models/qnet_cdtg``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from common.networks.dmtnet import DMTNet
from common.networks.fewshot_host import TextGuide
from common.networks.ifa import IFANet
from common.networks.patnet import RESNET50_LAYERS, RESNET50_WIDTHS, PATNet
from common.networks.pmm import PMMNet
from common.networks.qnet import RESNET101_LAYERS, QNet

__all__ = [
    "FewShotHost",
    "HOSTS",
    "host_names",
    "host_entry",
    "display_name",
    "text_stage_channels",
    "default_finetune_steps",
    "check_finetune_steps",
    "checkpoint_folder",
    "host_comparison",
    "build_host",
]

# constructor arguments the registry fills from the bundle's ids; host_options may not set them
_BUNDLE_ARGUMENTS = ("layers", "widths", "backbone_weights", "checkpoint", "text_guide", "support", "dropout")


def _default(network: type[nn.Module], argument: str) -> Any:
    """Default value of a constructor argument of ``network``."""
    return inspect.signature(network).parameters[argument].default


def _pyramid_channels(widths: tuple[int, ...], options: Mapping[str, Any]) -> tuple[int, ...]:
    """PATNet / DMTNet: one unit per ResNet stage layer2..4, ``4 w`` channels (512, 1024, 2048 for ResNet-50)."""
    return tuple(4 * w for w in widths[1:])


def _qnet_channels(widths: tuple[int, ...], options: Mapping[str, Any]) -> tuple[int, ...]:
    """Q-Net: one unit per path (layer3 and layer4 reduced to ``channels``, 512)."""
    channels = int(options.get("channels", _default(QNet, "channels")))
    return channels, channels


def _pmm_channels(widths: tuple[int, ...], options: Mapping[str, Any]) -> tuple[int, ...]:
    """PMM: one unit on ``layer5(layer2 ⊕ layer3)``, ``channels`` (256)."""
    return (int(options.get("channels", _default(PMMNet, "channels"))),)


def _ifa_channels(widths: tuple[int, ...], options: Mapping[str, Any]) -> tuple[int, ...]:
    """IFA: one unit on layer3, ``4 w_3`` channels (1024)."""
    return (4 * widths[2],)


@dataclass(frozen=True)
class FewShotHost:
    """One host of the registry.

    Attributes:
        name: registry key (the bundle's ``host`` id).
        display_name: name in reports ("Q-Net"; "Q-Net + CD-TG" with the text guide).
        network: the host class; its constructor takes ``layers``, ``widths``, ``backbone_weights``,
            ``checkpoint``, ``text_guide``, ``support`` (and ``dropout`` when ``has_dropout``).
        paper_layers: bottleneck counts of layer1..layer4 of the paper's ResNet.
        resnet_stages: how many ResNet stages the host keeps (4, or 3 for a backbone cut after layer3).
        stage_channels: ``(widths, host_options) -> channels`` of the feature maps the text guide fuses.
        finetune_steps: the paper's test-time fine-tuning steps (0: available, off by default; None: the host has
            no test-time fine-tuning).
        has_dropout: whether the host takes the ``dropout`` MONAI Label's epistemic scoring sets.
    """

    name: str
    display_name: str
    network: type[nn.Module]
    paper_layers: tuple[int, int, int, int]
    resnet_stages: int
    stage_channels: Callable[[tuple[int, ...], Mapping[str, Any]], tuple[int, ...]]
    finetune_steps: int | None
    has_dropout: bool = False


HOSTS: dict[str, FewShotHost] = {
    "patnet": FewShotHost("patnet", "PATNet", PATNet, RESNET50_LAYERS, 4, _pyramid_channels, 0, has_dropout=True),
    "qnet": FewShotHost("qnet", "Q-Net", QNet, RESNET101_LAYERS, 4, _qnet_channels, None),
    "pmm": FewShotHost("pmm", "PMM", PMMNet, RESNET50_LAYERS, 3, _pmm_channels, None),
    "dmtnet": FewShotHost("dmtnet", "DMTNet", DMTNet, RESNET50_LAYERS, 4, _pyramid_channels, 1),
    "ifa": FewShotHost("ifa", "IFA", IFANet, RESNET50_LAYERS, 3, _ifa_channels, 20),
}
"""The registry (module docstring table)."""


def host_names() -> tuple[str, ...]:
    """The registered host names, in registry order."""
    return tuple(HOSTS)


def host_entry(host: str) -> FewShotHost:
    """The registry entry of ``host``.

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    if host not in HOSTS:
        raise ValueError(f"unknown few-shot host {host!r}; valid hosts: {', '.join(HOSTS)}")
    return HOSTS[host]


def display_name(host: str, use_text: bool = False) -> str:
    """Report name of ``host``: "PATNet", or "PATNet + CD-TG" with the text guide."""
    name = host_entry(host).display_name
    return f"{name} + CD-TG" if use_text else name


def _backbone(entry: FewShotHost, layers: Sequence[int] | None,
              widths: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The four layer1..layer4 counts and widths (the paper's where ``None``), checked."""
    layers = tuple(int(n) for n in (entry.paper_layers if layers is None else layers))
    widths = tuple(int(w) for w in (RESNET50_WIDTHS if widths is None else widths))
    for label, values in (("backbone_layers", layers), ("backbone_widths", widths)):
        if len(values) != 4 or min(values) < 1:
            raise ValueError(f"{label} must list 4 positive values for the ResNet's layer1..layer4 (the {entry.name} "
                             f"host uses the first {entry.resnet_stages}), got {list(values)}")
    return layers, widths


def text_stage_channels(host: str, widths: Sequence[int] | None = None,
                        options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
    """Channels of the feature maps ``host`` fuses with the text guide, one per ``TextGuidedPrototypes`` stage, for
    the ResNet ``widths`` of layer1..layer4 (``None``: the paper's) and the ``host_options`` of the bundle."""
    entry = host_entry(host)
    _, widths = _backbone(entry, None, widths)
    return entry.stage_channels(widths, dict(options or {}))


def default_finetune_steps(host: str) -> int:
    """The paper's test-time fine-tuning steps of ``host`` (0 for a host without, or with it off by default)."""
    return host_entry(host).finetune_steps or 0


def check_finetune_steps(host: str, steps: int) -> int:
    """``steps`` after checking that ``host`` can fine-tune that many steps at test time.

    Raises:
        ValueError: ``steps < 0``, or ``steps > 0`` on a host without test-time fine-tuning (named, with the hosts
            that have it).
    """
    entry = host_entry(host)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"finetune_steps must be an integer >= 0, got {steps!r}")
    if steps > 0 and entry.finetune_steps is None:
        tuned = [h.name for h in HOSTS.values() if h.finetune_steps is not None]
        raise ValueError(f"host {host!r} ({entry.display_name}) has no test-time fine-tuning, so finetune_steps must "
                         f"be 0, got {steps}; hosts that fine-tune: {', '.join(tuned)}")
    return int(steps)


def checkpoint_folder(host: str, use_text: bool) -> str:
    """Checkpoint folder of ``host`` with or without the text guide, relative to the bundle root (module
    docstring): ``models`` for PATNet + CD-TG, else ``models/<host>`` or ``models/<host>_cdtg``."""
    host_entry(host)
    if host == "patnet" and use_text:
        return "models"
    return f"models/{host}_cdtg" if use_text else f"models/{host}"


def host_comparison(host: str, baseline: nn.Module, guided: nn.Module | None,
                    bundle_root: str | os.PathLike) -> dict[str, tuple[nn.Module, str]]:
    """``{report name: (network, checkpoint file)}`` of the host alone and, when ``guided`` is given, the host with
    the text guide (for :func:`common.utils.checkpoints.checkpointed_networks`): ``{"Q-Net": (baseline,
    <root>/models/qnet/model.pt), "Q-Net + CD-TG": (guided, <root>/models/qnet_cdtg/model.pt)}``."""
    root = Path(bundle_root)
    networks = {display_name(host): (baseline, str(root / checkpoint_folder(host, False) / "model.pt"))}
    if guided is not None:
        networks[display_name(host, True)] = (guided, str(root / checkpoint_folder(host, True) / "model.pt"))
    return networks


def build_host(host: str, layers: Sequence[int] | None = None, widths: Sequence[int] | None = None,
               backbone_weights: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
               text_guide: TextGuide | None = None, support: Mapping[str, Any] | None = None,
               dropout: float = 0.0, options: Mapping[str, Any] | None = None) -> nn.Module:
    """The host network ``host`` built from the bundle's ids (the bundle's ``network_def``).

    Args:
        host: registry name (:func:`host_names`).
        layers, widths: bottleneck counts and widths of the ResNet's layer1..layer4 (``None``: the paper's); a host
            cut after layer3 uses the first three.
        backbone_weights: ImageNet (or, for Q-Net, COCO DeepLabV3) backbone file, in the host's format.
        checkpoint: a full-model file of the original code (official key names), loaded strictly.
        text_guide: the CD-TG plug-in, built for :func:`text_stage_channels`, or None.
        support: a support set to prime the network with (``set_support`` arguments), or None.
        dropout: MONAI Label's epistemic dropout; only a host with ``has_dropout`` (PATNet) takes a non-zero value.
        options: further constructor arguments of the host (its switches, e.g. ``{"stem": "torchvision"}`` for IFA
            with a torchvision ImageNet file, ``{"refine_steps": 0}`` for Q-Net).

    Raises:
        ValueError: an unknown host, a bad backbone shape, an option the host does not take or that the bundle's ids
            set, or a dropout the host has no place for.
    """
    entry = host_entry(host)
    layers, widths = _backbone(entry, layers, widths)
    options = dict(options or {})
    accepted = [p for p in inspect.signature(entry.network).parameters if p not in _BUNDLE_ARGUMENTS]
    reserved = sorted(set(options) & set(_BUNDLE_ARGUMENTS))
    unknown = sorted(set(options) - set(accepted) - set(reserved))
    if reserved or unknown:
        raise ValueError(f"host_options {sorted(options)} for {entry.display_name}: "
                         + (f"{reserved} are set by the bundle's own ids; " if reserved else "")
                         + (f"{unknown} are not arguments of {entry.network.__name__}; " if unknown else "")
                         + f"it takes {accepted}")
    if dropout and not entry.has_dropout:
        with_dropout = [h.name for h in HOSTS.values() if h.has_dropout]
        raise ValueError(f"host {host!r} ({entry.display_name}) has no dropout to set (got dropout={dropout}); "
                         f"hosts with one: {', '.join(with_dropout)}")
    if entry.has_dropout:
        options["dropout"] = dropout
    n = entry.resnet_stages
    return entry.network(layers=layers[:n], widths=widths[:n], backbone_weights=backbone_weights,
                         checkpoint=checkpoint, text_guide=text_guide, support=support, **options)
