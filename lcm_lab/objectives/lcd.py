"""LCD: latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1).

One training step, for a batch of clean latents ``z`` with text conditioning ``c``:

1. draw a solver index ``n`` per sample on the skipping-step grid ``[k-1, 2k-1, ..., N k - 1]``
   (``k = T // N``, N = 50 DDIM steps; the grid ends at ``T-1`` only when N divides T) and set
   ``t = t_{n+k}``, ``s = t_n = max(t - k, 0)``;
2. noise ``x_t = alpha_t z + sigma_t eps`` (DDPM eq. 4);
3. draw ``w ~ U[w_min, w_max]`` per sample (LCM-form guidance, i.e. the diffusers scale minus 1);
4. teacher, cond and uncond in ONE batched forward, guided in LCM form
   ``x0 = x0_c + w (x0_c - x0_u)``, ``eps = eps_c + w (eps_c - eps_u)``, and one DDIM step to
   ``x_s = alpha_s x0 + sigma_s eps`` (LCM eq. 8 with the DDIM solver);
5. target ``f_{theta^-}(x_s, s, w, c)`` without gradient, from the EMA target network;
6. loss ``d(f_theta(x_t, t, w, c), target)``, ``d`` = l2 or the elementwise pseudo-Huber of the diffusers
   LCD scripts (``train_lcm_distill_*_wds.py``; unlike iCT's, which is taken on each sample's l2 norm).

``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)`` uses :func:`lcm_boundary_scalings` and
:func:`to_x0` from the core: the same functions the LCM sampler and the exported LCMScheduler use.

The reference script (diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``)
runs the teacher's cond and uncond passes as two forwards of batch B; here they are one forward of
batch 2B (the uncond embedding is computed once, as there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.parameterization import (
    consistency_output,
    guidance_scale_embedding,
    lcm_boundary_scalings,
    to_eps,
    to_x0,
)
from ..core.conditioning import Conditioning
from ..core.sampling import ddim_step
from ..core.schedules import NoiseSchedule, ddim_solver_timesteps, previous_solver_timestep

__all__ = ["LCDConfig", "LCDLoss", "consistency_loss"]

LOSS_TYPES = ("l2", "huber")

# added_cond_kwargs that describe the sample, not the prompt (SDXL size/crop micro-conditioning): the
# unconditional branch may share them with the conditional one.
_PER_SAMPLE_ADDED_KEYS = ("time_ids",)


@dataclass
class LCDConfig:
    """Hyper-parameters of the LCD objective (defaults: the SD recipe of diffusers' README commands,
    LCM-LoRA report, Luo et al. 2023: pseudo-Huber loss, where the script's own ``--loss_type`` default is l2)."""

    num_ddim_timesteps: int = field(default=50, metadata={"help": "N: teacher DDIM solver steps (skip k = T // N)."})
    w_min: float = field(default=5.0, metadata={"help": "Lowest guidance w (LCM form = diffusers scale - 1)."})
    w_max: float = field(default=15.0, metadata={"help": "Highest guidance w (LCM form)."})
    loss_type: str = field(default="huber", metadata={"help": "'l2' or 'huber' (pseudo-Huber)."})
    huber_c: float = field(default=0.001, metadata={"help": "Pseudo-Huber constant c."})
    timestep_scaling: float = field(default=10.0, metadata={"help": "Boundary scalings use s = scaling * t."})
    target_ema_decay: float = field(default=0.95, metadata={"help": "EMA decay of the target network theta^-."})

    def __post_init__(self) -> None:
        if self.num_ddim_timesteps < 1:
            raise ValueError(f"num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}")
        _check_loss_type(self.loss_type)
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if self.huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        if not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if not 0 <= self.target_ema_decay < 1:
            raise ValueError(f"target_ema_decay must be in [0, 1), got {self.target_ema_decay}")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber",
                     huber_c: float = 0.001) -> torch.Tensor:
    """Mean l2 (``(a-b)^2``) or elementwise pseudo-Huber (``sqrt((a-b)^2 + c^2) - c``) distance, as the
    diffusers LCD scripts compute it (iCT instead takes pseudo-Huber of each sample's l2 norm)."""
    pred, target = pred.float(), target.float()
    _check_loss_type(loss_type)
    if loss_type == "l2":
        return F.mse_loss(pred, target)
    return (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c).mean()


def _unet(net, x, t, cond: Conditioning, timestep_cond=None):
    return net(x, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond,
               added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]


class LCDLoss:
    """The LCD loss as a callable: ``loss, logs = LCDLoss(...)(student, target, latents, cond, generator)``.

    Args:
        config: :class:`LCDConfig`.
        teacher: the frozen teacher UNet (any dtype; outputs are taken to float32).
        schedule: the teacher's :class:`NoiseSchedule` (its ``prediction_type`` covers eps and v teachers).
        uncond: the unconditional :class:`Conditioning`, batch 1 (SD: the embedding of ``""``;
            SDXL: zero prompt and pooled embeddings, as in the reference script). Of the added-cond keys it
            lacks, only per-sample micro-conditioning (``time_ids``) is taken from the conditional batch;
            lacking any other (e.g. ``text_embeds``) is an error.
        w_embedding_dim: ``time_cond_proj_dim`` of a w-conditioned student, or ``None`` for a student
            without w-embedding (LCM-LoRA: guidance is distilled in, not an input).
    """

    def __init__(self, config: LCDConfig, teacher: torch.nn.Module, schedule: NoiseSchedule,
                 uncond: Conditioning, w_embedding_dim: int | None = 256) -> None:
        self.config = config
        self.teacher = teacher
        self.schedule = schedule
        self.uncond = uncond
        self.w_embedding_dim = w_embedding_dim
        T = schedule.num_train_timesteps
        self.solver_timesteps = ddim_solver_timesteps(T, config.num_ddim_timesteps)
        self.k = T // config.num_ddim_timesteps

    def f(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
          w_emb: torch.Tensor | None) -> torch.Tensor:
        """The consistency function ``c_skip(t) x_t + c_out(t) x0_hat(net(x_t, t))`` in float32."""
        # sigma_data stays at the core's 0.5 and is no config entry: the exported LCMScheduler (like every
        # diffusers LCM pipeline) fixes it at 0.5, so a student trained with another value would be sampled
        # with boundary scalings it was not trained for.
        c_skip, c_out = lcm_boundary_scalings(t.view(-1, 1, 1, 1), self.config.timestep_scaling)
        alpha, sigma = self.schedule.alpha_sigma(t)
        out = _unet(net, x_t, t, cond, None if w_emb is None else w_emb.to(x_t.dtype)).float()
        x0 = to_x0(out, x_t.float(), alpha, sigma, self.schedule.prediction_type)
        return consistency_output(x_t.float(), x0, c_skip.to(x0.device), c_out.to(x0.device))

    def uncond_for(self, cond: Conditioning) -> Conditioning:
        """The unconditional batch matching ``cond``: per-sample micro-conditioning absent from ``uncond``
        (SDXL ``time_ids``) is taken from ``cond``, as the reference SDXL script does. Any other added key
        of ``cond`` missing from ``uncond`` raises: copying e.g. the pooled ``text_embeds`` would make the
        unconditional branch conditional."""
        uncond = self.uncond.expand(len(cond))
        if cond.added_cond_kwargs is None:
            return uncond
        added = dict(uncond.added_cond_kwargs or {})
        for key, value in cond.added_cond_kwargs.items():
            if key in added:
                continue
            if key not in _PER_SAMPLE_ADDED_KEYS:
                raise ValueError(f"the unconditional Conditioning lacks added_cond_kwargs[{key!r}]; only "
                                 f"{_PER_SAMPLE_ADDED_KEYS} may be taken from the conditional batch")
            added[key] = value
        return Conditioning(uncond.encoder_hidden_states, added)

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning,
                     w: torch.Tensor) -> torch.Tensor:
        """One guided DDIM step of the teacher from ``t`` to ``s`` (cond and uncond in one forward)."""
        dtype = next(self.teacher.parameters()).dtype
        both = Conditioning.cat(cond, self.uncond_for(cond)).to(dtype=dtype)
        out = _unet(self.teacher, torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), both).float()
        alpha, sigma = self.schedule.alpha_sigma(torch.cat([t, t]))
        x2 = torch.cat([x_t, x_t]).float()
        x0_c, x0_u = to_x0(out, x2, alpha, sigma, self.schedule.prediction_type).chunk(2)
        eps_c, eps_u = to_eps(out, x2, alpha, sigma, self.schedule.prediction_type).chunk(2)
        w = w.view(-1, 1, 1, 1)
        # LCM-form CFG (LCM eq. 9) in the reference script's arithmetic; cfg_combine(u, c, 1 + w) equals it up to
        # float rounding, which would shift the recorded demo figures in their last digit.
        x0 = x0_c + w * (x0_c - x0_u)
        eps = eps_c + w * (eps_c - eps_u)
        alpha_s, sigma_s = self.schedule.alpha_sigma(s)
        return ddim_step(x0, eps, alpha_s, sigma_s)  # eta = 0

    def sample_inputs(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        """Draw ``(t, s, noise, w)`` for a batch: the only randomness of a step."""
        b, device = latents.shape[0], latents.device
        cfg = self.config
        idx = torch.randint(0, len(self.solver_timesteps), (b,), generator=generator)
        t = self.solver_timesteps[idx].to(device)
        s = previous_solver_timestep(t, self.k)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand((b,), generator=generator)).to(device)
        return t, s, noise, w

    def __call__(self, student: torch.nn.Module, target: torch.nn.Module, latents: torch.Tensor,
                 cond: Conditioning, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """LCD loss of ``student`` on clean (scaled) ``latents``; ``target`` is theta^- (may be ``student``)."""
        t, s, noise, w = self.sample_inputs(latents, generator)
        latents = latents.float()
        x_t = self.schedule.add_noise(latents, noise, t)
        w_emb = None
        if self.w_embedding_dim is not None:
            w_emb = guidance_scale_embedding(w, self.w_embedding_dim).to(latents.device)
        x_s = self.teacher_step(x_t, t, s, cond, w)
        with torch.no_grad():
            target_out = self.f(target, x_s, s, cond, w_emb)
        pred = self.f(student, x_t, t, cond, w_emb)
        loss = consistency_loss(pred, target_out, self.config.loss_type, self.config.huber_c)
        # pred keeps its graph (reward-guided objectives differentiate a reward of it); the target
        # f_{theta^-}(x_s, s) is what RG-LCD's proxy update reuses without another forward.
        return loss, {"loss": loss.detach(), "pred": pred, "t": t, "w": w, "target": target_out}
