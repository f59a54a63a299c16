"""The one place for parameterization formulas.

Every sampler, loss and solver in ``lcm_lab`` converts network outputs through these functions, so a
convention (e.g. the v-prediction sign, or the LCM boundary scalings) is written exactly once.

Notation: variance-preserving ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t = sqrt(abar_t)``,
``sigma_t = sqrt(1 - abar_t)`` (``alpha_t^2 + sigma_t^2 = 1``). ``alpha``/``sigma`` arguments are tensors
that broadcast against ``x_t`` (e.g. ``[B, 1, 1, 1]`` from :meth:`NoiseSchedule.alpha_sigma`) or floats.
"""

from __future__ import annotations

import torch

from .schedules import check_prediction_type

__all__ = [
    "from_x0_eps",
    "to_x0",
    "to_eps",
    "lcm_boundary_scalings",
    "consistency_output",
    "edm_cm_scalings",
    "guidance_scale_embedding",
]

Scalar = torch.Tensor | float


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """Compose a noisy sample ``alpha * x0 + sigma * eps``.

    This is the forward marginal (DDPM eq. 4) and, with ``(alpha, sigma)`` of an earlier timestep, the
    deterministic DDIM update (Song et al. 2021, eq. 12 with sigma_t = 0); add_noise, DDIM, LCM re-noising
    and TCD all use it.
    """
    return alpha * x0 + sigma * eps


def to_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha: Scalar, sigma: Scalar, prediction_type: str
) -> torch.Tensor:
    """Predicted clean sample ``x0_hat`` from a raw network output.

    - ``"epsilon"``: ``x0 = (x_t - sigma * eps) / alpha`` (invert DDPM eq. 4).
    - ``"v_prediction"``: ``x0 = alpha * x_t - sigma * v`` with ``v = alpha * eps - sigma * x0``
      (Salimans & Ho 2022, "Progressive Distillation", sec. 4 / appendix D).
    - ``"sample"``: ``x0 = model_output``.

    Args:
        model_output (`torch.Tensor`): network output ``[B, C, H, W]`` in ``prediction_type``.
        x_t (`torch.Tensor`): noisy input ``[B, C, H, W]``.
        alpha, sigma (`torch.Tensor` or `float`): ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``, broadcastable.
        prediction_type (`str`): ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    return model_output


def to_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha: Scalar, sigma: Scalar, prediction_type: str
) -> torch.Tensor:
    """Predicted noise ``eps_hat`` from a raw network output (arguments as in :func:`to_x0`).

    - ``"epsilon"``: ``eps = model_output``.
    - ``"v_prediction"``: ``eps = alpha * v + sigma * x_t`` (Salimans & Ho 2022).
    - ``"sample"``: ``eps = (x_t - alpha * x0) / sigma`` (undefined at sigma = 0).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t
    return (x_t - alpha * model_output) / sigma


def _as_float_tensor(t: torch.Tensor | float | int) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.float32)


def _check_positive(**values: float) -> None:
    # Scalars only: a zero or negative scale silently flips or zeroes c_out, and sigma_data = 0 gives 0/0 at t = 0.
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def lcm_boundary_scalings(
    t: torch.Tensor | float | int, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings ``(c_skip, c_out)`` for discrete timesteps.

    Consistency models (Song et al. 2023, eq. 7 / appendix C) with the LCM discretization (Luo et al. 2023,
    sec. 4.2; diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``), with
    ``s = timestep_scaling * t``::

        c_skip = sigma_data^2 / (s^2 + sigma_data^2),    c_out = s / sqrt(s^2 + sigma_data^2)

    so ``f(x, 0) = x`` exactly (c_skip = 1, c_out = 0). Larger ``timestep_scaling`` makes c_skip vanish
    faster (at t = 999, scaling 10 gives c_skip ~ 2.5e-9).

    Args:
        t (`torch.Tensor`, `int` or `float`): timesteps, any shape (e.g. ``[B, 1, 1, 1]``).
        timestep_scaling (`float`, defaults to 10.0): multiplier applied to ``t``.
        sigma_data (`float`, defaults to 0.5): data standard deviation.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``(c_skip, c_out)``, shape of ``t``, float32 (float64 for a
        float64 ``t``).
    """
    _check_positive(timestep_scaling=timestep_scaling, sigma_data=sigma_data)
    t = _as_float_tensor(t)
    # At least float32: in float16, s^2 overflows to inf for t >= 26 (scaling 10), giving c_skip = c_out = 0.
    s = t.to(torch.promote_types(t.dtype, torch.float32)) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_output(x_t: torch.Tensor, x0_hat: torch.Tensor, c_skip: Scalar, c_out: Scalar) -> torch.Tensor:
    """Consistency function ``f(x_t, t) = c_skip * x_t + c_out * x0_hat`` (Song et al. 2023, eq. 7)."""
    return c_skip * x_t + c_out * x0_hat


def edm_cm_scalings(
    sigma: torch.Tensor | float, sigma_min: float = 0.002, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM-style consistency-model preconditioning ``(c_skip, c_out, c_in, c_noise)``.

    Song et al. 2023 (appendix C) / iCT (Song & Dhariwal 2023, sec. 3), shifted so the boundary condition
    holds at ``sigma_min`` (``c_skip = 1, c_out = 0``)::

        c_skip  = sd^2 / ((sigma - sigma_min)^2 + sd^2)
        c_out   = sd * (sigma - sigma_min) / sqrt(sigma^2 + sd^2)
        c_in    = 1 / sqrt(sigma^2 + sd^2)          # unit-variance network input (EDM, Karras et al. 2022, Table 1)
        c_noise = 0.25 * ln(sigma)

    Note: diffusers' consistency-training example writes ``c_in = 1 / (sigma^2 + sd^2)`` without the square
    root; that is a bug (the input variance would not be 1) and is not reproduced here.

    Args:
        sigma (`torch.Tensor` or `float`): noise levels (> 0), any shape.
        sigma_min (`float`, defaults to 0.002): boundary noise level.
        sigma_data (`float`, defaults to 0.5): data standard deviation.
    """
    _check_positive(sigma_data=sigma_data)
    if sigma_min < 0:
        raise ValueError(f"sigma_min must be >= 0, got {sigma_min}")
    sigma = _as_float_tensor(sigma)
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma**2 + sd2) ** 0.5
    c_in = 1 / (sigma**2 + sd2) ** 0.5
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def guidance_scale_embedding(
    w: torch.Tensor | float, embedding_dim: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for w-conditioned LCM students.

    LCM (Luo et al. 2023, sec. 4.2) feeds ``w`` to the UNet through ``timestep_cond`` using the VDM
    Fourier-feature recipe (Kingma et al. 2021; diffusers
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``): ``w * 1000`` against frequencies
    ``exp(-j * ln(1e4) / (half - 1))``, ``j = 0..half-1``, ``[sin, cos]`` concatenated, zero-padded to an
    odd ``embedding_dim``.

    Args:
        w (`torch.Tensor` ``[B]`` or `float`): guidance scales (diffusers passes ``guidance_scale - 1``).
        embedding_dim (`int`, defaults to 256): output width (SD-LCM's ``time_cond_proj_dim`` is 256), >= 4.
        dtype (`torch.dtype`, defaults to float32): computation/output dtype.

    Returns:
        `torch.Tensor`: ``[B, embedding_dim]``.
    """
    if embedding_dim < 4:
        raise ValueError(f"`embedding_dim` must be >= 4, got {embedding_dim}.")
    w = torch.as_tensor(w)
    if w.ndim == 0:
        w = w.reshape(1)
    if w.ndim != 1:
        raise ValueError(f"`w` must be a scalar or a 1-D tensor, got shape {tuple(w.shape)}.")
    half = embedding_dim // 2
    # log(1e4) is taken in float32 (not Python float) on purpose: w * 1000 reaches ~1e4, so a one-ulp
    # difference in the frequency would show up at the 1e-3 level in the sines. It is not cast to ``dtype``
    # first either: diffusers multiplies the ``dtype`` arange by the float32 0-dim tensor, and rounding the
    # frequency to float16/bfloat16 beforehand shifts the arguments by up to ~2 radians.
    log_base = torch.log(torch.tensor(10000.0, dtype=torch.float32)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -log_base).to(w.device)
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
