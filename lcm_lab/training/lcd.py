"""LCD as a :class:`~lcm_lab.training.trainer.Task`: build teacher, student and target, feed batches to
:class:`~lcm_lab.objectives.lcd.LCDLoss`, export to diffusers.

Full LCD trains a w-conditioned copy of the teacher (``time_cond_proj_dim``) against an EMA target
(decay 0.95). LoRA LCD trains peft adapters on the teacher UNet without w-embedding; its target is the
online network under ``no_grad`` as in diffusers' LoRA script, or, with ``model.lora_target_ema``, an
EMA of the adapters (the option diffusers issue #6505 asks for).

SDXL teachers (a folder with ``text_encoder_2/``, :func:`~lcm_lab.models.sdxl.is_sdxl_dir`) are loaded with
:func:`~lcm_lab.models.sdxl.load_sdxl`. Captions are encoded with both text encoders and the fixed
micro-conditioning ``original_size = target_size = (R, R)``, ``crop_top_left = (0, 0)`` (R =
``data.resolution``): diffusers' ``--use_fix_crop_and_size``, as its SDXL README recipe trains, not the
source images' own sizes and crop offsets (which the loaders, resizing and center-cropping to R, do not
keep); the unconditional branch is zero text and pooled embeddings with the
per-sample conditional ``time_ids`` (:func:`~lcm_lab.models.sdxl.sdxl_uncond`). A VAE whose config asks for
``force_upcast`` (SDXL's own, which overflows in fp16) stays in float32 under mixed precision. Export is a
stock ``StableDiffusionXLPipeline`` folder with an ``LCMScheduler`` (full) or an SDXL LoRA file.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.conditioning import Conditioning
from ..core.latents import LatentCodec
from ..models.sd import check_prompts, load_ldm, toy_teacher_dir
from ..models.sdxl import is_sdxl_dir, load_sdxl, sdxl_uncond
from ..objectives.lcd import LCDConfig, LCDLoss
from ..toy.world import IMAGE_SIZE as TOY_IMAGE_SIZE
from .data import DataConfig, StepBatchSampler, build_dataset, encode_dataset, make_dataloader, random_hflip
from .ema import EMA
from .sharding import gather_state, is_sharded, reshard, shard_like, unsharded_class
from .trainer import LoopConfig, apply_channels_last, train

__all__ = ["ModelConfig", "ValidationConfig", "LCDRunConfig", "LCDTask", "train_lcd"]


@dataclass
class ModelConfig:
    """Which teacher to distill and what the student is."""

    teacher: str | None = field(default=None, metadata={
        "help": "Local diffusers pipeline folder of the teacher (SD 1.x/2.x or SDXL); null = the toy teacher."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the full UNet."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_target_ema: bool = field(default=False, metadata={
        "help": "LoRA only: use an EMA of the adapters as target (diffusers' script uses the online net)."})
    w_embedding_dim: int = field(default=256, metadata={"help": "time_cond_proj_dim of a full student."})
    export_unet: str = field(default="target", metadata={
        "help": "Which full-LCD UNet becomes the exported pipeline's unet: 'target' (EMA) or 'online'."})

    def __post_init__(self) -> None:
        if self.teacher is not None and not self.teacher.strip():  # e.g. model.teacher=$UNSET_VARIABLE
            raise ValueError("model.teacher is empty: give a local diffusers pipeline folder (null = the toy teacher)")
        if self.export_unet not in ("target", "online"):
            raise ValueError(f"export_unet must be 'target' or 'online', got {self.export_unet!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")


@dataclass
class ValidationConfig:
    """Validation grids: one row per step count, one column per prompt."""

    prompts: list[str] = field(default_factory=list, metadata={
        "help": "Prompts; empty = 8 held-out toy prompts (SD; SDXL without prompts skips validation)."})
    steps: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "LCM step counts, one row each."})
    guidance_scale: float = field(default=8.0, metadata={
        "help": "diffusers-convention scale; a w-conditioned student embeds w = scale - 1."})
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"validation.steps must be step counts >= 1, got {self.steps}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"validation.guidance_scale must be finite, got {self.guidance_scale}")


@dataclass
class LCDRunConfig:
    """A complete LCD run: ``lcm-lab train lcd --config FILE [section.key=value ...]``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: LCDConfig = field(default_factory=LCDConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(output_dir="outputs/lcd"))
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    proportion_empty_prompts: float = field(default=0.0, metadata={
        "help": "Fraction of captions replaced by '' (the reference script parses but ignores this flag)."})

    def __post_init__(self) -> None:
        if self.model.teacher is None and self.data.resolution != TOY_IMAGE_SIZE:
            raise ValueError(f"model.teacher is null (the {TOY_IMAGE_SIZE} px toy teacher) but data.resolution is "
                             f"{self.data.resolution}: set model.teacher=/path/to/a/diffusers/pipeline")
        if max(self.validation.steps) > self.objective.num_ddim_timesteps:
            raise ValueError(f"validation.steps {self.validation.steps} exceed the student's LCM grid "
                             f"(objective.num_ddim_timesteps = {self.objective.num_ddim_timesteps})")
        if not 0 <= self.proportion_empty_prompts <= 1:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}")


class LCDTask:
    """Models, data and loss of an LCD run (see :class:`~lcm_lab.training.trainer.Task`)."""

    def __init__(self, config: LCDRunConfig) -> None:
        from ..models.student import add_lora, make_w_student

        self.config = config
        self.teacher_dir = Path(config.model.teacher) if config.model.teacher is not None else toy_teacher_dir()
        self.sdxl = is_sdxl_dir(self.teacher_dir)
        self.ldm = load_sdxl(self.teacher_dir) if self.sdxl else load_ldm(self.teacher_dir)
        if self.sdxl and not config.validation.prompts and config.train.validation_steps:
            warnings.warn("SDXL teacher without validation.prompts: validation grids are skipped "
                          "(set validation.prompts to get them)", stacklevel=2)
            config.train.validation_steps = 0
        teacher = self.ldm.unet
        mcfg = config.model
        # Fresh weights (cond_proj, LoRA A) come from the global RNG: seed it here so a run's initial
        # student depends on train.seed only, not on what ran before in the process.
        torch.manual_seed(config.train.seed)
        if mcfg.lora:
            self.student = add_lora(copy.deepcopy(teacher).float().train(), rank=mcfg.lora_rank, alpha=mcfg.lora_alpha)
            w_dim = None  # LCM-LoRA distills guidance in; no w input (diffusers' LoRA script)
            self.ema = EMA(self.student, config.objective.target_ema_decay, copy.deepcopy(self.student)) \
                if mcfg.lora_target_ema else None
        else:
            self.student = make_w_student(teacher, mcfg.w_embedding_dim)
            w_dim = mcfg.w_embedding_dim
            self.ema = EMA(self.student, config.objective.target_ema_decay, copy.deepcopy(self.student))
        self.w_dim = w_dim
        self.fsdp_unsupported = ("model.lora=true: a LoRA student shares its frozen base with its target, and its "
                                 "adapters are small enough to replicate") if mcfg.lora else ""
        self.dataset = build_dataset(config.data)
        self.cache = None
        self.objective: LCDLoss | None = None
        # Unreadable images and over-long (truncated) captions this process met; the *_total of both are the
        # sums over all processes as of the last step (logged, and checkpointed).
        self.skipped = self.truncated = 0
        self.skipped_total = self.truncated_total = 0

    # ------------------------------------------------------------------ setup
    def setup(self, accelerator, channels_last: str = "frozen") -> None:
        self.accelerator = accelerator
        device = accelerator.device
        # The frozen nets' dtype: accelerate's mixed precision (the trained weights stay float32).
        self.frozen_dtype = dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                       torch.float32)
        text_encoders = self.ldm.text.text_encoders if self.sdxl else (self.ldm.text_encoder,)
        for net in (self.ldm.unet, self.ldm.vae, *text_encoders):
            # dtype only when it changes: diffusers warns on any .to(dtype=...) of a loaded model
            net.to(device) if dtype == torch.float32 else net.to(device, dtype=dtype)
        if self.sdxl and getattr(self.ldm.vae.config, "force_upcast", False):
            self.ldm.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (diffusers keeps it fp32 too)
        self.ldm.schedule = self.ldm.schedule.to(device)
        self.student.to(device)
        if self.config.model.lora and dtype != torch.float32:
            # The frozen base in the mixed-precision dtype, as diffusers' LoRA script: only the adapters stay
            # float32 (the trainer keeps trainable weights float32). The EMA target shares these tensors.
            for p in self.student.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
        if self.ema is not None:
            self.ema.model.to(device)
        target = self.ema.model if self.ema is not None else None
        apply_channels_last(channels_last, self.student, self.ldm.unet, target)
        if self.sdxl:
            uncond = sdxl_uncond(self._encode_sdxl([""]))  # zeros; time_ids come per sample from cond
        else:
            uncond = Conditioning(self.ldm.encode_prompts([""], allow_empty=True))
        self.objective = LCDLoss(self.config.objective, self.ldm.unet, self.ldm.schedule, uncond, self.w_dim)
        if self.config.train.validation_steps and self.config.validation.prompts:  # fail now, not at validation
            for tokenizer in (self.ldm.text.tokenizers if self.sdxl else (self.ldm.tokenizer,)):
                try:
                    check_prompts(tokenizer, self.config.validation.prompts, fix="Shorten it.")
                except ValueError as e:
                    raise ValueError(f"validation.prompts: {e}") from None
        if self.config.data.cache_latents:
            self.cache, skipped = encode_dataset(self.dataset, self.ldm.vae, device=device,
                                                 progress=accelerator.is_local_main_process)
            self.skipped += skipped if accelerator.is_main_process else 0  # every process encodes the dataset

    def prepared(self, student) -> None:
        if self.ema is None:
            return
        online = self.accelerator.unwrap_model(student)
        shard_like(self.ema.model, online)  # under FSDP: the target's shards match the student's (a local update)
        self.ema.rebind(online)

    def batches(self, rank: int, start: int, *, count_skipped: bool = True):
        """The data batches of ``rank`` from micro-step ``start`` on; batches without any readable image are
        replaced by the next one and, with ``count_skipped``, counted (a second pass over the loop's own
        batches, as the LRM pre-training makes, must not count them again)."""
        cfg = self.config
        if self.cache is not None:
            sampler = StepBatchSampler(len(self.cache), cfg.train.batch_size, cfg.train.seed, rank, start)
            for indices in sampler:
                yield self.cache.batch(indices)
        else:
            empty_in_a_row, epoch = 0, -(-len(self.dataset) // cfg.train.batch_size)
            for batch in make_dataloader(self.dataset, cfg.train.batch_size, cfg.train.seed, rank, start,
                                         cfg.data.num_workers):
                if batch["text"]:
                    empty_in_a_row = 0
                    yield batch
                    continue
                # No readable image at all: count them and take the next batch in this step's place (a resumed
                # run therefore sees the data order of an uninterrupted one only up to the first such batch).
                self.skipped += batch["skipped"] if count_skipped else 0
                empty_in_a_row += 1
                if empty_in_a_row >= epoch:
                    raise ValueError(f"no readable image in {empty_in_a_row} batches in a row (an epoch of the "
                                       f"{len(self.dataset)}-item dataset; an item needs an image that decodes and "
                                       "a non-empty caption); check data.path and data.caption_column")

    # ------------------------------------------------------------------ one step
    def _latents_and_text(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, list[str], int]:
        device = self.accelerator.device
        codec = LatentCodec(self.ldm.vae)
        if isinstance(batch, tuple):  # cached posterior (mean, std, texts)
            mean, std, texts = batch
            eps = torch.randn(mean.shape, generator=generator)
            latents = codec.scale((mean + std * eps).to(device))
            return latents, list(texts), 0
        pixels = batch["pixel_values"].to(device)
        if self.config.data.random_flip:
            pixels = random_hflip(pixels, generator)
        latents = codec.encode(pixels, generator=generator, sample=True, no_grad=True)
        return latents.float(), list(batch["text"]), int(batch["skipped"])

    def _encode_text(self, texts: list[str], generator: torch.Generator, count: bool = False) -> Conditioning:
        p = self.config.proportion_empty_prompts
        if p > 0:
            drop = torch.rand(len(texts), generator=generator) < p
            texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        if count:  # truncated to the text encoder's context like the reference scripts, but counted
            tokenizer = self.ldm.text.tokenizers[0] if self.sdxl else self.ldm.tokenizer
            self.truncated += sum(len(ids) > tokenizer.model_max_length for ids in tokenizer(texts, verbose=False).input_ids)
        if self.sdxl:
            return self._encode_sdxl(texts)
        return Conditioning(self.ldm.encode_prompts(texts, allow_empty=True, truncate=True))

    def _encode_sdxl(self, texts: list[str]) -> Conditioning:
        """SDXL conditioning with the fixed micro-conditioning of R x R images (``--use_fix_crop_and_size``)."""
        r = self.config.data.resolution
        return self.ldm.text.encode(texts, original_size=(r, r), crop_top_left=(0, 0), target_size=(r, r))

    def target_net(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.student)

    def _prepare(self, batch, generator) -> tuple[torch.Tensor, list[str], Conditioning]:
        """Latents, captions and their conditioning of a batch; unreadable images are counted and dropped."""
        latents, texts, skipped = self._latents_and_text(batch, generator)
        self.skipped += skipped
        return latents, texts, self._encode_text(texts, generator, count=True)

    def loss(self, student, batch, generator):
        latents, _, cond = self._prepare(batch, generator)
        # Teacher and target under autocast too (as the reference scripts): the EMA target is not wrapped by
        # accelerate, and would otherwise get half-precision text embeddings with its float32 weights.
        with self.accelerator.autocast():
            loss, logs = self.objective(student, self.target_net(), latents, cond, generator)
        return loss, {"loss": logs["loss"]}

    def after_step(self, step: int) -> dict:
        if self.ema is not None:
            self.ema.update()
        # Counts so far, summed over the processes (each counts what its own batches met).
        local = torch.tensor([self.skipped, self.truncated], device=self.accelerator.device)
        self.skipped_total, self.truncated_total = self.accelerator.reduce(local, reduction="sum").tolist()
        return {"skipped_images": float(self.skipped_total), "truncated_captions": float(self.truncated_total)}

    def summary(self) -> str:
        # Also logged every log_every steps; said once here, where a run without trackers shows it too.
        counts = {"skipped images": int(self.skipped_total), "truncated captions": int(self.truncated_total)}
        said = [f"{k}: {v}" for k, v in counts.items() if v]
        return "data: " + ", ".join(said) + " (all processes)" if said else ""

    def extra_state(self) -> dict:
        state = {"counters": {"skipped_images": torch.tensor(self.skipped_total),
                              "truncated_captions": torch.tensor(self.truncated_total)}}
        if self.ema is not None:  # whole tensors: gathered from every process's shards under FSDP
            main = self.accelerator.is_main_process
            shadow = gather_state(self.ema.state_dict()["shadow"].items(), keep=main)
            if main:
                state["target_ema"] = shadow
        return state

    def load_extra_state(self, state: dict) -> None:
        # The checkpoint holds all-process totals: the main process carries them on, the others restart at 0.
        counters = state.get("counters", {})
        if {"skipped_images", "truncated_captions"} - counters.keys():
            raise KeyError("checkpoint has no counters of skipped images and truncated captions")
        main = self.accelerator.is_main_process
        self.skipped = int(counters["skipped_images"]) if main else 0
        self.truncated = int(counters["truncated_captions"]) if main else 0
        if self.ema is not None:
            if "target_ema" not in state:
                raise KeyError("checkpoint has no target_ema state but this run uses an EMA target")
            self.ema.load_state_dict({"shadow": state["target_ema"]})

    # ------------------------------------------------------------------ validation / export
    def final_unet(self) -> torch.nn.Module:
        """The network that is exported and validated."""
        online = self.accelerator.unwrap_model(self.student)
        if self.config.model.lora:
            return self.ema.model if self.ema is not None else online
        return self.ema.model if self.config.model.export_unet == "target" else online

    def validation_images(self) -> tuple[torch.Tensor, int]:
        from ..eval.toy import eval_prompts
        from ..generation import generate

        vcfg, ocfg = self.config.validation, self.config.objective
        prompts = list(vcfg.prompts)
        if not prompts:
            if self.sdxl:
                raise ValueError("SDXL validation needs validation.prompts (there are no toy prompts for SDXL)")
            prompts = eval_prompts(8)[0]
        view = copy.copy(self.ldm)
        view.unet = self.final_unet()
        was_training = view.unet.training
        view.unet.eval()
        seeds = [vcfg.seed + i for i in range(len(prompts))]
        guidance = 1.0 if self.config.model.lora else vcfg.guidance_scale
        # No autocast: generate() casts the (possibly half-precision) text embeddings to the student's dtype, so
        # the grid shows the float32 model that is exported (under FSDP mixed precision, the online student's
        # weights are gathered in the compute dtype), and SDXL's VAE decodes in its own dtype.
        try:  # under FSDP every process samples the same grid, each forward gathering the sharded weights
            rows = [generate(view, prompts, seeds, sampler="lcm", steps=s, guidance_scale=guidance,
                             original_inference_steps=ocfg.num_ddim_timesteps, timestep_scaling=ocfg.timestep_scaling,
                             image_size=self.config.data.resolution, progress=False)
                    for s in vcfg.steps]
        finally:
            view.unet.train(was_training)
            reshard(view.unet)
        return torch.cat(rows).float().cpu(), len(prompts)

    def export(self, out_dir: Path) -> None:
        from ..pipelines.export import export_lcm_pipeline, export_lcm_sdxl_pipeline, export_lora

        ocfg = self.config.objective
        if self.config.model.lora:  # never sharded (fsdp_unsupported)
            if self.accelerator.is_main_process:
                export_lora(out_dir / "lora", self.final_unet(), base=self.teacher_dir,
                            original_inference_steps=ocfg.num_ddim_timesteps, timestep_scaling=ocfg.timestep_scaling)
            return
        online = self._whole(self.accelerator.unwrap_model(self.student))
        target = self._whole(self.ema.model)
        if not self.accelerator.is_main_process:
            return
        main, other = (target, online) if self.config.model.export_unet == "target" else (online, target)
        exporter = export_lcm_sdxl_pipeline if self.sdxl else export_lcm_pipeline
        exporter(out_dir / "pipeline", self.teacher_dir, main, target_unet=other,
                 original_inference_steps=ocfg.num_ddim_timesteps, timestep_scaling=ocfg.timestep_scaling)

    def _whole(self, unet: torch.nn.Module) -> torch.nn.Module | None:
        """``unet`` itself, or under FSDP an unsharded copy on the main process (None on the others): its
        weights are gathered from every process, one tensor at a time, so every process must call this."""
        if not is_sharded(unet):
            return unet
        from accelerate import init_empty_weights

        reshard(unet)
        main = self.accelerator.is_main_process
        state = gather_state(unet.state_dict().items(), keep=main)
        if not main:
            return None
        with init_empty_weights(include_buffers=False):  # no random initialisation of weights about to be replaced
            whole = unsharded_class(unet).from_config(unet.config)
        whole.load_state_dict(state, assign=True)
        return whole


def train_lcd(config: LCDRunConfig) -> Path:
    """Run LCD with ``config``; returns the output folder (``final/pipeline`` or ``final/lora`` inside)."""
    return train(config.train, LCDTask(config))
