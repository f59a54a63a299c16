"""Metrics of the embedded toy world: judge features (FD), prompt accuracy, floors.

FD is the Fréchet distance between judge features of generated images and of VAE
reconstructions of held-out real images: a generator can at best reproduce what the
VAE decodes, so measuring against raw images would let the VAE's own error dominate and
hide differences between samplers. The floors say how small FD can get at this sample
size: two independent reconstructed sets, two independent real sets, and the VAE's own
error (reconstructions vs real images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.sd import assets_dir
from ..toy.judge import AttributeJudge
from ..toy.world import ATTRIBUTE_NAMES, ToyWorld, attribute_labels
from .frechet import FeatureStats, fd_between

EVAL_SEED = 1234  # seed of the held-out evaluation stream (split "eval")
# Reference and floor sets use eval images [0, 2 * num) (num <= 50_000); generated sets take their prompts from
# here on, so that prompts never coincide with reference images (the unpaired floors apply).
PROMPT_START = 100_000


def toy_judge_dir() -> Path:
    """The embedded attribute judge's folder (assets/toy/judge)."""
    return assets_dir() / "toy" / "judge"


def load_judge(path=None) -> AttributeJudge:
    """The toy attribute judge from ``path`` (default: the embedded one)."""
    return AttributeJudge.from_pretrained(path or toy_judge_dir())


def eval_prompts(n: int, start: int = PROMPT_START, split: str = "eval") -> tuple[list[str], list[dict]]:
    """``n`` held-out (caption, attributes) pairs of the evaluation stream (by default
    disjoint from the reference and floor images of :func:`toy_reference`)."""
    pairs = ToyWorld(EVAL_SEED, split).prompts(n, start)
    return [p for p, _ in pairs], [a for _, a in pairs]


def real_images(n: int, start: int = 0, split: str = "eval") -> tuple[torch.Tensor, list[dict]]:
    """``n`` held-out real images (N, 3, 32, 32) in [0, 1] and their attributes."""
    world = ToyWorld(EVAL_SEED, split)
    samples = [world[i] for i in range(start, start + n)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
    return images, [s.attributes for s in samples]


@torch.no_grad()
def judge_features(judge: AttributeJudge, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The judge's penultimate features of images (N, 3, 32, 32) in [0, 1]: the space of the toy FD."""
    return torch.cat([judge.features(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def prompt_accuracy(judge: AttributeJudge, images: torch.Tensor, attributes: list[dict],
                    batch_size: int = 500) -> dict[str, float]:
    """Fraction of images whose every attribute the judge reads as the prompt says
    (``accuracy``), and the per-attribute accuracies (``acc_<name>``)."""
    pred = torch.cat([judge.predict(chunk) for chunk in images.split(batch_size)])
    target = torch.tensor([attribute_labels(a) for a in attributes])
    correct = pred == target
    # float64 means: averaged over batches they are then exact fractions of the image count
    out = {"accuracy": correct.all(1).double().mean().item()}
    out.update({f"acc_{k}": correct[:, j].double().mean().item() for j, k in enumerate(ATTRIBUTE_NAMES)})
    return out


@torch.no_grad()
def vae_reconstruct(vae, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Images in [0, 1] through the VAE (posterior mode) and back, in [0, 1]."""
    outs = []
    for chunk in images.split(batch_size):
        z = vae.encode(chunk.to(vae.dtype) * 2 - 1).latent_dist.mode()
        outs.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(outs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [0, 1]."""
    mse = (a - b).square().flatten(1).mean(1).clamp(min=1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


@dataclass
class ToyReference:
    """Reference statistics for toy FD: judge features of held-out real images (set A, eval
    images ``[0, num)``) and of their VAE reconstructions (what generated images are compared
    against), plus the floors measured against a second disjoint real set B (``[num, num + num_b)``)."""

    recon: FeatureStats
    real: FeatureStats
    num: int
    floors: dict[str, float]


def _judge_stats(judge: AttributeJudge, vae, num: int, start: int) -> tuple[FeatureStats, FeatureStats]:
    """(reconstructions, real) judge statistics of eval images ``[start, start + num)``; the
    images go to the VAE's device, the reconstructions to the judge's."""
    vae_device = next(vae.parameters()).device
    judge_device = next(judge.parameters()).device
    images, _ = real_images(num, start)
    recon = vae_reconstruct(vae, images.to(vae_device))
    return (FeatureStats.of(judge_features(judge, recon.to(judge_device)).cpu()),
            FeatureStats.of(judge_features(judge, images.to(judge_device)).cpu()))


def toy_reference(judge: AttributeJudge, vae, num: int = 1000, num_b: int | None = None) -> ToyReference:
    """The toy FD reference (``num`` images, set A) and its floors, measured with a second set B of ``num_b``
    images (default ``num``): the sample sizes of ``num_b`` generated images against the reference, since
    FD's bias depends on both.

    * ``fd_floor``: reconstructions of B vs reconstructions of A (the floor of ``fd``);
    * ``fd_real_floor``: real B vs real A (the floor of ``fd_real``);
    * ``fd_vae``: reconstructions of B vs real A (the VAE's own error).
    """
    num_b = num if num_b is None else num_b
    if min(num, num_b) < 2:
        raise ValueError(f"FD needs at least 2 images per set (a covariance), got {num} reference and {num_b}")
    recon_a, real_a = _judge_stats(judge, vae, num, 0)
    recon_b, real_b = _judge_stats(judge, vae, num_b, num)
    floors = {"fd_floor": fd_between(recon_b, recon_a), "fd_real_floor": fd_between(real_b, real_a),
              "fd_vae": fd_between(recon_b, real_a)}
    return ToyReference(recon_a, real_a, num, floors)


def toy_metrics(judge: AttributeJudge, reference: ToyReference, images: torch.Tensor,
                attributes: list[dict]) -> dict[str, float]:
    """FD (vs reconstructions), FD vs real images, their floors, and prompt accuracy."""
    feats = judge_features(judge, images)
    out = {"fd": fd_between(feats, reference.recon), "fd_real": fd_between(feats, reference.real),
           **reference.floors}
    out.update(prompt_accuracy(judge, images, attributes))
    return out

