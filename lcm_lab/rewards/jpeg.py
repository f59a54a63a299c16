"""JPEG (in)compressibility rewards of DDPO (Black et al. 2023, "Training Diffusion Models
with Reinforcement Learning", https://github.com/kvablack/ddpo-pytorch).

Each image is quantised to 8 bits and encoded as a JPEG with PIL at quality 95; the reward
is the negative file size in kB (``jpeg-compressibility``: smooth, flat images score high)
or the file size (``jpeg-incompressibility``: detailed, noisy images score high), with
1 kB = 1000 bytes as in DDPO. No weights; not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from ..imaging import check_finite, to_uint8
from .base import RewardModel, register

JPEG_QUALITY = 95


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """JPEG file size in kB (1000 bytes) of every image of a ``(B, 3, H, W)`` batch in ``[0, 1]``."""
    from PIL import Image

    check_finite(images)
    pixels = to_uint8(images)
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegReward(RewardModel):
    differentiable = False
    uses_prompts = False
    sign = 1.0

    def __init__(self, quality: int = JPEG_QUALITY, device: str | torch.device | None = None, dtype=None):
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = int(quality)  # device/dtype are accepted for a uniform signature and unused

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.sign * jpeg_sizes_kb(images, self.quality)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={self.quality}"


@register("jpeg-compressibility")
class JpegCompressibilityReward(_JpegReward):
    """``-size_kB`` of the image encoded as JPEG (quality 95): higher for more compressible images.

    Args:
        quality: JPEG quality (DDPO: 95).
        device, dtype: accepted for a uniform constructor signature; unused.
    """

    sign = -1.0


@register("jpeg-incompressibility")
class JpegIncompressibilityReward(_JpegReward):
    """``+size_kB`` of the image encoded as JPEG (quality 95): higher for less compressible images.

    Args:
        quality: JPEG quality (DDPO: 95).
        device, dtype: accepted for a uniform constructor signature; unused.
    """

    sign = 1.0
