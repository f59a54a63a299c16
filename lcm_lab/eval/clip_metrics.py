"""Prompt-alignment and preference metrics on top of the reward zoo (:mod:`lcm_lab.rewards`).

* CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning"): the mean over images of ``100 * max(cos(image, prompt), 0)``, computed by the
  ``clip`` reward (any local open_clip model) or, in the toy world, by ``toy-clip``.
* HPSv2 (Wu et al. 2023, "Human Preference Score v2"): the benchmark reports the mean score
  x 100 per style (anime, concept-art, paintings, photo) and their average.

The scores themselves are never re-implemented here: this module loads the reward models and
aggregates their per-image outputs. They resize with antialiasing, as the PIL preprocessing the
models were published with (the rewards' default, used for training too). The CLIP score clamps
each pair at 0, as Hessel et al.; torchmetrics' ``CLIPScore`` clamps the mean instead (the same
value unless some cosines are negative).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import torch

from ..rewards import CLIPScoreReward, HPSv2Reward, RewardModel, ToyCLIPReward


def load_clip_metric(toy: bool = False, checkpoint: str | os.PathLike | RewardModel | None = None,
                     arch: str | None = None, device: str | torch.device = "cpu") -> RewardModel:
    """The CLIP-score model: ``toy-clip`` for the toy world, else the ``clip`` reward.

    Args:
        toy: use the toy world's CLIP (``checkpoint`` then overrides its folder).
        checkpoint: an open_clip folder / weights file (default ``$LCM_LAB_CLIP_CHECKPOINT`` or,
            for toy, the embedded ``assets/toy/reward``), or an already loaded reward model.
        arch: open_clip architecture of a bare weights file (``clip`` only).

    Raises:
        FileNotFoundError: the weights are missing (the message says where they are published).
    """
    if isinstance(checkpoint, RewardModel):
        return checkpoint.to(device)
    if toy:
        return ToyCLIPReward(path=checkpoint, device=device, antialias=True)
    return CLIPScoreReward(checkpoint=checkpoint, arch=arch, device=device, antialias=True)


def load_hps_metric(checkpoint: str | os.PathLike | RewardModel | None = None, version: str = "v2.1",
                    arch: str | os.PathLike = "ViT-H-14", device: str | torch.device = "cpu") -> RewardModel:
    """The HPSv2 model (``HPS_v2.1_compressed.pt`` or a folder holding it; default
    ``$LCM_LAB_HPS_CHECKPOINT``), or an already loaded reward model."""
    if isinstance(checkpoint, RewardModel):
        return checkpoint.to(device)
    return HPSv2Reward(checkpoint=checkpoint, version=version, arch=arch, device=device, antialias=True)


@torch.no_grad()
def reward_scores(reward: RewardModel, images: torch.Tensor, prompts: Sequence[str],
                  batch_size: int = 64) -> torch.Tensor:
    """Per-image scores ``(N,)`` float64 on the CPU, computed in batches without gradients."""
    prompts = list(prompts)
    out = [reward(images[i:i + batch_size].to(reward.device), prompts[i:i + batch_size]).double().cpu()
           for i in range(0, len(prompts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class ScoreMean:
    """Running mean of per-image scores, overall and per group (e.g. HPS style).

    Args:
        scale: multiplies the reported means (100 for HPSv2's convention; 1 for CLIP score,
            which is already ``100 * cos``).
    """

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.sums: dict[str | None, float] = defaultdict(float)
        self.counts: dict[str | None, int] = defaultdict(int)

    def update(self, scores: torch.Tensor, groups: Sequence[str | None] | None = None) -> None:
        values = scores.double().cpu().tolist()
        groups = [None] * len(values) if groups is None else list(groups)
        if len(groups) != len(values):
            raise ValueError(f"got {len(values)} scores but {len(groups)} group labels")
        for v, g in zip(values, groups):
            self.sums[g] += v
            self.counts[g] += 1

    def mean(self) -> float:
        """Mean over all images x scale (NaN when empty)."""
        n = sum(self.counts.values())
        return self.scale * sum(self.sums.values()) / n if n else float("nan")

    def group_means(self) -> dict[str, float]:
        """Mean x scale per named group (images without a group are left out)."""
        return {g: self.scale * self.sums[g] / self.counts[g] for g in self.counts if g is not None}

    def summary(self, name: str) -> dict[str, float]:
        """``{name: overall}`` plus ``{name_<group>: mean}`` per group.

        With groups (HPS styles), ``name`` is the average of the group means, as the HPSv2
        benchmark's "averaged" column; it equals the image mean when groups are equally sized.
        """
        groups = self.group_means()
        if not groups:
            return {name: self.mean()}
        out = {name: sum(groups.values()) / len(groups)}
        out.update({f"{name}_{g}": v for g, v in sorted(groups.items())})
        return out
