"""Export distilled students as stock diffusers artifacts (no lcm_lab needed to use them).

- :func:`export_lcm_pipeline`: a w-conditioned full-model student (:func:`~lcm_lab.models.student.make_w_student`)
  as a ``LatentConsistencyModelPipeline`` folder with an ``LCMScheduler``::

      from diffusers import LatentConsistencyModelPipeline
      pipe = LatentConsistencyModelPipeline.from_pretrained(DIR)
      image = pipe(prompt, num_inference_steps=4, guidance_scale=8.0).images[0]

  The pipeline embeds ``w = guidance_scale - 1`` (Imagen-style scale -> LCM-paper scale), so a student
  trained with ``w ~ U[w_min, w_max]`` is meant for ``guidance_scale`` in ``[w_min + 1, w_max + 1]``.
  lcm_lab's ``load_ldm(DIR)`` + ``generate(..., sampler="lcm")`` use the same convention.
- :func:`export_lora`: an LCM-LoRA adapter (:func:`~lcm_lab.models.student.add_lora`) as
  ``pytorch_lora_weights.safetensors`` for the teacher's pipeline::

      from diffusers import LCMScheduler, StableDiffusionPipeline
      pipe = StableDiffusionPipeline.from_pretrained(TEACHER_DIR)
      pipe.load_lora_weights(DIR); pipe.fuse_lora()
      pipe.scheduler = LCMScheduler.from_pretrained(DIR, subfolder="scheduler")  # the run's LCM grid
      image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]

  A LoRA student has no w-embedding; ``guidance_scale`` > 1 there means ordinary CFG on top.
  An SDXL adapter is the same file; load it with ``StableDiffusionXLPipeline`` the same way.
- :func:`export_lcm_sdxl_pipeline`: a w-conditioned SDXL student as a stock ``StableDiffusionXLPipeline`` folder
  with an ``LCMScheduler`` (the form of diffusers' LCM-SDXL; the SDXL pipeline embeds ``guidance_scale - 1``
  when ``unet.config.time_cond_proj_dim`` is set).

All write into a temporary sibling folder ``<out>.partial-<host>-<pid>`` and move it into place only when it is
complete; an existing ``out_dir`` is replaced only after the new folder is complete, so a crash never leaves
a half-written model; what a hard kill leaves beside it is tidied by the next write (a previous model left
only as ``<out>.old-*`` is put back).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import write_folder_atomically
from ..models.student import is_w_conditioned

__all__ = ["export_lcm_pipeline", "export_lcm_sdxl_pipeline", "export_lora"]


def _check_student_unets(unet, target_unet, pipeline_name: str, plain_pipeline_name: str) -> None:
    """Reject wrapped / peft-carrying UNets and a main UNet without w-embedding."""
    for name, module in (("unet", unet), ("target_unet", target_unet)):
        if module is None:
            continue
        if not hasattr(module, "save_pretrained") or not hasattr(module, "config"):
            raise TypeError(
                f"`{name}` must be a diffusers UNet2DConditionModel (unwrap DDP/accelerate/torch.compile "
                f"first), got {type(module).__name__}."
            )
        if getattr(module, "_hf_peft_config_loaded", False):
            raise ValueError(
                f"`{name}` carries peft adapters; export the adapter with export_lora, or fuse and unload it "
                "(`unet.fuse_lora(); unet.unload_lora()`) first."
            )
    if not is_w_conditioned(unet):
        raise ValueError(
            f"{pipeline_name} needs a w-conditioned UNet (config.time_cond_proj_dim set; see "
            "lcm_lab.models.student.make_w_student). A student without w-embedding is used with a stock "
            f"{plain_pipeline_name} and an LCMScheduler instead."
        )


def _lcm_scheduler(base: Path, original_inference_steps: int, timestep_scaling: float):
    """``LCMScheduler.from_config(<base scheduler config>, original_inference_steps, timestep_scaling)``."""
    from diffusers import LCMScheduler

    if isinstance(original_inference_steps, bool) or not isinstance(original_inference_steps, int) \
            or original_inference_steps < 1:
        raise ValueError(f"`original_inference_steps` must be a positive integer, got {original_inference_steps!r}.")
    if not timestep_scaling > 0:
        raise ValueError(f"`timestep_scaling` must be > 0, got {timestep_scaling!r}.")
    base_scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    num_train = int(base_scheduler.get("num_train_timesteps", 1000))
    if original_inference_steps > num_train:
        raise ValueError(
            f"`original_inference_steps` ({original_inference_steps}) exceeds num_train_timesteps ({num_train})."
        )
    # The LCD objective never clips or thresholds x0, so the exported scheduler must not either: a teacher config
    # that does (an old DDPM-style "clip_sample": true) would make LatentConsistencyModelPipeline clip latents.
    return LCMScheduler.from_config(
        base_scheduler, original_inference_steps=original_inference_steps, timestep_scaling=float(timestep_scaling),
        clip_sample=False, thresholding=False,
    )


def _save_pipeline(out_dir, pipe, target_unet) -> Path:
    """Save ``pipe`` (and ``target_unet`` to ``unet_target/``) atomically into ``out_dir``."""

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if target_unet is not None:
            target_unet.save_pretrained(tmp / "unet_target", safe_serialization=True)

    return write_folder_atomically(out_dir, write)


def export_lcm_pipeline(
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    unet,
    target_unet=None,
    *,
    original_inference_steps: int = 50,
    timestep_scaling: float = 10.0,
) -> Path:
    """Save a w-conditioned student as a stock ``LatentConsistencyModelPipeline`` folder.

    The folder holds ``unet/`` (the student), ``vae/``, ``text_encoder/``, ``tokenizer/`` loaded from
    ``base_dir`` (the teacher's pipeline folder), ``scheduler/`` = ``LCMScheduler.from_config(<base scheduler
    config>, original_inference_steps=..., timestep_scaling=...)`` (same betas and prediction type as the
    teacher), no safety checker. Load it with ``LatentConsistencyModelPipeline.from_pretrained(out_dir)`` or
    ``lcm_lab.models.sd.load_ldm(out_dir)``. ``guidance_scale`` g embeds ``w = g - 1``: a student trained with
    ``w ~ U[w_min, w_max]`` corresponds to ``guidance_scale`` in ``[w_min + 1, w_max + 1]``.

    Args:
        out_dir: destination folder; replaced atomically if it exists (see the module docstring).
        base_dir: the teacher's diffusers pipeline folder (SD 1.x/2.x layout).
        unet (`UNet2DConditionModel`): the student, with ``time_cond_proj_dim`` set; a plain module (unwrap
            DDP/accelerate first) without LoRA adapters. Saved as is (its dtype); not modified.
        target_unet (`UNet2DConditionModel`, *optional*): a second UNet saved to ``unet_target/`` (ignored by
            stock ``from_pretrained``; load it with ``UNet2DConditionModel.from_pretrained``). The trainer puts
            there whichever of the online and EMA-target networks ``unet`` is not (``model.export_unet``).
        original_inference_steps (`int`, defaults to 50): the distillation grid size N (LCMScheduler config).
        timestep_scaling (`float`, defaults to 10.0): boundary-condition scaling (LCMScheduler config).

    Returns:
        `Path`: the (absolute) output folder.
    """
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.sd import check_pipeline_dir

    base = check_pipeline_dir(base_dir)
    _check_student_unets(unet, target_unet, "LatentConsistencyModelPipeline", "StableDiffusionPipeline")
    scheduler = _lcm_scheduler(base, original_inference_steps, timestep_scaling)
    pipe = LatentConsistencyModelPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

    return _save_pipeline(out_dir, pipe, target_unet)


def export_lcm_sdxl_pipeline(
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    unet,
    target_unet=None,
    *,
    original_inference_steps: int = 50,
    timestep_scaling: float = 10.0,
) -> Path:
    """Save a w-conditioned SDXL student as a stock ``StableDiffusionXLPipeline`` folder with an ``LCMScheduler``.

    This is how diffusers' LCM-SDXL is distributed: the SDXL pipeline embeds ``w = guidance_scale - 1`` into
    ``timestep_cond`` whenever ``unet.config.time_cond_proj_dim`` is set (and then runs no CFG)::

        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(DIR)   # scheduler: LCMScheduler
        image = pipe(prompt, num_inference_steps=4, guidance_scale=8.0).images[0]

    The folder holds ``unet/`` (the student), ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
    ``tokenizer_2/`` loaded from ``base_dir`` (the SDXL teacher's pipeline folder), and ``scheduler/`` =
    ``LCMScheduler.from_config(<base scheduler config>, original_inference_steps=..., timestep_scaling=...)``
    (same betas and prediction type as the teacher). The teacher's ``force_zeros_for_empty_prompt`` is kept.

    Args:
        out_dir: destination folder; replaced atomically if it exists (see the module docstring).
        base_dir: the SDXL teacher's diffusers pipeline folder.
        unet (`UNet2DConditionModel`): the student, with ``time_cond_proj_dim`` set; unwrapped, no LoRA
            adapters. Saved as is (its dtype); not modified.
        target_unet (`UNet2DConditionModel`, *optional*): a second UNet saved to ``unet_target/`` (as in
            :func:`export_lcm_pipeline`).
        original_inference_steps (`int`, defaults to 50): the distillation grid size N (LCMScheduler config).
        timestep_scaling (`float`, defaults to 10.0): boundary-condition scaling (LCMScheduler config).

    Returns:
        `Path`: the (absolute) output folder.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from ..models.sd import pipeline_index
    from ..models.sdxl import SDXL_PARTS, check_sdxl_dir, load_sdxl_text

    base = check_sdxl_dir(base_dir, SDXL_PARTS)
    _check_student_unets(unet, target_unet, "an LCM StableDiffusionXLPipeline",
                         "StableDiffusionXLPipeline (as a LoRA, see export_lora)")
    scheduler = _lcm_scheduler(base, original_inference_steps, timestep_scaling)
    index = pipeline_index(base)
    text = load_sdxl_text(base)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=text.text_encoder,
        text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer,
        tokenizer_2=text.tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )

    return _save_pipeline(out_dir, pipe, target_unet)


def export_lora(out_dir: str | os.PathLike, unet_with_lora, adapter_name: str = "default", *,
                base: str | os.PathLike | None = None, original_inference_steps: int = 50,
                timestep_scaling: float = 10.0) -> Path:
    """Save an LCM-LoRA adapter as ``<out_dir>/pytorch_lora_weights.safetensors`` (diffusers LoRA format),
    and, with ``base``, the matching ``LCMScheduler`` as ``<out_dir>/scheduler/scheduler_config.json``.

    ``StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora_state_dict(unet),
    unet_lora_adapter_metadata=<LoraConfig dict>, safe_serialization=True)``, like diffusers'
    ``train_lcm_distill_lora_sd_wds.py``, with two differences: keys are uniformly PEFT-style
    (``unet.<module>.lora_A.weight``; see :func:`~lcm_lab.models.student.lora_state_dict` for why the script's
    ``convert_state_dict_to_diffusers`` output loses the attention LoRA on load), and the adapter's
    ``LoraConfig`` is stored as safetensors metadata so that ``lora_alpha != r`` survives the round trip
    (without it, loaders assume ``alpha = r``). Load with::

        pipe = StableDiffusionPipeline.from_pretrained(TEACHER_DIR)
        pipe.load_lora_weights(out_dir); pipe.fuse_lora()
        pipe.scheduler = LCMScheduler.from_pretrained(out_dir, subfolder="scheduler")

    ``LCMScheduler.from_config(pipe.scheduler.config)`` gives the same sampler only when the run used
    diffusers' defaults (``original_inference_steps`` 50, ``timestep_scaling`` 10); the saved scheduler
    carries the run's own values.

    Args:
        out_dir: destination folder; replaced atomically if it exists.
        unet_with_lora (`UNet2DConditionModel`): a UNet prepared by :func:`~lcm_lab.models.student.add_lora`
            (plain module, unwrapped). Not modified.
        adapter_name (`str`, defaults to ``"default"``): the peft adapter to export.
        base: the teacher's diffusers folder; its scheduler config is the base of the saved ``LCMScheduler``
            (None: no scheduler is written).
        original_inference_steps, timestep_scaling: the LCD run's skipping-step grid size N
            (``objective.num_ddim_timesteps``) and boundary-condition scaling, as in :func:`export_lcm_pipeline`.

    The file holds UNet layers only, so it is the same for SD and SDXL UNets: an SDXL adapter loads with
    ``StableDiffusionXLPipeline.load_lora_weights``.

    Returns:
        `Path`: the (absolute) output folder.
    """
    from diffusers import StableDiffusionPipeline

    from ..models.student import lora_state_dict

    state = lora_state_dict(unet_with_lora, adapter_name)
    layers = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    metadata = unet_with_lora.peft_config[adapter_name].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}

    scheduler = None if base is None else _lcm_scheduler(Path(base), original_inference_steps, timestep_scaling)

    def write(tmp: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True
        )
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")

    return write_folder_atomically(out_dir, write)
