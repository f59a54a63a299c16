"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation", https://github.com/yuvalkirstain/PickScore).

PickScore is a CLIP-H fine-tuned on Pick-a-Pic preferences and distributed as a transformers
``CLIPModel`` (``yuvalkirstain/PickScore_v1``); its tokenizer and image statistics are those
of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. The score is, as in the reference code,
``logit_scale.exp() * cos(image_embeds, text_embeds)`` (about 18-23 for real images).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import read_json_object
from ..models.sd import has_tokenizer_files
from ..readable import from_pretrained_complete, reading
from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessor, RewardModel, missing_weights, register,
                   resolve_weights)
from .clip_score import as_dtype

PICKSCORE_DIR_ENV = "LCM_LAB_PICKSCORE_DIR"
PICKSCORE_PROCESSOR_ENV = "LCM_LAB_PICKSCORE_PROCESSOR_DIR"
PICKSCORE_SOURCE = "https://huggingface.co/yuvalkirstain/PickScore_v1"
PROCESSOR_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes used by CLIPImageProcessor


def _side(value, default: int) -> int:
    """A square side from a processor ``size``/``crop_size`` entry (int or dict)."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    height, width = int(value["height"]), int(value["width"])
    if height != width:
        raise NotImplementedError(f"non-square crop {height}x{width} is not supported")
    return height


def processor_preprocessor(folder: Path, image_size: int, antialias: bool = True) -> ImagePreprocessor:
    """Differentiable preprocessing from a transformers ``preprocessor_config.json`` (CLIPImageProcessor:
    resize the shortest edge, center crop, normalise); OpenAI CLIP statistics and the model's
    ``image_size`` when the file is absent."""
    path = folder / "preprocessor_config.json"
    cfg = {}
    if path.is_file():
        cfg = read_json_object(path, "image processor config")
    crop = _side(cfg.get("crop_size"), image_size)
    resize = _side(cfg.get("size"), crop)
    if resize != crop:
        raise NotImplementedError(f"{path}: resizing to {resize} before a {crop} crop is not supported")
    return ImagePreprocessor(crop, cfg.get("image_mean") or OPENAI_CLIP_MEAN, cfg.get("image_std") or OPENAI_CLIP_STD,
                             resize_mode="shortest", interpolation=_RESAMPLE.get(cfg.get("resample", 3), "bicubic"),
                             antialias=antialias)


def _embeddings(output) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output object in transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = output[1] if isinstance(output, (tuple, list)) else output["pooler_output"]
    return pooled


@register("pickscore")
class PickScoreReward(RewardModel):
    """PickScore: ``logit_scale.exp() * cos(image, prompt)`` of the PickScore CLIP model.

    Args:
        model_dir: the ``yuvalkirstain/PickScore_v1`` folder (``config.json`` + weights);
            default ``$LCM_LAB_PICKSCORE_DIR``.
        processor_dir: folder with the tokenizer (``vocab.json`` + ``merges.txt`` or
            ``tokenizer.json``) and ``preprocessor_config.json`` of
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; default ``$LCM_LAB_PICKSCORE_PROCESSOR_DIR``,
            else ``model_dir`` when it holds a tokenizer.
        device, dtype: where and in which precision the model runs.
        antialias: antialiased resizing, see :func:`~lcm_lab.rewards.base.preprocess_images`.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, processor_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 antialias: bool = True):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        model_path = resolve_weights(model_dir, PICKSCORE_DIR_ENV)
        weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        if model_path is None or not (model_path / "config.json").is_file() or not any(
                (model_path / name).is_file() for name in weights):
            raise missing_weights("PickScore", "config.json + model.safetensors (folder)", PICKSCORE_SOURCE,
                                  "model_dir", PICKSCORE_DIR_ENV, model_path)
        proc_path = resolve_weights(processor_dir, PICKSCORE_PROCESSOR_ENV)
        if proc_path is None and has_tokenizer_files(model_path):
            proc_path = model_path
        if proc_path is None or not has_tokenizer_files(proc_path):
            raise missing_weights("PickScore processor", "vocab.json + merges.txt (or tokenizer.json) and "
                                  "preprocessor_config.json (folder)", PROCESSOR_SOURCE, "processor_dir",
                                  PICKSCORE_PROCESSOR_ENV, proc_path)
        model = from_pretrained_complete(CLIPModel, model_path, "PickScore model folder", local_files_only=True)
        self.model = model.to(device=device, dtype=as_dtype(dtype))
        with reading(proc_path, "PickScore processor folder"):
            self.tokenizer = AutoTokenizer.from_pretrained(str(proc_path), local_files_only=True)
        self.preprocess = processor_preprocessor(proc_path, int(model.config.vision_config.image_size), antialias)
        self.input_size = self.preprocess.size
        self.max_length = min(77, int(model.config.text_config.max_position_embeddings))
        self.model_dir, self.processor_dir = model_path, proc_path
        self.freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, D)`` float32, differentiable w.r.t. ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return F.normalize(_embeddings(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)`` float32 (no gradients)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(_embeddings(out).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cos
