"""Reductions and broadcasts over the ranks of a ``torch.distributed`` run that are no-ops in a single process.

State that every rank must agree on (DINO's teacher centre, DHC's class weights) is computed from global-batch
statistics, as the original multi-GPU code does: each rank sums its part, the sums are all-reduced, then the
ratio is formed. Outside a process group (one process, CPU tests) the tensors come back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["world_size", "all_reduce_sum", "all_reduce_extreme", "average_gradients", "broadcast_from_rank0"]


def world_size() -> int:
    """Number of ranks of the initialised default process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``sum_r tensor_r`` over the ranks, as a new tensor (the input is left untouched); the input itself in a
    single process."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_extreme(tensor: torch.Tensor, largest: bool) -> torch.Tensor:
    """Element-wise ``max_r`` (``largest``) or ``min_r`` of ``tensor`` over the ranks, as a new tensor; the input
    itself in a single process (EndoKED-MIL's per-epoch score range over every rank's instances)."""
    if world_size() == 1:
        return tensor
    extreme = tensor.detach().clone()
    dist.all_reduce(extreme, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
    return extreme


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks (what DDP does, without wrapping the network, so that
    ``state_dict`` keys keep their names and engines with several optimisers stay simple); nothing in a single
    process. A parameter that has a gradient on some ranks only (a class head whose class is absent from one rank's
    batch) is averaged with zeros from the others; one with a gradient on no rank keeps ``grad = None``. Every rank
    must pass the same parameters in the same order."""
    world = world_size()
    if world <= 1:
        return
    params = [param for param in parameters if param.requires_grad]
    if not params:
        return
    present = torch.tensor([param.grad is not None for param in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(present)  # how many ranks hold each gradient: the same collective calls follow on every rank
    for param, count in zip(params, present.tolist()):
        if count == 0:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad.div_(world)


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (parameters, BatchNorm statistics); nothing in a single
    process."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)
