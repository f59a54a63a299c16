"""Text-to-image (and image-to-image) generation with any sampler of the core.

Noise is drawn per image from a generator seeded by that image's seed, so image ``i``
is the same whatever the batch size or the other prompts in its batch (EDM's
``StackedRandomGenerator`` idea; diffusers' list-of-generators semantics).
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .arg_types import MAX_SEED
from .core.denoiser import UNetModel
from .core.latents import images_per_vae_call
from .core.noise import generators_for_seeds, randn
from .core.parameterization import guidance_scale_embedding
from .core.sampling import SAMPLERS, noised_start, timesteps_for
from .core.schedules import NoiseSchedule, img2img_timesteps
from .imaging import unit_range
from .models.sd import LDMParts
from .models.student import is_w_conditioned

DEFAULT_STEPS = {"ddim": 50, "lcm": 4, "tcd": 4}


def as_seeds(seeds: Sequence) -> list[int]:
    """Seeds as Python ints: Python, numpy or torch integers are taken, anything else (1.5 would silently be
    seed 1) is a ``TypeError``."""
    out, bad = [], []
    for seed in seeds:
        try:
            if isinstance(seed, bool):  # True is an int to Python, not a seed anyone means
                raise TypeError
            out.append(operator.index(seed))
        except TypeError:
            bad.append(seed)
    if bad:
        raise TypeError(f"seeds must be integers, got {bad[:3]}")
    return out


def resolve_steps(sampler: str, steps: int | None) -> int:
    """``steps``, or the sampler's default (:data:`DEFAULT_STEPS`) when ``None``; an unknown sampler or fewer
    than one step is a ``ValueError``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def sampling_grid(scheduler_config: Mapping, sampler: str, steps: int | None = None, *, guidance_scale: float = 7.5,
                  gamma: float = 0.3, strength: float = 1.0, original_inference_steps: int | None = None,
                  schedule: NoiseSchedule | None = None, strength_in_scheduler: bool = False
                  ) -> tuple[int, torch.Tensor]:
    """``(steps, timesteps)`` that :func:`generate` runs for these settings on a model with ``scheduler_config``.

    Needs no network, so entry points call it before loading models or metrics: impossible settings (an
    unknown sampler, a non-finite guidance scale, TCD's gamma outside [0, 1], more steps than the training or
    distillation grid has, an img2img strength that leaves no step, a scheduler config asking for dynamic
    thresholding or clipping to a bound that is not positive) fail before any work.

    Args:
        scheduler_config: the scheduler config as the stock pipeline runs it (``LDMParts.sampling_config``; a
            folder's ``scheduler/scheduler_config.json`` plus what its pipeline imposes); the schedule is built
            from it unless ``schedule`` (the model's own) is given.
        original_inference_steps: LCM/TCD distillation grid; default the config's, or 50.
        strength_in_scheduler: img2img as ``LatentConsistencyModelImg2ImgPipeline`` (LCM and TCD lay out their
            grid for ``strength``) instead of the other img2img pipelines (the last ``int(steps * strength)``
            steps of the full grid); see :func:`~lcm_lab.models.sd.strength_in_scheduler`. DDIM always trims.
        Other arguments: as in :func:`generate`.
    """
    steps = resolve_steps(sampler, steps)
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
    if sampler == "tcd" and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD's gamma must be in [0, 1], got {gamma}")
    if sampler != "tcd" and scheduler_config.get("thresholding", False):  # TCDScheduler.step ignores it
        raise ValueError("the model's scheduler config sets thresholding=true (dynamic thresholding of x0, for "
                         "pixel-space models), which lcm_lab's samplers do not implement; set it to false in "
                         "scheduler/scheduler_config.json")
    clip = clip_bound(scheduler_config, sampler)
    if clip is not None and not clip > 0:  # NaN too
        raise ValueError(f"the model's scheduler config clips x0 to clip_sample_range={clip}, which must be > 0")
    if schedule is None:
        schedule = NoiseSchedule.from_scheduler(scheduler_config)
    if original_inference_steps is None:
        original_inference_steps = int(scheduler_config.get("original_inference_steps", 50))
    # DDIM's grid as DDIMScheduler.from_config(scheduler_config) lays it out (its defaults: leading, offset 0)
    spacing = {"timestep_spacing": scheduler_config.get("timestep_spacing", "leading"),
               "steps_offset": int(scheduler_config.get("steps_offset", 0))} if sampler == "ddim" else {}
    if sampler in ("lcm", "tcd") and not strength_in_scheduler:  # the pipeline, not the scheduler, applies strength
        full = timesteps_for(sampler, steps, schedule, 1.0, original_inference_steps)
        return steps, img2img_timesteps(full, strength)
    return steps, timesteps_for(sampler, steps, schedule, strength, original_inference_steps, **spacing)


def clip_bound(scheduler_config: Mapping, sampler: str) -> float | None:
    """The bound x0 is clipped to as the scheduler built from this config clips it, or ``None``: DDIMScheduler
    clips unless told not to (diffusers' SD/SDXL configs say ``clip_sample: false``), LCMScheduler only when
    told, TCDScheduler never."""
    if sampler == "tcd" or not scheduler_config.get("clip_sample", sampler == "ddim"):
        return None
    bound = scheduler_config.get("clip_sample_range", 1.0)
    try:
        return float(bound)
    except (TypeError, ValueError):
        raise ValueError(f"the model's scheduler config has clip_sample_range={bound!r}, not a number") from None


def check_sampling(models: Sequence, samplers: Sequence[str], steps_list: Sequence[int | None] | None,
                   guidance: float | None, gamma: float = 0.3, strength: float = 1.0) -> None:
    """:func:`sampling_grid` for every (model, sampler, steps), from each model folder's scheduler config alone
    (``None``: the toy teacher; ``steps_list=None``: each sampler's default; ``guidance=None``: the toy
    teacher's). Entry points call it before any network is loaded, metric prepared or result written."""
    from .models.sd import (check_pipeline_dir, load_schedule, stock_scheduler_overrides, strength_in_scheduler,
                            toy_teacher_dir)
    from .toy import TEACHER_GUIDANCE

    for model in models:
        folder = check_pipeline_dir(toy_teacher_dir() if model is None else model)
        config, schedule = load_schedule(folder)
        config = {**config, **stock_scheduler_overrides(folder)}  # as LDMParts.sampling_config
        for sampler in samplers:
            for steps in steps_list or [None]:
                sampling_grid(config, sampler, steps, guidance_scale=TEACHER_GUIDANCE if guidance is None else guidance,
                              gamma=gamma, strength=strength, schedule=schedule,
                              strength_in_scheduler=strength_in_scheduler(folder))


def _checked_init_images(images: torch.Tensor, num_prompts: int, image_size: int) -> torch.Tensor:
    """``images`` clamped to [0, 1], after checking their shape, count, size and values."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"init images must be a (N, 3, H, W) RGB tensor, got {shape} "
                         "(lcm_lab.imaging.load_images reads files in that form)")
    if len(images) != num_prompts:
        raise ValueError(f"got {len(images)} init images for {num_prompts} prompts: pass one per prompt")
    if tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"init images are {tuple(images.shape[-2:])} px but the model generates {image_size} px; "
                         "resize them (lcm_lab.imaging.load_images(..., size=...))")
    return unit_range(images, "init images", "divide 8-bit images by 255")


def generate(
    model: LDMParts,
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
    timestep_scaling: float | None = None,
    image_size: int | None = None,
    decode_chunk_size: int | None = None,
    truncate: bool = False,
    progress: bool = True,
    output: str = "images",
) -> torch.Tensor:
    """Generate one image per (prompt, seed).

    Args:
        model: a loaded LDM, teacher or distilled student: SD 1.x/2.x
            (:class:`~lcm_lab.models.sd.LatentDiffusionModel`) or SDXL (:class:`~lcm_lab.models.sdxl.SDXLModel`,
            conditioned as ``StableDiffusionXLPipeline`` does: negative embeddings per the folder's
            ``force_zeros_for_empty_prompt``, size micro-conditioning ``image_size``).
        prompts, seeds: equal-length sequences; image ``i`` depends only on
            ``prompts[i]``, ``seeds[i]`` and the sampler settings.
        sampler: ``"ddim"``, ``"lcm"`` or ``"tcd"``, each stepping as the diffusers scheduler built from
            ``model.sampling_config`` in the family's stock pipeline (DDIM: its ``timestep_spacing``,
            ``steps_offset`` and ``clip_sample``; StableDiffusionPipeline imposes offset 1 and no clipping).
        steps: number of sampling steps (default: 50 for DDIM, 4 otherwise).
        guidance_scale: classifier-free guidance scale (diffusers convention); as in diffusers'
            pipelines, guidance runs only for a scale > 1 (<= 1: the conditional model alone). For a
            w-conditioned LCM student the scale is embedded instead, as
            ``LatentConsistencyModelPipeline`` does (``w = guidance_scale - 1``).
        images: optional init images (N, 3, H, W) in [0, 1] for img2img / restoration. They are
            encoded with the VAE posterior's mode (deterministic); diffusers' img2img pipelines sample
            the posterior from their generator, so their images differ from these by that draw.
        strength: how far towards noise the init images are taken, in (0, 1], applied as the folder's stock
            img2img pipeline does (:func:`~lcm_lab.models.sd.strength_in_scheduler`):
            on LCM folders all ``steps`` run on a grid laid out for ``strength``
            (``LatentConsistencyModelImg2ImgPipeline``; TCD as ``TCDScheduler.set_timesteps(strength=...)``);
            ``StableDiffusion(XL)Img2ImgPipeline`` (other folders; DDIM always) runs the last
            ``int(steps * strength)`` steps of the full grid.
        batch_size: images per network call.
        gamma: TCD's stochasticity.
        original_inference_steps: LCM/TCD distillation grid size; default: the model's scheduler config
            (an exported ``LCMScheduler`` records it) or 50.
        timestep_scaling: the LCM boundary scaling; default: the scheduler config the same way, or 10.
        image_size: side of the square images, a multiple of the VAE factor; default: the UNet's native size.
        decode_chunk_size: images per VAE call (decode, and encode of init images); default: as many as make
            about one 1024 px image (at most 64): 64 at 32-128 px, 4 at 512 px, 1 at 768 px and above.
        truncate: cut prompts longer than the text encoder's context instead of raising.
        output: ``"images"`` (N, 3, H, W) in [0, 1] or ``"latents"``.

    Runs under ``torch.inference_mode``; the result is an ordinary tensor. Non-finite results (a diverged or
    damaged model, fp16 overflow) raise ``FloatingPointError`` instead of becoming black images or NaN metrics.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of strings (one per image), e.g. [\"a red circle\"]")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    seeds = as_seeds(seeds)
    if any(not 0 <= s < MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be in [0, 2**63), got {min(seeds)}..{max(seeds)}")
    if not prompts:
        raise ValueError("no prompts: nothing to generate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = model.sampling_config
    steps, timesteps = sampling_grid(config, sampler, steps, guidance_scale=guidance_scale,
                                     gamma=gamma, strength=strength, original_inference_steps=original_inference_steps,
                                     schedule=model.schedule, strength_in_scheduler=model.strength_in_scheduler)
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    factor = model.vae_scale_factor
    image_size = model.image_size if image_size is None else image_size
    if image_size < factor or image_size % factor:
        raise ValueError(f"image size {image_size} is not a positive multiple of the VAE's scale factor {factor}")
    if images is None and strength != 1.0:
        raise ValueError("strength < 1 needs init images (--image)")
    if images is not None:
        images = _checked_init_images(images, len(prompts), image_size)
    schedule, device, dtype = model.schedule, model.device, next(model.unet.parameters()).dtype
    sample_fn = SAMPLERS[sampler]
    kwargs = {"gamma": gamma} if sampler == "tcd" else {}
    if sampler == "ddim":  # DDIMScheduler.step's previous timestep, also on trailing/linspace grids
        kwargs["step_ratio"] = schedule.num_train_timesteps // steps
    if (clip := clip_bound(config, sampler)) is not None:
        kwargs["clip_sample"] = clip
    if sampler == "lcm":
        kwargs["timestep_scaling"] = float(timestep_scaling if timestep_scaling is not None
                                           else config.get("timestep_scaling", 10.0))
    latent_shape = (model.latent_shape[0], image_size // factor, image_size // factor)
    decode_chunk = decode_chunk_size or min(64, images_per_vae_call(image_size, image_size))
    w_cond = is_w_conditioned(model.unet)
    # inference_mode is cheaper than no_grad (no autograd version tracking).
    with torch.inference_mode():
        outputs = []
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=f"{sampler}-{steps}", disable=not progress or len(batches) < 2):
            chunk = slice(start, start + batch_size)
            cond = model.conditioning(list(prompts[chunk]), truncate=truncate, image_size=image_size)
            gens = generators_for_seeds(seeds[chunk])  # CPU generators: the same noise on every device
            noise = randn((len(cond), *latent_shape), generator=gens, dtype=dtype, device=device)
            if images is None:
                latents = noise
            else:
                clean = model.codec.encode(images[chunk].to(device) * 2 - 1, chunk_size=decode_chunk)
                latents = noised_start(clean, schedule, timesteps[0], noise).to(dtype)
            timestep_cond, uncond = None, None
            if w_cond:
                w = torch.full((len(cond),), guidance_scale - 1.0, device=device)
                timestep_cond = guidance_scale_embedding(w, model.unet.config.time_cond_proj_dim).to(dtype)
            elif guidance_scale > 1:  # diffusers' do_classifier_free_guidance
                uncond = model.unconditional(cond).to(device, dtype)
            cond = cond.to(device, dtype)
            net = UNetModel(model.unet, cond.encoder_hidden_states, guidance_scale=1.0 if w_cond else guidance_scale,
                            timestep_cond=timestep_cond, added_cond_kwargs=cond.added_cond_kwargs,
                            uncond=None if uncond is None else uncond.encoder_hidden_states,
                            uncond_added_cond_kwargs=None if uncond is None else uncond.added_cond_kwargs)
            x0 = sample_fn(net, latents, schedule, timesteps, generator=gens, **kwargs)
            outputs.append(x0 if output == "latents"
                           else model.codec.to_unit(model.codec.decode(x0, chunk_size=decode_chunk)))
        images_out = torch.cat(outputs)
        if not torch.isfinite(images_out).all():  # damaged weights or fp16 overflow: no caller should use these
            raise FloatingPointError(f"{sampler}-{steps} produced non-finite {output} for seeds "
                                     f"{seeds[0]}..{seeds[-1]}; the model or its precision is broken")
    return images_out.clone()  # an ordinary tensor again, usable outside inference mode


def timed_generate(model: LDMParts, prompts, seeds, **kwargs) -> tuple[torch.Tensor, float]:
    """:func:`generate` plus wall-clock seconds per image."""
    t0 = time.perf_counter()
    out = generate(model, prompts, seeds, **kwargs)
    return out, (time.perf_counter() - t0) / max(1, len(prompts))
