"""Human Preference Score v2 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis", https://github.com/tgxs002/HPSv2).

HPSv2 is an open_clip ViT-H-14 fine-tuned on human preference pairs; the score is the cosine
similarity of the normalised image and text features (typically 0.25-0.33 for real images).
The checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are torch files whose
``"state_dict"`` entry holds the open_clip model's state dict; they are loaded here with
open_clip directly (the ``hpsv2`` PyPI wheel lacks its tokenizer vocabulary and downloads
at import).
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..readable import reading
from .base import missing_weights, register, resolve_weights
from .clip_score import OpenCLIPReward, create_open_clip, open_clip_preprocessor

HPS_CHECKPOINT_ENV = "LCM_LAB_HPS_CHECKPOINT"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_SOURCE = "https://huggingface.co/xswu/HPSv2"


def _normalise_version(version: str) -> str:
    key = str(version).lower().lstrip("v")
    key = {"2": "2.0", "2.0": "2.0", "2.1": "2.1"}.get(key, key)
    if f"v{key}" not in HPS_FILES:
        raise ValueError(f"unknown HPS version {version!r}; expected one of {sorted(HPS_FILES)}")
    return f"v{key}"


@register("hpsv2")
class HPSv2Reward(OpenCLIPReward):
    """HPSv2 / HPSv2.1: ``cos(image_features, text_features)`` of the HPS open_clip model.

    Args:
        checkpoint: ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` (from the Hugging Face
            repo ``xswu/HPSv2``), or a folder holding it; default ``$LCM_LAB_HPS_CHECKPOINT``.
        version: ``"v2.1"`` (default) or ``"v2.0"``; picks the file name inside a folder.
        arch: the open_clip architecture of the checkpoint (default ``"ViT-H-14"``; any
            open_clip name, config dict or ``.json`` config file).
        device, dtype: where and in which precision the model runs.
        antialias: antialiased resizing, see :func:`~lcm_lab.rewards.base.preprocess_images`.

    Images are resized with their longest side to 224 and padded to a square, as HPSv2's own
    evaluation transform (``ResizeMaxSize``) does; for square images this is a plain resize.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, version: str = "v2.1",
                 arch: str | os.PathLike | Mapping = "ViT-H-14", device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, antialias: bool = True):
        import open_clip

        version = _normalise_version(version)
        filename = HPS_FILES[version]
        path = resolve_weights(checkpoint, HPS_CHECKPOINT_ENV)
        if path is not None and path.is_dir():
            path = path / filename
        if path is None or not path.is_file():
            raise missing_weights(f"HPS {version}", filename, f"{HPS_SOURCE} (file {filename})", "checkpoint",
                                  HPS_CHECKPOINT_ENV, path)
        model, tokenizer = create_open_clip(arch)
        # torch.load(weights_only=True); the state dict may sit under "state_dict".
        with reading(path, f"HPS {version} checkpoint"):
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        super().__init__(model, tokenizer, open_clip_preprocessor(model, antialias, resize_mode="longest"),
                         device, dtype)
        self.version = version
        self.checkpoint = path

