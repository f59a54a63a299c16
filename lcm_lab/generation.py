"""Text-to-image (and image-to-image) generation with any sampler of the core.

Noise is drawn per image from a generator seeded by that image's seed, so image ``i``
is the same whatever the batch size or the other prompts in its batch (EDM's
``StackedRandomGenerator`` idea; diffusers' list-of-generators semantics).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .core.denoiser import UNetModel
from .core.noise import generators_for_seeds, randn
from .core.parameterization import guidance_scale_embedding
from .core.sampling import SAMPLERS, noised_start, timesteps_for
from .models.sd import LatentDiffusionModel

DEFAULT_STEPS = {"ddim": 50, "lcm": 4, "tcd": 4}


def is_w_conditioned(unet) -> bool:
    """True for LCM students that take the guidance scale as an embedding (no CFG at sampling)."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def generate(
    model: LatentDiffusionModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    guidance_scale: float = 7.5,
    images: torch.Tensor | None = None,
    strength: float = 1.0,
    batch_size: int = 64,
    gamma: float = 0.3,
    original_inference_steps: int | None = None,
    truncate: bool = False,
    progress: bool = True,
    output: str = "images",
) -> torch.Tensor:
    """Generate one image per (prompt, seed).

    Args:
        model: a loaded LDM (teacher or distilled student).
        prompts, seeds: equal-length sequences; image ``i`` depends only on
            ``prompts[i]``, ``seeds[i]`` and the sampler settings.
        sampler: ``"ddim"``, ``"lcm"`` or ``"tcd"``.
        steps: number of sampling steps (default: 50 for DDIM, 4 otherwise).
        guidance_scale: classifier-free guidance scale (diffusers convention). For a
            w-conditioned LCM student the scale is embedded instead, as
            ``LatentConsistencyModelPipeline`` does (``w = guidance_scale - 1``).
        images: optional init images (N, 3, H, W) in [0, 1] for img2img / restoration.
        strength: how far towards noise the init images are taken, in (0, 1].
        batch_size: images per network call.
        gamma: TCD's stochasticity.
        original_inference_steps: LCM/TCD distillation grid size; default: the model's scheduler config
            (an exported ``LCMScheduler`` records it) or 50. The LCM boundary ``timestep_scaling`` is
            read from the scheduler config the same way (default 10).
        output: ``"images"`` (N, 3, H, W) in [0, 1] or ``"latents"``.

    Runs under ``torch.inference_mode``; the result is an ordinary tensor.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if images is None and strength != 1.0:
        raise ValueError("strength < 1 needs init images (--image)")
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    steps = steps or DEFAULT_STEPS[sampler]
    schedule, device = model.schedule, model.device
    if original_inference_steps is None:
        original_inference_steps = int(model.scheduler_config.get("original_inference_steps", 50))
    timesteps = timesteps_for(sampler, steps, schedule, strength, original_inference_steps)
    sample_fn = SAMPLERS[sampler]
    kwargs = {"gamma": gamma} if sampler == "tcd" else {}
    if sampler == "lcm":
        kwargs["timestep_scaling"] = float(model.scheduler_config.get("timestep_scaling", 10.0))
    # inference_mode is cheaper than no_grad (no autograd version tracking).
    with torch.inference_mode():
        w_cond = is_w_conditioned(model.unet)
        uncond = None if w_cond or guidance_scale == 1 else model.encode_prompts([""], allow_empty=True)

        outputs = []
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=f"{sampler}-{steps}", disable=not progress or len(batches) < 2):
            chunk = slice(start, start + batch_size)
            cond = model.encode_prompts(list(prompts[chunk]), truncate=truncate)
            gens = generators_for_seeds(seeds[chunk], device=device)
            shape = (len(cond), *model.latent_shape)
            noise = randn(shape, generator=gens, dtype=cond.dtype, device=device)
            if images is None:
                latents = noise
            else:
                clean = model.codec.encode(images[chunk].to(device) * 2 - 1)
                latents = noised_start(clean, schedule, timesteps[0], noise)
            timestep_cond = None
            if w_cond:
                w = torch.full((len(cond),), guidance_scale - 1.0, device=device)
                timestep_cond = guidance_scale_embedding(w, model.unet.config.time_cond_proj_dim).to(cond.dtype)
            net = UNetModel(model.unet, cond, uncond=uncond, guidance_scale=1.0 if w_cond else guidance_scale,
                            timestep_cond=timestep_cond)
            x0 = sample_fn(net, latents, schedule, timesteps, generator=gens, **kwargs)
            outputs.append(x0 if output == "latents" else model.codec.to_unit(model.codec.decode(x0)))
        images_out = torch.cat(outputs)
    return images_out.clone()  # an ordinary tensor again, usable outside inference mode


def timed_generate(model: LatentDiffusionModel, prompts, seeds, **kwargs) -> tuple[torch.Tensor, float]:
    """:func:`generate` plus wall-clock seconds per image."""
    t0 = time.perf_counter()
    out = generate(model, prompts, seeds, **kwargs)
    return out, (time.perf_counter() - t0) / max(1, len(prompts))
