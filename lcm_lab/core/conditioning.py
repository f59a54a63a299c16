"""What a UNet is conditioned on besides ``(x_t, t)``: the batch type shared by models, objectives and samplers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Conditioning"]


@dataclass
class Conditioning:
    """What a UNet is conditioned on besides (x_t, t): text embeddings and SDXL extras."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def expand(self, batch: int) -> "Conditioning":
        """Broadcast a batch-1 conditioning (e.g. the unconditional one) to ``batch`` rows."""
        def grow(x):
            return x if x.shape[0] == batch else x.expand(batch, *x.shape[1:])
        added = None if self.added_cond_kwargs is None else {k: grow(v) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(grow(self.encoder_hidden_states), added)

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
