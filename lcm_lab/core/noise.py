"""Seeded Gaussian noise whose per-sample values do not depend on batch composition.

With one generator per sample (diffusers' ``randn_tensor`` convention), sample ``i`` of a batch seeded
``[a, b, c]`` gets exactly the same initial and per-step noise as a batch seeded ``[b]`` alone, so image
``i`` of an evaluation grid is reproducible whatever else is in its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["Generators", "generators_for_seeds", "randn"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def generators_for_seeds(seeds: Iterable[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per seed, seeded with ``manual_seed(seed)``.

    Args:
        seeds (iterable of `int`): one seed per sample.
        device (`torch.device` or `str`, defaults to ``"cpu"``): generator device. CPU generators give the
            same numbers on every machine; :func:`randn` moves the result to the requested device.

    Returns:
        `list[torch.Generator]`.
    """
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def randn(
    shape: Sequence[int] | torch.Size,
    generator: Generators = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal tensor with diffusers ``randn_tensor`` semantics.

    - ``generator=None``: global RNG, one ``torch.randn(shape)``.
    - a single generator (or a list of one): one ``torch.randn(shape)`` call.
    - a list of ``B == shape[0]`` generators: ``torch.randn((1, *shape[1:]))`` from each, concatenated along
      the batch, so sample ``i`` depends only on ``generator[i]``.

    Noise is drawn on the generator's device (e.g. CPU) and then moved to ``device``.

    Args:
        shape (sequence of `int`): output shape ``[B, ...]``.
        generator (`torch.Generator`, list of them, or None): see above.
        dtype (`torch.dtype`, defaults to float32): output dtype.
        device (`torch.device` or `str`, defaults to ``"cpu"``): output device.

    Returns:
        `torch.Tensor` of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) == 0:
            raise ValueError("`generator` list must not be empty.")
        if len(generators) == 1:
            generator = generators[0]
        else:
            if len(shape) == 0 or len(generators) != shape[0]:
                batch = shape[0] if shape else "none"
                raise ValueError(
                    f"got {len(generators)} generators for a batch of {batch}: pass one generator per sample "
                    "(or a single generator)."
                )
            per_sample = (1, *shape[1:])
            noise = torch.cat(
                [torch.randn(per_sample, generator=g, device=g.device, dtype=dtype) for g in generators], dim=0
            )
            return noise.to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
