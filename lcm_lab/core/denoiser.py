"""The network interface every sampler calls: ``model(x_t, t) -> raw output``.

A :data:`ModelFn` hides conditioning (text embeddings, classifier-free guidance, w-embeddings, SDXL
micro-conditioning) so that samplers only ever see latents and integer timesteps. Its output is in the
schedule's ``prediction_type`` (eps, v or x0); samplers convert it with
:mod:`lcm_lab.core.parameterization`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .conditioning import Conditioning, match_batch

__all__ = ["ModelFn", "cfg_combine", "UNetModel"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x_t [B, C, H, W], t LongTensor [B]) -> raw network output [B, C, H, W]`` in the schedule's prediction_type."""


def cfg_combine(out_uncond: torch.Tensor, out_cond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022), diffusers/Imagen convention.

    ``out = out_uncond + w * (out_cond - out_uncond)``: ``w = 1`` is the plain conditional model, ``w = 0``
    the unconditional one. (The LCM paper writes ``(1 + w') cond - w' uncond``, i.e. ``w = 1 + w'``.)
    Linear in the output, so it is valid for eps-, v- and x0-prediction alike.

    Args:
        out_uncond, out_cond (`torch.Tensor`): outputs of the same shape.
        guidance_scale (`float` or `torch.Tensor` broadcastable to the outputs, e.g. ``[B, 1, 1, 1]``).
    """
    return out_uncond + guidance_scale * (out_cond - out_uncond)


class UNetModel:
    """Wrap a diffusers ``UNet2DConditionModel``-like net as a :data:`ModelFn`.

    Classifier-free guidance runs the unconditional and conditional passes as ONE forward on a batch of
    ``2B`` (``[uncond; cond]``, the order diffusers pipelines use), then applies :func:`cfg_combine`.
    Guidance is applied only when ``uncond`` is given and ``guidance_scale != 1``; otherwise a single
    conditional forward of batch ``B`` runs.

    Args:
        unet (`torch.nn.Module`): called as ``unet(x, t, encoder_hidden_states=..., timestep_cond=...,
            added_cond_kwargs=..., cross_attention_kwargs=..., return_dict=False)[0]``.
        encoder_hidden_states (`torch.Tensor`): conditional text embeddings ``[B, L, D]`` (or ``[1, L, D]``,
            broadcast over the batch).
        uncond (`torch.Tensor`, *optional*): unconditional embeddings ``[B, L, D]`` or ``[1, L, D]``.
        guidance_scale (`float` or `torch.Tensor`, defaults to 1.0): CFG scale (diffusers convention, see
            :func:`cfg_combine`); a per-sample tensor must broadcast against the output, e.g. ``[B, 1, 1, 1]``.
        timestep_cond (`torch.Tensor`, *optional*): ``[B, time_cond_proj_dim]`` extra timestep conditioning,
            e.g. :func:`~lcm_lab.core.parameterization.guidance_scale_embedding` for w-conditioned LCM
            students (which are normally run *without* CFG). Repeated for the uncond half under CFG.
        added_cond_kwargs (`dict`, *optional*): SDXL micro-conditioning for the conditional pass
            (``{"text_embeds": [B, 1280], "time_ids": [B, 6]}``).
        uncond_added_cond_kwargs (`dict`, *optional*): the same for the unconditional pass (SDXL's negative
            pooled embeddings, zeros for an empty negative prompt); required under CFG when
            ``added_cond_kwargs`` is given, because reusing the prompt's pooled ``text_embeds`` would make
            the unconditional pass conditional.
        cross_attention_kwargs (`dict`, *optional*): forwarded to the UNet unchanged (e.g. LoRA scale).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        encoder_hidden_states: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        uncond_added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if encoder_hidden_states.ndim != 3:
            raise ValueError(
                f"`encoder_hidden_states` must be [B, L, D], got shape {tuple(encoder_hidden_states.shape)}."
            )
        if uncond is not None and uncond.shape[1:] != encoder_hidden_states.shape[1:]:
            raise ValueError(
                f"`uncond` shape {tuple(uncond.shape)} must match encoder_hidden_states "
                f"{tuple(encoder_hidden_states.shape)} except for the batch dimension."
            )
        self.unet = unet
        self.encoder_hidden_states = encoder_hidden_states
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.timestep_cond = timestep_cond
        self.added_cond_kwargs = dict(added_cond_kwargs) if added_cond_kwargs is not None else None
        self.uncond_added_cond_kwargs = dict(uncond_added_cond_kwargs) if uncond_added_cond_kwargs is not None else None
        self.cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else None
        if self.do_cfg and self.added_cond_kwargs is not None and self.uncond_added_cond_kwargs is None:
            raise ValueError("classifier-free guidance with `added_cond_kwargs` needs `uncond_added_cond_kwargs` "
                             "(SDXL: the negative pooled `text_embeds` and the `time_ids`)")

    @property
    def do_cfg(self) -> bool:
        """Whether calls run the batched guided forward (``uncond`` given and ``guidance_scale != 1``)."""
        return self.uncond is not None and bool(torch.as_tensor(self.guidance_scale).ne(1).any())

    def _forward(self, x, t, cond: Conditioning, timestep_cond):
        return self.unet(
            x,
            t,
            encoder_hidden_states=cond.encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs=cond.added_cond_kwargs,
            cross_attention_kwargs=self.cross_attention_kwargs,
            return_dict=False,
        )[0]

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output for latents ``x_t [B, C, H, W]`` at timesteps ``t`` (LongTensor ``[B]`` or scalar)."""
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(batch) if t.ndim == 0 else match_batch("t", t, batch)
        tcond = None if self.timestep_cond is None else match_batch("timestep_cond", self.timestep_cond, batch)
        cond = Conditioning(self.encoder_hidden_states, self.added_cond_kwargs).expand(batch)
        if not self.do_cfg:
            return self._forward(x_t, t, cond, tcond)

        uncond = Conditioning(self.uncond, self.uncond_added_cond_kwargs if cond.added_cond_kwargs else None)
        out = self._forward(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            Conditioning.cat(uncond.expand(batch, ("uncond", "uncond_added_cond_kwargs")), cond),
            None if tcond is None else torch.cat([tcond, tcond]),
        )
        out_uncond, out_cond = out.chunk(2)
        return cfg_combine(out_uncond, out_cond, self.guidance_scale)
