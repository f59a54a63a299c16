"""Few-step samplers for discrete-time latent diffusion / consistency models (k-diffusion style).

Every sampler is a plain function with the same signature::

    sample_x(model, latents, schedule, timesteps, *, generator=None, callback=None, disable=True,
             **sampler_kwargs) -> final latents

- ``model``: a :data:`~lcm_lab.core.denoiser.ModelFn`, ``(x_t [B,C,H,W], t LongTensor [B]) -> raw output``
  in ``schedule.prediction_type``.
- ``latents``: the starting noisy latents at ``timesteps[0]`` (pure noise for text-to-image, or
  :func:`noised_start` for img2img).
- ``timesteps``: a strictly descending integer grid (see :func:`timesteps_for`).
- ``generator``: a ``torch.Generator`` or one per sample (see :func:`lcm_lab.core.noise.randn`) for the
  fresh noise of stochastic steps.
- ``callback(i, t, x)``: called after step ``i`` (``t`` an ``int``) with the new latents ``x``.
- ``disable``: disables the tqdm progress bar (default True for library use).

Samplers do not touch autograd: wrap calls in ``torch.no_grad()`` for inference. Update arithmetic is done
in float32 (the schedule's dtype) and the running latents are cast back to ``latents.dtype`` each step so
half-precision UNets keep receiving half-precision inputs.

Each sampler reproduces the matching diffusers scheduler loop (``LCMScheduler``, ``TCDScheduler``,
``DDIMScheduler``) to float32 round-off for float32 latents; see ``tests/test_core_parity.py``. With
half-precision latents the results differ from diffusers' by design: diffusers steps in half precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .denoiser import ModelFn
from .noise import Generators, randn
from .parameterization import consistency_output, from_x0_eps, lcm_boundary_scalings, to_eps, to_x0
from .schedules import (
    NoiseSchedule,
    ddim_timesteps,
    img2img_timesteps,
    lcm_timesteps,
    tcd_timesteps,
)

__all__ = [
    "Callback",
    "ddim_step",
    "ddim_jump",
    "noised_start",
    "sample_lcm",
    "sample_tcd",
    "sample_ddim",
    "SAMPLERS",
    "timesteps_for",
]

Callback = Callable[[int, int, torch.Tensor], None]
Scalar = torch.Tensor | float


# --------------------------------------------------------------------------------------
# single-step updates shared with the objectives (the LCD teacher solver)
# --------------------------------------------------------------------------------------


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_prev: Scalar,
    sigma_prev: Scalar,
    std: Scalar = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update to the previous (less noisy) timestep (Song et al. 2021, eq. 12).

    ``x_prev = alpha_prev * x0 + sqrt(sigma_prev^2 - std^2) * eps + std * noise``; with the default
    ``std = 0`` (eta = 0) this is the deterministic ``alpha_prev * x0 + sigma_prev * eps`` that the LCD
    teacher ODE solver also uses.

    Args:
        x0 (`torch.Tensor`): predicted clean sample ``[B, C, H, W]``.
        eps (`torch.Tensor`): predicted noise, same shape.
        alpha_prev, sigma_prev: ``sqrt(abar_prev)``, ``sqrt(1 - abar_prev)`` (broadcastable).
        std (`float` or `torch.Tensor`, defaults to 0): DDIM's ``sigma_t(eta)`` (eq. 16); needs ``noise``
            when nonzero.
        noise (`torch.Tensor`, *optional*): fresh standard normal noise for ``std > 0``.
    """
    if noise is None:
        if bool(torch.as_tensor(std).ne(0).any()):
            raise ValueError("`noise` is required when `std` is nonzero (eta > 0).")
        return from_x0_eps(x0, eps, alpha_prev, sigma_prev)
    direction = (sigma_prev**2 - std**2) ** 0.5
    return from_x0_eps(x0, eps, alpha_prev, direction) + std * noise


def ddim_jump(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: Scalar,
    sigma_t: Scalar,
    alpha_s: Scalar,
    sigma_s: Scalar,
) -> torch.Tensor:
    """Deterministic DDIM jump from ``x_t`` to timestep ``s`` given a clean estimate ``x0``.

    ``x_s = alpha_s * x0 + (sigma_s / sigma_t) * (x_t - alpha_t * x0)``: the implied noise
    ``(x_t - alpha_t x0) / sigma_t`` is reused (Song et al. 2021, eq. 12; the form used by Multistep
    Consistency Models, Heek et al. 2024, Alg. 1).
    """
    return from_x0_eps(x0, x_t - alpha_t * x0, alpha_s, sigma_s / sigma_t)


def noised_start(
    latents_clean: torch.Tensor, schedule: NoiseSchedule, t_start: int | torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Starting latents for img2img / restoration: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` at ``t_start``.

    Use ``t_start = timesteps[0]`` of the (strength-reduced) grid, as ``LatentConsistencyModelImg2ImgPipeline``
    and ``StableDiffusionImg2ImgPipeline`` do.

    Args:
        latents_clean (`torch.Tensor`): encoded images ``[B, C, H, W]`` (already scaled).
        schedule (`NoiseSchedule`): the noise schedule.
        t_start (`int` or `torch.LongTensor`): one timestep or ``[B]`` timesteps.
        noise (`torch.Tensor`): standard normal noise of the same shape (e.g. from :func:`~lcm_lab.core.noise.randn`).
    """
    if noise.shape != latents_clean.shape:  # broadcasting would silently give a wrong batch
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latents' {tuple(latents_clean.shape)}")
    return schedule.add_noise(latents_clean, noise, t_start)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _check_grid(timesteps: torch.Tensor | Sequence[int], schedule: NoiseSchedule) -> torch.Tensor:
    ts = torch.as_tensor(timesteps)
    if ts.is_floating_point() or ts.ndim != 1 or ts.numel() == 0:
        raise ValueError(
            f"`timesteps` must be a non-empty 1-D integer sequence, got dtype {ts.dtype}, shape {tuple(ts.shape)}."
        )
    ts = ts.long().cpu()
    if int(ts.min()) < 0 or int(ts.max()) >= schedule.num_train_timesteps:
        raise ValueError(
            f"`timesteps` must lie in [0, {schedule.num_train_timesteps - 1}], got {ts.tolist()}."
        )
    if len(ts) > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"`timesteps` must be strictly descending, got {ts.tolist()}.")
    return ts


def _per_sample(t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timestep(s) as a LongTensor ``[B]`` on the latents' device."""
    return torch.as_tensor(t, dtype=torch.long, device=x.device).reshape(-1).expand(x.shape[0])


def _predict(
    model: ModelFn, x: torch.Tensor, t_b: torch.Tensor, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Call the model once; return ``(model_output, alpha_t, sigma_t, x0_hat)`` (coefficients ``[B,1,..,1]``)."""
    out = model(x, t_b)
    if out.shape != x.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} differs from latents shape {tuple(x.shape)}.")
    alpha, sigma = schedule.alpha_sigma(t_b, ndim=x.ndim)
    x0 = to_x0(out, x, alpha, sigma, schedule.prediction_type)
    return out, alpha, sigma, x0


def _check_clip(clip_sample: float | None) -> None:
    if clip_sample is not None and not clip_sample > 0:  # NaN too
        raise ValueError(f"`clip_sample` must be a positive bound or None, got {clip_sample!r}.")


def _fresh_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _progress(ts: torch.Tensor, disable: bool, desc: str):
    return tqdm(list(enumerate(ts.tolist())), disable=disable, desc=desc, leave=False)


# --------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------


def sample_lcm(
    model: ModelFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
    clip_sample: float | None = None,
) -> torch.Tensor:
    """LCM multistep sampling (Luo et al. 2023, Algorithm 1; diffusers ``LCMScheduler.step``).

    At each grid point ``t_i``: ``x0_hat = to_x0(model(x, t_i))``, consistency output
    ``f = c_skip(t_i) x + c_out(t_i) x0_hat`` (boundary scalings, LCM eq. 5); then, except at the last step,
    re-noise to the next grid point ``x = sqrt(abar_{t_{i+1}}) f + sqrt(1 - abar_{t_{i+1}}) z`` with fresh
    ``z``. The last step returns ``f``.

    Args:
        model, latents, schedule, timesteps, generator, callback, disable: see the module docstring.
        timestep_scaling (`float`, defaults to 10.0): see :func:`~lcm_lab.core.parameterization.lcm_boundary_scalings`.
        sigma_data (`float`, defaults to 0.5): see the same.
        clip_sample (`float`, *optional*): clamp ``x0_hat`` to ``[-clip_sample, clip_sample]`` (a scheduler
            config's ``clip_sample`` with its ``clip_sample_range``; off by default, as in ``LCMScheduler``).

    Returns:
        `torch.Tensor`: final latents ``f(x_{t_last}, t_last)``, shape and dtype of ``latents``.
    """
    _check_clip(clip_sample)
    ts = _check_grid(timesteps, schedule)
    dtype = latents.dtype
    x = latents
    last = len(ts) - 1
    for i, t in _progress(ts, disable, "LCM"):
        t_b = _per_sample(t, x)
        _, _, _, x0 = _predict(model, x, t_b, schedule)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        c_skip, c_out = lcm_boundary_scalings(t_b.reshape(-1, *([1] * (x.ndim - 1))), timestep_scaling, sigma_data)
        denoised = consistency_output(x, x0, c_skip, c_out)
        if i == last:
            x = denoised
        else:
            alpha_prev, sigma_prev = schedule.alpha_sigma_prev(_per_sample(ts[i + 1], x), ndim=x.ndim)
            x = from_x0_eps(denoised, _fresh_noise(denoised, generator), alpha_prev, sigma_prev)
        x = x.to(dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def sample_tcd(
    model: ModelFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    gamma: float = 0.3,
) -> torch.Tensor:
    """Strategic Stochastic Sampling of TCD (Zheng et al. 2024, Alg. 4; diffusers ``TCDScheduler.step``).

    From ``t`` to the next grid point ``t'`` (``t' = 0`` after the last step): jump deterministically to the
    intermediate ``s = floor((1 - gamma) t')`` with DDIM, ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s)
    eps_hat``, then diffuse forward to ``t'``: ``x_{t'} = sqrt(abar_{t'}/abar_s) x_s + sqrt(1 - abar_{t'}/abar_s) z``.
    ``gamma = 0`` is deterministic DDIM on the grid; ``gamma = 1`` jumps to ``s = 0`` every step (LCM-like,
    but without boundary scalings).

    As in diffusers, the last step returns ``x_s`` with ``s = 0``, i.e.
    ``sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps_hat`` (not ``x0_hat``), and no noise is added there;
    no c_skip/c_out scalings are used at all.

    Args:
        model, latents, schedule, timesteps, generator, callback, disable: see the module docstring.
        gamma (`float`, defaults to 0.3): stochasticity in ``[0, 1]`` (diffusers' ``eta``).

    Returns:
        `torch.Tensor`: final latents, shape and dtype of ``latents``.
    """
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"`gamma` must be in [0, 1], got {gamma}.")
    ts = _check_grid(timesteps, schedule)
    dtype = latents.dtype
    x = latents
    last = len(ts) - 1
    for i, t in _progress(ts, disable, "TCD"):
        t_b = _per_sample(t, x)
        out, alpha, sigma, x0 = _predict(model, x, t_b, schedule)
        eps = to_eps(out, x, alpha, sigma, schedule.prediction_type)
        t_next = _per_sample(ts[i + 1] if i < last else 0, x)
        # Same float32 arithmetic as diffusers so that floor() ties resolve identically.
        s_b = torch.floor((1 - gamma) * t_next).long()
        alpha_s, sigma_s = schedule.alpha_sigma(s_b, ndim=x.ndim)
        x_s = from_x0_eps(x0, eps, alpha_s, sigma_s)
        if gamma > 0 and i < last:
            ratio = schedule.alpha_cumprod_prev(t_next, ndim=x.ndim) / schedule.alpha_cumprod(s_b, ndim=x.ndim)
            x = from_x0_eps(x_s, _fresh_noise(x_s, generator), ratio.sqrt(), (1 - ratio).sqrt())
        else:
            x = x_s
        x = x.to(dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def sample_ddim(
    model: ModelFn,
    latents: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 0.0,
    step_ratio: int | None = None,
    clip_sample: float | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12; diffusers ``DDIMScheduler.step``).

    Each step predicts ``x0_hat, eps_hat`` and moves to the previous timestep with :func:`ddim_step`. The
    previous timestep of the last step is "below 0", which uses ``schedule.final_alpha_cumprod``
    (``set_alpha_to_one``).

    Previous timesteps: with ``step_ratio=None`` (default) step ``i`` goes to ``timesteps[i + 1]``; this
    equals ``DDIMScheduler`` for "leading" grids, including img2img-trimmed ones. ``DDIMScheduler`` itself
    always uses ``t - num_train_timesteps // num_inference_steps``, which differs from the next grid point
    on some "trailing"/"linspace" grids; pass ``step_ratio=num_train_timesteps // num_inference_steps`` (the
    *untrimmed* step count) to reproduce it literally.

    Args:
        model, latents, schedule, timesteps, generator, callback, disable: see the module docstring.
        eta (`float`, defaults to 0.0): DDIM eta in ``[0, 1]``; ``0`` is deterministic, ``1`` DDPM-like.
            ``std = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))`` (DDIM eq. 16).
        step_ratio (`int`, *optional*): see above.
        clip_sample (`float`, *optional*): clamp ``x0_hat`` to ``[-clip_sample, clip_sample]`` after ``eps_hat``
            is taken from the unclipped prediction, as ``DDIMScheduler.step`` does with ``clip_sample`` (its
            default) and ``clip_sample_range``. Off by default: clamping latents is for pixel-space models.

    Returns:
        `torch.Tensor`: final latents (at ``final_alpha_cumprod``), shape and dtype of ``latents``.
    """
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"`eta` must be in [0, 1], got {eta}.")
    if step_ratio is not None and (isinstance(step_ratio, bool) or not isinstance(step_ratio, int) or step_ratio < 1):
        raise ValueError(f"`step_ratio` must be a positive integer or None, got {step_ratio!r}.")
    _check_clip(clip_sample)
    ts = _check_grid(timesteps, schedule)
    dtype = latents.dtype
    x = latents
    last = len(ts) - 1
    for i, t in _progress(ts, disable, "DDIM"):
        t_b = _per_sample(t, x)
        out, alpha, sigma, x0 = _predict(model, x, t_b, schedule)
        eps = to_eps(out, x, alpha, sigma, schedule.prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        if step_ratio is not None:
            t_prev = t - step_ratio
        else:
            t_prev = int(ts[i + 1]) if i < last else -1
        t_prev_b = _per_sample(t_prev, x)
        alpha_prev, sigma_prev = schedule.alpha_sigma_prev(t_prev_b, ndim=x.ndim)
        if eta == 0:
            x = ddim_step(x0, eps, alpha_prev, sigma_prev)
        else:
            abar_t = schedule.alpha_cumprod(t_b, ndim=x.ndim)
            abar_prev = schedule.alpha_cumprod_prev(t_prev_b, ndim=x.ndim)
            variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
            std = eta * variance**0.5
            x = ddim_step(x0, eps, alpha_prev, sigma_prev, std=std, noise=_fresh_noise(out, generator))
        x = x.to(dtype)
        if callback is not None:
            callback(i, t, x)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "lcm": sample_lcm,
    "tcd": sample_tcd,
    "ddim": sample_ddim,
}
"""Sampler name -> sampler function (all share the signature described in the module docstring)."""


def timesteps_for(
    sampler_name: str,
    num_inference_steps: int,
    schedule: NoiseSchedule,
    strength: float = 1.0,
    original_inference_steps: int = 50,
    *,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> torch.Tensor:
    """The standard grid for a sampler in :data:`SAMPLERS`.

    - ``"lcm"``: :func:`~lcm_lab.core.schedules.lcm_timesteps` (strength handled inside the grid, as
      ``LatentConsistencyModelImg2ImgPipeline``).
    - ``"tcd"``: :func:`~lcm_lab.core.schedules.tcd_timesteps` (config-style ``original_inference_steps``;
      strength handled inside the grid, as ``TCDScheduler.set_timesteps(..., strength=...)``).
    - ``"ddim"``: :func:`~lcm_lab.core.schedules.ddim_timesteps` with ``timestep_spacing`` /
      ``steps_offset`` (SD defaults: "leading", 1), then :func:`~lcm_lab.core.schedules.img2img_timesteps`
      for ``strength < 1`` (``StableDiffusionImg2ImgPipeline``). ``original_inference_steps`` is unused.

    LCM and TCD handle strength as their schedulers do; the img2img pipelines other than
    ``LatentConsistencyModelImg2ImgPipeline`` trim the full grid instead (4 steps at strength 0.5:
    [499, 379, 259, 139] here, [499, 259] there), which :func:`lcm_lab.generation.sampling_grid` does for
    their folders.

    Args:
        sampler_name (`str`): a key of :data:`SAMPLERS`.
        num_inference_steps (`int`): number of steps before any strength reduction (>= 1).
        schedule (`NoiseSchedule`): supplies ``num_train_timesteps``.
        strength (`float`, defaults to 1.0): img2img strength in ``(0, 1]``.
        original_inference_steps (`int`, defaults to 50): LCM/TCD distillation grid size.

    Returns:
        `torch.LongTensor`: descending timesteps.
    """
    T = schedule.num_train_timesteps
    if sampler_name == "lcm":
        return lcm_timesteps(num_inference_steps, T, original_inference_steps, strength)
    if sampler_name == "tcd":
        return tcd_timesteps(num_inference_steps, T, original_inference_steps, strength)
    if sampler_name == "ddim":
        grid = ddim_timesteps(num_inference_steps, T, timestep_spacing, steps_offset)
        return img2img_timesteps(grid, strength)
    raise ValueError(f"sampler_name must be one of {sorted(SAMPLERS)}, got {sampler_name!r}.")
