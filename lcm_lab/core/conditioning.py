"""What a UNet is conditioned on besides ``(x_t, t)``: the batch type shared by models, objectives and samplers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Conditioning", "match_batch"]


@dataclass
class Conditioning:
    """What a UNet is conditioned on besides (x_t, t): text embeddings and SDXL extras."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def expand(self, batch: int, names: tuple[str, str] = ("encoder_hidden_states", "added_cond_kwargs")
               ) -> "Conditioning":
        """Broadcast a batch-1 conditioning (e.g. the unconditional one) to ``batch`` rows; one of ``batch``
        rows is returned as it is, any other batch is a ``ValueError`` naming the tensor by ``names``."""
        added = self.added_cond_kwargs
        return Conditioning(match_batch(names[0], self.encoder_hidden_states, batch),
                            None if added is None else
                            {k: match_batch(f"{names[1]}[{k!r}]", v, batch) for k, v in added.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Every tensor moved to ``device`` and/or cast to ``dtype`` (e.g. the frozen UNet's half precision)."""
        added = self.added_cond_kwargs
        return Conditioning(self.encoder_hidden_states.to(device, dtype),
                            None if added is None else {k: v.to(device, dtype) for k, v in added.items()})

    @staticmethod
    def cat(a: "Conditioning", b: "Conditioning") -> "Conditioning":
        """Stack two conditionings along the batch; both must carry the same ``added_cond_kwargs`` keys."""
        a_keys, b_keys = set(a.added_cond_kwargs or ()), set(b.added_cond_kwargs or ())
        if a_keys != b_keys:
            raise ValueError(f"cannot concatenate conditionings with different added_cond_kwargs keys: "
                             f"{sorted(a_keys)} vs {sorted(b_keys)}")
        added = None
        if a_keys:
            added = {k: torch.cat([v, b.added_cond_kwargs[k]]) for k, v in a.added_cond_kwargs.items()}
        return Conditioning(torch.cat([a.encoder_hidden_states, b.encoder_hidden_states]), added)


def match_batch(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    """``value`` with ``batch`` rows: returned as it is, or expanded (no copy) from one row; any other batch
    raises a ``ValueError`` naming ``name`` (broadcasting would otherwise fail deep inside the UNet, or not at
    all)."""
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"`{name}` has batch {value.shape[0]} but the latents have batch {batch} (expected {batch} or 1).")
