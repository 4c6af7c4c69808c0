"""The semi-supervised methods of the DHC bundle by name: each one's loss object and the network it trains.

DHC (Wang & Li, MICCAI 2023) and the baselines of its Table 1 (specs/dhc.md §9) share the data, schedules, engine
(:class:`~common.engines.co_training.CoTrainingTrainer`) and evaluation; they differ in the *method* (the
:class:`~common.engines.co_training.CoTrainingMethod` that turns the branches' outputs into a loss) and in the
networks it trains, held in one :class:`~common.networks.branches.Branches` module:

=========  ===================================================  =======================================
method     networks                                             prediction (``forward``)
=========  ===================================================  =======================================
dhc        two VNets, both kaiming-initialised                  mean of the branches' logits
cps        two VNets, branch B xavier-initialised               mean
simis,     two VNets, both kaiming-initialised                  mean
crest,
depl
uamt,      VNet student (A) + EMA teacher (B)                   the student
acisis
urpc       one deep-supervised 3D U-Net (A), widths from f/2    its finest head
ssnet      one VNet with SS-Net's projection, prediction and    the VNet's logits
           selector heads (A), PyTorch's default init
adsh, cld  two VNets, both kaiming-initialised                  mean
dst        two decoupled VNets (shared encoder; main, pseudo    mean of the main heads
           and worst-case decoders), B xavier-initialised
=========  ===================================================  =======================================

Widths follow the VNet's ``n_filters`` (f): URPC's U-Net starts at f/2 channels (16 for DHC's f = 32, as the
original), so a narrowed run narrows every method alike. URPC keeps its own normalisation (affine-free instance
norm, as the original) whatever the VNets use.

A bundle selects one with its ``method`` id: ``network_def`` is :func:`build_network` and the trainer's method is
:func:`build_method`, both keyed by the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.engines.co_training import CPS, DHC, UAMT, CoTrainingMethod, CReST, DePL, SimiS
from common.engines.dhc_baselines.acisis import ACISIS
from common.engines.dhc_baselines.adsh import Adsh
from common.engines.dhc_baselines.cld import CLD
from common.engines.dhc_baselines.dst import DST
from common.engines.dhc_baselines.ssnet import SSNet
from common.engines.dhc_baselines.urpc import URPC
from common.losses.adaptive_thresholds import adsh_period
from common.networks.branches import Branches
from common.networks.unet_ds import DEFAULT_DROPOUT, UNetDS3D
from common.networks.vnet_decoupled import DualDecoupledVNet
from common.networks.vnet_ssnet import SSNetVNet
from common.networks.vnet import DualVNet

__all__ = ["MethodEntry", "METHODS", "NEEDS_LABELLED_COUNTS", "method_entry", "build_method", "build_network",
           "has_branch_b"]

NetworkBuilder = Callable[[int, int, int, str, bool, "float | None"], nn.Module]
"""``(in_channels, num_classes, n_filters, normalization, has_dropout, dropout) -> Branches``."""

CONTEXT = ("labelled_counts", "patch_size", "max_epochs", "n_unlabelled", "epoch_length", "n_filters")
"""What a method's constructor may need from the run besides ``num_classes``: the labelled class histogram, the
training patch ``(d, h, w)``, the number of epochs, the number of unlabelled cases and of iterations per epoch, and
the network width ``f``."""


@dataclass(frozen=True)
class MethodEntry:
    """One method: its loss class, its networks, the run context its constructor takes (of :data:`CONTEXT`) and,
    when the constructor names them otherwise, how the context values become its keyword arguments.
    """

    method: type[CoTrainingMethod]
    network: NetworkBuilder
    context: tuple[str, ...] = ()
    arguments: Callable[..., dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.context) - set(CONTEXT))
        if unknown:
            raise ValueError(f"MethodEntry: unknown context {unknown}; choose from {CONTEXT}")


def _vnet_pair(init_b: str = "kaiming", branches: str = "AB") -> NetworkBuilder:
    """Two VNets (:class:`~common.networks.vnet.DualVNet`) with branch B's initialisation and the prediction."""

    def build(in_channels: int, num_classes: int, n_filters: int, normalization: str, has_dropout: bool,
              dropout: float | None) -> nn.Module:
        return DualVNet(in_channels, num_classes, n_filters, normalization, has_dropout, dropout, init_b=init_b,
                        branches=branches)

    return build


def _dropouts(has_dropout: bool, dropout: float | None, default: tuple[float, ...]) -> tuple[float, ...]:
    """Per-stage dropout of a network with several: ``default`` when on, ``dropout`` everywhere when given."""
    if dropout is not None:
        return (float(dropout),) * len(default)
    return default if has_dropout else (0.0,) * len(default)


def _urpc_unet(in_channels: int, num_classes: int, n_filters: int, normalization: str, has_dropout: bool,
               dropout: float | None) -> nn.Module:
    """URPC's U-Net (``branch_a`` only) with first width ``f / 2`` (``feature_scale = 128 / f``)."""
    return Branches(UNetDS3D(in_channels, num_classes, feature_scale=128 / n_filters,
                             dropout=_dropouts(has_dropout, dropout, DEFAULT_DROPOUT)), branches="A")


def _ssnet_vnet(in_channels: int, num_classes: int, n_filters: int, normalization: str, has_dropout: bool,
                dropout: float | None) -> nn.Module:
    """SS-Net's VNet with its heads (``branch_a`` only), left at PyTorch's default initialisation as DHC's run."""
    return Branches(SSNetVNet(in_channels, num_classes, n_filters, normalization, has_dropout, dropout), branches="A")


def _ssnet_arguments(n_filters: int) -> dict[str, Any]:
    """SS-Net's projected features are ``2 f`` wide, as its network's heads."""
    return {"feature_dim": 2 * n_filters}


def _adsh_arguments(n_unlabelled: int) -> dict[str, Any]:
    """Adsh re-estimates its thresholds every ``max(#U // 4, 1)`` iterations, as DHC."""
    return {"period": adsh_period(n_unlabelled)}


def _acisis_arguments(epoch_length: int) -> dict[str, Any]:
    """Basak et al.'s mean teacher refreshes its sampling rates once per epoch, as DHC."""
    return {"refresh_iters": epoch_length}


METHODS: dict[str, MethodEntry] = {
    "dhc": MethodEntry(DHC, _vnet_pair(), ("labelled_counts",)),
    "cps": MethodEntry(CPS, _vnet_pair("xavier")),
    "uamt": MethodEntry(UAMT, _vnet_pair(branches="A"), ("max_epochs",)),
    "simis": MethodEntry(SimiS, _vnet_pair(), ("labelled_counts",)),
    "crest": MethodEntry(CReST, _vnet_pair(), ("labelled_counts",)),
    "depl": MethodEntry(DePL, _vnet_pair(), ("patch_size",)),
    "urpc": MethodEntry(URPC, _urpc_unet),
    "adsh": MethodEntry(Adsh, _vnet_pair(), ("n_unlabelled",), _adsh_arguments),
    "cld": MethodEntry(CLD, _vnet_pair(), ("labelled_counts",)),
    "dst": MethodEntry(DST, DualDecoupledVNet),
    "acisis": MethodEntry(ACISIS, _vnet_pair(branches="A"), ("epoch_length",), _acisis_arguments),
    "ssnet": MethodEntry(SSNet, _ssnet_vnet, ("n_filters",), _ssnet_arguments),
}
"""Methods selectable by name (the bundle's ``method`` id)."""

NEEDS_LABELLED_COUNTS: tuple[str, ...] = tuple(name for name, entry in METHODS.items()
                                               if "labelled_counts" in entry.context)
"""Methods whose constructor takes the labelled class histogram (the bundle computes it only for these)."""


def method_entry(name: str) -> MethodEntry:
    """The :class:`MethodEntry` called ``name`` (case-insensitive); an unknown name lists the valid ones."""
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"unknown co-training method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[key]


def build_method(name: str, num_classes: int, labelled_counts: torch.Tensor | None = None, max_epochs: int = 300,
                 patch_size: Sequence[int] | None = None, n_unlabelled: int | None = None,
                 epoch_length: int | None = None, n_filters: int | None = None, **kwargs: Any) -> CoTrainingMethod:
    """The loss object of method ``name``, given the run context its constructor needs (:data:`CONTEXT`: the
    labelled class histogram, the training patch, the number of epochs, the number of unlabelled cases, the
    iterations per epoch, the network width); other keyword arguments go to the constructor. A needed context that is None is named
    in the error."""
    entry = method_entry(name)
    given = {"labelled_counts": labelled_counts, "patch_size": patch_size, "max_epochs": max_epochs,
             "n_unlabelled": n_unlabelled, "epoch_length": epoch_length, "n_filters": n_filters}
    missing = [key for key in entry.context if given[key] is None]
    if missing:
        raise ValueError(f"build_method({str(name).lower()!r}): {', '.join(missing)} is required")
    context = {key: given[key] for key in entry.context}
    arguments = entry.arguments(**context) if entry.arguments is not None else context
    return entry.method(num_classes, **arguments, **kwargs)


def build_network(method: str, in_channels: int = 1, out_channels: int = 14, n_filters: int = 32,
                  normalization: str = "batchnorm", has_dropout: bool = True, dropout: float | None = None
                  ) -> nn.Module:
    """The networks method ``method`` trains, in one :class:`~common.networks.branches.Branches` module whose
    ``forward`` is the method's test-time prediction (module docstring); ``n_filters`` is the VNet width ``f``,
    ``has_dropout``/``dropout`` the VNet's dropout switches (``dropout`` is what MONAI Label's epistemic scoring
    sets)."""
    return method_entry(method).network(in_channels, out_channels, n_filters, normalization, has_dropout, dropout)


def has_branch_b(method: str) -> bool:
    """Whether method ``method`` has a branch B (a second network or an EMA teacher), i.e. an ``optimizer_b``."""
    return bool(method_entry(method).method.uses_b)
