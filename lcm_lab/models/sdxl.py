"""SDXL text conditioning for training (LCD on an SDXL teacher).

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", sec. 2.1-2.2) conditions its UNet on

- ``encoder_hidden_states``: the *penultimate* hidden states of two text encoders, CLIP ViT-L
  (``text_encoder``, ``CLIPTextModel``, width 768) and OpenCLIP ViT-bigG (``text_encoder_2``,
  ``CLIPTextModelWithProjection``, width 1280), concatenated on the feature axis (2048);
- ``text_embeds``: the pooled, projected output of the second encoder (1280);
- ``time_ids``: the micro-conditioning ``original_size + crop_top_left + target_size`` as
  six numbers per sample, each Fourier-embedded inside the UNet (``addition_embed_type="text_time"``).

Both are packed into a :class:`~lcm_lab.core.conditioning.Conditioning`
(``added_cond_kwargs = {"text_embeds": ..., "time_ids": ...}``), the form
:class:`~lcm_lab.objectives.lcd.LCDLoss` passes to the UNet.

Unconditional branch (diffusers ``train_lcm_distill_sdxl_wds.py``): the
prompt embedding and the pooled embedding are *zeros* (not the encoding of ``""``; this matches
SDXL's ``force_zeros_for_empty_prompt``), while ``time_ids`` stay the conditional ones (the
reference deep-copies the conditional ``added_cond_kwargs`` and only replaces ``text_embeds``;
SDXL pipelines likewise give the negative branch the same size/crop conditioning). See
:func:`sdxl_uncond`. Sampling follows the folder's flag instead (:meth:`SDXLModel.unconditional`).

Training captions: empty prompts are allowed (caption dropout) and over-long prompts are
truncated to the tokenizers' context (77 tokens), as the reference training scripts do.

Whole teachers: :func:`is_sdxl_dir` tells an SDXL pipeline folder (it has ``text_encoder_2/``) from an
SD 1.x/2.x one, :func:`load_sdxl` loads it as an :class:`SDXLModel`, which :func:`lcm_lab.generation.generate` samples
like any other LDM (validation grids during LCD).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.schedules import NoiseSchedule
from ..core.conditioning import Conditioning
from ..readable import from_pretrained_complete
from .sd import LDMParts, check_pipeline_dir, check_prompts, load_schedule, load_tokenizer, pipeline_index

__all__ = [
    "SDXL_TEXT_PARTS",
    "SDXL_PARTS",
    "SDXLText",
    "SDXLModel",
    "is_sdxl_dir",
    "check_sdxl_dir",
    "load_sdxl",
    "make_time_ids",
    "encode_prompts_sdxl",
    "sdxl_uncond",
    "load_sdxl_text",
]

SDXL_TEXT_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
"""Subfolders of a diffusers SDXL pipeline folder that :func:`load_sdxl_text` reads."""

SDXL_PARTS = ("unet", "vae", "scheduler") + SDXL_TEXT_PARTS
"""Subfolders of a diffusers SDXL pipeline folder that :func:`load_sdxl` reads."""

_DOWNLOAD_HINT = (
    "On a machine with internet access run `huggingface-cli download "
    "stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR` (or save a pipeline with "
    "`pipe.save_pretrained(DIR)`) and copy DIR here."
)

Size = tuple[int, int] | Sequence[int]


def _sizes(name: str, value, batch: int) -> torch.Tensor:
    """``value`` as a float64 ``[batch, 2]`` tensor: one ``(a, b)`` pair for all rows, or one pair per row."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim == 1:
        if t.numel() != 2:
            raise ValueError(f"`{name}` must be a pair (a, b) or one pair per prompt, got {value!r}")
        t = t.expand(batch, 2)
    elif t.ndim != 2 or t.shape != (batch, 2):
        raise ValueError(f"`{name}` must be a pair (a, b) or {batch} pairs (one per prompt), got shape {tuple(t.shape)}")
    return t


def make_time_ids(batch: int, original_size: Size, crop_top_left: Size = (0, 0), target_size: Size | None = None,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """SDXL micro-conditioning ``[B, 6]`` = ``original_size + crop_top_left + target_size`` (SDXL sec. 2.2).

    Each argument is one ``(height, width)`` / ``(top, left)`` pair shared by the batch, or ``batch``
    pairs (per-image original sizes and random crops, as in the reference training script).
    ``target_size`` defaults to ``original_size``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    target_size = original_size if target_size is None else target_size
    parts = [_sizes("original_size", original_size, batch), _sizes("crop_top_left", crop_top_left, batch),
             _sizes("target_size", target_size, batch)]
    return torch.cat(parts, dim=1).to(device=device, dtype=dtype)


def _encoder_device(encoder) -> torch.device:
    try:
        return next(encoder.parameters()).device
    except StopIteration:  # pragma: no cover - a text encoder always has parameters
        return torch.device("cpu")


def encode_prompts_sdxl(tokenizers: Sequence, text_encoders: Sequence, prompts: str | Sequence[str],
                        original_size: Size = (1024, 1024), crop_top_left: Size = (0, 0),
                        target_size: Size | None = None) -> Conditioning:
    """Encode training captions into SDXL UNet conditioning.

    Args:
        tokenizers: ``(tokenizer, tokenizer_2)``.
        text_encoders: ``(text_encoder, text_encoder_2)``: a ``CLIPTextModel`` and a
            ``CLIPTextModelWithProjection`` (its ``text_embeds`` is the pooled conditioning).
        prompts: one caption or a list; ``""`` is allowed (caption dropout); captions longer than a
            tokenizer's ``model_max_length`` are truncated.
        original_size: ``(H, W)`` of the source image, one pair or one per prompt.
        crop_top_left: ``(top, left)`` of the crop, one pair or one per prompt.
        target_size: ``(H, W)`` of the training image; defaults to ``original_size``.

    Returns:
        :class:`Conditioning` with ``encoder_hidden_states [B, 77, D1 + D2]`` (penultimate hidden
        states of both encoders, concatenated), ``added_cond_kwargs = {"text_embeds": [B, P],
        "time_ids": [B, 6]}``; all in the second encoder's dtype, on its device, without grad.
    """
    tokenizers, text_encoders = list(tokenizers), list(text_encoders)
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError(f"SDXL needs two tokenizers and two text encoders, got {len(tokenizers)} and {len(text_encoders)}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")

    hidden, pooled = [], None
    with torch.no_grad():
        for i, (tok, enc) in enumerate(zip(tokenizers, text_encoders)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(_encoder_device(enc))
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer (SDXL sec. 2.1)
            if i == 1:
                pooled = getattr(out, "text_embeds", None)
                if pooled is None:
                    raise ValueError("text_encoders[1] must be a CLIPTextModelWithProjection (its output has no `text_embeds`)")
    dtype = hidden[1].dtype
    encoder_hidden_states = torch.cat([h.to(dtype) for h in hidden], dim=-1)
    time_ids = make_time_ids(len(prompts), original_size, crop_top_left, target_size, dtype=dtype,
                             device=encoder_hidden_states.device)
    return Conditioning(encoder_hidden_states, {"text_embeds": pooled, "time_ids": time_ids})


def sdxl_uncond(cond: Conditioning, time_ids: str = "cond") -> Conditioning:
    """The unconditional SDXL conditioning (batch 1) for guidance in LCD.

    ``encoder_hidden_states`` and ``text_embeds`` are zeros of the shapes of ``cond`` (diffusers' SDXL LCD script:
    uncond = zeros for SDXL). ``time_ids``:

    - ``"cond"`` (default, as the reference script): left out, so that
      :meth:`~lcm_lab.objectives.lcd.LCDLoss.uncond_for` gives each sample its own conditional
      ``time_ids`` (per-image sizes and crops work).
    - ``"zeros"``: zeros too (the teacher then sees an out-of-distribution 0x0 image size in the
      unconditional branch; only for comparison with setups that zero everything).
    """
    if time_ids not in ("cond", "zeros"):
        raise ValueError(f"time_ids must be 'cond' or 'zeros', got {time_ids!r}")
    added = cond.added_cond_kwargs
    if not added or "text_embeds" not in added or "time_ids" not in added:
        raise ValueError("cond must be an SDXL Conditioning with added_cond_kwargs 'text_embeds' and 'time_ids'")
    uncond = {"text_embeds": torch.zeros_like(added["text_embeds"][:1])}
    if time_ids == "zeros":
        uncond["time_ids"] = torch.zeros_like(added["time_ids"][:1])
    return Conditioning(torch.zeros_like(cond.encoder_hidden_states[:1]), uncond)


@dataclass
class SDXLText:
    """The two SDXL tokenizers and text encoders, loaded by :func:`load_sdxl_text`."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    path: Path | None = None

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder, self.text_encoder_2)

    def encode(self, prompts: str | Sequence[str], original_size: Size = (1024, 1024),
               crop_top_left: Size = (0, 0), target_size: Size | None = None) -> Conditioning:
        """:func:`encode_prompts_sdxl` with these tokenizers and encoders."""
        return encode_prompts_sdxl(self.tokenizers, self.text_encoders, prompts, original_size, crop_top_left,
                                   target_size)


def is_sdxl_dir(path: str | os.PathLike | None) -> bool:
    """True when ``path`` is a diffusers pipeline folder of the SDXL family (it has ``text_encoder_2/``).

    SD 1.x/2.x folders have a single text encoder; :class:`~lcm_lab.training.lcd.LCDTask` uses this to pick
    :func:`load_sdxl` over :func:`~lcm_lab.models.sd.load_ldm`.
    """
    if path is None:
        return False
    folder = Path(path)
    return folder.is_dir() and (folder / "text_encoder_2").is_dir()


def check_sdxl_dir(path: str | os.PathLike, parts: Sequence[str] = SDXL_PARTS) -> Path:
    """:func:`~lcm_lab.models.sd.check_pipeline_dir` for SDXL folders (the error says how to get SDXL)."""
    return check_pipeline_dir(path, tuple(parts), kind="SDXL model", hint=_DOWNLOAD_HINT)


def load_sdxl_text(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> SDXLText:
    """Load ``tokenizer``, ``tokenizer_2``, ``text_encoder``, ``text_encoder_2`` from a local SDXL folder.

    The encoders are put on ``device`` in ``dtype``, in eval mode, frozen. Nothing is downloaded.

    Raises:
        FileNotFoundError: ``path`` is missing, or lacks one of the four subfolders (named in the
            message, with how to obtain an SDXL pipeline folder), or a tokenizer lacks its vocabulary files.
        ValueError: unreadable weights, weights missing some of the encoder's tensors, or a tokenizer with
            more tokens than its encoder.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = check_sdxl_dir(path, SDXL_TEXT_PARTS)
    text_encoder = from_pretrained_complete(CLIPTextModel, folder / "text_encoder", "text encoder", dtype=dtype)
    text_encoder_2 = from_pretrained_complete(CLIPTextModelWithProjection, folder / "text_encoder_2",
                                              "text encoder 2", dtype=dtype)
    tokenizer = load_tokenizer(CLIPTokenizer, folder / "tokenizer", text_encoder.config.vocab_size)
    tokenizer_2 = load_tokenizer(CLIPTokenizer, folder / "tokenizer_2", text_encoder_2.config.vocab_size)
    for enc in (text_encoder, text_encoder_2):
        enc.to(device).eval().requires_grad_(False)
    return SDXLText(tokenizer, tokenizer_2, text_encoder, text_encoder_2, folder)


@dataclass
class SDXLModel(LDMParts):
    """A loaded SDXL teacher (or SDXL-architecture student): networks, noise schedule, text conditioning.

    ``unet``, ``vae``, ``schedule``, ``scheduler_config`` and ``path`` mean what they mean on
    :class:`~lcm_lab.models.sd.LatentDiffusionModel`; the text side is :class:`SDXLText` (two tokenizers and
    encoders; :meth:`SDXLText.encode` gives a full :class:`~lcm_lab.core.conditioning.Conditioning` with the
    ``text_embeds``/``time_ids`` micro-conditioning).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text: SDXLText
    schedule: NoiseSchedule
    scheduler_config: dict
    path: Path
    # model_index.json's flag (StableDiffusionXLPipeline's default: True): zeros, or the encoded "", as the
    # negative branch of guidance.
    force_zeros_for_empty_prompt: bool = True
    stock_scheduler_overrides: dict = field(default_factory=dict)  # the SDXL pipelines impose nothing
    strength_in_scheduler: bool = False  # StableDiffusionXLImg2ImgPipeline trims the grid

    def conditioning(self, prompts: Sequence[str], truncate: bool = False, image_size: int | None = None
                     ) -> Conditioning:
        """Generation conditioning: ``text.encode`` with ``original_size = target_size = (R, R)`` and no crop,
        ``R = image_size`` (default :attr:`image_size`), as ``StableDiffusionXLPipeline`` does. Empty prompts,
        and prompts longer than either tokenizer's context unless ``truncate``, are errors, as for SD
        (:func:`~lcm_lab.models.sd.check_prompts`)."""
        for tokenizer in self.text.tokenizers:
            prompts = check_prompts(tokenizer, prompts, truncate=truncate)
        r = self.image_size if image_size is None else image_size
        if r < 1:
            raise ValueError(f"image size must be positive, got {r}")
        return self.text.encode(prompts, original_size=(r, r), crop_top_left=(0, 0), target_size=(r, r))

    def unconditional(self, cond: Conditioning) -> Conditioning:
        """The negative branch of ``StableDiffusionXLPipeline`` (batch 1) with ``cond``'s ``time_ids``: zero text
        and pooled embeddings under ``force_zeros_for_empty_prompt`` (SDXL's default), else those of ``""``."""
        if self.force_zeros_for_empty_prompt:
            uncond = sdxl_uncond(cond)
        else:
            uncond = self.text.encode([""], original_size=(self.image_size,) * 2, target_size=(self.image_size,) * 2)
        return Conditioning(uncond.encoder_hidden_states,
                            {**uncond.added_cond_kwargs, "time_ids": cond.added_cond_kwargs["time_ids"]})


def load_sdxl(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> SDXLModel:
    """Load UNet, VAE, both text encoders/tokenizers and the noise schedule from a local SDXL folder.

    The folder is a diffusers ``StableDiffusionXLPipeline`` folder (``save_pretrained`` layout): ``unet/``,
    ``vae/``, ``scheduler/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``. Any
    scheduler class works (SDXL ships an ``EulerDiscreteScheduler``); only its betas and ``prediction_type``
    are read (:meth:`~lcm_lab.core.schedules.NoiseSchedule.from_scheduler`). Networks are placed on ``device``
    in ``dtype``, in eval mode, frozen; a VAE whose config says ``force_upcast`` stays float32 under float16,
    as the SDXL pipelines run it. Nothing is downloaded.

    Raises:
        FileNotFoundError: the folder, one of its subfolders (named in the message, with how to obtain the
            weights) or ``scheduler/scheduler_config.json`` is missing.
        ValueError: an unreadable scheduler config or weights, or weights missing some of a network's tensors
            (as :func:`load_sdxl_text` for the text side).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = check_sdxl_dir(path, SDXL_PARTS)
    scheduler_config, schedule = load_schedule(folder, hint=_DOWNLOAD_HINT)
    unet = from_pretrained_complete(UNet2DConditionModel, folder / "unet", "UNet", torch_dtype=dtype)
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ValueError(f"{folder / 'unet'} is not an SDXL UNet (addition_embed_type must be 'text_time', got "
                         f"{unet.config.addition_embed_type!r})")
    vae = from_pretrained_complete(AutoencoderKL, folder / "vae", "VAE", torch_dtype=dtype)
    if dtype == torch.float16 and vae.config.force_upcast:
        # SDXL's VAE overflows in float16: the SDXL pipelines upcast it to run it, lcm_lab keeps it float32.
        vae.to(dtype=torch.float32)
    for net in (unet, vae):
        net.to(device).eval().requires_grad_(False)
    text = load_sdxl_text(folder, device=device, dtype=dtype)
    force_zeros = bool(pipeline_index(folder).get("force_zeros_for_empty_prompt", True))
    return SDXLModel(unet, vae, text, schedule.to(device), scheduler_config, folder,
                     force_zeros_for_empty_prompt=force_zeros)
