"""toy-clip: the toy world's reward model, a small open_clip CLIP on 32 px images.

It is trained contrastively on the toy world's (image, caption) pairs by
``scripts/build_toy_assets.py`` and stored as an open_clip ``local-dir`` folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``) at
``<assets>/toy/reward``. Its score is the CLIP score, ``100 * max(cos, 0)``, exactly as the
``clip`` reward computes it, so toy experiments and real ones report the same quantity.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import register
from .clip_score import CLIPScoreReward

TOY_CLIP_ENV = "LCM_LAB_TOY_CLIP_DIR"


def toy_clip_dir() -> Path:
    """Where toy-clip lives: ``$LCM_LAB_TOY_CLIP_DIR`` or ``<assets>/toy/reward``."""
    from ..models.sd import assets_dir

    value = os.environ.get(TOY_CLIP_ENV)
    return Path(value).expanduser() if value else assets_dir() / "toy" / "reward"


@register("toy-clip")
class ToyCLIPReward(CLIPScoreReward):
    """The toy world's CLIP score, ``100 * max(cos(image, caption), 0)`` (input 32 px).

    Args:
        path: the toy-clip folder (default :func:`toy_clip_dir`).
        clip_at_zero: clamp negative scores at 0 (default, as the ``clip`` reward); ``False``
            gives ``100 * cos``.
        device, dtype: where and in which precision the model runs.
        antialias: antialiased resizing of non-32 px inputs.
    """

    def __init__(self, path: str | os.PathLike | None = None, clip_at_zero: bool = True,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 antialias: bool = True):
        folder = Path(path).expanduser() if path is not None else toy_clip_dir()
        if path is not None and not (folder / "open_clip_config.json").is_file():  # a folder the user named
            raise FileNotFoundError(f"toy-clip: {folder} is not an open_clip model folder (it needs "
                                    "open_clip_config.json and open_clip_model.safetensors, as assets/toy/reward)")
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"toy-clip: {folder / 'open_clip_config.json'} not found. Build the toy assets with "
                f"`python scripts/build_toy_assets.py`, or pass the folder with `path=...` or the environment "
                f"variable {TOY_CLIP_ENV} (the assets root can also be moved with LCM_LAB_ASSETS).")
        super().__init__(checkpoint=folder, clip_at_zero=clip_at_zero, device=device, dtype=dtype,
                         antialias=antialias)
