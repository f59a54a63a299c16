"""Shared latent-space sampler core of ``lcm_lab``.

- :mod:`~lcm_lab.core.schedules`: noise schedules and timestep grids (LCM, TCD, DDIM, Karras/CT sigmas).
- :mod:`~lcm_lab.core.parameterization`: the one source for x0/eps conversions and consistency scalings.
- :mod:`~lcm_lab.core.noise`: per-sample seeded noise.
- :mod:`~lcm_lab.core.denoiser`: the ``model(x_t, t)`` interface and classifier-free guidance.
- :mod:`~lcm_lab.core.sampling`: LCM / TCD / DDIM samplers with one signature.
- :mod:`~lcm_lab.core.latents`: VAE encode/decode.
- :mod:`~lcm_lab.core.conditioning`: the text (and SDXL) conditioning of a batch.
"""

from .conditioning import Conditioning
from .denoiser import ModelFn, UNetModel, cfg_combine
from .latents import LatentCodec
from .noise import generators_for_seeds, randn
from .parameterization import (
    consistency_output,
    edm_cm_scalings,
    from_x0_eps,
    guidance_scale_embedding,
    lcm_boundary_scalings,
    to_eps,
    to_x0,
)
from .sampling import (
    SAMPLERS,
    ddim_jump,
    ddim_step,
    noised_start,
    sample_ddim,
    sample_lcm,
    sample_tcd,
    timesteps_for,
)
from .schedules import (
    PREDICTION_TYPES,
    NoiseSchedule,
    ct_sigmas,
    ddim_solver_timesteps,
    ddim_timesteps,
    img2img_timesteps,
    karras_sigmas,
    lcm_timesteps,
    make_betas,
    previous_solver_timestep,
    rescale_zero_terminal_snr,
    tcd_timesteps,
)

__all__ = [
    # schedules
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "make_betas",
    "rescale_zero_terminal_snr",
    "lcm_timesteps",
    "tcd_timesteps",
    "ddim_timesteps",
    "img2img_timesteps",
    "ddim_solver_timesteps",
    "previous_solver_timestep",
    "karras_sigmas",
    "ct_sigmas",
    # parameterization
    "from_x0_eps",
    "to_x0",
    "to_eps",
    "lcm_boundary_scalings",
    "consistency_output",
    "edm_cm_scalings",
    "guidance_scale_embedding",
    # noise
    "generators_for_seeds",
    "randn",
    # denoiser
    "ModelFn",
    "UNetModel",
    "cfg_combine",
    # sampling
    "SAMPLERS",
    "sample_lcm",
    "sample_tcd",
    "sample_ddim",
    "ddim_step",
    "ddim_jump",
    "noised_start",
    "timesteps_for",
    # latents
    "LatentCodec",
    # conditioning
    "Conditioning",
]
