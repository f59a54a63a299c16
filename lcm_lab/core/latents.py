"""Pixel <-> latent conversion around a diffusers ``AutoencoderKL``.

Latents are ``z = E(x) * scaling_factor`` (Rombach et al. 2022, sec. 4.3.2 / appendix G: rescale latents to
roughly unit variance), as the SD 1.x/2.x and SDXL pipelines scale them. VAEs whose config asks for more
(``shift_factor``: SD3 / FLUX; ``latents_mean`` / ``latents_std``: e.g. Playground v2.5) are refused rather
than half-followed.

Large batches are processed in chunks so peak activation memory is bounded. Neither method changes the
autograd mode: ``decode`` stays differentiable when gradients are enabled (reward-guided LCD
back-propagates through it); wrap calls in ``torch.no_grad()`` or pass ``no_grad=True`` for inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

__all__ = ["LatentCodec", "images_per_vae_call"]

PIXELS_PER_VAE_CALL = 2**20  # about one 1024 px image: beyond that the VAE's activations dominate memory


def images_per_vae_call(height: int, width: int) -> int:
    """Images of ``height`` x ``width`` px per VAE call that make about one 1024 px image (4 at 512 px, 1 at 768
    px and above): a VAE's activations take ~0.6 GiB per 512 px image in float32."""
    return max(1, PIXELS_PER_VAE_CALL // (height * width))


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    return chunk_size


class LatentCodec:
    """Encode images to scaled latents and decode them back.

    Args:
        vae (`diffusers.AutoencoderKL`-like): has ``encode(x).latent_dist`` (with ``mode()`` and
            ``sample(generator)``), ``decode(z).sample`` and a ``config``.
        scaling_factor (`float`, *optional*): overrides ``vae.config.scaling_factor`` (0.18215 for SD 1.x).
    """

    def __init__(self, vae, scaling_factor: float | None = None) -> None:
        self.vae = vae
        config = getattr(vae, "config", {})
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        if scaling_factor is None:
            scaling_factor = get("scaling_factor", None)
        if scaling_factor is None:
            raise ValueError("`scaling_factor` is not in vae.config; pass it explicitly.")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if get(key, None) is not None:
                raise ValueError(f"this VAE's config sets {key} (an SD3/FLUX- or Playground-style VAE); lcm_lab "
                                 "follows the SD 1.x/2.x and SDXL pipelines, which scale latents by scaling_factor "
                                 "alone")
        self.scaling_factor = float(scaling_factor)

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (a posterior sample or mode) -> the scaled latents the UNet sees: ``raw * scaling_factor``."""
        return raw * self.scaling_factor

    def _param(self) -> torch.Tensor | None:
        return next(iter(self.vae.parameters()), None) if hasattr(self.vae, "parameters") else None

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        p = self._param()
        return x if p is None else x.to(device=p.device, dtype=p.dtype)

    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sample: bool = False,
        chunk_size: int = 64,
        no_grad: bool = False,
    ) -> torch.Tensor:
        """Images in ``[-1, 1]`` ``[B, 3, H, W]`` -> scaled latents ``[B, C, H/f, W/f]``.

        Args:
            images (`torch.Tensor`): pixel values in ``[-1, 1]`` (``ValueError`` beyond 1% outside).
            generator (`torch.Generator` or list, *optional*): for ``sample=True``. A list of per-sample
                generators gives results independent of ``chunk_size``; a single generator is consumed
                chunk by chunk.
            sample (`bool`, defaults to False): draw from the posterior instead of taking its mode.
            chunk_size (`int`, defaults to 64): images per VAE call.
            no_grad (`bool`, defaults to False): run under ``torch.no_grad()``.

        Returns:
            `torch.Tensor`: ``latent * scaling_factor``.
        """
        chunk_size = _check_chunk_size(chunk_size)
        if images.numel():
            # one reduction: catches e.g. [0, 255] pixels, which the VAE would encode silently
            lo, hi = torch.aminmax(images.detach())
            if lo < -1.01 or hi > 1.01:
                raise ValueError(f"images must be in [-1, 1], got min {float(lo):.4g}, max {float(hi):.4g}.")
        if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
            if len(generator) != images.shape[0]:
                raise ValueError(f"got {len(generator)} generators for {images.shape[0]} images.")
        out = []
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            for sl in _chunks(images.shape[0], chunk_size):
                dist = self.vae.encode(self._to_vae(images[sl])).latent_dist
                if sample:
                    gen = generator[sl] if isinstance(generator, Sequence) else generator
                    z = dist.sample(generator=list(gen) if isinstance(gen, Sequence) else gen)
                else:
                    z = dist.mode()
                out.append(self.scale(z))
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, chunk_size: int = 64, no_grad: bool = False) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, h*f, w*f]``, nominally in ``[-1, 1]`` (not clamped).

        Differentiable unless ``no_grad=True`` or called under ``torch.no_grad()``.

        Args:
            latents (`torch.Tensor`): latents as produced by :meth:`encode` / the samplers.
            chunk_size (`int`, defaults to 64): latents per VAE call.
            no_grad (`bool`, defaults to False): run under ``torch.no_grad()``.
        """
        chunk_size = _check_chunk_size(chunk_size)
        out = []
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            for sl in _chunks(latents.shape[0], chunk_size):
                z = self._to_vae(latents[sl]) / self.scaling_factor
                out.append(self.vae.decode(z, return_dict=False)[0])
        return torch.cat(out)

    @staticmethod
    def to_unit(images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images -> ``[0, 1]``: ``(x / 2 + 0.5).clamp(0, 1)``."""
        return (images / 2 + 0.5).clamp(0, 1)
