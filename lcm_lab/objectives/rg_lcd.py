"""RG-LCD: reward-guided latent consistency distillation (Li et al., "Reward Guided Latent Consistency
Distillation", TMLR 2024; github.com/Ji4chenLi/rg-lcd).

The LCD loss plus a reward of the student's SINGLE-STEP prediction ``f_theta(x_t, t, w, c)`` (the same
tensor the consistency loss compares with its target, not a sampling chain)::

    L = L_LCD - beta * mean_b R(f_theta(x_t, t, w, c)_b, c_b)

Two ways to compute ``R`` (``mode``):

* ``direct``: the expert reward of the decoded image, ``R = expert(to_unit(decode(pred)), prompt)``
  with ``to_unit(x) = (x / 2 + 0.5).clamp(0, 1)``. Gradients flow through the VAE decoder and the
  expert's image branch (both frozen). The expert must be differentiable.
* ``lrm``: the latent proxy reward model's cosine score of ``pred`` itself,
  ``R = LRM(pred, text_states)``, with the LRM frozen during the student's step. No VAE decode is in
  the gradient path (the paper's fix for the high-frequency artifacts of direct optimisation). The LRM
  is trained separately, once per optimizer step, against the expert
  (:class:`~lcm_lab.rewards.lrm.LRMTrainer`, driven by the RG-LCD task).

With ``reward_scale = 0`` the student's gradients are exactly those of LCD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.conditioning import Conditioning
from .lcd import LCDLoss

__all__ = ["RGLCDConfig", "RGLCDLoss", "build_expert"]

MODES = ("direct", "lrm")


@dataclass
class RGLCDConfig:
    """Reward guidance of RG-LCD (defaults: the paper and its repository, github.com/Ji4chenLi/rg-lcd)."""

    reward: str = field(default="0.01*toy-clip", metadata={
        "help": "Expert reward spec for lcm_lab.rewards.parse_reward_spec, e.g. 'hpsv2', "
                "'1.0*hpsv2+0.1*imagereward', 'jpeg-compressibility' (lrm mode only: not differentiable). "
                "Weights also set the scale: beta=1 and lrm_logit_scale=100 assume cosine-like scores (HPSv2), "
                "so CLIP-style scores of 100*cos (clip, toy-clip, pickscore) take a weight of 0.01. In lrm mode "
                "the reference code takes the aesthetic score (about 1-10) itself as the preference logit: "
                "'0.01*aesthetic' matches it (100 times the raw score makes near one-hot preferences)."})
    reward_kwargs: dict = field(default_factory=dict, metadata={
        "help": "Constructor arguments per reward name, e.g. {hpsv2: {checkpoint: /w/HPS_v2.1_compressed.pt}}; "
                "weights can also come from the rewards' LCM_LAB_* environment variables."})
    reward_scale: float = field(default=1.0, metadata={"help": "beta: weight of the reward term (paper: 1.0)."})
    imagereward_clip: float | None = field(default=2.0, metadata={
        "help": "ImageReward terms are clipped to min(r, this) (RG-LCD: 2.0); null = no clip."})
    mode: str = field(default="direct", metadata={
        "help": "'direct': expert reward through the VAE decoder (the paper's RG-LCM); 'lrm': frozen latent "
                "proxy reward model, trained online against the expert."})
    lrm_arch: str = field(default="small", metadata={"help": "LRM image-tower preset: tiny, small or base."})
    lrm_width: int | None = field(default=None, metadata={"help": "Override the preset's first-stage channels."})
    lrm_depth: int | None = field(default=None, metadata={"help": "Override the preset's number of stride-2 stages."})
    lrm_embed_dim: int | None = field(default=None, metadata={"help": "Override the preset's embedding size."})
    lrm_lr: float = field(default=3.3e-6, metadata={"help": "LRM AdamW learning rate (paper: 3.3e-6)."})
    lrm_weight_decay: float = field(default=0.0, metadata={
        "help": "LRM AdamW weight decay (the reference uses its adam_weight_decay, default 0)."})
    lrm_subset: int = field(default=16, metadata={
        "help": "Samples of the batch (random subset) the LRM is trained on each step (paper: 16)."})
    lrm_logit_scale: float = field(default=100.0, metadata={"help": "Logit scale of the pairwise KL (paper: 100)."})
    lrm_pretrain_steps: int = field(default=0, metadata={
        "help": "LRM pre-training steps on data before distillation (the expert scores every data latent of a "
                "batch against every caption; the LRM learns that matrix); 0 = none."})
    lrm_pretrain_batch_size: int = field(default=32, metadata={
        "help": "Data latents (and captions) per pre-training step; non-CLIP experts score batch^2 pairs."})
    lrm_pretrain_lr: float | None = field(default=None, metadata={
        "help": "AdamW learning rate of the pre-training steps; null = lrm_lr."})
    lrm_pretrained: str | None = field(default=None, metadata={
        "help": "Folder of a saved LRM (final/lrm of an earlier run) to start from."})
    decode_chunk_size: int = field(default=16, metadata={"help": "Latents per VAE decode call."})

    def __post_init__(self) -> None:
        from ..rewards import REGISTRY, available_rewards, parse_reward_terms
        from ..rewards.lrm import LRM_ARCHS

        if self.mode not in MODES:
            raise ValueError(f"mode must be 'direct' or 'lrm', got {self.mode!r}")
        names = [name for _, name in parse_reward_terms(self.reward)]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown reward {', '.join(map(repr, unknown))} in reward={self.reward!r}; "
                             f"known rewards: {', '.join(available_rewards())}")
        if not isinstance(self.reward_kwargs, dict) or not all(isinstance(v, dict) for v in self.reward_kwargs.values()):
            raise ValueError(f"reward_kwargs must map reward names to argument mappings, got {self.reward_kwargs!r}")
        extra = sorted(set(k.lower() for k in self.reward_kwargs) - set(names))
        if extra:
            raise ValueError(f"reward_kwargs names {extra}, which reward={self.reward!r} does not use")
        if self.lrm_arch not in LRM_ARCHS:
            raise ValueError(f"lrm_arch must be one of {sorted(LRM_ARCHS)}, got {self.lrm_arch!r}")
        for name in ("lrm_subset", "decode_chunk_size", "lrm_pretrain_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lrm_width", "lrm_depth", "lrm_embed_dim"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "lrm_depth" else 1):
                raise ValueError(f"{name} must be positive, got {value}")
        if self.lrm_pretrain_steps < 0:
            raise ValueError(f"lrm_pretrain_steps must be >= 0, got {self.lrm_pretrain_steps}")
        if self.lrm_lr <= 0 or self.lrm_logit_scale <= 0 or (self.lrm_pretrain_lr is not None and self.lrm_pretrain_lr <= 0):
            raise ValueError("lrm_lr, lrm_pretrain_lr and lrm_logit_scale must be > 0")


def build_expert(config: RGLCDConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The expert :class:`~lcm_lab.rewards.base.WeightedReward` of ``config.reward`` (frozen).

    ImageReward terms get ``clip_max = config.imagereward_clip`` and CLIP-score terms (``clip``,
    ``toy-clip``) ``clip_at_zero = False`` unless ``reward_kwargs`` sets them: as a training signal the
    raw cosine is used, as in the reference's CLIP reward; clamping it at 0 (the metric's definition)
    would give no gradient to images the expert scores below 0.
    """
    from ..rewards import parse_reward_spec, parse_reward_terms

    kwargs = {k.lower(): dict(v) for k, v in config.reward_kwargs.items()}
    names = {name for _, name in parse_reward_terms(config.reward)}  # lower-cased by the parser
    if "imagereward" in names:
        kwargs.setdefault("imagereward", {}).setdefault("clip_max", config.imagereward_clip)
    for name in names & {"clip", "toy-clip"}:
        kwargs.setdefault(name, {}).setdefault("clip_at_zero", False)
    return parse_reward_spec(config.reward, kwargs, device=device, dtype=dtype)


class RGLCDLoss:
    """``loss, logs = RGLCDLoss(...)(student, target, latents, cond, prompts, generator)``.

    Args:
        config: :class:`RGLCDConfig`.
        lcd: the :class:`~lcm_lab.objectives.lcd.LCDLoss` it extends (draws all the randomness).
        codec: :class:`~lcm_lab.core.latents.LatentCodec` (``direct`` mode).
        expert: the expert reward (``direct`` mode; must be differentiable).
        lrm: the :class:`~lcm_lab.rewards.lrm.LatentRewardModel` (``lrm`` mode); kept frozen here.

    ``logs``: ``loss`` (total), ``lcd_loss``, ``reward`` (mean expert or LRM score of the prediction),
    and LCDLoss's tensors (``pred``, ``t``, ``w``, ``target``) for the task's LRM update.
    """

    def __init__(self, config: RGLCDConfig, lcd: LCDLoss, codec=None, expert=None, lrm=None) -> None:
        if config.mode == "direct":
            if expert is None or codec is None:
                raise ValueError("direct mode needs the expert reward and the VAE codec")
            if not expert.differentiable:
                raise ValueError(f"reward {expert.name!r} is not differentiable: use reward.mode=lrm (the latent "
                                 "proxy learns it from scores alone)")
        elif lrm is None:
            raise ValueError("lrm mode needs the latent reward model")
        self.config = config
        self.lcd = lcd
        self.codec = codec
        self.expert = expert
        self.lrm = lrm

    def reward(self, pred: torch.Tensor, cond: Conditioning, prompts: list[str]) -> torch.Tensor:
        """Per-sample reward ``[B]`` of single-step predictions ``pred`` (differentiable w.r.t. ``pred``)."""
        if self.config.mode == "direct":
            # The VAE decodes in its own dtype even under mixed precision, as the reference scripts decode
            # outside autocast: autocast would run SDXL's VAE, kept in float32 because it overflows in
            # fp16, in fp16 anyway.
            with torch.autocast(pred.device.type, enabled=False):
                decoded = self.codec.decode(pred, chunk_size=self.config.decode_chunk_size)
            return self.expert(self.codec.to_unit(decoded.float()), prompts).float()
        # frozen proxy: its parameters do not require grad outside LRMTrainer.update, so only pred gets gradients
        return self.lrm(pred, cond.encoder_hidden_states)

    def __call__(self, student: torch.nn.Module, target: torch.nn.Module, latents: torch.Tensor, cond: Conditioning,
                 prompts: list[str], generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {latents.shape[0]} latents")
        lcd_loss, logs = self.lcd(student, target, latents, cond, generator)
        reward = self.reward(logs["pred"], cond, prompts).mean()
        loss = lcd_loss - self.config.reward_scale * reward
        return loss, {**logs, "loss": loss.detach(), "lcd_loss": lcd_loss.detach(), "reward": reward.detach()}
