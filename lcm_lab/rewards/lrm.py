"""The latent proxy reward model (LRM) of RG-LCD (Li et al., "Reward Guided Latent Consistency
Distillation", TMLR 2024, sec. 4).

Optimising an expert reward through the VAE decoder puts high-frequency artifacts into the student's
images. RG-LCD's fix is a small CLIP-like model that reads *latents* and is trained online to agree
with the expert on which of two latents is better; the student is then optimised against this frozen
proxy directly in latent space, with no VAE decode in its gradient path. The expert only ever scores
images under ``no_grad``, so non-differentiable rewards (JPEG compressibility) work too.

The pieces:

* :class:`LatentRewardModel`: ``score = cos(image_tower(latents), text_tower(text_states))``.
  The image tower is a small ResNet with ``latent_channels`` input channels, ``depth`` stride-2 stages
  (one residual block each) and a global average pool, so it reads 8x8 toy latents and 64x64/128x128 SD/SDXL latents alike.
  The text tower does not re-encode text: it reads the frozen text encoder's last hidden states
  ``[B, L, D]`` that the LCD step computes anyway for the UNet (``Conditioning.encoder_hidden_states``)
  and learns an attention pooling plus a projection. This keeps the LRM small and tokenizer-free and
  gives it the teacher's own text representation; the price is that its text side is only as
  expressive as one pooled query over those states (the reference code fine-tunes the top layers of
  a full CLIP text transformer instead).
* :func:`pairwise_kl_loss`: for the pairs (pred, target), (pred, gt), (target, gt) of the three
  latent sets, ``KL(softmax_2(s * expert) || softmax_2(s * lrm))``, summed over pairs, averaged over
  samples (``s`` = ``logit_scale`` ~ 100).
* :class:`LRMTrainer`: one proxy update per LCM optimizer step: decode the three sets without
  gradient, score them with the expert, one AdamW step (lr 3.3e-6 in the paper) on the KL loss.
* :func:`listwise_kl_loss` and :func:`pretrain_lrm`: optional warm start on data before distillation: the
  expert scores every data latent of a batch against every caption and the LRM learns that matrix. The
  reference code starts from a pre-trained latent CLIP (``--pretrained_latent_rm``) instead; a proxy that
  starts from scratch and only learns online stays near chance agreement (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import read_json_object
from ..readable import reading
from .base import float32_head

__all__ = ["LRM_ARCHS", "LatentRewardModel", "pairwise_kl_loss", "listwise_kl_loss", "pairwise_accuracy", "LRMTrainer",
           "pretrain_lrm"]

LRM_ARCHS: dict[str, dict[str, int]] = {
    "tiny": {"width": 32, "depth": 2, "embed_dim": 128},
    "small": {"width": 64, "depth": 3, "embed_dim": 256},
    "base": {"width": 128, "depth": 4, "embed_dim": 512},
}
"""Image-tower presets: first-stage channels (doubled per stage up to 4x), stride-2 stages, embedding size.
Parameters with 768-d text states: tiny ~0.6M, small ~4M, base ~24M. ``small`` pools 64x64 SD latents from
8x8 and 8x8 toy latents from 1x1."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class LatentImageTower(nn.Module):
    """ResNet over scaled latents ``[B, C, h, w]`` -> ``[B, embed_dim]`` (any ``h, w``)."""

    def __init__(self, latent_channels: int = 4, width: int = 64, depth: int = 3, embed_dim: int = 256) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        stages, ch = [], width
        for i in range(depth):  # channels double per stage up to 4 * width
            out = width * min(2 ** (i + 1), 4)
            stages += [_ResBlock(ch), nn.Conv2d(ch, out, 3, stride=2, padding=1)]
            ch = out
        self.stages = nn.Sequential(*stages, _ResBlock(ch))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.proj = nn.Linear(ch, embed_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.conv_in(latents))
        return self.proj(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


class TextStatePooler(nn.Module):
    """Attention pooling (one learned query) of frozen text-encoder states ``[B, L, D]`` -> ``[B, embed_dim]``.

    A ``[B, D]`` input (a pooled embedding) skips the pooling.
    """

    def __init__(self, text_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.query = nn.Parameter(torch.zeros(text_dim))  # zero: starts as the mean over tokens
        self.proj = nn.Linear(text_dim, embed_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        h = self.norm(states.float())
        if h.ndim == 3:
            weights = torch.softmax(h @ self.query / math.sqrt(h.shape[-1]), dim=1)  # [B, L]
            h = (weights.unsqueeze(-1) * h).sum(dim=1)
        return self.proj(h)


class LatentRewardModel(nn.Module):
    """CLIP-like reward on latents: ``cos(image_tower(latents), text_tower(text_states))`` in ``[-1, 1]``.

    Args:
        text_dim: feature size of the text states (the UNet's ``cross_attention_dim``: 768 SD 1.x,
            1024 SD 2.x, 2048 SDXL, 64 toy).
        latent_channels: latent channels (4 for SD/SDXL).
        width, depth, embed_dim: image-tower size (see :data:`LRM_ARCHS`).

    The model always computes in float32: inputs are cast, and autocast (the student's mixed precision
    in RG-LCD) is switched off inside, so the scores the student follows are those the LRM was trained on.
    """

    def __init__(self, text_dim: int, latent_channels: int = 4, width: int = 64, depth: int = 3,
                 embed_dim: int = 256) -> None:
        super().__init__()
        if width < 1 or depth < 0 or embed_dim < 1 or text_dim < 1:
            raise ValueError(f"invalid LRM size: width={width}, depth={depth}, embed_dim={embed_dim}, text_dim={text_dim}")
        self.config = {"text_dim": int(text_dim), "latent_channels": int(latent_channels), "width": int(width),
                       "depth": int(depth), "embed_dim": int(embed_dim)}
        self.image_tower = LatentImageTower(latent_channels, width, depth, embed_dim)
        self.text_tower = TextStatePooler(text_dim, embed_dim)

    @classmethod
    def from_arch(cls, arch: str, text_dim: int, latent_channels: int = 4, **overrides) -> "LatentRewardModel":
        """Build a preset of :data:`LRM_ARCHS`; ``overrides`` (``width``/``depth``/``embed_dim``) not None win."""
        if arch not in LRM_ARCHS:
            raise ValueError(f"unknown LRM arch {arch!r}; choose one of {sorted(LRM_ARCHS)}")
        size = {**LRM_ARCHS[arch], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(text_dim, latent_channels, **size)

    def encode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``[B, E]`` of scaled latents ``[B, C, h, w]`` (float32)."""
        return F.normalize(float32_head(self.image_tower, latents), dim=-1)

    def encode_text(self, text_states: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``[B, E]`` of the text encoder's states ``[B, L, D]`` (float32)."""
        return F.normalize(float32_head(self.text_tower, text_states), dim=-1)

    def forward(self, latents: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """Cosine scores ``[B]`` of scaled latents ``[B, C, h, w]`` against text states ``[B, L, D]``."""
        if latents.shape[0] != text_states.shape[0]:
            raise ValueError(f"LRM: {latents.shape[0]} latents but {text_states.shape[0]} text states")
        return (self.encode_latents(latents) * self.encode_text(text_states)).sum(-1)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "LatentRewardModel":
        """Load a folder written by :meth:`save_pretrained`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not an LRM folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}, "
                                    "as written by LatentRewardModel.save_pretrained / the rg_lcd export)")
        config = read_json_object(folder / CONFIG_NAME, "LRM config")
        with reading(folder, "LRM folder"):
            with safe_open(folder / WEIGHTS_NAME, "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            # Compare the config with the weights' header before allocating anything: a corrupt config
            # (depth 10**6, width 10**9) would otherwise build a huge model first.
            stages = {k.split(".")[2] for k in shapes if k.startswith("image_tower.stages.")}
            if "depth" in config and len(stages) != 2 * int(config["depth"]) + 1:
                raise ValueError(f"config depth {config['depth']} does not match the weights' {len(stages)} "
                                 "image-tower stages")
            with torch.device("meta"):  # shapes only: the weights are then assigned, not copied into a second model
                model = cls(**config)
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            if expected != shapes:
                wrong = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
                raise ValueError(f"{CONFIG_NAME} does not match {WEIGHTS_NAME}: {len(wrong)} tensors missing or of "
                                 f"another shape, e.g. {wrong[:3]}")
            model.load_state_dict(load_file(folder / WEIGHTS_NAME), assign=True)
        return model.float()  # the proxy trains in float32 whatever the file holds (a no-op for float32 files)


# ----------------------------------------------------------------------------- pairwise losses


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def pairwise_kl_loss(expert_scores: torch.Tensor, lrm_scores: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """RG-LCD's proxy loss: ``mean_n sum_{i<j} KL(softmax(s [e_i, e_j]) || softmax(s [l_i, l_j]))``.

    Args:
        expert_scores: ``[k, n]`` expert scores of ``k`` latent sets (RG-LCD: k = 3, rows pred,
            target, gt); treated as constants.
        lrm_scores: ``[k, n]`` LRM scores of the same latents.
        logit_scale: ``s``, applied to both (RG-LCD: 100, CLIP's logit scale).

    Returns:
        Scalar: the KL summed over the ``k (k-1) / 2`` pairs and averaged over the ``n`` samples.
    """
    if expert_scores.shape != lrm_scores.shape or expert_scores.ndim != 2 or expert_scores.shape[0] < 2:
        raise ValueError(f"expected two [k>=2, n] score tensors, got {tuple(expert_scores.shape)} "
                         f"and {tuple(lrm_scores.shape)}")
    pairs = _pairs(expert_scores.shape[0])
    i, j = [p[0] for p in pairs], [p[1] for p in pairs]
    expert = torch.stack([expert_scores[i], expert_scores[j]], dim=-1)  # [P, n, 2]
    lrm = torch.stack([lrm_scores[i], lrm_scores[j]], dim=-1)
    return _softmax_kl(expert, lrm, logit_scale, dim=-1).sum(0).mean()


def _softmax_kl(expert: torch.Tensor, lrm: torch.Tensor, logit_scale: float, dim: int) -> torch.Tensor:
    """``KL(softmax(s * expert) || softmax(s * lrm))`` along ``dim``, in at least float32; the expert's scores
    are constants."""
    dtype = torch.promote_types(lrm.dtype, torch.float32)
    log_p = (logit_scale * expert.detach().to(dtype)).log_softmax(dim)
    log_q = (logit_scale * lrm.to(dtype)).log_softmax(dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim)


def listwise_kl_loss(expert_matrix: torch.Tensor, lrm_matrix: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """The LRM's pre-training loss on ``n`` data latents and their ``n`` prompts: :func:`pairwise_kl_loss`
    widened from two latents to all of them, both ways as CLIP's loss.

    ``mean_j KL(softmax_i(s E[:, j]) || softmax_i(s L[:, j])) + mean_i KL(softmax_j(s E[i, :]) || softmax_j(s L[i, :]))``
    where ``E[i, j]`` / ``L[i, j]`` are the expert's / LRM's scores of latent ``i`` against prompt ``j``
    (``[n, n]``; the expert's are constants). The first term ranks every latent under each prompt (what the
    student's reward gradient uses), the second every prompt for each latent (what teaches the text side).
    """
    if expert_matrix.shape != lrm_matrix.shape or expert_matrix.ndim != 2:
        raise ValueError(f"expected two [n_latents, n_prompts] matrices, got {tuple(expert_matrix.shape)} "
                         f"and {tuple(lrm_matrix.shape)}")
    return sum(_softmax_kl(expert_matrix, lrm_matrix, logit_scale, dim).mean() for dim in (0, 1))


@torch.no_grad()
def pairwise_accuracy(expert_scores: torch.Tensor, lrm_scores: torch.Tensor) -> float:
    """Fraction of pairs ``(i < j)`` of each sample the LRM orders like the expert (ties of the expert skipped;
    NaN when every pair is a tie)."""
    pairs = _pairs(expert_scores.shape[0])
    i, j = [p[0] for p in pairs], [p[1] for p in pairs]
    de, dl = expert_scores[i] - expert_scores[j], lrm_scores[i] - lrm_scores[j]
    valid = de != 0
    if not valid.any():
        return float("nan")
    return float(((de > 0) == (dl > 0))[valid].float().mean())


# ----------------------------------------------------------------------------- online training


class LRMTrainer:
    """Trains a :class:`LatentRewardModel` to rank latents like an expert reward on their decoded images.

    Args:
        model: the LRM (kept frozen, ``requires_grad=False``, outside :meth:`update`).
        expert: a :class:`~lcm_lab.rewards.base.RewardModel` (images in ``[0, 1]`` + prompts -> scores);
            only ever called under ``no_grad``.
        codec: a :class:`~lcm_lab.core.latents.LatentCodec` decoding scaled latents to ``[-1, 1]`` images.
        lr, weight_decay, betas: the LRM's own AdamW (RG-LCD: lr 3.3e-6, weight decay 0).
        logit_scale: see :func:`pairwise_kl_loss`; it multiplies the expert's scores as they are, so an
            expert should score on a cosine-like scale (HPSv2; weight a ``100 cos`` CLIP score by 0.01).
            Fixed here; the reference's latent CLIP starts from a learnable one of about the same value.
        decode_chunk_size: latents per VAE decode call.

    Under ``torch.distributed`` the LRM's gradients are averaged over ranks, so every rank keeps the
    same proxy (each rank scores its own share of the batch).
    """

    def __init__(self, model: LatentRewardModel, expert, codec, lr: float = 3.3e-6, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), logit_scale: float = 100.0,
                 decode_chunk_size: int = 16) -> None:
        self.model = model.requires_grad_(False).eval()
        self.expert = expert
        self.codec = codec
        self.logit_scale = float(logit_scale)
        self.decode_chunk_size = int(decode_chunk_size)
        self.optimizer = torch.optim.AdamW(list(model.parameters()), lr=lr, betas=betas, weight_decay=weight_decay)

    @torch.no_grad()
    def expert_scores(self, latent_sets: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        """``[k, n]`` expert scores of ``k`` latent sets ``[n, C, h, w]`` decoded without gradient."""
        k, n = len(latent_sets), latent_sets[0].shape[0]
        images = self.codec.to_unit(self.codec.decode(torch.cat(list(latent_sets)), chunk_size=self.decode_chunk_size,
                                                      no_grad=True).float())
        scores = self.expert(images, list(prompts) * k)
        return scores.float().view(k, n)

    def update(self, latent_sets: Sequence[torch.Tensor], text_states: torch.Tensor, prompts: Sequence[str]) -> dict:
        """One AdamW step of the LRM on ``k`` latent sets of the same ``n`` prompts.

        Args:
            latent_sets: RG-LCD's three sets ``[pred, target, gt]``, each ``[n, C, h, w]`` scaled latents.
            text_states: ``[n, L, D]`` text-encoder states of the prompts (the LRM's text input).
            prompts: the ``n`` prompts (the expert's text input).

        Returns:
            ``lrm_loss`` (before the step), ``lrm_pairwise_acc`` (agreement with the expert on every pair,
            before the step) and ``expert_reward`` (mean expert score of the first set, the predictions).
        """
        if len(prompts) != latent_sets[0].shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {latent_sets[0].shape[0]} latents")
        k, n = len(latent_sets), len(prompts)
        expert = self.expert_scores(latent_sets, prompts)
        latents = torch.cat([z.detach().float() for z in latent_sets])
        states = text_states.detach().float().repeat(k, *([1] * (text_states.ndim - 1)))
        scores, loss = self._step(lambda: self.model(latents, states).view(k, n),
                                  lambda lrm: pairwise_kl_loss(expert, lrm, self.logit_scale))
        return {"lrm_loss": float(loss), "lrm_pairwise_acc": pairwise_accuracy(expert, scores),
                "expert_reward": float(expert[0].mean())}

    def pretrain_update(self, latents: torch.Tensor, text_states: torch.Tensor, prompts: Sequence[str]) -> dict:
        """One AdamW step of :func:`listwise_kl_loss` on ``n`` data latents ``[n, C, h, w]`` and their prompts.

        The expert scores every decoded latent against every prompt (:meth:`RewardModel.score_matrix`: one
        embedding product for CLIP-like rewards, ``n * n`` evaluations otherwise). Returns ``lrm_pretrain_loss``
        and ``lrm_pretrain_acc`` (agreement with the expert on the order of every two latents under each prompt),
        both before the step.
        """
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {latents.shape[0]} latents")
        with torch.no_grad():
            images = self.codec.to_unit(self.codec.decode(latents, chunk_size=self.decode_chunk_size,
                                                          no_grad=True).float())
            expert = self.expert.score_matrix(images, list(prompts)).float()
        latents, states = latents.detach().float(), text_states.detach().float()

        def lrm_matrix():
            return self.model.encode_latents(latents) @ self.model.encode_text(states).T

        scores, loss = self._step(lrm_matrix, lambda lrm: listwise_kl_loss(expert, lrm, self.logit_scale))
        return {"lrm_pretrain_loss": float(loss), "lrm_pretrain_acc": pairwise_accuracy(expert, scores)}

    def _step(self, scores_fn, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """One AdamW step of ``loss_fn(scores_fn())`` with the LRM trainable; returns (scores, loss), detached."""
        self.model.requires_grad_(True).train()
        try:
            scores = scores_fn()
            loss = loss_fn(scores)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._average_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.model.requires_grad_(False).eval()
        return scores.detach(), loss.detach()

    def _average_gradients(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for p, g in zip(self.model.parameters(), grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p)
            offset += g.numel()

    # ------------------------------------------------------------------ checkpoint tensors
    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """The AdamW state as flat tensors (``"<param index>.<key>"``), for safetensors checkpoints."""
        out = {}
        for idx, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`optimizer_tensors`."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})


def pretrain_lrm(trainer: LRMTrainer, batches: Iterable[tuple[torch.Tensor, torch.Tensor, Sequence[str]]],
                 steps: int, lr: float | None = None, progress: bool = False) -> list[dict]:
    """Warm-start the LRM with ``steps`` calls of :meth:`LRMTrainer.pretrain_update` on data.

    ``batches`` yields ``(latents, text_states, prompts)`` of data latents and their captions. This is the
    toolkit's counterpart of RG-LCD's pre-trained latent CLIP: before distillation the proxy learns from the
    expert how latents and prompts match (a proxy trained only online on (prediction, target, data) triplets
    from scratch stays near chance, as RESULTS.md shows for the toy world). ``lr`` (default: the trainer's)
    holds for these steps only. Returns every step's logs.
    """
    from tqdm.auto import tqdm

    groups = trainer.optimizer.param_groups
    online_lr = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = g["lr"] if lr is None else float(lr)
    logs = []
    try:
        with tqdm(total=steps, desc="LRM pre-training", disable=not progress) as bar:
            for _, (latents, text_states, prompts) in zip(range(steps), batches):
                logs.append(trainer.pretrain_update(latents, text_states, prompts))
                bar.set_postfix(loss=f"{logs[-1]['lrm_pretrain_loss']:.3f}", acc=f"{logs[-1]['lrm_pretrain_acc']:.3f}")
                bar.update()
    finally:
        for g, value in zip(groups, online_lr):
            g["lr"] = value
    return logs
