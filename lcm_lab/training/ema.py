"""Exponential moving averages of parameters: the LCD target network theta^- and export EMAs."""

from __future__ import annotations

import torch

from .sharding import copy_full_, fsdp_units, reshard

__all__ = ["EMA"]


class EMA:
    """Keeps ``shadow <- decay * shadow + (1 - decay) * online`` over the *trainable* parameters.

    The shadow lives in a module of its own (``self.model``, e.g. the LCD target network), so it can be
    called like any network. For a LoRA student the frozen base weights are shared with the online
    model instead of copied, and only the adapter weights are averaged: A and B each, so the target's
    update is EMA(B) EMA(A), not the EMA of the product B A (the two agree while the adapters change slowly).

    Args:
        online: the trained module (unwrapped, not DDP).
        decay: EMA decay (LCD target: 0.95, diffusers' ``train_lcm_distill_sd_wds.py``).
        model: the module holding the shadow weights; must have the same parameter names as ``online``.
    """

    def __init__(self, online: torch.nn.Module, decay: float, model: torch.nn.Module) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = model.requires_grad_(False)
        self._units = []  # the shadow model's FSDP units, once sharded (rebind)
        self._bind(online)
        # Frozen weights: share storage rather than duplicating them (LoRA students).
        for name, p in online.named_parameters():
            if not p.requires_grad:
                module_name, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(module_name), attr, p)
        with torch.no_grad():
            torch._foreach_copy_(self._shadow, [p.detach() for p in self._online])

    def _bind(self, online: torch.nn.Module) -> None:
        shadow = dict(self.model.named_parameters())
        online_params = dict(online.named_parameters())
        if shadow.keys() != online_params.keys():
            raise ValueError("EMA model and online model have different parameters")
        self.names = [n for n, p in online_params.items() if p.requires_grad]
        self._online = [online_params[n] for n in self.names]
        self._shadow = [shadow[n] for n in self.names]

    def rebind(self, online: torch.nn.Module) -> None:
        """Follow ``online`` after its parameters were replaced: FSDP shards the prepared student into new
        ``DTensor`` parameters, and :func:`~lcm_lab.training.sharding.shard_like` the shadow model the same way,
        so the update stays a local ``lerp`` of matching shards."""
        self._units = fsdp_units(self.model)
        for unit in self._units:
            unit.reshard()
        reshard(online)
        self._bind(online)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step; one fused ``lerp`` over all tensors instead of a Python loop per parameter."""
        for unit in self._units:  # FSDP: the next forward must gather the updated shards, not the weights it kept
            unit.reshard()
        torch._foreach_lerp_(self._shadow, [p.detach() for p in self._online], 1.0 - self.decay)

    def state_dict(self) -> dict:
        """The decay and the shadow tensors themselves (like ``Module.state_dict``: no copies, so saving a
        checkpoint does not double the target's memory); sharded ``DTensor`` s under FSDP."""
        return {"decay": self.decay, "shadow": {n: p.detach() for n, p in zip(self.names, self._shadow)}}

    def load_state_dict(self, state: dict) -> None:
        """Copy a :meth:`state_dict`'s shadow tensors in: whole tensors, of which a sharded shadow takes its own
        slice (every parameter must be there; the decay stays this object's, the run's config)."""
        shadow = state["shadow"]
        missing = set(self.names) - set(shadow)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, p in zip(self.names, self._shadow):
                copy_full_(p, shadow[n])
