"""CLIP score (Hessel et al. 2021, "CLIPScore") with any open_clip model, plus the open_clip
loading helpers shared by the HPSv2, aesthetic and toy-clip rewards.

CLIP score = ``100 * max(cos(image_features, text_features), 0)``, computed here directly:
torchmetrics' ``CLIPScore`` fails with transformers 5, only accepts Hugging Face ``openai/*``
models, and its PIL-style processor is not differentiable w.r.t. the images. Models come from open_clip (Ilharco et al. 2021,
https://github.com/mlfoundations/open_clip) and are always loaded from local files.
"""

from __future__ import annotations

import copy
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..files import read_json_object
from ..readable import reading
from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessor, RewardModel, missing_weights, register,
                   resolve_weights)

CLIP_CHECKPOINT_ENV = "LCM_LAB_CLIP_CHECKPOINT"
CLIP_ARCH_ENV = "LCM_LAB_CLIP_ARCH"
DEFAULT_CLIP_ARCH = "ViT-H-14"

# File names open_clip uses for the weights inside a model folder, most preferred first.
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                          "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                          "pytorch_model.bin", "model.pth")


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``torch.float16`` from ``torch.float16``, ``"float16"``, ``"fp16"`` or ``"half"`` (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _config_file(path: str | os.PathLike) -> dict:
    """The JSON object in an open_clip model config file, or a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} does not exist")
    return read_json_object(path, "open_clip model config")


def _architecture_config(arch: str | os.PathLike | Mapping) -> tuple[dict, dict] | None:
    """An explicit open_clip model config (dict or JSON file) and the preprocessing a JSON file sets beside it
    (its ``"preprocess_cfg"``, as an ``open_clip_config.json`` has), or ``None`` for a built-in name."""
    if isinstance(arch, Mapping):
        raw, preprocess = dict(arch), {}
    elif str(arch).endswith(".json"):
        raw = _config_file(arch)
        preprocess = raw.get("preprocess_cfg", {})
    else:
        return None
    cfg = copy.deepcopy(raw.get("model_cfg", raw))
    if "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ValueError("an open_clip model config needs 'vision_cfg' and 'text_cfg' (and 'embed_dim')")
    return cfg, preprocess


def _tokenizer_for_config(text_cfg: Mapping):
    from open_clip import SimpleTokenizer

    context_length = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # of an open_clip pretrained config


def create_open_clip(arch: str | os.PathLike | Mapping) -> tuple[torch.nn.Module, object]:
    """A randomly initialised open_clip model and its tokenizer, without loading any weights.

    Args:
        arch: a built-in open_clip architecture name (``"ViT-H-14"``, ``"ViT-L-14-quickgelu"``...),
            an open_clip model config dict (``{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}``),
            or the path of a ``.json`` file holding one (optionally under ``"model_cfg"``, as in
            an ``open_clip_config.json``).
    """
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    explicit = _architecture_config(arch)
    if explicit is None:
        name = str(arch)
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {name!r}; pass a built-in name "
                             f"(open_clip.list_models()), a model-config dict or a .json config file")
        model = open_clip.create_model(name, pretrained=None)
        # Without pretrained weights open_clip falls back to OpenAI's preprocessing. Where every published
        # checkpoint of the architecture agrees on another one (SigLIP: mean = std = 0.5, squash), use it;
        # where they disagree (ViT-H-14: laion2b vs dfn5b), the OpenAI default stays (HPSv2's) and a .json
        # config with a "preprocess_cfg" picks another.
        known = {tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in
                              open_clip.get_pretrained_cfg(name, tag).items() if k in _PREPROCESS_KEYS))
                 for tag in open_clip.list_pretrained_tags_by_model(name)}
        if len(known) == 1:
            set_model_preprocess_cfg(model, {**asdict(PreprocessCfg()), **dict(known.pop()),
                                             "size": model.visual.image_size})
        return model, open_clip.get_tokenizer(name)
    cfg, preprocess = explicit
    text_cfg, vision_cfg = cfg["text_cfg"], cfg["vision_cfg"]
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # never fetch tower weights: the checkpoint has them
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
    preprocess_cfg = {**asdict(PreprocessCfg()), **preprocess, "size": model.visual.image_size}
    set_model_preprocess_cfg(model, preprocess_cfg)
    return model, _tokenizer_for_config(text_cfg)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _weights_in_folder(folder: Path) -> Path | None:
    for name in OPEN_CLIP_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_open_clip(checkpoint: str | os.PathLike, arch: str | os.PathLike | Mapping = DEFAULT_CLIP_ARCH
                   ) -> tuple[torch.nn.Module, object]:
    """Load an open_clip model and its tokenizer from local files (nothing is downloaded).

    Args:
        checkpoint: one of
            * an open_clip model folder with ``open_clip_config.json`` (``{"model_cfg": ...,
              "preprocess_cfg": ...}``) and its weights (``open_clip_model.safetensors`` or
              ``open_clip_pytorch_model.bin``), e.g. a snapshot of a Hugging Face open_clip repo
              such as ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; ``arch`` is then ignored;
            * a weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, a plain state dict or
              one under a ``"state_dict"`` key) for the architecture ``arch``;
            * OpenAI's original TorchScript CLIP archive (e.g. ``ViT-L-14.pt``); ``arch`` is
              then ignored (the architecture is read from the weights).
        arch: the architecture of a weights file, see :func:`create_open_clip`.

    Returns:
        ``(model, tokenizer)``; ``open_clip.get_model_preprocess_cfg(model)`` gives its input
        size and normalisation.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist, or a folder holds no weights.
    """
    import open_clip

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            if not any(any(path.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
                raise FileNotFoundError(f"open_clip model folder {path} has open_clip_config.json but no weights "
                                        f"(expected one of {', '.join(OPEN_CLIP_WEIGHT_FILES[:3])})")
            with reading(path, "open_clip model folder"):
                model = open_clip.create_model(f"local-dir:{path}")
            return model, open_clip.get_tokenizer(f"local-dir:{path}")
        weights = _weights_in_folder(path)
        if weights is None:
            raise FileNotFoundError(f"folder {path} holds neither open_clip_config.json nor a weights file "
                                    f"({', '.join(OPEN_CLIP_WEIGHT_FILES)})")
        path = weights
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
    if _is_torchscript(path):
        from open_clip import SimpleTokenizer

        with reading(path, "OpenAI CLIP TorchScript file"):
            model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        return model, SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))
    model, tokenizer = create_open_clip(arch)
    with reading(path, f"open_clip checkpoint ({arch})"):
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    return model, tokenizer


def open_clip_preprocessor(model: torch.nn.Module, antialias: bool = True,
                           resize_mode: str | None = None) -> ImagePreprocessor:
    """The differentiable preprocessing matching an open_clip model's preprocess config."""
    from open_clip import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise NotImplementedError(f"non-square model input {tuple(size)} is not supported")
        size = size[0]
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    fill = cfg.get("fill_color", 0)
    return ImagePreprocessor(int(size), cfg.get("mean") or OPENAI_CLIP_MEAN, cfg.get("std") or OPENAI_CLIP_STD,
                             resize_mode=resize_mode or cfg.get("resize_mode", "shortest"),
                             interpolation=interpolation, antialias=antialias,
                             fill=fill / 255.0 if fill > 1 else float(fill))


class OpenCLIPReward(RewardModel):
    """Base of rewards built on an open_clip model: frozen model, tokenizer and preprocessing.

    Provides :meth:`image_features` (differentiable) and :meth:`text_features` (no grad),
    both L2-normalised float32, and :meth:`cosine` of matching rows.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess: ImagePreprocessor,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
        super().__init__()
        self.model = model.to(device=device, dtype=as_dtype(dtype))
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.input_size = preprocess.size
        self.freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, D)`` float32, differentiable w.r.t. ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)`` float32 (computed without gradients).

        Each distinct prompt is encoded once: RG-LCD's proxy training scores three latent sets against the
        same prompts."""
        prompts = list(prompts)
        distinct = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(distinct).to(self.device)
        features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        if len(distinct) == len(prompts):
            return features
        row = {p: i for i, p in enumerate(distinct)}
        return features[torch.tensor([row[p] for p in prompts], device=features.device)]

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity ``(B,)`` of each image with its own prompt."""
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """The score as a function of the image-prompt cosine (here the cosine itself, as HPSv2)."""
        return cos

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.from_cosine(self.cosine(images, prompts))

    def score_matrix(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``(n_images, n_prompts)`` scores from one product of the normalised embeddings."""
        self.check_inputs(images, ["" for _ in range(images.shape[0])])
        prompts = self.check_prompt_list(prompts)
        return self.from_cosine(self.image_features(images) @ self.text_features(prompts).T).to(images.device)


@register("clip")
class CLIPScoreReward(OpenCLIPReward):
    """CLIP score: ``100 * max(cos(image, prompt), 0)`` with an open_clip model.

    Args:
        checkpoint: an open_clip model folder (``open_clip_config.json`` + weights), a weights
            file for ``arch``, or OpenAI's TorchScript archive; default ``$LCM_LAB_CLIP_CHECKPOINT``.
            For the default ViT-H-14 use the files of the Hugging Face repo
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the folder, or its
            ``open_clip_pytorch_model.bin``).
        arch: architecture of a weights file (default ``$LCM_LAB_CLIP_ARCH`` or ``"ViT-H-14"``);
            any open_clip name, config dict or ``.json`` config file.
        clip_at_zero: clamp negative scores at 0 as the CLIP-score definition does (default).
            Clamped scores have zero gradient; pass ``False`` for a plain ``100 * cos``.
        device, dtype: where and in which precision the model runs.
        antialias: antialiased resizing, see :func:`~lcm_lab.rewards.base.preprocess_images`.

    Scores are typically 15-35 for matching image-prompt pairs with real CLIP models.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, arch: str | os.PathLike | Mapping | None = None,
                 clip_at_zero: bool = True, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, antialias: bool = True):
        path = resolve_weights(checkpoint, CLIP_CHECKPOINT_ENV)
        if path is None or not path.exists():
            raise missing_weights("CLIP score", "open_clip_pytorch_model.bin (CLIP ViT-H-14 laion2b_s32b_b79k)",
                                  "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                                  "(or any open_clip model folder / checkpoint)", "checkpoint",
                                  CLIP_CHECKPOINT_ENV, path)
        arch = arch or os.environ.get(CLIP_ARCH_ENV) or DEFAULT_CLIP_ARCH
        model, tokenizer = load_open_clip(path, arch)
        super().__init__(model, tokenizer, open_clip_preprocessor(model, antialias), device, dtype)
        self.clip_at_zero = bool(clip_at_zero)
        self.checkpoint = path

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        scores = 100.0 * cos
        return scores.clamp(min=0) if self.clip_at_zero else scores
