"""FSDP as the tasks see it: what a sharded student means for its EMA target, checkpoints and export.

Under accelerate's FSDP2 (``fsdp_version: 2``, PyTorch's ``fully_shard``) the prepared student's parameters are
``DTensor`` shards: each process holds a slice of every tensor, and a forward pass gathers each unit's weights
just in time. The LCD target is sharded the same way (:func:`shard_like`), so the EMA update is a local
``lerp`` of matching shards, with no communication and no full copy on any process. Reading full weights
(checkpoint extras, export) is collective: every process calls :func:`gather_state`, one tensor at a time.

Without FSDP every function here is a no-op on plain modules and tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["fsdp_units", "is_sharded", "shard_like", "reshard", "local", "full_tensor", "gather_state", "copy_full_",
           "unsharded_class"]


def fsdp_units(module: torch.nn.Module) -> list[FSDPModule]:
    """The submodules of ``module`` (itself included) that ``fully_shard`` was applied to, outermost first."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or any of its submodules."""
    return bool(fsdp_units(module))


def shard_like(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Shard ``module`` in place into the units of ``reference`` (same architecture and parameter names), on the
    same device mesh, so that every parameter's local shard covers the same slice in
    both (FSDP2 shards each tensor along dim 0, whatever the unit it belongs to). Channels-last weights are
    made contiguous first: ``fully_shard`` takes no other layout."""
    units = [name for name, m in reference.named_modules() if isinstance(m, FSDPModule)]
    if not units:
        return
    for p in module.parameters():
        p.data = p.data.contiguous()
    mesh = next(p for p in reference.parameters() if isinstance(p, DTensor)).device_mesh
    # named_modules lists a module before its submodules: reversed, every unit comes after the units inside it,
    # the order fully_shard needs (a unit leaves the parameters of units already inside it alone).
    for name in reversed(units):
        fully_shard(module.get_submodule(name), mesh=mesh)


def reshard(module: torch.nn.Module) -> None:
    """Put every unit of ``module`` back in its sharded state. FSDP2 keeps the root unit's gathered weights after
    a forward pass (to spare the gather before backward), and a later forward would reuse them: an in-place
    update of the shards (the EMA step) must come after this, so that the next forward gathers it."""
    for unit in fsdp_units(module):
        unit.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard for a ``DTensor``, ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a ``DTensor`` (collective), ``t`` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_state(named: Iterable[tuple[str, torch.Tensor]], keep: bool = True) -> dict[str, torch.Tensor] | None:
    """``{name: full CPU tensor}`` of ``named`` (e.g. ``module.state_dict().items()`` after :func:`reshard`).

    Collective when the tensors are sharded: every process must call it, in the same order. One tensor is
    gathered at a time and moved to the CPU, so no device ever holds more than one full tensor; processes
    that pass ``keep=False`` take part in the gathers and keep nothing (returns None).
    """
    out = {}
    for name, t in named:
        whole = full_tensor(t.detach())
        if keep:
            out[name] = whole.cpu()
    return out if keep else None


@torch.no_grad()
def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor ``full`` into ``dst``: for a ``DTensor``, only this process's slice (every process
    holds ``full``, e.g. read from a checkpoint, so nothing is sent between processes)."""
    if isinstance(dst, DTensor):
        mine = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(mine.to_local())
    else:
        dst.copy_(full)


def unsharded_class(module: torch.nn.Module) -> type:
    """The model class of a module that ``fully_shard`` re-classed (``FSDPUNet2DConditionModel`` ->
    ``UNet2DConditionModel``); ``type(module)`` for a plain one."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
