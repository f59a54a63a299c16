"""RG-LCD as a :class:`~lcm_lab.training.trainer.Task`: LCD plus reward guidance (Li et al., TMLR 2024).

:class:`RGLCDTask` is :class:`~lcm_lab.training.lcd.LCDTask` (same teacher, student, EMA target, data,
validation and export) with four differences:

* ``setup`` also loads the expert reward (frozen, in the frozen nets' precision) and, in ``lrm`` mode,
  moves the latent reward model (LRM) to the device and gives it its own AdamW (:class:`LRMTrainer`);
* ``loss`` is :class:`~lcm_lab.objectives.rg_lcd.RGLCDLoss`: LCD minus ``beta`` times the reward of the
  student's single-step prediction; in ``lrm`` mode it also keeps a random ``lrm_subset`` of the
  micro-batch (prediction, LCD target, data latent, text) for the proxy update;
* ``after_step`` (after the student's optimizer step, before the EMA update) trains the LRM once on that
  subset. Under gradient accumulation that is the last micro-batch's subset only, whereas the reference
  accumulates the LRM's gradients over the micro-batches too (its shipped recipes use no accumulation);
* ``extra_state`` adds the LRM weights and its AdamW moments to checkpoints (safetensors); ``export``
  also writes ``final/lrm`` (:meth:`LatentRewardModel.save_pretrained`).

The trainer optimises ``task.student``'s trainable parameters only: the expert and the LRM are separate
modules, never in the student's optimizer; the expert never requires grad, and the LRM requires grad only
inside :meth:`LRMTrainer.update`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..objectives.rg_lcd import RGLCDConfig, RGLCDLoss, build_expert
from ..files import write_folder_atomically
from ..rewards.lrm import LatentRewardModel, LRMTrainer, pretrain_lrm
from .lcd import LCDRunConfig, LCDTask
from .trainer import LoopConfig, step_generator, train

__all__ = ["RGLCDRunConfig", "RGLCDTask", "train_rg_lcd"]

_LRM_SEED_OFFSET = 0x51D  # the LRM's initial weights: a function of train.seed, identical on every rank


@dataclass
class RGLCDRunConfig(LCDRunConfig):
    """A complete RG-LCD run: ``lcm-lab train rg_lcd --config FILE [section.key=value ...]``."""

    train: LoopConfig = field(default_factory=lambda: LoopConfig(output_dir="outputs/rg_lcd"))
    reward: RGLCDConfig = field(default_factory=RGLCDConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward.mode == "lrm" and self.reward.lrm_pretrain_steps and \
                self.reward.lrm_pretrain_batch_size > self.train.batch_size:
            raise ValueError(f"reward.lrm_pretrain_batch_size ({self.reward.lrm_pretrain_batch_size}) must be <= "
                             f"train.batch_size ({self.train.batch_size}): pre-training batches are cut from "
                             "training batches")
        if self.proportion_empty_prompts > 0:
            raise ValueError("proportion_empty_prompts must be 0 for rg_lcd: the reward scores each prediction "
                             "against the caption the student was conditioned on, and '' has no reward")


class RGLCDTask(LCDTask):
    """Models, data and loss of an RG-LCD run (see :class:`~lcm_lab.training.trainer.Task`)."""

    def __init__(self, config: RGLCDRunConfig) -> None:
        super().__init__(config)
        rcfg = config.reward
        self.expert = None  # built in setup, on the device
        self.lrm: LatentRewardModel | None = None
        self.lrm_trainer: LRMTrainer | None = None
        self._pending: dict | None = None
        self._lrm_started = False
        if rcfg.mode == "lrm":
            ucfg = self.ldm.unet.config
            if rcfg.lrm_pretrained:
                self.lrm = LatentRewardModel.from_pretrained(rcfg.lrm_pretrained)
                if self.lrm.config["text_dim"] != ucfg.cross_attention_dim:
                    raise ValueError(f"LRM {rcfg.lrm_pretrained} reads {self.lrm.config['text_dim']}-d text states "
                                     f"but this teacher's are {ucfg.cross_attention_dim}-d")
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.train.seed + _LRM_SEED_OFFSET)
                    self.lrm = LatentRewardModel.from_arch(
                        rcfg.lrm_arch, text_dim=int(ucfg.cross_attention_dim), latent_channels=ucfg.in_channels,
                        width=rcfg.lrm_width, depth=rcfg.lrm_depth, embed_dim=rcfg.lrm_embed_dim)
            self.lrm.requires_grad_(False).eval()

    # ------------------------------------------------------------------ setup
    def setup(self, accelerator, channels_last: str = "frozen") -> None:
        super().setup(accelerator, channels_last)
        rcfg = self.config.reward
        device = accelerator.device
        self.expert = build_expert(rcfg, device=device, dtype=self.frozen_dtype)
        codec = self.ldm.codec
        if self.lrm is not None:
            self.lrm.to(device)
            self.lrm_trainer = LRMTrainer(self.lrm, self.expert, codec, lr=rcfg.lrm_lr,
                                          weight_decay=rcfg.lrm_weight_decay, logit_scale=rcfg.lrm_logit_scale,
                                          decode_chunk_size=rcfg.decode_chunk_size)
        self.rg_objective = RGLCDLoss(rcfg, self.objective, codec=codec, expert=self.expert, lrm=self.lrm)

    # ------------------------------------------------------------------ one step
    def loss(self, student, batch, generator):
        if self.lrm is not None and not self._lrm_started:
            self._start_lrm(student)
        latents, texts, cond = self._prepare(batch, generator)  # no prompt dropping in rg_lcd (RGLCDRunConfig)
        with self.accelerator.autocast():  # as LCDTask.loss: frozen nets in the mixed-precision dtype
            loss, logs = self.rg_objective(student, self.target_net(), latents, cond, texts, generator)
        if self.lrm is not None:
            # Drawn after the LCD draws, so reward guidance leaves LCD's randomness untouched. Under gradient
            # accumulation each micro-batch overwrites the subset: after_step trains on the last one.
            n = min(self.config.reward.lrm_subset, len(texts))
            keep = torch.randperm(len(texts), generator=generator)[:n]
            idx = keep.to(latents.device)
            self._pending = {
                "sets": [logs["pred"].detach()[idx], logs["target"][idx], latents[idx]],  # (pred, target, gt)
                "text_states": cond.encoder_hidden_states[idx], "prompts": [texts[i] for i in keep.tolist()],
            }
        return loss, {"loss": logs["loss"], "lcd_loss": logs["lcd_loss"], "reward": logs["reward"]}

    def after_step(self, step: int) -> dict:
        logs = {}
        if self._pending is not None:
            p, self._pending = self._pending, None
            logs.update(self.lrm_trainer.update(p["sets"], p["text_states"], p["prompts"]))
        logs.update(super().after_step(step))  # EMA target update
        return logs

    def _start_lrm(self, student) -> None:
        """Before the first step of a run that did not resume: optional LRM pre-training on data."""
        self._lrm_started = True
        rcfg = self.config.reward
        if rcfg.lrm_pretrain_steps == 0:
            return
        batches = self._pretrain_batches()
        try:
            show = self.config.train.progress and self.accelerator.is_local_main_process
            logs = pretrain_lrm(self.lrm_trainer, batches, rcfg.lrm_pretrain_steps, lr=rcfg.lrm_pretrain_lr,
                                progress=show)
        finally:
            batches.close()  # its data loader's workers stop now, not at the end of the run
        tail = logs[-min(len(logs), 20):]
        self.accelerator.print(f"LRM pre-trained for {len(logs)} steps: loss "
                               f"{sum(l['lrm_pretrain_loss'] for l in tail) / len(tail):.3f}, pairwise agreement "
                               f"with the expert {sum(l['lrm_pretrain_acc'] for l in tail) / len(tail):.3f} "
                               f"(mean of the last {len(tail)})")

    @torch.no_grad()
    def _pretrain_batches(self):
        """``(latents, text_states, prompts)``: the first ``lrm_pretrain_batch_size`` data latents and captions of
        each training batch (the loop's data order; posterior samples drawn with seed ``train.seed + 1``)."""
        cfg = self.config
        rank, n = self.accelerator.process_index, cfg.reward.lrm_pretrain_batch_size
        data = self.batches(rank, 0, count_skipped=False)  # the loop counts them
        try:
            for i, batch in enumerate(data):
                gen = step_generator(cfg.train.seed + 1, rank, i)
                latents, texts, _ = self._latents_and_text(batch, gen)
                latents, texts = latents[:n], texts[:n]
                if texts:
                    yield latents, self._encode_text(texts, gen).encoder_hidden_states, texts
        finally:
            data.close()  # with this generator's close(): the data loader stops now, not when collected

    # ------------------------------------------------------------------ checkpoints / export
    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.lrm is not None:
            state["lrm"] = dict(self.lrm.state_dict())
            if self.lrm_trainer is not None:  # written even before its first step, so a resume can require it
                state["lrm_optimizer"] = self.lrm_trainer.optimizer_tensors()
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if self.lrm is None:
            return
        if "lrm" not in state:
            raise KeyError("checkpoint has no lrm state but this run uses reward.mode=lrm (was it a direct-mode "
                           "run? start a new output_dir)")
        self.lrm.load_state_dict(state["lrm"])
        if self.lrm_trainer is not None:
            if "lrm_optimizer" not in state:
                raise KeyError("checkpoint has no lrm_optimizer state: the proxy's AdamW moments are missing")
            self.lrm_trainer.load_optimizer_tensors(state["lrm_optimizer"])
        self._lrm_started = True  # a resumed proxy is not pretrained again

    def export(self, out_dir: Path) -> None:
        super().export(out_dir)
        if self.lrm is not None and self.accelerator.is_main_process:
            write_folder_atomically(out_dir / "lrm", self.lrm.save_pretrained)


def train_rg_lcd(config: RGLCDRunConfig) -> Path:
    """Run RG-LCD with ``config``; returns the output folder (``final/pipeline`` or ``final/lora``, and
    ``final/lrm`` in lrm mode)."""
    return train(config.train, RGLCDTask(config))
