"""Load the pieces of a Stable-Diffusion-style latent diffusion model from a local folder.

Any diffusers pipeline folder with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/`` works: SD 1.x/2.x checkpoints in diffusers format, the embedded toy teacher,
or an exported lcm_lab student. Nothing is downloaded.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.latents import LatentCodec
from ..core.schedules import NoiseSchedule, check_scheduler_config
from ..files import read_json_object
from ..readable import from_pretrained_complete, reading

ASSETS_ENV = "LCM_LAB_ASSETS"
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def assets_dir() -> Path:
    """The embedded assets folder (``$LCM_LAB_ASSETS`` or ``<repo>/assets``)."""
    return Path(os.environ.get(ASSETS_ENV, Path(__file__).resolve().parents[2] / "assets"))


def toy_teacher_dir() -> Path:
    """The embedded toy teacher's diffusers folder (assets/toy/teacher)."""
    return assets_dir() / "toy" / "teacher"


class LDMParts(ABC):
    """What every loaded LDM (SD 1.x/2.x :class:`LatentDiffusionModel`, SDXL
    :class:`~lcm_lab.models.sdxl.SDXLModel`) has: networks, schedule, conditioning, and what follows from them.
    :func:`lcm_lab.generation.generate` needs nothing else."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: NoiseSchedule
    scheduler_config: dict
    # Scheduler settings the family's stock diffusers pipeline imposes whatever the config says (none for SDXL).
    stock_scheduler_overrides: dict  # see :func:`stock_scheduler_overrides`
    # How the folder's stock img2img pipeline applies strength: see :func:`strength_in_scheduler`.
    strength_in_scheduler: bool

    @property
    def sampling_config(self) -> dict:
        """The scheduler config as the family's stock pipeline runs it: :func:`~lcm_lab.generation.generate`
        samples with these settings (grid spacing, offset, x0 clipping)."""
        return {**self.scheduler_config, **self.stock_scheduler_overrides}

    @abstractmethod
    def conditioning(self, prompts: list[str], truncate: bool = False, image_size: int | None = None):
        """The :class:`~lcm_lab.core.conditioning.Conditioning` of ``prompts`` for generating ``image_size`` px."""

    @abstractmethod
    def unconditional(self, cond):
        """The unconditional branch of classifier-free guidance for ``cond`` (batch 1 or ``len(cond)``)."""

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec(self.vae)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, size, size)`` of the UNet's native latents (``unet.config.sample_size``)."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @property
    def image_size(self) -> int:
        """Side of the images the model generates natively (latent size x VAE factor)."""
        return self.latent_shape[1] * self.vae_scale_factor


# StableDiffusionPipeline.__init__ (and its img2img twin) rewrites any scheduler's steps_offset to 1 and clip_sample
# to False, with a deprecation warning; LatentConsistencyModelPipeline and the SDXL pipelines impose nothing.
SD_PIPELINE_OVERRIDES = {"steps_offset": 1, "clip_sample": False}


def pipeline_index(folder: str | os.PathLike) -> dict:
    """A pipeline folder's ``model_index.json`` (its pipeline class and flags), or ``{}`` when it has none."""
    index = Path(folder) / "model_index.json"
    return read_json_object(index, "pipeline index") if index.is_file() else {}


def stock_scheduler_overrides(folder: str | os.PathLike) -> dict:
    """What the stock pipeline of a folder imposes on its scheduler config: :data:`SD_PIPELINE_OVERRIDES` for
    StableDiffusionPipeline folders, nothing for LatentConsistencyModelPipeline (model_index.json's
    ``_class_name``) and SDXL folders."""
    from .sdxl import is_sdxl_dir  # sdxl builds on this module

    name = str(pipeline_index(folder).get("_class_name", ""))
    if is_sdxl_dir(folder) or name.startswith("LatentConsistencyModel"):
        return {}
    return dict(SD_PIPELINE_OVERRIDES)


def strength_in_scheduler(folder: str | os.PathLike) -> bool:
    """Whether the folder's stock img2img pipeline passes ``strength`` to its scheduler's ``set_timesteps``:
    ``LatentConsistencyModelImg2ImgPipeline`` does, for LatentConsistencyModelPipeline folders (model_index.json's
    ``_class_name``), so an LCM or TCD scheduler spreads all the steps over the lower part of its grid. The
    img2img pipelines of the other folders, SDXL's included, keep the last ``int(n * strength)`` of the ``n``
    steps instead."""
    return str(pipeline_index(folder).get("_class_name", "")).startswith("LatentConsistencyModel")


@dataclass
class LatentDiffusionModel(LDMParts):
    """A loaded SD 1.x/2.x-style LDM: networks, noise schedule and latent codec."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: NoiseSchedule
    scheduler_config: dict
    path: Path
    stock_scheduler_overrides: dict = field(default_factory=lambda: dict(SD_PIPELINE_OVERRIDES))
    strength_in_scheduler: bool = False  # StableDiffusionImg2ImgPipeline trims the grid

    def encode_prompts(self, prompts: list[str], allow_empty: bool = False,
                       truncate: bool = False) -> torch.Tensor:
        """Text embeddings [B, L, D] exactly as StableDiffusionPipeline.encode_prompt makes them."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, allow_empty, truncate)

    def conditioning(self, prompts: list[str], truncate: bool = False, image_size: int | None = None):
        """Text embeddings of ``prompts`` (``image_size`` is SDXL's micro-conditioning; unused here)."""
        from ..core.conditioning import Conditioning

        return Conditioning(self.encode_prompts(prompts, truncate=truncate))

    def unconditional(self, cond):
        """The embedding of ``""`` (batch 1), whatever ``cond``."""
        from ..core.conditioning import Conditioning

        return Conditioning(self.encode_prompts([""], allow_empty=True))


def check_pipeline_dir(path: str | os.PathLike, parts: tuple[str, ...] = REQUIRED_PARTS, kind: str = "model",
                       hint: str = "Pass a local diffusers pipeline folder (e.g. one saved with "
                                   "`pipe.save_pretrained(DIR)`, or downloaded once with "
                                   "`huggingface-cli download <repo> --local-dir DIR`).") -> Path:
    """``path`` as a ``Path`` if it is a folder with every subfolder in ``parts``.

    Raises:
        FileNotFoundError: the folder is missing, or lacks some of ``parts`` (each named in the message,
            followed by ``hint``: how to obtain such a folder).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} folder {folder} does not exist. {hint}")
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{kind} folder {folder} lacks the subfolder(s) {', '.join(p + '/' for p in missing)}; it must be a "
            f"diffusers pipeline folder with {', '.join(p + '/' for p in parts)}. {hint}")
    return folder


def load_ldm(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LatentDiffusionModel:
    """Load unet, vae, text encoder, tokenizer and schedule from a local pipeline folder.

    Args:
        path: diffusers pipeline folder; defaults to the embedded toy teacher.
        device, dtype: where and in which precision the networks are placed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = check_pipeline_dir(path if path is not None else toy_teacher_dir())
    from .sdxl import is_sdxl_dir  # (sdxl imports this module)

    if is_sdxl_dir(folder):
        raise ValueError(f"{folder} is an SDXL pipeline: load it with lcm_lab.models.sdxl.load_sdxl (`lcm-lab sample` "
                         "and training take SDXL folders; `lcm-lab eval` and `bench` take SD 1.x/2.x ones)")
    scheduler_config, schedule = load_schedule(folder)
    unet = from_pretrained_complete(UNet2DConditionModel, folder / "unet", "UNet", torch_dtype=dtype)
    vae = from_pretrained_complete(AutoencoderKL, folder / "vae", "VAE", torch_dtype=dtype)
    text_encoder = from_pretrained_complete(CLIPTextModel, folder / "text_encoder", "text encoder", dtype=dtype)
    tokenizer = load_tokenizer(CLIPTokenizer, folder / "tokenizer", text_encoder.config.vocab_size)
    for net in (unet, vae, text_encoder):
        net.to(device).eval().requires_grad_(False)
    return LatentDiffusionModel(unet, vae, text_encoder, tokenizer, schedule.to(device), scheduler_config, folder,
                                stock_scheduler_overrides(folder), strength_in_scheduler(folder))


def load_schedule(folder: Path, hint: str = "Copy the scheduler/ folder of the model's repository (or of the "
                                            "pipeline it was distilled from).") -> tuple[dict, NoiseSchedule]:
    """``scheduler/scheduler_config.json`` of a pipeline folder and the :class:`NoiseSchedule` it defines
    (a config the schedule cannot be built from is an error naming the file; a missing one names ``hint``)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model folder {folder} lacks scheduler/scheduler_config.json. {hint}")
    config = read_json_object(path, "scheduler config")
    try:
        check_scheduler_config(config)  # a config lcm_lab would not follow: its own message, not "unreadable"
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    with reading(path, "scheduler config"):  # a wrong type or NaN in a value fails in here
        return config, NoiseSchedule.from_scheduler(config)


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds a CLIP BPE vocabulary: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                       and (folder / "merges.txt").is_file())


def load_tokenizer(cls, folder: Path, vocab_size: int):
    """``cls.from_pretrained(folder)`` for a text encoder with ``vocab_size`` token embeddings.

    Raises:
        FileNotFoundError: no vocabulary files (transformers would build a 2-token tokenizer from the config
            alone, and every prompt would become the same few ids).
        ValueError: an unreadable tokenizer, or one with more tokens than the text encoder has embeddings.
    """
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt: "
                                "copy the tokenizer/ folder of the model's repository there")
    with reading(folder, "tokenizer"):
        tokenizer = cls.from_pretrained(str(folder))
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {folder} has {len(tokenizer)} tokens but the text encoder only {vocab_size} "
                         "embeddings: the two folders come from different models")
    return tokenizer


def encode_prompts(tokenizer, text_encoder, prompts: list[str], allow_empty: bool = False,
                   truncate: bool = False) -> torch.Tensor:
    """Embed prompts with the last hidden state of the text encoder (SD 1.x/2.x).

    Empty prompts are an error unless ``allow_empty`` (the unconditional embedding uses "").
    Prompts longer than the tokenizer's context are an error unless ``truncate``: silently
    dropping words, as the stock pipeline does after a warning, changes what is generated.
    """
    prompts = check_prompts(tokenizer, prompts, allow_empty, truncate)
    max_len = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    # As StableDiffusionPipeline.encode_prompt: the padding mask only for encoders whose config asks for it
    # (CLIP's does not: SD was trained on embeddings of the padded sequence).
    mask = tokens.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(text_encoder.device),
                            attention_mask=None if mask is None else mask.to(text_encoder.device))[0]


def check_prompts(tokenizer, prompts: str | list[str], allow_empty: bool = False, truncate: bool = False,
                  fix: str = "Shorten it or pass truncate=True (--truncate on the CLI).") -> list[str]:
    """``prompts`` as a list, or a clear error for no prompts, an empty prompt (unless ``allow_empty``) or a
    prompt longer than ``tokenizer``'s context (unless ``truncate``; ``fix`` ends that error): silently
    dropping words, as the stock pipelines do after a warning, changes what is generated."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not allow_empty and any(not p.strip() for p in prompts):
        raise ValueError("empty prompt; give some text (the unconditional branch of guidance uses '' internally)")
    if not truncate:
        max_len = tokenizer.model_max_length
        # one batched call (no "sequence longer than" warning: we raise instead)
        for p, ids in zip(prompts, tokenizer(prompts, verbose=False).input_ids):
            n = len(ids)
            if n > max_len:
                raise ValueError(f"prompt has {n} tokens, more than the model's {max_len}: {p[:80]!r}... {fix}")
    return prompts
