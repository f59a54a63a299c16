"""Discrete-time noise schedules and timestep grids.

Everything here describes *where* a sampler evaluates the network, never *how* it
steps: the update rules live in :mod:`lcm_lab.core.sampling` and the
parameterization formulas in :mod:`lcm_lab.core.parameterization`.

Notation (DDPM, Ho et al. 2020, eq. 4): ``x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps``
with ``abar_t = prod_{s<=t} (1 - beta_s)``; we write ``alpha_t = sqrt(abar_t)`` and
``sigma_t = sqrt(1 - abar_t)`` (variance-preserving).

Every timestep grid returns exactly what the corresponding diffusers scheduler's
``set_timesteps`` produces for the same arguments (checked in
``tests/test_core_schedules.py``). Grid arithmetic is done in numpy float64, as
diffusers does, so that rounding ties resolve identically.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "make_betas",
    "rescale_zero_terminal_snr",
    "NoiseSchedule",
    "lcm_timesteps",
    "tcd_timesteps",
    "ddim_timesteps",
    "img2img_timesteps",
    "ddim_solver_timesteps",
    "previous_solver_timestep",
    "karras_sigmas",
    "ct_sigmas",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------
# argument checks shared by this module (and re-used by parameterization.py)
# --------------------------------------------------------------------------------------


def check_scheduler_config(config: Mapping) -> None:
    """Refuse a scheduler config whose noise schedule diffusers' schedulers would not agree on: betas left to
    their defaults (DDIM: linear 1e-4..0.02; LCM: scaled_linear 0.00085..0.012), or ``trained_betas`` of another
    length than ``num_train_timesteps`` (default 1000), on which diffusers lays out its grids."""
    present = {k for k, v in config.items() if v is not None}
    if "trained_betas" in present:
        n, T = len(config["trained_betas"]), config.get("num_train_timesteps") or 1000
        if n != T:
            raise ValueError(f"the scheduler config has {n} trained_betas but num_train_timesteps={T}")
    elif missing := [k for k in ("beta_start", "beta_end", "beta_schedule") if k not in present]:
        raise ValueError(f"the scheduler config lacks {', '.join(missing)} (and has no trained_betas); "
                         "diffusers' schedulers disagree on their defaults, so write them into it")


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` or raise ``ValueError`` if it is not one of :data:`PREDICTION_TYPES`."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}."
        )
    return prediction_type


def _check_int_range(name: str, value: Any, low: int, high: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # int, numpy and 0-dim torch integers; not floats
    except TypeError:
        raise ValueError(f"`{name}` must be an integer, got {value!r}.") from None
    if value < low or (high is not None and value > high):
        upper = "inf" if high is None else str(high)
        raise ValueError(f"`{name}` must be in [{low}, {upper}], got {value}.")
    return value


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not (0.0 < strength <= 1.0):
        raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
    return strength


# --------------------------------------------------------------------------------------
# betas
# --------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide / improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at ``max_beta``.

    Computed in Python floats (float64) and cast once to float32, like diffusers' ``betas_for_alpha_bar``.
    """

    def abar(u: float) -> float:
        # s = 0.008 offset keeps beta_0 from being vanishingly small (iDDPM sec. 3.2)
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> torch.Tensor:
    """Training betas, identical (float32) to the diffusers schedulers' constructors.

    Args:
        num_train_timesteps (`int`, defaults to 1000): number of training timesteps ``T``.
        beta_start (`float`, defaults to 0.00085): first beta (ignored by ``"squaredcos_cap_v2"``).
        beta_end (`float`, defaults to 0.012): last beta (ignored by ``"squaredcos_cap_v2"``).
        beta_schedule (`str`, defaults to ``"scaled_linear"``):
            ``"linear"`` (DDPM), ``"scaled_linear"`` (latent diffusion: linear in sqrt(beta), then squared) or
            ``"squaredcos_cap_v2"`` (iDDPM cosine, max beta 0.999).

    Returns:
        `torch.Tensor`: float32 betas of shape ``[T]``.
    """
    num_train_timesteps = _check_int_range("num_train_timesteps", num_train_timesteps, 1)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # Latent diffusion (Rombach et al. 2022): linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}.")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the terminal SNR is exactly zero.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift
    ``sqrt(abar)`` so its last value is 0, rescale so its first value is unchanged, then undo the
    cumulative product. Same arithmetic as diffusers (results are bit-identical).

    Args:
        betas (`torch.Tensor`): betas of shape ``[T]``.

    Returns:
        `torch.Tensor`: rescaled betas of shape ``[T]`` (``betas[-1] == 1``).
    """
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = sqrt_abar[0].clone()
    last = sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


# --------------------------------------------------------------------------------------
# the schedule object
# --------------------------------------------------------------------------------------

# keys of a diffusers scheduler config that determine the (abar, prediction_type, final alpha) triple
_CONFIG_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
    "set_alpha_to_one",
)


def _broadcast(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a ``[B]`` tensor to ``[B, 1, ..., 1]`` with ``ndim`` dims (0-dim tensors are left alone)."""
    if values.ndim == 1 and ndim > 1:
        return values.reshape(-1, *([1] * (ndim - 1)))
    return values


@dataclass(eq=False)
class NoiseSchedule:
    """A discrete variance-preserving noise schedule plus the network's parameterization.

    Args:
        alphas_cumprod (`torch.Tensor`): float32 ``abar_t`` of shape ``[T]``, t = 0..T-1.
        prediction_type (`str`, defaults to ``"epsilon"``): what the network predicts:
            ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        final_alpha_cumprod (`float`, defaults to 1.0): the ``abar`` used when a step targets a timestep
            below 0 (diffusers' ``set_alpha_to_one``: 1.0 if True, else ``alphas_cumprod[0]``).
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    final_alpha_cumprod: float = 1.0

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)
        abar = torch.as_tensor(self.alphas_cumprod, dtype=torch.float32)
        if abar.ndim != 1 or abar.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}.")
        self.alphas_cumprod = abar
        # Zero terminal SNR (abar_{T-1} = 0, e.g. rescale_betas_zero_snr=True) leaves alpha = 0 at t = T-1,
        # where epsilon prediction cannot recover x0 (x0 = (x - sigma eps) / alpha is inf/NaN). Lin et al.
        # 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.2: use v-prediction.
        if self.prediction_type == "epsilon" and float(abar[-1]) == 0.0:
            raise ValueError(
                "a zero-terminal-SNR schedule (alphas_cumprod[-1] == 0, e.g. rescale_betas_zero_snr=True) needs "
                "prediction_type='v_prediction' (Lin et al. 2024); prediction_type='epsilon' gives "
                "x0 = (x - sigma * eps) / 0 at the last timestep."
            )
        self.final_alpha_cumprod = float(self.final_alpha_cumprod)
        if not (0.0 <= self.final_alpha_cumprod <= 1.0):
            raise ValueError(f"final_alpha_cumprod must be in [0, 1], got {self.final_alpha_cumprod}.")

    # ---- constructors ----------------------------------------------------------------

    @classmethod
    def from_betas(
        cls,
        betas: torch.Tensor,
        prediction_type: str = "epsilon",
        set_alpha_to_one: bool = True,
        rescale_betas_zero_snr: bool = False,
    ) -> "NoiseSchedule":
        """Build from betas ``[T]``: ``abar = cumprod(1 - betas)`` (float32).

        Args:
            betas (`torch.Tensor`): betas of shape ``[T]``.
            prediction_type (`str`, defaults to ``"epsilon"``): see the class docstring.
            set_alpha_to_one (`bool`, defaults to True): final ``abar`` is 1.0, else ``abar[0]``.
            rescale_betas_zero_snr (`bool`, defaults to False): apply :func:`rescale_zero_terminal_snr` first.
        """
        betas = torch.as_tensor(betas, dtype=torch.float32)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if set_alpha_to_one else float(abar[0])
        return cls(abar, prediction_type=prediction_type, final_alpha_cumprod=final)

    @classmethod
    def from_config(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        set_alpha_to_one: bool = True,
    ) -> "NoiseSchedule":
        """Build from diffusers-style scheduler config arguments (same names and defaults as ``LCMScheduler``).

        ``trained_betas`` (if given) overrides ``beta_start/beta_end/beta_schedule``. Unknown keyword
        arguments are rejected (``TypeError``); use :meth:`from_scheduler` to read a full config.
        """
        check_prediction_type(prediction_type)
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float32)
        else:
            betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        return cls.from_betas(
            betas,
            prediction_type=prediction_type,
            set_alpha_to_one=set_alpha_to_one,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    @classmethod
    def from_scheduler(cls, scheduler_or_config: Any) -> "NoiseSchedule":
        """Build from any diffusers scheduler (or its ``config`` / a plain config dict).

        Reads ``num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr, prediction_type, set_alpha_to_one`` and ignores every other key
        (``clip_sample``, ``timestep_spacing``, ...: the samplers and grids take those). Other missing keys
        take :meth:`from_config`'s defaults, but not the betas: diffusers' schedulers default them differently
        (DDIM: linear 1e-4..0.02; LCM: scaled_linear 0.00085..0.012), so a config must name them or give
        ``trained_betas`` (of ``num_train_timesteps`` values, if both are there).
        """
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise ValueError(
                "scheduler_or_config must be a diffusers scheduler, its `config`, or a dict; "
                f"got {type(scheduler_or_config).__name__}."
            )
        check_scheduler_config(config)
        kwargs = {k: config[k] for k in _CONFIG_KEYS if k in config and config[k] is not None}
        return cls.from_config(**kwargs)

    # ---- queries ---------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        """Number of training timesteps ``T`` (valid timesteps are ``0..T-1``)."""
        return int(self.alphas_cumprod.shape[0])

    def _index(self, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}.")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must be in [0, {self.num_train_timesteps - 1}], got min {int(t.min())}, max {int(t.max())}."
            )
        return t

    def alpha_cumprod(self, t: int | torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """``abar_t`` (float32). A ``[B]`` tensor ``t`` gives shape ``[B, 1, ..., 1]`` (``ndim`` dims)."""
        t = self._index(t)
        return _broadcast(self.alphas_cumprod.to(t.device)[t], ndim)

    def alpha_cumprod_prev(self, t_prev: int | torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """``abar`` at a *target* timestep, with ``final_alpha_cumprod`` wherever ``t_prev < 0``.

        This is the DDIM/LCM convention (``scheduling_ddim.py``: "for the final step there is no previous
        alphas_cumprod"). Shapes as in :meth:`alpha_cumprod`.
        """
        t_prev = torch.as_tensor(t_prev)
        if t_prev.is_floating_point():
            raise ValueError(f"timesteps must be integers, got dtype {t_prev.dtype}.")
        t_prev = t_prev.long()
        abar = self.alpha_cumprod(t_prev.clamp(min=0), ndim=1)
        abar = torch.where(t_prev < 0, torch.full_like(abar, self.final_alpha_cumprod), abar)
        return _broadcast(abar, ndim)

    def alpha_sigma(self, t: int | torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t))``, float32.

        Args:
            t (`int` or `torch.LongTensor`): a timestep, or ``[B]`` timesteps.
            ndim (`int`, defaults to 4): for a ``[B]`` input, the result is reshaped to ``[B, 1, ..., 1]``
                with ``ndim`` dimensions so it broadcasts against ``[B, C, H, W]`` latents.
        """
        abar = self.alpha_cumprod(t, ndim=ndim)
        return abar.sqrt(), (1 - abar).sqrt()

    def alpha_sigma_prev(self, t_prev: int | torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar), sqrt(1 - abar))`` at a target timestep, using ``final_alpha_cumprod`` where ``t_prev < 0``."""
        abar = self.alpha_cumprod_prev(t_prev, ndim=ndim)
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (DDPM eq. 4).

        Args:
            x0 (`torch.Tensor`): clean samples ``[B, ...]``.
            noise (`torch.Tensor`): standard normal noise, same shape.
            t (`int` or `torch.LongTensor`): one timestep or ``[B]`` timesteps.
        """
        # local import: parameterization imports nothing from here, keeps one formula source
        from .parameterization import from_x0_eps

        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, device=x0.device), ndim=x0.ndim)
        return from_x0_eps(x0, noise, alpha.to(x0.dtype), sigma.to(x0.dtype))

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy whose ``alphas_cumprod`` lives on ``device``."""
        return NoiseSchedule(self.alphas_cumprod.to(device), self.prediction_type, self.final_alpha_cumprod)


# --------------------------------------------------------------------------------------
# timestep grids (all descending torch.long unless stated otherwise)
# --------------------------------------------------------------------------------------


def _distilled_origin(num_train_timesteps: int, original_inference_steps: int, strength: float) -> np.ndarray:
    """The skipping-step grid the student was distilled on, ``[1..int(N*strength)] * (T//N) - 1`` (ascending).

    LCM (Luo et al. 2023, sec. 4.3) distils on ``N`` = ``original_inference_steps`` evenly skipped
    timesteps; img2img with ``strength`` keeps only its lowest ``int(N * strength)`` entries.
    """
    return ddim_solver_timesteps(num_train_timesteps, original_inference_steps)[
        : int(original_inference_steps * strength)].numpy()


def _pick_evenly(origin_ascending: np.ndarray, num_inference_steps: int, strength: float, steps_name: str) -> torch.Tensor:
    """Take ``num_inference_steps`` entries evenly spaced *in index* from the descending origin grid."""
    if len(origin_ascending) // num_inference_steps < 1:
        raise ValueError(
            f"`num_inference_steps` ({num_inference_steps}) must be <= the {len(origin_ascending)} timesteps left "
            f"by {steps_name} x strength ({strength}); reduce num_inference_steps or raise strength."
        )
    descending = origin_ascending[::-1]
    idx = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(descending[idx].copy()).long()


def lcm_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """LCM inference grid, equal to ``LCMScheduler.set_timesteps(num_inference_steps, original_inference_steps=..., strength=...)``.

    The student was distilled on the skipping-step grid ``[1..N] * (T//N) - 1`` with
    ``N = original_inference_steps``; inference takes ``num_inference_steps`` of those, evenly spaced in
    index, starting from the noisiest. With ``strength < 1`` (img2img, as in
    ``LatentConsistencyModelImg2ImgPipeline``) only the lowest ``int(N * strength)`` grid points are
    candidates.

    Examples (T=1000, N=50): 1 -> [999]; 2 -> [999, 499]; 4 -> [999, 759, 499, 259];
    4 steps at strength 0.8 -> [799, 599, 399, 199].

    Args:
        num_inference_steps (`int`): number of sampling steps, in ``[1, original_inference_steps]``.
        num_train_timesteps (`int`, defaults to 1000): ``T``.
        original_inference_steps (`int`, defaults to 50): ``N``, the distillation grid size, in ``[1, T]``.
        strength (`float`, defaults to 1.0): img2img strength in ``(0, 1]``.

    Returns:
        `torch.LongTensor`: descending timesteps ``[num_inference_steps]``.

    Raises:
        ValueError: for any argument outside its range, or when ``int(N * strength) < num_inference_steps``.
    """
    T = _check_int_range("num_train_timesteps", num_train_timesteps, 1)
    N = _check_int_range("original_inference_steps", original_inference_steps, 1, T)
    n = _check_int_range("num_inference_steps", num_inference_steps, 1)
    strength = _check_strength(strength)
    if n > N:
        raise ValueError(
            f"`num_inference_steps` ({n}) must be <= `original_inference_steps` ({N}): the inference grid is a "
            "subset of the distillation grid."
        )
    origin = _distilled_origin(T, N, strength)
    return _pick_evenly(origin, n, strength, f"original_inference_steps ({N})")


def tcd_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    dense_origin: bool = False,
) -> torch.Tensor:
    """TCD inference grid, equal to ``TCDScheduler.set_timesteps``.

    TCD (Zheng et al. 2024, "Trajectory Consistency Distillation") builds its grid like LCM
    (:func:`lcm_timesteps`) when ``original_inference_steps`` comes from the scheduler *config*
    (``dense_origin=False``, the default). diffusers differs when ``original_inference_steps`` is passed
    *explicitly* to ``set_timesteps``: then the candidates are *all* training timesteps
    ``0..int(T*strength)-1`` and ``original_inference_steps`` only bounds ``num_inference_steps``.
    ``dense_origin=True`` reproduces that call (e.g. 4 steps -> [999, 749, 499, 249] instead of
    [999, 759, 499, 259]).

    Args:
        num_inference_steps (`int`): number of sampling steps, in ``[1, original_inference_steps]``.
        num_train_timesteps (`int`, defaults to 1000): ``T``.
        original_inference_steps (`int`, defaults to 50): ``N``.
        strength (`float`, defaults to 1.0): img2img strength in ``(0, 1]``.
        dense_origin (`bool`, defaults to False): use all training timesteps as candidates (see above).

    Returns:
        `torch.LongTensor`: descending timesteps ``[num_inference_steps]``.
    """
    T = _check_int_range("num_train_timesteps", num_train_timesteps, 1)
    n = _check_int_range("num_inference_steps", num_inference_steps, 1)
    strength = _check_strength(strength)
    if dense_origin:
        N = _check_int_range("original_inference_steps", original_inference_steps, 1)
        origin = np.arange(0, int(T * strength))
        steps_name = f"num_train_timesteps ({T})"
    else:
        N = _check_int_range("original_inference_steps", original_inference_steps, 1, T)
        origin = _distilled_origin(T, N, strength)
        steps_name = f"original_inference_steps ({N})"
    if n > N:
        raise ValueError(
            f"`num_inference_steps` ({n}) must be <= `original_inference_steps` ({N}): the inference grid is a "
            "subset of the distillation grid."
        )
    return _pick_evenly(origin, n, strength, steps_name)


def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """DDIM grid, equal to ``DDIMScheduler.set_timesteps`` with the same config.

    Spacings (Lin et al. 2024, Table 2): ``"leading"``: ``arange(n) * (T//n) + steps_offset`` (SD uses
    ``steps_offset=1``, giving 981..1 for 50 steps); ``"trailing"``: ``round(arange(T, 0, -T/n)) - 1``
    (always starts at T-1); ``"linspace"``: ``round(linspace(0, T-1, n))``. ``steps_offset`` is only used
    by ``"leading"``, as in diffusers.

    Args:
        num_inference_steps (`int`): number of steps, in ``[1, T]``.
        num_train_timesteps (`int`, defaults to 1000): ``T``.
        timestep_spacing (`str`, defaults to ``"leading"``): one of :data:`TIMESTEP_SPACINGS`.
        steps_offset (`int`, defaults to 0): offset added to the ``"leading"`` grid.

    Returns:
        `torch.LongTensor`: descending timesteps (``[num_inference_steps]``).
    """
    T = _check_int_range("num_train_timesteps", num_train_timesteps, 1)
    n = _check_int_range("num_inference_steps", num_inference_steps, 1, T)
    steps_offset = _check_int_range("steps_offset", steps_offset, 0)
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}.")
    if int(ts.max()) >= T:
        raise ValueError(
            f"{n} {timestep_spacing} DDIM steps with steps_offset {steps_offset} reach timestep {int(ts.max())}, past "
            f"num_train_timesteps - 1 ({T - 1}): use fewer steps"
        )
    return torch.from_numpy(ts).long()


def img2img_timesteps(timesteps: torch.Tensor | Sequence[int], strength: float) -> torch.Tensor:
    """Keep the last ``min(int(n * strength), n)`` of ``n`` grid points (``StableDiffusionImg2ImgPipeline.get_timesteps``).

    For DDIM-style img2img the full grid is built first, then the noisiest steps are dropped. (LCM/TCD
    img2img instead pass ``strength`` to :func:`lcm_timesteps` / :func:`tcd_timesteps`.)

    Args:
        timesteps (`torch.LongTensor`): a descending grid ``[n]``.
        strength (`float`): in ``(0, 1]``; must keep at least one step.

    Returns:
        `torch.LongTensor`: the trailing ``min(int(n * strength), n)`` timesteps.
    """
    timesteps = torch.as_tensor(timesteps).long()
    strength = _check_strength(strength)
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep < 1:
        raise ValueError(
            f"`strength` ({strength}) keeps no step of a {n}-step grid; use strength >= {1.0 / n:.4g} or more steps."
        )
    return timesteps[n - keep:].clone()


def ddim_solver_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """The LCD teacher's skipping-step grid ``[1..N] * k - 1`` with ``k = T // N`` (ascending).

    LCM / LCD (Luo et al. 2023, sec. 4.3 "skipping-step"; diffusers ``train_lcd_*.py`` ``DDIMSolver``):
    for T=1000, N=50 this is [19, 39, ..., 999].

    Returns:
        `torch.LongTensor`: ascending timesteps ``[N]``.
    """
    T = _check_int_range("num_train_timesteps", num_train_timesteps, 1)
    N = _check_int_range("num_ddim_timesteps", num_ddim_timesteps, 1, T)
    return torch.arange(1, N + 1, dtype=torch.long) * (T // N) - 1


def previous_solver_timestep(t: torch.Tensor | int, k: int) -> torch.Tensor:
    """The teacher solver's target timestep ``max(t - k, 0)`` for skipping step ``k`` (LCM sec. 4.3)."""
    k = _check_int_range("k", k, 1)
    return (torch.as_tensor(t).long() - k).clamp(min=0)


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """EDM sigmas (Karras et al. 2022, eq. 5), descending from ``sigma_max`` to ``sigma_min``.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, i = 0..n-1.
    No trailing zero is appended (k-diffusion's ``get_sigmas_karras`` appends one). ``n=1`` gives
    ``[sigma_max]``.

    Returns:
        `torch.Tensor`: ``[n]`` sigmas (computed in float64, returned as ``dtype``).
    """
    n = _check_int_range("n", n, 1)
    _check_sigmas(sigma_min, sigma_max, rho)
    if n == 1:
        return torch.tensor([sigma_max], dtype=dtype)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(dtype)


def ct_sigmas(
    N: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Consistency-training discretization ``sigma_1 < ... < sigma_N`` (Song et al. 2023 / iCT, Song & Dhariwal 2023).

    ``sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, i = 1..N
    (ascending; the Karras grid reversed).

    Returns:
        `torch.Tensor`: ``[N]`` ascending sigmas (``N >= 2``).
    """
    N = _check_int_range("N", N, 2)
    _check_sigmas(sigma_min, sigma_max, rho)
    ramp = torch.linspace(0, 1, N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((lo + ramp * (hi - lo)) ** rho).to(dtype)


def _check_sigmas(sigma_min: float, sigma_max: float, rho: float) -> None:
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    if rho <= 0:
        raise ValueError(f"`rho` must be > 0, got {rho}.")
