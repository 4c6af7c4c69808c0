"""The contract checks shared by the polyp segmentation network tests (tests/test_networks_<name>.py).

A network of the ``endoked_polyp_segmentation`` bundle maps ``[B, 3, H, W]`` to one logit map ``[B, 1, H, W]`` in
eval mode and to a tuple of maps (deep supervision) in training mode. The helpers below check, for one tiny
instance, that it traces and takes channels-last input in eval mode, runs under bf16 autocast, names a bad input
size, gives every parameter a gradient, reloads its checkpoints, and trains and evaluates through its bundle
override (``configs/networks/<name>.json``). Network-specific details (tolerances, which parameters may get an
exactly zero gradient, the override ids) are arguments.

Imported by the test files as ``from polyp_network_checks import ...`` (``tests/`` is on ``sys.path``, as for
``conftest``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, bundle_workflow, read_csv, run_workflow

__all__ = [
    "POLYP_CONFIGS",
    "EXACT",
    "Tolerance",
    "n_params",
    "seeded",
    "with_bn_stats",
    "tiny_with_bn_stats",
    "fixed_image",
    "identity_batchnorms",
    "assert_traceable",
    "assert_bf16_close",
    "assert_rejects_size",
    "assert_gradients",
    "assert_reloads",
    "assert_load_fails",
    "train_and_evaluate_override",
]

POLYP_CONFIGS = REPO_ROOT / "bundles" / "endoked_polyp_segmentation" / "configs"

Tolerance = tuple[float, float]
"""``(rtol, atol)`` for :func:`torch.testing.assert_close`; ``None`` where one is expected means its defaults."""
EXACT: Tolerance = (0.0, 0.0)

M = TypeVar("M", bound=nn.Module)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance | None) -> None:
    if tol is None:
        torch.testing.assert_close(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1])


# ------------------------------------------------------------------------------------------ building tiny models
def n_params(module: nn.Module) -> int:
    """The number of parameter values of ``module``."""
    return sum(p.numel() for p in module.parameters())


def seeded(network: Callable[..., M], seed: int = 0, **kwargs: Any) -> M:
    """``network(**kwargs)`` built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return network(**kwargs)


def with_bn_stats(model: M, forwards: int = 2, batch_shape: tuple[int, ...] = (2, 3, 64, 64)) -> M:
    """``model`` after ``forwards`` training-mode forwards of random batches (no gradients), which move the
    BatchNorm running statistics (and any other training-time state) away from their initial values; in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(forwards):
            model(torch.randn(*batch_shape))
    return model.eval()


def tiny_with_bn_stats(network: Callable[..., M], seed: int = 0, **kwargs: Any) -> M:
    """``network(**kwargs)`` built after ``torch.manual_seed(seed)``, with non-trivial BatchNorm statistics (two
    training forwards, :func:`with_bn_stats`) unless it loads a ``checkpoint``, in eval mode."""
    model = seeded(network, seed, **kwargs)
    if "checkpoint" not in kwargs:
        return with_bn_stats(model)
    return model.eval()


def fixed_image(shape: tuple[int, ...] = (2, 3, 64, 64), seed: int = 1) -> torch.Tensor:
    """A standard-normal batch from its own generator (seeded ``seed``): the same tensor whatever ran before."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def identity_batchnorms(module: nn.Module) -> None:
    """Every BatchNorm of ``module`` in eval mode computing y = x (gamma 1, beta 0, mean 0, var 1, eps 0)."""
    module.eval()
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = 0.0
            with torch.no_grad():
                bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0)


# ------------------------------------------------------------------------------------------ eval-mode contract
def assert_traceable(model: nn.Module, image: torch.Tensor, *, trace_on: torch.Tensor | None = None,
                     check_trace: bool = True, tol: Tolerance | None = None,
                     channels_last_tol: Tolerance | None = None) -> torch.Tensor:
    """In eval mode (no gradients), ``torch.jit.trace(model, trace_on)`` run on ``image`` gives the eager output
    (within ``tol``), and so does ``image`` in channels-last layout (within ``channels_last_tol``).

    Args:
        trace_on: the example input of the trace (``image`` when ``None``), e.g. one image of a larger batch.
        check_trace: passed to :func:`torch.jit.trace` (``False`` where its re-run check trips over benign
            data-dependent Python values).
        tol, channels_last_tol: ``(rtol, atol)``; ``None``: :func:`torch.testing.assert_close`'s defaults.

    Returns:
        the eager output on ``image``.
    """
    model.eval()
    with torch.no_grad():
        eager = model(image)
        traced = torch.jit.trace(model, image if trace_on is None else trace_on, check_trace=check_trace)
        _assert_close(traced(image), eager, tol)
        channels_last = model(image.contiguous(memory_format=torch.channels_last))
    _assert_close(channels_last, eager, channels_last_tol)
    return eager


def assert_bf16_close(model: nn.Module, image: torch.Tensor, *, min_corr: float | None = 0.99,
                      mean_error: tuple[float, float] | None = None) -> torch.Tensor:
    """Eval mode under CPU bf16 autocast: one finite logit map ``[B, 1, H, W]`` per image, close to float32.

    Args:
        min_corr: the Pearson correlation of the bf16 and float32 maps must exceed it (``None``: not checked).
        mean_error: ``(relative, absolute)``: the mean absolute bf16 error must stay below
            ``relative * mean(|float32 map|) + absolute`` (``None``: not checked).

    Returns:
        the bf16 output.
    """
    model.eval()
    with torch.no_grad():
        reference = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(image)
    shape = (image.shape[0], 1, *image.shape[-2:])
    assert reference.shape == out.shape == shape and torch.isfinite(out).all()
    if min_corr is not None:
        assert torch.corrcoef(torch.stack([out.float().flatten(), reference.flatten()]))[0, 1] > min_corr
    if mean_error is not None:
        relative, absolute = mean_error
        assert (out.float() - reference).abs().mean() < relative * reference.abs().mean() + absolute
    return out


def assert_rejects_size(model: nn.Module, size: tuple[int, int], match: str) -> None:
    """A ``[1, 3, *size]`` input raises a ValueError whose message matches ``match`` (naming the network and the
    size)."""
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, *size))


# ------------------------------------------------------------------------------------------ training contract
def assert_gradients(model: nn.Module, image: torch.Tensor, n_maps: int, *, zero_ok: Collection[str] = (),
                     reduce: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> None:
    """One training forward of ``image`` gives a tuple of ``n_maps`` maps; backpropagating ``sum(reduce(map))``
    gives every parameter a finite gradient (what DistributedDataParallel without ``find_unused_parameters``
    needs), non-zero except for the parameters named in ``zero_ok`` (e.g. convolution biases that a training-mode
    BatchNorm cancels: their gradient is zero in exact arithmetic, in the original networks as here)."""
    model.train()
    maps = model(image)
    assert isinstance(maps, tuple) and len(maps) == n_maps
    sum(reduce(m) for m in maps).backward()
    params = dict(model.named_parameters())
    assert [name for name, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()] == []
    zero = {name for name, p in params.items() if not p.grad.abs().sum() > 0}
    assert zero <= set(zero_ok), sorted(zero - set(zero_ok))


# ------------------------------------------------------------------------------------------ checkpoints
def assert_reloads(saved: Mapping[str, Any], path: str | Path, reference: nn.Module, image: torch.Tensor,
                   *loads: Callable[[str | Path], nn.Module], tol: Tolerance | None = EXACT) -> list[nn.Module]:
    """``torch.save(saved, path)``; every network ``load(path)`` builds (each loading the file, e.g.
    ``lambda p: Net(checkpoint=p)``) gives ``reference``'s eval output on ``image``, within ``tol`` (exactly by
    default; ``None``: :func:`torch.testing.assert_close`'s defaults).

    Returns:
        the loaded networks, in eval mode.
    """
    torch.save(saved, path)
    loaded = [load(path).eval() for load in loads]
    reference.eval()
    with torch.no_grad():
        expected = reference(image)
        for model in loaded:
            _assert_close(model(image), expected, tol)
    return loaded


def assert_load_fails(saved: Mapping[str, Any], path: str | Path, load: Callable[[str | Path], Any],
                      match: str) -> None:
    """``torch.save(saved, path)``; ``load(path)`` raises a ValueError whose message matches ``match`` (e.g. the
    name of the key ``saved`` lacks)."""
    torch.save(saved, path)
    with pytest.raises(ValueError, match=match):
        load(path)


# ------------------------------------------------------------------------------------------ bundle override
def train_and_evaluate_override(bundle_root: Path, network_file: str, network: type[nn.Module] | None,
                                **tiny_ids: Any) -> dict[str, dict[str, str]]:
    """Train one epoch (64 px, batch 4) through ``configs/networks/<network_file>`` with the override ids
    ``tiny_ids`` (a tiny instance), then evaluate the saved model.

    Checks that the override turns on ImageNet normalisation, builds a ``network`` (unless ``None``), saves
    ``models/model.pt``, and that the evaluation writes a Dice in [0, 1] for "all images".

    Returns:
        the rows of ``eval/metrics_per_set.csv`` by set name.
    """
    override = {"epochs": 1, "image_size": 64, "batch_size": 4, "num_workers": 0, "progress_bar": False,
                **tiny_ids}
    network_json = f"networks/{network_file}"
    wf = bundle_workflow(POLYP_CONFIGS, bundle_root, "train", ["train.json", network_json], **override)
    assert wf.parser.get_parsed_content("normalize_imagenet") is True
    if network is not None:
        assert isinstance(wf.parser.get_parsed_content("network_def"), network)
    run_workflow(wf)
    assert (Path(bundle_root) / "models" / "model.pt").is_file()
    wf = bundle_workflow(POLYP_CONFIGS, bundle_root, "train", ["train.json", "evaluate.json", network_json],
                         **override)
    run_workflow(wf)
    rows = {r["set"]: r for r in read_csv(Path(bundle_root) / "eval" / "metrics_per_set.csv")}
    assert "all images" in rows and 0.0 <= float(rows["all images"]["dice"]) <= 1.0
    return rows
