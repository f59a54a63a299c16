"""One LCD training step: lcm_lab vs the formulation of diffusers' reference script, same models and batch.

    python benchmarks/lcd_step_speed.py --scale toy  --batch-size 64 --steps 10 --warmup 2 --rounds 2 --out outputs/lcd_step_speed_toy.json
    python benchmarks/lcd_step_speed.py --scale sd15 --batch-size 1 --latent-size 8 --steps 5 --warmup 1 --out outputs/lcd_step_speed_sd15.json

A step is everything between two batches: LCD loss (teacher, target and student forwards), backward,
gradient clipping (max norm 1.0), optimizer step, target EMA update (decay 0.95). The two variants:

* **ours** (lcm_lab, as its trainer sets it up): conv weights laid out by
  :func:`lcm_lab.training.trainer.apply_channels_last` (``LoopConfig.channels_last``, default ``"frozen"``:
  teacher and EMA target channels-last, the trained student NCHW);
  :class:`lcm_lab.objectives.lcd.LCDLoss` (teacher cond + uncond in ONE forward of batch 2B; the
  unconditional embedding of ``""`` computed once, outside the step); the trainer's ``_optimizer`` (fused
  AdamW); ``clip_grad_norm_``; :meth:`lcm_lab.training.ema.EMA.update` (one ``torch._foreach_lerp_``).
* **reference**: the step of diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``
  as a plain function written here from that script's steps, all weights in the default
  (NCHW) layout as in that script: student forward first, then the teacher twice under ``no_grad`` (cond
  batch B, uncond batch B), x0/eps from the eps-prediction, LCM-form CFG, DDIM step from a solver table,
  target forward at ``s``, pseudo-Huber loss, backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` with
  torch's defaults (no ``fused``/``foreach`` flag: the per-tensor loop on CPU, ``foreach`` on CUDA), and
  the EMA as a Python loop ``targ.detach().mul_(decay).add_(src, alpha=1 - decay)``. Like the diffusers
  script, it encodes ``[""] * B`` once before the loop (``--reference-uncond once``, the default);
  ``per-step`` re-encodes it every step, a cost the script does not pay (kept only to show its size).

Not part of either step (the same for both, so left out): data loading and VAE encoding (fixed latents,
NCHW, are reused), the conditional text encoding (fixed embeddings are reused), the LR scheduler
(constant LR: a warm-up would make the first step's LR 0), logging, ``autocast`` (everything float32).
The random draws (solver index, noise, w) follow :meth:`LCDLoss.sample_inputs` and come from a generator
seeded per step (``seed + 1000 + i``), identical for both variants.

Measurements:

* speed and memory, from subprocesses only: ``--rounds`` rounds (default 2) of [ours, reference], the
  order alternating each round. Each subprocess builds its own models from the same seeds, applies its
  variant's setup, runs ``--warmup`` untimed then ``--steps`` timed steps, and reports every step's
  seconds and its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, models included). Per
  variant: s/step = median over all timed steps of all its rounds; speed-up = reference / ours, also per
  round (the spread between rounds is the machine's noise between processes); peak RSS = max over its
  subprocesses. The parent holds no models while they run;
* phases (``--no-phases`` to skip): median seconds of forward / uncond encoding / backward / clipping /
  AdamW / EMA during the timed steps (on CUDA the phase marks synchronize);
* correctness (in this process, by default only at ``--scale toy``): two copies of the same weights, one
  per variant (ours laid out as its trainer does, reference NCHW); one step of each from that identical state with
  identical draws; the max abs difference of the students' (and targets') parameters afterwards, the
  max abs update as a scale, and the clipped gradients the two optimizers received. See
  :func:`check_one_step` for why a few weights can differ by more than float rounding.

SD1.5 scale: each subprocess needs about 21 GiB of RAM (20.8 GiB ours, 21.1 GiB reference peak RSS at
batch 1, 8x8 latents, measured before ours used channels-last); they run one after the other. The
correctness check holds two training states (~40 GB), so it is off there unless ``--check``.

Scales: ``toy`` (the embedded toy teacher, ``lcm_lab.models.sd.load_ldm()``, 8x8 latents) and ``sd15``
(SD1.5-architecture UNet, 860M parameters, random weights, built in memory like
``lcm_lab.eval.bench.build_random_pipeline(preset="sd15")``: same UNet config, a 2-layer 768-wide CLIP
text encoder with SD's 77-token context). ``--pipeline DIR`` uses any local diffusers SD folder instead.
The student is ``make_w_student(teacher, 256)`` in both cases.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from lcm_lab.files import atomic_write_text  # noqa: E402
from lcm_lab.core.schedules import NoiseSchedule  # noqa: E402
from lcm_lab.models.sd import encode_prompts, load_ldm  # noqa: E402
from lcm_lab.models.student import make_w_student  # noqa: E402
from lcm_lab.core.conditioning import Conditioning  # noqa: E402
from lcm_lab.objectives.lcd import LCDConfig, LCDLoss  # noqa: E402
from lcm_lab.training.ema import EMA  # noqa: E402
from lcm_lab.training.trainer import LoopConfig, _optimizer, apply_channels_last  # noqa: E402

SCALES = ("toy", "sd15")
VARIANTS = ("ours", "reference")
RESULT_MARKER = "LCD_STEP_RESULT "
W_EMBEDDING_DIM = 256  # time_cond_proj_dim of the SD-LCM student (diffusers' LCD script)
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a red circle on the left, dark background",
    "a bowl of fruit on a wooden table, studio lighting",
)


# ----------------------------------------------------------------------------- models and batch


@dataclass
class Setup:
    """Teacher, text encoder, student and target of one benchmark, plus the fixed batch."""

    scale: str
    teacher: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    schedule: NoiseSchedule
    student: torch.nn.Module
    target: torch.nn.Module
    latents: torch.Tensor
    cond: torch.Tensor  # [B, L, D] text embeddings of the batch's prompts
    device: torch.device
    objective: LCDConfig = field(default_factory=LCDConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(report_to="none", progress=False))

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def latent_size(self) -> int:
        return self.latents.shape[-1]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.student.parameters())

    def copy(self) -> Setup:
        """Independent copies of the teacher, student and target (same weights); the frozen text encoder,
        tokenizer and batch are shared."""
        return dataclasses.replace(self, teacher=copy.deepcopy(self.teacher), student=copy.deepcopy(self.student),
                                   target=copy.deepcopy(self.target))


def _build_sd15(latent_size: int, seed: int):
    """SD1.5-architecture UNet (random weights) and a 2-layer 768-wide CLIP text encoder, in memory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lcm_lab.eval.bench import SD15_UNET_CONFIG, SD_SCHEDULER_CONFIG
    from lcm_lab.toy.tokenizer import write_clip_tokenizer

    text_config = CLIPTextConfig(hidden_size=SD15_UNET_CONFIG["cross_attention_dim"], num_hidden_layers=2,
                                 intermediate_size=3072, num_attention_heads=12, vocab_size=49408,
                                 max_position_embeddings=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": latent_size})
        text_encoder = CLIPTextModel(text_config)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_dir, model_max_length=77))
    return unet, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG)


def build_setup(scale: str = "toy", batch_size: int = 64, latent_size: int | None = None, seed: int = 0,
                device: str | torch.device = "cpu", pipeline: str | os.PathLike | None = None) -> Setup:
    """Build the models and the fixed batch of one benchmark (deterministic for ``seed``).

    Args:
        scale: ``"toy"`` (embedded toy teacher, native 8x8 latents) or ``"sd15"`` (SD1.5-architecture
            UNet with random weights, ``latent_size`` default 16).
        pipeline: a local diffusers SD folder to load instead (``scale`` is then only a label).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    device = torch.device(device)
    if pipeline is not None or scale == "toy":
        ldm = load_ldm(pipeline, device=device)
        teacher, text_encoder, tokenizer, scheduler_config = ldm.unet, ldm.text_encoder, ldm.tokenizer, ldm.scheduler_config
        native = ldm.latent_shape[-1]
    else:
        native = 16
        teacher, text_encoder, tokenizer, scheduler_config = _build_sd15(latent_size or native, seed)
    for net in (teacher, text_encoder):
        net.to(device).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_scheduler(scheduler_config).to(device)
    if schedule.prediction_type != "epsilon":
        raise ValueError("the reference formulation here covers eps-prediction teachers only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # the fresh cond_proj of the student
        student = make_w_student(teacher, W_EMBEDDING_DIM)
    target = copy.deepcopy(student).requires_grad_(False)
    size = latent_size or native
    g = torch.Generator().manual_seed(seed + 2)
    latents = torch.randn((batch_size, teacher.config.in_channels, size, size), generator=g).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    cond = encode_prompts(tokenizer, text_encoder, prompts, truncate=True)
    return Setup(scale, teacher, text_encoder, tokenizer, scheduler_config, schedule, student, target, latents, cond,
                 device)




# ----------------------------------------------------------------------------- the two steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _NoTimer:
    """Phase marks that cost nothing (steps run untimed)."""

    def mark(self, name: str) -> None:
        return None


class PhaseTimer:
    """Seconds spent in each phase of a step (``mark(name)`` closes the phase that just ran)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {}  # phase -> one value per finished step

    def start(self) -> None:
        self.current: dict[str, float] = {}
        _sync(self.device)
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.current[name] = self.current.get(name, 0.0) + now - self.t
        self.t = now

    def finish(self) -> None:
        for name, s in self.current.items():
            self.seconds.setdefault(name, []).append(s)


class OursStep:
    """lcm_lab's step, set up like its trainer: memory layout per ``LoopConfig.channels_last``,
    :class:`LCDLoss`, the trainer's fused AdamW, ``clip_grad_norm_``, :meth:`EMA.update`.
    Converts ``setup``'s teacher, student and target in place."""

    name = "ours"

    def __init__(self, setup: Setup) -> None:
        self.s = setup
        apply_channels_last(setup.loop.channels_last, setup.student, setup.teacher, setup.target)
        uncond = Conditioning(encode_prompts(setup.tokenizer, setup.text_encoder, [""], allow_empty=True))
        self.loss_fn = LCDLoss(setup.objective, setup.teacher, setup.schedule, uncond, W_EMBEDDING_DIM)
        self.cond = Conditioning(setup.cond)
        self.params = [p for p in setup.student.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.params, setup.loop, setup.device)
        self.ema = EMA(setup.student, setup.objective.target_ema_decay, setup.target)
        self.timer = _NoTimer()

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        s, tm = self.s, self.timer
        loss, _ = self.loss_fn(s.student, self.ema.model, s.latents, self.cond, generator)
        tm.mark("forward (teacher, target, student, loss)")
        loss.backward()
        tm.mark("backward")
        if s.loop.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, s.loop.max_grad_norm)
        tm.mark("clip_grad_norm_")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tm.mark("AdamW step")
        self.ema.update()
        tm.mark("target EMA")
        return loss.detach()


class ReferenceStep:
    """The step of diffusers' ``train_lcm_distill_sd_wds.py`` (full model, eps teacher), as plain torch.

    Written from the script's steps, independent of lcm_lab's LCD code: the
    noise schedule is diffusers' ``DDPMScheduler`` (``add_noise``, ``alphas_cumprod``); the DDIM solver,
    boundary scalings, w-embedding, CFG and loss are spelled out below.
    """

    name = "reference"

    def __init__(self, setup: Setup, uncond: str = "once") -> None:
        from diffusers import DDPMScheduler

        if uncond not in ("per-step", "once"):
            raise ValueError(f"uncond must be 'per-step' or 'once', got {uncond!r}")
        self.s = setup
        cfg = setup.objective
        self.noise_scheduler = DDPMScheduler.from_config(setup.scheduler_config)
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ValueError("reference step: eps-prediction teachers only")
        dev = setup.device
        abar = self.noise_scheduler.alphas_cumprod.float()
        self.alpha_schedule = abar.sqrt().to(dev)
        self.sigma_schedule = (1 - abar).sqrt().to(dev)
        T = abar.shape[0]
        self.topk = T // cfg.num_ddim_timesteps
        # DDIM solver on the skipping-step grid [k-1, 2k-1, ..., T-1]; "previous" of index i is the
        # grid point below it, abar[0] for the first.
        ddim_t = torch.arange(1, cfg.num_ddim_timesteps + 1) * self.topk - 1
        abar_prev = torch.cat([abar[:1], abar[ddim_t[:-1]]])
        self.ddim_timesteps = ddim_t.long().to(dev)
        self.ddim_alpha_prev = abar_prev.sqrt().to(dev)
        self.ddim_sigma_prev = (1 - abar_prev).sqrt().to(dev)
        self.uncond_mode = uncond
        self.uncond_once = self._encode_uncond() if uncond == "once" else None
        lc = setup.loop
        self.optimizer = torch.optim.AdamW(setup.student.parameters(), lr=lc.learning_rate,
                                           betas=(lc.adam_beta1, lc.adam_beta2),
                                           weight_decay=lc.adam_weight_decay, eps=lc.adam_epsilon)
        self.timer = _NoTimer()

    @torch.no_grad()
    def _encode_uncond(self) -> torch.Tensor:
        s = self.s
        ids = s.tokenizer([""] * s.batch_size, return_tensors="pt", padding="max_length",
                          max_length=s.tokenizer.model_max_length).input_ids.to(s.device)
        return s.text_encoder(ids)[0]

    def _scalings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.s.objective
        scaled = cfg.timestep_scaling * t
        sigma_data = 0.5  # the script's scalings_for_boundary_conditions default
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)

    def _x0(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha_schedule[t].view(-1, 1, 1, 1)
        sigma = self.sigma_schedule[t].view(-1, 1, 1, 1)
        return (x - sigma * eps) / alpha

    @staticmethod
    def _w_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
        half = dim // 2
        step = torch.log(torch.tensor(10000.0)) / (half - 1)
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
        args = (w * 1000.0).float()[:, None] * freqs[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        s, cfg, dev, tm = self.s, self.s.objective, self.s.device, self.timer
        latents, prompt_embeds = s.latents, s.cond
        bsz = latents.shape[0]
        # 1. solver index, t_{n+k} and t_n
        index = torch.randint(0, cfg.num_ddim_timesteps, (bsz,), generator=generator).to(dev)
        start_timesteps = self.ddim_timesteps[index]
        timesteps = start_timesteps - self.topk
        timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
        c_skip_start, c_out_start = self._scalings(start_timesteps)
        c_skip, c_out = self._scalings(timesteps)
        # 2. noise, guidance scale and its embedding
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, start_timesteps)
        w = (cfg.w_max - cfg.w_min) * torch.rand((bsz,), generator=generator) + cfg.w_min
        w_embedding = self._w_embedding(w, W_EMBEDDING_DIM).to(dev)
        w = w.reshape(bsz, 1, 1, 1).to(dev)
        tm.mark("forward (teacher, target, student, loss)")
        uncond_embeds = self._encode_uncond() if self.uncond_once is None else self.uncond_once
        tm.mark("uncond text encoding")
        # 3. online student prediction at t_{n+k}
        noise_pred = s.student(noisy, start_timesteps, timestep_cond=w_embedding,
                               encoder_hidden_states=prompt_embeds).sample
        model_pred = c_skip_start * noisy + c_out_start * self._x0(noise_pred, start_timesteps, noisy)
        with torch.no_grad():
            # 4. teacher, cond and uncond as two separate forwards; LCM-form CFG; DDIM step
            cond_out = s.teacher(noisy, start_timesteps, encoder_hidden_states=prompt_embeds).sample
            cond_x0 = self._x0(cond_out, start_timesteps, noisy)
            cond_eps = cond_out
            uncond_out = s.teacher(noisy, start_timesteps, encoder_hidden_states=uncond_embeds).sample
            uncond_x0 = self._x0(uncond_out, start_timesteps, noisy)
            uncond_eps = uncond_out
            pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
            pred_eps = cond_eps + w * (cond_eps - uncond_eps)
            x_prev = (self.ddim_alpha_prev[index].view(-1, 1, 1, 1) * pred_x0
                      + self.ddim_sigma_prev[index].view(-1, 1, 1, 1) * pred_eps)
            # 5. target network at t_n
            target_out = s.target(x_prev.float(), timesteps, timestep_cond=w_embedding,
                                  encoder_hidden_states=prompt_embeds.float()).sample
            target = c_skip * x_prev + c_out * self._x0(target_out, timesteps, x_prev)
        # 6. loss, backward, clip, AdamW
        if cfg.loss_type == "l2":
            loss = torch.nn.functional.mse_loss(model_pred.float(), target.float())
        else:
            loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + cfg.huber_c**2) - cfg.huber_c)
        tm.mark("forward (teacher, target, student, loss)")
        loss.backward()
        tm.mark("backward")
        if s.loop.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(s.student.parameters(), s.loop.max_grad_norm)
        tm.mark("clip_grad_norm_")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tm.mark("AdamW step")
        # 7. EMA of the target, one parameter at a time
        decay = cfg.target_ema_decay
        with torch.no_grad():
            for targ, src in zip(s.target.parameters(), s.student.parameters()):
                targ.detach().mul_(decay).add_(src, alpha=1 - decay)
        tm.mark("target EMA")
        return loss.detach()


def make_step(setup: Setup, variant: str, reference_uncond: str = "once") -> OursStep | ReferenceStep:
    """The step of ``variant`` on ``setup`` (``"ours"`` lays out the setup's nets as its trainer does)."""
    if variant == "ours":
        return OursStep(setup)
    if variant == "reference":
        return ReferenceStep(setup, reference_uncond)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def make_pair(scale: str = "toy", batch_size: int = 4, latent_size: int | None = None, seed: int = 0,
              device: str | torch.device = "cpu", pipeline: str | os.PathLike | None = None,
              reference_uncond: str = "once") -> tuple[OursStep, ReferenceStep]:
    """Both variants, each on its own copy of the same freshly built weights (two training states)."""
    setup = build_setup(scale, batch_size, latent_size, seed, device, pipeline)
    return OursStep(setup.copy()), ReferenceStep(setup, reference_uncond)


# ----------------------------------------------------------------------------- correctness


@torch.no_grad()
def _compare(a, b, masks=None, threshold: float = 1e-6) -> tuple[float, int]:
    """``(max |a - b|, number of elements differing by more than threshold)`` over two tensor lists,
    optionally only where ``masks`` (a list of bool tensors) is true."""
    worst, above = 0.0, 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        diff = (x - y).abs()
        if masks is not None:
            diff = diff[masks[i]]
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        above += int((diff > threshold).sum())
    return worst, above


def check_one_step(ours: OursStep, ref: ReferenceStep, seed: int = 0, keep_grads: bool = False) -> dict:
    """One step of each variant, on fresh steps from :func:`make_pair` (same weights, no optimizer state),
    with the same draws; compare the results.

    Returns ``max_abs_diff_student`` / ``max_abs_diff_target`` (parameters after the step) with the number
    of elements differing by more than 1e-6, the same maxima over the elements whose (reference) gradient
    is above 1e-6 (``*_grad_gt_1e-6``), ``max_abs_update`` (how far ours moved the student: the scale of
    the comparison), ``max_abs_diff_grad`` / ``max_abs_grad`` (the clipped gradients the optimizers
    received) and both losses; with ``keep_grads`` also ``grads`` = {variant: list of tensors}.

    Why a parameter can differ by much more than float rounding: AdamW's first update is
    ``lr * g / (|g| + eps)``; for a weight whose gradient is within a few hundred ``eps`` (1e-8) a
    rounding-level change of ``g`` (channels-last vs NCHW convolutions, the batched 2B teacher forward vs two B
    forwards, amplified by the pseudo-Huber loss's ``1/c`` = 1000 near zero residual) moves that
    weight's update by up to ``2 * lr``. Measured at toy scale, batch 4: with both variants NCHW the
    gradients are bit-identical and the students 1.5e-8 apart; with all of ours channels-last, 232 of 3.1M
    weights (all with |g| < 2.4e-7) differ by up to 1.4e-4, all others by < 2e-7. The gradients show
    whether the two steps agree.
    """
    grads: dict[str, list[torch.Tensor]] = {}

    def hook(step):
        def keep(optimizer, args, kwargs):
            grads[step.name] = [p.grad.detach().clone() for p in step.s.student.parameters()]  # all trainable
        return keep

    losses = {}
    for step in (ours, ref):
        if step.optimizer.state:
            raise ValueError("check_one_step needs fresh steps (see make_pair)")
        handle = step.optimizer.register_step_pre_hook(hook(step))
        try:
            losses[step.name] = float(step(torch.Generator().manual_seed(seed)))
        finally:
            handle.remove()
        if step is ours:  # the reference's student still holds the initial weights
            update = _compare(ours.s.student.parameters(), ref.s.student.parameters())[0]
    students, targets = [(list(getattr(ours.s, net).parameters()), list(getattr(ref.s, net).parameters()))
                         for net in ("student", "target")]
    diff_student, n_student = _compare(*students)
    diff_target, n_target = _compare(*targets)
    away = [g.abs() > 1e-6 for g in grads["reference"]]
    result = {"max_abs_diff_student": diff_student, "max_abs_diff_target": diff_target,
              "n_student_elements_differ_gt_1e-6": n_student, "n_target_elements_differ_gt_1e-6": n_target,
              "max_abs_diff_student_grad_gt_1e-6": _compare(*students, away)[0],
              "max_abs_diff_target_grad_gt_1e-6": _compare(*targets, away)[0],
              "n_elements": ours.s.num_params(), "max_abs_update": update,
              "max_abs_diff_grad": _compare(grads["ours"], grads["reference"])[0],
              "max_abs_grad": max(float(g.abs().max()) for g in grads["reference"]),
              "loss_ours": losses["ours"], "loss_reference": losses["reference"],
              "abs_diff_loss": abs(losses["ours"] - losses["reference"])}
    if keep_grads:
        result["grads"] = grads
    return result


# ----------------------------------------------------------------------------- timing and memory


def peak_rss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_variant(args) -> dict:
    """Subprocess mode (``--variant``): build, set up ONE variant, warm up, time ``--steps`` steps."""
    t0 = time.perf_counter()
    setup = build_setup(args.scale, args.batch_size, args.latent_size, args.seed, args.device, args.pipeline)
    step = make_step(setup, args.variant, args.reference_uncond)
    build_s, rss_after_build = time.perf_counter() - t0, peak_rss_mib()
    timer = None if args.no_phases else PhaseTimer(setup.device)
    times = []
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        g = torch.Generator().manual_seed(args.seed + 1000 + i)
        step.timer = timer if timer and timed else _NoTimer()
        if step.timer is timer:
            timer.start()
        _sync(setup.device)
        t1 = time.perf_counter()
        step(g)
        _sync(setup.device)
        elapsed = time.perf_counter() - t1
        if timed:
            times.append(elapsed)
            if timer:
                timer.finish()
        if not args.quiet:
            tag = f"step {i - args.warmup + 1}/{args.steps}" if timed else "warmup"
            print(f"  [{args.variant} {tag}] {elapsed:.3f} s", file=sys.stderr, flush=True)
    opt = step.optimizer
    out = {"variant": args.variant, "median_s_per_step": statistics.median(times), "step_seconds": times,
           "peak_rss_mib": peak_rss_mib(), "peak_rss_after_build_mib": rss_after_build, "build_seconds": build_s,
           "phase_seconds": timer.seconds if timer else None, "threads": torch.get_num_threads(),
           "student_params": setup.num_params(), "latent_size": setup.latent_size,
           "channels_last": {net: getattr(setup, net).conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                             for net in ("teacher", "student", "target")},
           "optimizer": type(opt).__name__ + str({k: opt.defaults.get(k) for k in ("fused", "foreach")})}
    if setup.device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(setup.device) / 2**20
    return out


def measure(args, variant: str) -> dict:
    """Run :func:`run_variant` for ``variant`` in a fresh subprocess and parse its result line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--scale", args.scale,
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", str(args.device),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(torch.get_num_threads()),
           "--reference-uncond", args.reference_uncond]
    cmd += ["--latent-size", str(args.latent_size)] if args.latent_size else []
    cmd += ["--pipeline", str(args.pipeline)] if args.pipeline else []
    cmd += ["--no-phases"] if args.no_phases else []
    cmd += ["--quiet"] if args.quiet else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE if args.quiet else None, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"{variant} subprocess failed (exit code {proc.returncode}): {(proc.stderr or '')[-2000:]}")


def round_speed_ups(runs: list[dict]) -> list[float]:
    """Reference / ours median s/step of each round. Their spread shows the machine's noise between
    processes, which on shared 2-core machines is larger than the spread of one process's steps."""
    rounds = sorted({run["round"] for run in runs})
    med = {(run["round"], run["variant"]): run["median_s_per_step"] for run in runs}
    return [med[r, "reference"] / med[r, "ours"] for r in rounds]


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; elsewhere platform's name stays
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import diffusers

    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------- report


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _layout(channels_last: dict[str, bool]) -> str:
    nets = [net for net, cl in channels_last.items() if cl]
    return " + ".join(nets) if nets else "none"


def markdown(result: dict) -> str:
    r, m, st = result["row"], result["machine"], result["settings"]
    load = ", load average " + "/".join(f"{x:.2f}" for x in m["load_average"]) if m.get("load_average") else ""
    lines = [
        f"LCD training step, lcm_lab vs diffusers-script formulation. Machine: {m['cpu']}, {m['cores']} cores "
        f"({m['usable_cores']} usable{load}), torch {m['torch']}, diffusers {m['diffusers']}, "
        f"{m['threads']} threads; device {st['device']}.",
        "",
        "| scale | batch | latent | ours s/step | reference s/step | speed-up | ours peak RSS MiB | "
        "reference peak RSS MiB | max abs dparam after one step (all / where abs grad > 1e-6) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['scale']} | {r['batch_size']} | {r['latent_size']}x{r['latent_size']} | "
        f"{_fmt(r['ours_s_per_step'], '.4g')} | {_fmt(r['reference_s_per_step'], '.4g')} | "
        f"{_fmt(r['speed_up'], '.3f')}x | {_fmt(r['ours_peak_rss_mib'], '.0f')} | "
        f"{_fmt(r['reference_peak_rss_mib'], '.0f')} | {_fmt(r['max_abs_diff_student'], '.2e')} / "
        f"{_fmt(r['max_abs_diff_student_grad_gt_1e-6'], '.2e')} |",
        "",
        "Speed-up of each round (reference / ours median s/step): "
        + ", ".join(f"{x:.3f}x" for x in r["speed_up_per_round"]) + ".",
        "",
        f"Timing: {result['timing_method']}. Memory: {result['memory_method']}. Conv weights channels-last: ours "
        f"{_layout(st['ours_channels_last'])}, reference {_layout(st['reference_channels_last'])}. Optimizer: ours "
        f"{st['ours_optimizer']}, reference {st['reference_optimizer']}. Reference uncond embedding: "
        f"{st['reference_uncond']}. Student {r['student_params'] / 1e6:.1f}M parameters.",
    ]
    if st["warmup"] == 0:
        lines.append("No warm-up: the first timed step also allocates the AdamW state (smoke run only).")
    c = result.get("check")
    if c:
        lines.append(
            f"One step from identical state and draws (separate copies: ours as above, reference NCHW): "
            f"max abs dparam student {c['max_abs_diff_student']:.2e} ({c['n_student_elements_differ_gt_1e-6']} of "
            f"{c['n_elements']} elements differ by > 1e-6; {c['max_abs_diff_student_grad_gt_1e-6']:.2e} where abs "
            f"grad > 1e-6), target {c['max_abs_diff_target']:.2e}; max abs update "
            f"{c['max_abs_update']:.2e}; clipped gradients: max abs diff {c['max_abs_diff_grad']:.2e} of max abs "
            f"{c['max_abs_grad']:.2e}; loss ours {c['loss_ours']:.7g} vs reference {c['loss_reference']:.7g}.")
    ph = result.get("phase_median_seconds")
    if ph:
        names = list(dict.fromkeys(list(ph["reference"]) + list(ph["ours"])))
        lines += ["", "| phase (median s) | ours | reference |", "|---|---|---|"]
        for n in names:
            lines.append(f"| {n} | {_fmt(ph['ours'].get(n), '.4g')} | {_fmt(ph['reference'].get(n), '.4g')} |")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="toy")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (toy), 2 (sd15)")
    parser.add_argument("--latent-size", type=int, default=None, help="default: 8 (toy, native), 16 (sd15)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per subprocess")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per subprocess first")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of [ours, reference] subprocesses, the order alternating each round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--reference-uncond", choices=("per-step", "once"), default="once",
                        help="the reference encodes [''] * B once before the loop (default, as diffusers' "
                             "script) or every step")
    parser.add_argument("--pipeline", default=None, help="local diffusers SD folder instead of the scale's model")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="one-step correctness check in this process (default: only at --scale toy; it holds "
                             "two training states, ~40 GB at SD1.5 scale, which do not fit in 23 GiB)")
    parser.add_argument("--no-phases", action="store_true",
                        help="do not time the phases of each step (on CUDA the phase marks synchronize)")
    parser.add_argument("--quiet", action="store_true", help="no per-step progress on stderr")
    parser.add_argument("--out", default=None, help="JSON result (default outputs/lcd_step_speed_<scale>.json)")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if args.scale == "toy" else 2
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.batch_size < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --rounds >= 1, --batch-size >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant is not None:  # internal: one variant alone in this process
        print(RESULT_MARKER + json.dumps(run_variant(args)), flush=True)
        return None

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    runs = []
    for r in range(args.rounds):  # first, while this process holds no models
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            log(f"round {r + 1}/{args.rounds}: {variant} in a subprocess ...")
            runs.append({"round": r, **measure(args, variant)})
    by_variant = {v: [run for run in runs if run["variant"] == v] for v in VARIANTS}
    times = {v: [t for run in rs for t in run["step_seconds"]] for v, rs in by_variant.items()}
    med = {v: statistics.median(ts) for v, ts in times.items()}
    phases = None if args.no_phases else {
        v: {name: statistics.median(s for run in rs for s in run["phase_seconds"].get(name, []))
            for name in dict.fromkeys(n for run in rs for n in run["phase_seconds"])}
        for v, rs in by_variant.items()}
    check = None
    if args.check or (args.check is None and args.scale == "toy"):
        log("one-step check (two copies of the models in this process) ...")
        ours, ref = make_pair(args.scale, args.batch_size, args.latent_size, args.seed, args.device, args.pipeline,
                              args.reference_uncond)
        check = check_one_step(ours, ref, args.seed)
        del ours, ref
        log(f"  {check}")
    first = {v: rs[0] for v, rs in by_variant.items()}
    row = {
        "scale": args.scale if args.pipeline is None else f"{args.scale} ({args.pipeline})",
        "batch_size": args.batch_size, "latent_size": first["ours"]["latent_size"],
        "student_params": first["ours"]["student_params"],
        "ours_s_per_step": med["ours"], "reference_s_per_step": med["reference"],
        "speed_up": med["reference"] / med["ours"],
        "speed_up_per_round": round_speed_ups(runs),
        "ours_peak_rss_mib": max(run["peak_rss_mib"] for run in by_variant["ours"]),
        "reference_peak_rss_mib": max(run["peak_rss_mib"] for run in by_variant["reference"]),
        "max_abs_diff_student": check["max_abs_diff_student"] if check else None,
        "max_abs_diff_student_grad_gt_1e-6": check["max_abs_diff_student_grad_gt_1e-6"] if check else None,
    }
    loop, objective = LoopConfig(report_to="none", progress=False), LCDConfig()
    result = {
        "row": row, "check": check, "runs": runs, "times": times,
        "min_s_per_step": {v: min(ts) for v, ts in times.items()},
        "phase_median_seconds": phases,
        "machine": machine_info(),
        "settings": {"scale": args.scale, "batch_size": args.batch_size, "latent_size": row["latent_size"],
                     "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed,
                     "device": args.device, "reference_uncond": args.reference_uncond, "pipeline": args.pipeline,
                     "learning_rate": loop.learning_rate, "max_grad_norm": loop.max_grad_norm,
                     "ema_decay": objective.target_ema_decay, "loss": f"{objective.loss_type} (c={objective.huber_c})",
                     "ours_channels_last": first["ours"]["channels_last"],
                     "reference_channels_last": first["reference"]["channels_last"],
                     "ours_optimizer": first["ours"]["optimizer"],
                     "reference_optimizer": first["reference"]["optimizer"]},
        "timing_method": f"{args.rounds} round(s) of one subprocess per variant (order alternating), each "
                         f"{args.warmup} warm-up + {args.steps} timed steps; s/step = median over all timed steps; "
                         f"speed-up = reference / ours",
        "memory_method": "peak RSS (ru_maxrss, models included) of the same subprocesses, max per variant",
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out or f"outputs/lcd_step_speed_{args.scale}.json")
    atomic_write_text(out, json.dumps(result, indent=1))
    result["markdown"] = markdown(result)
    print(result["markdown"])
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
