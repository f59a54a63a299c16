"""LCM students: the w-conditioned UNet of latent consistency distillation, and LCM-LoRA adapters.

Two ways to turn a teacher UNet into something LCD can train:

- :func:`make_w_student`: the full-model student of LCM (Luo et al. 2023, "Latent Consistency Models",
  sec. 4.2): the teacher's architecture plus a guidance-scale embedding. The guidance scale ``w`` enters
  through ``timestep_cond`` (``time_cond_proj_dim`` in the diffusers config): a bias-free
  ``Linear(time_cond_proj_dim -> block_out_channels[0])`` whose output is added to the timestep
  embedding. All other weights start as the teacher's, ``cond_proj`` is freshly initialised
  (diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``).
- :func:`add_lora`: LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration
  Module"): frozen teacher plus a peft LoRA adapter on the attention, feed-forward, ResNet and
  resampling layers, as ``train_lcm_distill_lora_sd_wds.py`` does (rank 64, alpha 64). No
  w-embedding: a LoRA student is distilled at a fixed or random w but sampled without it.

Exporting either as a stock diffusers folder: :mod:`lcm_lab.pipelines.export`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["LORA_TARGET_MODULES", "make_w_student", "add_lora", "lora_parameters", "lora_state_dict"]

LORA_TARGET_MODULES: list[str] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
"""peft target modules of diffusers' LCM-LoRA script (``train_lcm_distill_lora_sd_wds.py``).

Names are matched as module-name suffixes (peft: ``name == t`` or ``name.endswith("." + t)``)."""

_COND_PROJ_KEY = "time_embedding.cond_proj.weight"


def is_w_conditioned(unet) -> bool:
    """True for LCM students that take the guidance scale as an embedding (no CFG at sampling)."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def make_w_student(teacher_unet, w_embedding_dim: int = 256):
    """A w-conditioned LCM student initialised from a teacher UNet.

    LCM (Luo et al. 2023, sec. 4.2) conditions the consistency function on the guidance scale:
    ``f_theta(z_t, w, c, t)``. As in diffusers' ``train_lcm_distill_sd_wds.py`` the student is
    ``UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=w_embedding_dim)`` and
    ``load_state_dict(teacher.state_dict(), strict=False)``: every weight is the teacher's except the
    fresh, bias-free ``time_embedding.cond_proj`` (default ``nn.Linear`` init) that maps
    :func:`~lcm_lab.core.parameterization.guidance_scale_embedding` (``w * 1000``, sinusoidal) into the
    timestep embedding. Because ``cond_proj`` has no bias, a zero ``timestep_cond`` reproduces the
    teacher exactly.

    At inference ``LatentConsistencyModelPipeline`` embeds ``w = guidance_scale - 1``: a student trained on
    ``w ~ U[w_min, w_max]`` is sampled with ``guidance_scale`` in ``[w_min + 1, w_max + 1]``.

    Args:
        teacher_unet (`UNet2DConditionModel`): the teacher; it is not modified. A teacher that is already
            w-conditioned with the same ``time_cond_proj_dim`` is copied as is (including its ``cond_proj``).
        w_embedding_dim (`int`, defaults to 256): ``time_cond_proj_dim`` (SD-LCM uses 256), >= 4.

    Returns:
        `UNet2DConditionModel`: float32, on the teacher's device, in train mode, all parameters trainable.

    Raises:
        ValueError: bad ``w_embedding_dim``, or a teacher already conditioned with another width.
        RuntimeError: the teacher's weights do not cover the student's (other than ``cond_proj``).
    """
    from diffusers import UNet2DConditionModel

    if isinstance(w_embedding_dim, bool) or not isinstance(w_embedding_dim, int) or w_embedding_dim < 4:
        raise ValueError(f"`w_embedding_dim` must be an integer >= 4, got {w_embedding_dim!r}.")
    teacher_dim = getattr(teacher_unet.config, "time_cond_proj_dim", None)
    if teacher_dim is not None and teacher_dim != w_embedding_dim:
        raise ValueError(
            f"the teacher is already w-conditioned with time_cond_proj_dim={teacher_dim}; "
            f"cannot build a student with w_embedding_dim={w_embedding_dim}."
        )
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=w_embedding_dim)
    result = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    expected_missing = [] if teacher_dim is not None else [_COND_PROJ_KEY]
    if sorted(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise RuntimeError(
            "initialising the w-student from the teacher's weights failed: missing keys "
            f"{result.missing_keys} (expected {expected_missing}), unexpected keys {result.unexpected_keys}. "
            "Pass a plain UNet2DConditionModel (no LoRA adapters, not wrapped by DDP/compile)."
        )
    try:
        device = next(teacher_unet.parameters()).device
    except StopIteration:  # pragma: no cover - a UNet always has parameters
        device = torch.device("cpu")
    if any(p.dtype != torch.float32 for p in student.parameters()):  # e.g. a non-default torch dtype
        student = student.to(dtype=torch.float32)
    return student.to(device).train().requires_grad_(True)


def _module_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(
    unet,
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    init: bool | str = True,
):
    """Freeze ``unet`` and add a peft LoRA adapter (LCM-LoRA; diffusers ``train_lcm_distill_lora_sd_wds.py``).

    ``unet.requires_grad_(False)`` then ``unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha,
    lora_dropout=dropout, init_lora_weights=init, target_modules=...))``. Afterwards only the LoRA
    matrices require grad. With peft's default ``init=True`` (as the script, which passes none) ``A`` is
    Kaiming-uniform and ``B = 0``, so the adapted UNet starts out computing exactly the base UNet. The
    effective update is ``(alpha / rank) * B @ A``.

    Args:
        unet (`UNet2DConditionModel`): modified in place (base frozen, adapter injected) and returned.
        rank (`int`, defaults to 64): LoRA rank ``r`` (> 0).
        alpha (`float`, defaults to 64): ``lora_alpha`` (> 0).
        dropout (`float`, defaults to 0.0): LoRA dropout in ``[0, 1)``.
        target_modules (list of `str`, *optional*): module-name suffixes; defaults to
            :data:`LORA_TARGET_MODULES`. Each must match at least one module of ``unet``.
        init (`bool` or `str`, defaults to ``True``): peft ``init_lora_weights`` (e.g. ``"gaussian"``: A with
            std 1/rank).

    Returns:
        the same ``unet`` with a ``"default"`` adapter, active.

    Raises:
        ValueError: bad rank/alpha/dropout, an empty target list, or a target name matching no module.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA `rank` must be a positive integer, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA `alpha` must be a positive number, got {alpha!r}.")
    if not (0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA `dropout` must be in [0, 1), got {dropout!r}.")
    targets = list(LORA_TARGET_MODULES if target_modules is None else target_modules)
    if isinstance(target_modules, str) or not targets:
        raise ValueError(f"`target_modules` must be a non-empty list of module names, got {target_modules!r}.")
    if getattr(unet, "_hf_peft_config_loaded", False) and "default" in getattr(unet, "peft_config", {}):
        raise ValueError("the UNet already has a LoRA adapter named 'default'.")
    names = [name for name, _ in unet.named_modules()]
    unmatched = [t for t in targets if not any(_module_matches(n, t) for n in names)]
    if unmatched:
        raise ValueError(
            f"LoRA target module(s) {unmatched} match no module of the UNet "
            f"({type(unet).__name__}); check `target_modules`."
        )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init, target_modules=targets
    )
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config)
    except ValueError as err:  # peft's own target checks, e.g. a matched module of an unsupported type
        raise ValueError(f"could not add a LoRA adapter with target_modules={targets}: {err}") from err
    # peft marks the adapter trainable; be explicit so the contract does not depend on the peft version.
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)
    return unet


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The LoRA parameters of a UNet prepared by :func:`add_lora` (the only ones it leaves trainable)."""
    return [p for n, p in unet.named_parameters() if ".lora_" in n]


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' (PEFT-style) LoRA keys, ready for ``save_lora_weights``.

    Keys are ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` for every adapted module (peft's
    ``get_peft_model_state_dict``, adapter name stripped): the format ``unet.save_lora_adapter`` writes and
    ``pipe.load_lora_weights`` reads in diffusers 0.42. ``StableDiffusionPipeline.save_lora_weights(
    unet_lora_layers=...)`` adds the ``unet.`` prefix.

    Not passed through ``convert_state_dict_to_diffusers``, unlike diffusers' older
    ``train_lcm_distill_lora_sd_wds.py``: that converts only the attention projections (``to_q``, ``to_k``,
    ``to_v``, ``to_out.0`` -> ``lora.down``/``lora.up``) and leaves every other module in ``lora_A``/``lora_B``
    form; diffusers 0.42's loader decides from the *first* key whether to convert, so with such a mixed
    dictionary it silently drops all attention LoRA weights (only a peft ``RuntimeWarning`` about
    "additional target modules" hints at it). ``tests/test_export.py`` checks that every tensor loads.

    Tensors are the live parameters (detach/copy before modifying them).
    """
    from peft.utils import get_peft_model_state_dict

    if not getattr(unet, "_hf_peft_config_loaded", False) or adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}; call add_lora first.")
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:  # e.g. lora_bias / DoRA magnitudes, which this export path does not cover
        raise ValueError(f"unsupported LoRA parameters for export: {odd[:4]}")
    return state
