"""The one accelerate training loop every lcm_lab method runs on.

Methods differ only in their :class:`Task` (models + loss object, EDM's ``loss.py`` idea): LCD, RG-LCD
and later objectives plug into :func:`train` unchanged. The loop owns what is common: devices and
mixed precision, the optimizer and LR schedule, gradient accumulation and clipping, deterministic
per-step randomness, checkpoints and ``resume latest``, logging, validation grids, and export.

Several processes run as DDP (replicated student) or FSDP2 (sharded student; the task shards what follows it,
see :mod:`~lcm_lab.training.sharding`).

Randomness is a function of ``(seed, rank, step)``: the data sampler and the per-step ``torch.Generator``
handed to the task are re-derived from the step number, so a resumed run continues exactly like an
uninterrupted one and ranks see different data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import (check_resumable, checkpoint_dirs, find_checkpoint, load_checkpoint,
                         recover_interrupted_swap, save_checkpoint)
from .sharding import full_tensor, local

__all__ = ["LoopConfig", "Task", "train", "step_generator", "apply_channels_last"]

CHANNELS_LAST = ("frozen", "all", "none")  # LoopConfig.channels_last, see apply_channels_last


def _check_channels_last(mode: str) -> None:
    if mode not in CHANNELS_LAST:
        raise ValueError(f"channels_last must be one of {', '.join(CHANNELS_LAST)}, got {mode!r}")


@dataclass
class LoopConfig:
    """Settings of the training loop shared by every method (defaults: diffusers' LCD scripts)."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Checkpoints, logs, validation grids, exports."})
    seed: int = field(default=0, metadata={"help": "Base seed; step s on rank r draws from (seed, r, s)."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Per-device micro-batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (<= 0 disables)."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={
        "help": "diffusers.optimization schedule: constant, constant_with_warmup, linear, cosine, ..."})
    lr_warmup_steps: int = field(default=500, metadata={"help": "Warm-up steps of the LR schedule."})
    mixed_precision: str = field(default="no", metadata={
        "help": "'no', 'fp16' or 'bf16': frozen nets run in it, the student keeps fp32 master weights."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute student activations."})
    attention: str = field(default="sdpa", metadata={"help": "'sdpa' (PyTorch) or 'xformers' (GPU, optional)."})
    channels_last: str = field(default="frozen", metadata={
        "help": "Conv weights stored channels-last: 'frozen' (teacher and EMA target, which only run forward "
                "passes), 'all' (the student too) or 'none'. See apply_channels_last."})
    checkpointing_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' or a checkpoint folder; 'latest' with no checkpoint yet starts fresh."})
    validation_steps: int = field(default=500, metadata={"help": "Validation grid every N steps (0: never)."})
    log_every: int = field(default=10, metadata={"help": "Scalar logging interval in steps."})
    report_to: str = field(default="tensorboard", metadata={"help": "'tensorboard', 'wandb', 'all' or 'none'."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "lr_warmup_steps", "validation_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        _check_channels_last(self.channels_last)
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.attention!r}")
        from diffusers.optimization import SchedulerType

        # piecewise_constant needs step_rules, which this loop does not pass.
        schedules = [t.value for t in SchedulerType if t.value != "piecewise_constant"]
        if self.lr_scheduler not in schedules:
            raise ValueError(f"lr_scheduler must be one of {', '.join(schedules)}, got {self.lr_scheduler!r}")
        if self.report_to not in ("tensorboard", "wandb", "all", "none"):
            raise ValueError(f"report_to must be tensorboard, wandb, all or none, got {self.report_to!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1 (or null for no limit)")
        if not math.isfinite(self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be a number (<= 0 disables clipping), got {self.max_grad_norm}")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir must not be empty")
        if not self.learning_rate > 0:  # NaN too
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


class Task(Protocol):
    """What a method provides to :func:`train`."""

    student: torch.nn.Module  # the trained network (its trainable parameters are optimised)
    fsdp_unsupported: str  # why this run cannot train under FSDP, or "" when it can

    def setup(self, accelerator, channels_last: str) -> None:
        """Move networks to the device (frozen ones in the mixed-precision dtype, the memory layout per
        :func:`apply_channels_last`); build anything device-bound."""

    def prepared(self, student: torch.nn.Module) -> None:
        """Once accelerate prepared ``student`` (under FSDP its parameters are now sharded): re-bind anything
        that holds them (the EMA target), before a checkpoint is loaded."""

    def batches(self, rank: int, start: int):
        """Iterator over micro-batches, the first being micro-step ``start`` of this rank."""

    def loss(self, student: torch.nn.Module, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Scalar loss (and float logs) for one micro-batch; ``student`` may be DDP-wrapped."""

    def after_step(self, step: int) -> dict:
        """After each optimizer step (EMA target update, proxy-model updates); returns logs. Runs on every
        process, and may use collectives (an override must call its base on every process too)."""

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors to checkpoint besides the student/optimizer (e.g. the EMA target), whole (not sharded).
        Called on every process (gathering shards is collective); only the main process's result is written."""

    def load_extra_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None: ...

    def validation_images(self) -> tuple[torch.Tensor, int]:
        """A grid's worth of images [N, 3, H, W] in [0, 1] from the current model, and the images per row.
        Called on the main process, and under FSDP on every process (with the same result on each)."""

    def export(self, out_dir: Path) -> None:
        """Write the final model(s) in a stock format. Called on every process (gathering shards is
        collective); only the main process writes."""

    def summary(self) -> str:
        """A line said once at the end of the run (e.g. what the data skipped), or ``""``; every process
        calls it after the last :meth:`after_step`."""


def apply_channels_last(mode: str, student: torch.nn.Module, *frozen: torch.nn.Module | None) -> None:
    """Store 4-D (conv) weights channels-last as ``LoopConfig.channels_last`` says: the ``frozen`` nets
    (teacher, EMA target) for ``"frozen"`` and ``"all"``, the trained ``student`` too for ``"all"``.

    Why "frozen" by default: on CPU (oneDNN) channels-last sped up the forward passes of an LCD step but
    made the student's SD1.5-size backward 8-49% slower (benchmarks/RESULTS.md, "LCD training step"), and
    the frozen nets only run forwards. Results differ from NCHW only by float rounding. Weights a frozen net
    shares with the student (a LoRA student's base weights, shared by its EMA target) keep the student's layout.
    """
    _check_channels_last(mode)
    nets = (*frozen, student) if mode == "all" else frozen if mode == "frozen" else ()
    keep = {id(p) for p in student.parameters()} if mode == "frozen" else set()
    for m in nets:
        for p in () if m is None else m.parameters():
            if p.dim() == 4 and id(p) not in keep:
                # .to, as Module.to does (.contiguous would keep the NCHW strides of 1x1 kernels, which are
                # also channels-last contiguous, and oneDNN would then round differently)
                p.data = p.data.to(memory_format=torch.channels_last)


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The per-(seed, rank, micro-step) generator tasks draw noise, timesteps and dropout from."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + rank) * 1_000_000_007 + micro_step & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _trackers(report_to: str) -> list[str] | None:
    if report_to == "none":
        return None
    wanted = ["tensorboard", "wandb"] if report_to == "all" else [report_to]
    found = []
    for name in wanted:
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else name)
            found.append(name)
        except ImportError:
            if report_to != "all":
                raise ImportError(f"report_to={name!r} needs the {name} package: pip install {name} "
                                  "(or set train.report_to=none)") from None
    return found or None


def _adamw_settings(cfg: LoopConfig) -> dict:
    """AdamW's settings from the config, learning rate aside."""
    return {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.adam_weight_decay}


def _optimizer(params, cfg: LoopConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel when the device has one (one kernel over all tensors, also on CPU)."""
    kwargs = dict(lr=cfg.learning_rate, **_adamw_settings(cfg))
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def _configure_attention(unet: torch.nn.Module, attention: str) -> None:
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ImportError("attention=xformers needs the xformers package (pip install 'lcm_lab[xformers]', "
                              "GPU only); the default 'sdpa' needs nothing") from None
        unet.enable_xformers_memory_efficient_attention()
    elif hasattr(unet, "set_default_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def train(cfg: LoopConfig, task: Task, accelerator=None) -> Path:
    """Run ``task`` for ``cfg.max_steps`` optimizer steps; returns the output folder.

    Writes ``checkpoints/checkpoint-<step>`` every ``checkpointing_steps`` (and at the end),
    ``validation/step-<step>.png`` grids, tracker logs under ``logs/``, and the task's export under
    ``final/``. A non-finite loss, or a non-finite gradient norm (outside fp16, whose loss scaler skips such
    steps by design), stops the run with an error naming the step; the last checkpoint stays intact. A
    fresh run into a folder holding checkpoints, and a resume with another process count, batch size,
    accumulation or seed, or from a step past ``max_steps``, are refused before the task's set-up. A resume
    takes this run's learning rate and AdamW settings (the restored optimizer would bring back the
    checkpoint's), and says so when they differ. DeepSpeed, FSDP1, and FSDP for a task that cannot shard
    (``task.fsdp_unsupported``) are refused before the set-up too.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    out = Path(cfg.output_dir)
    if accelerator is None:
        trackers = _trackers(cfg.report_to)
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=trackers,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
                         f"train.gradient_accumulation_steps is {cfg.gradient_accumulation_steps}")
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        # accelerate runs no float16 autocast there (CPU), so the float16 frozen nets would meet float32 inputs
        raise ValueError(f"train.mixed_precision=fp16 needs a GPU; on {accelerator.device.type} use 'bf16' or 'no'")
    kind = accelerator.distributed_type.value
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(f"{kind} is not supported: lcm_lab's EMA target, checkpoints and export follow DDP's "
                         "replicated or FSDP's sharded parameters. Use DDP (configs/accelerate/multi_gpu.yaml) or "
                         "FSDP (configs/accelerate/fsdp.yaml).")
    if kind == "FSDP":
        if task.fsdp_unsupported:
            raise ValueError(f"FSDP is not supported for this run: {task.fsdp_unsupported}. Use DDP "
                             "(configs/accelerate/multi_gpu.yaml) with gradient checkpointing and mixed precision.")
        if cfg.channels_last == "all":
            raise ValueError("train.channels_last=all cannot be used with FSDP, which shards contiguous (NCHW) "
                             "weights only: use 'frozen' (the default; the replicated teacher) or 'none'")
        if not accelerator.is_fsdp2:
            raise ValueError("FSDP needs fsdp_version: 2 in the accelerate config (PyTorch's fully_shard; "
                             "see configs/accelerate/fsdp.yaml)")
        _check_fsdp_plugin(accelerator.state.fsdp_plugin)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise ValueError(
            f"launched as {world} processes but accelerate runs {accelerator.num_processes}: every process would "
            "train alone and overwrite the others' checkpoints. Without GPUs set ACCELERATE_USE_CPU=1 and use "
            "`accelerate launch --multi_gpu --num_processes N ...` (see configs/accelerate/multi_gpu.yaml).")
    rank = accelerator.process_index

    # Resume checks first: they read a small JSON file, while the task's set-up may encode a whole dataset.
    ckpt_root = out / "checkpoints"
    layout = {"num_processes": accelerator.num_processes, "batch_size": cfg.batch_size,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "seed": cfg.seed}
    path, start = None, 0
    if accelerator.is_main_process:
        for restored in recover_interrupted_swap(ckpt_root):
            accelerator.print(f"put back {restored}, moved aside by a save that was interrupted")
    accelerator.wait_for_everyone()
    if cfg.resume_from_checkpoint:
        try:
            path = find_checkpoint(ckpt_root, cfg.resume_from_checkpoint)
        except FileNotFoundError:
            if cfg.resume_from_checkpoint != "latest":
                raise
            accelerator.print(f"no checkpoint in {ckpt_root} to resume: training from step 0")
        if path is not None:
            start = check_resumable(path, layout)
            if start > cfg.max_steps:
                raise ValueError(f"{path} is at step {start}, past train.max_steps={cfg.max_steps}: raise "
                                 "max_steps to continue it, or start a new train.output_dir")
            if path.resolve().parent != ckpt_root.resolve() and (here := checkpoint_dirs(ckpt_root)):
                # Its first save would prune this folder's checkpoints of later steps (another run's).
                raise ValueError(f"{ckpt_root} holds checkpoints of another run (latest: {here[-1].name}) and "
                                 f"{path} is not one of them; resume into a new train.output_dir")
    elif earlier := checkpoint_dirs(ckpt_root):
        # A fresh run here would prune the earlier run's checkpoints as soon as it saves its first one.
        raise ValueError(f"{ckpt_root} holds checkpoints of an earlier run (latest: {earlier[-1].name}); "
                         "set train.resume_from_checkpoint=latest to continue it, or choose a new train.output_dir")

    torch.manual_seed(cfg.seed)  # only model construction uses the global RNG; steps use step_generator
    task.setup(accelerator, cfg.channels_last)
    student = task.student
    _configure_attention(student, cfg.attention)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    for p in params:  # master weights stay fp32 whatever the mixed precision (as diffusers' LCD scripts)
        p.data = p.data.float()
    optimizer = _optimizer(params, cfg, accelerator.device)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_steps * accelerator.num_processes)
    if kind == "FSDP" and accelerator.mixed_precision != "no":
        _fsdp_float32_gradients(accelerator.state.fsdp_plugin)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    # FSDP replaces the parameters by sharded ones (and points the optimizer at them): read them again.
    params = [p for p in student.parameters() if p.requires_grad]
    task.prepared(student)

    if path is not None:
        load_checkpoint(accelerator, path, task.load_extra_state)
        accelerator.print(f"resumed from {path} at step {start}")
        _apply_optimizer_settings(optimizer, lr_scheduler, cfg, accelerator.print)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if accelerator.log_with:  # the requested trackers; `accelerator.trackers` is empty until this call
            accelerator.init_trackers("lcm_lab", config={"max_steps": cfg.max_steps, "seed": cfg.seed})

    accum = cfg.gradient_accumulation_steps
    data = task.batches(rank, start * accum)
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="train",
               disable=not (cfg.progress and accelerator.is_local_main_process), dynamic_ncols=True)
    sums: dict[str, float] = {}
    for step in bar:
        student.train()
        sums = {}
        for micro in range(accum):
            batch = next(data)
            with accelerator.accumulate(student):
                loss, step_logs = task.loss(student, batch, step_generator(cfg.seed, rank, step * accum + micro))
                finite = bool(torch.isfinite(loss.detach()))
                # All processes stop at the same point with the error, or none: one stopping alone leaves the
                # others blocked in the gradient reduction until the launcher kills them, wherever they are.
                if not _everywhere(finite, accelerator):
                    value = "on another process" if finite else loss.item()
                    raise FloatingPointError(f"non-finite loss ({value}) at step {step}; {_kept(ckpt_root)}. "
                                             "Lower train.learning_rate or check the data.")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # With clipping off the norm is still taken (an infinite bound scales by 1), so that a
                    # non-finite gradient stops the run before the update instead of one step later.
                    bound = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                    grad_norm = float(full_tensor(accelerator.clip_grad_norm_(params, bound)))
                    # fp16's loss scaler skips steps with inf gradients by design; otherwise they are a fault.
                    if not math.isfinite(grad_norm) and accelerator.mixed_precision != "fp16":
                        raise FloatingPointError(
                            f"non-finite gradient norm ({grad_norm}) at step {step}; nothing was updated and "
                            f"{_kept(ckpt_root)}. Lower train.learning_rate or check the data.")
                    sums["grad_norm"] = grad_norm
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in step_logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        sums.update(task.after_step(step + 1))
        sums["lr"] = lr_scheduler.get_last_lr()[0]
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            accelerator.log(sums, step=done)
            bar.set_postfix({k: f"{v:.4g}" for k, v in sums.items() if k in ("loss", "grad_norm")})
        if done % cfg.checkpointing_steps == 0 or done == cfg.max_steps:
            # A finite loss can still blow the weights up; under FSDP each process checks its own shards.
            if not _everywhere(all(torch.isfinite(local(p)).all() for p in params), accelerator):
                raise FloatingPointError(
                    f"non-finite student weights after step {done}: not saved; {_kept(ckpt_root)}. Lower "
                    "train.learning_rate or set train.max_grad_norm.")
            extra = task.extra_state()  # on every process (gathers under FSDP); the main process writes it
            save_checkpoint(accelerator, ckpt_root, done, extra, cfg.checkpoints_total_limit, layout)
        if cfg.validation_steps and (done % cfg.validation_steps == 0 or done == cfg.max_steps):
            _validate(accelerator, task, out, done)

    summary = task.summary()
    if summary:
        accelerator.print(summary)
    accelerator.wait_for_everyone()
    task.export(out / "final")  # on every process (gathers under FSDP); the main process writes
    accelerator.end_training()
    return out


def _kept(ckpt_root: Path) -> str:
    """What a run stopped by a numerical fault leaves to resume from."""
    found = checkpoint_dirs(ckpt_root)
    return f"the last checkpoint, {found[-1]}, is intact" if found else f"no checkpoint was written to {ckpt_root} yet"


def _apply_optimizer_settings(optimizer, lr_scheduler, cfg: LoopConfig, say: Callable[[str], None]) -> None:
    """Give a resumed optimizer this run's learning rate, betas, eps and weight decay.

    A restored optimizer and scheduler bring back the checkpoint's values (torch's ``load_state_dict``), so
    ``train.learning_rate=...`` on a resume would be silently ignored — the very change a run stopped by a
    non-finite loss needs. The schedule's shape comes from this run's config already (its lambdas are not
    saved); here its base rate is set too. Unchanged settings leave every value as it was (an exact resume).
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
    wanted = _adamw_settings(cfg)
    changed = {}
    for i, group in enumerate(optimizer.param_groups):
        for key, value in wanted.items():
            current = tuple(group[key]) if key == "betas" else group[key]
            if current != value:
                changed[key] = (current, value)
                group[key] = value
        old = scheduler.base_lrs[i]
        if old != cfg.learning_rate:
            changed["learning_rate"] = (old, cfg.learning_rate)
            scheduler.base_lrs[i] = group["initial_lr"] = cfg.learning_rate
            # Every diffusers schedule is a LambdaLR: the rate at this point of the schedule, exactly.
            group["lr"] = cfg.learning_rate * scheduler.lr_lambdas[i](scheduler.last_epoch)
    if changed:
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        say("resumed with " + ", ".join(f"{k}={new} (the checkpoint's: {old})" for k, (old, new) in changed.items()))


def _check_fsdp_plugin(plugin) -> None:
    """Refuse the FSDP options the task's sharded EMA target does not follow."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError("fsdp_offload_params: true is not supported (the EMA target's shards would stay on the "
                         "accelerator while the student's move to the CPU); set it to false")
    if plugin.activation_checkpointing:
        raise ValueError("fsdp_activation_checkpointing: true is not supported (it renames the student's modules, "
                         "which its EMA target follows by name); set train.gradient_checkpointing=true instead")


def _fsdp_float32_gradients(plugin) -> None:
    """Under FSDP mixed precision, reduce (and accumulate) gradients in float32 as DDP does: the policy accelerate
    sets for fp16/bf16 reduces them in the compute dtype. Its other settings (the student's weights gathered in
    the compute dtype) are kept."""
    plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy, reduce_dtype=torch.float32)


def _everywhere(ok: bool, accelerator) -> bool:
    """Whether ``ok`` holds on every process (one scalar all-reduce when there are several)."""
    if accelerator.num_processes == 1:
        return ok
    bad = torch.tensor(float(not ok), device=accelerator.device)
    return float(accelerator.reduce(bad, reduction="sum")) == 0


def _validate(accelerator, task: Task, out: Path, step: int) -> None:
    """Save (and log) a grid of the current model's samples from the main process; under FSDP every process
    samples (each forward pass gathers the weights from all of them)."""
    from accelerate.utils import DistributedType

    from ..imaging import save_grid

    if not accelerator.is_main_process and accelerator.distributed_type != DistributedType.FSDP:
        return
    images, nrow = task.validation_images()
    if not accelerator.is_main_process:
        return
    save_grid(images, out / "validation" / f"step-{step:06d}.png", nrow=nrow, scale=2)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images.clamp(0, 1), step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img.permute(1, 2, 0).numpy()) for img in images]}, step=step)
