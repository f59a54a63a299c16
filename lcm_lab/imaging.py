"""Image files in and out: PNG grids (written atomically) and init images for img2img."""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write


def to_rgb(img):
    """A decoded PIL image as 8-bit RGB. 16-bit grayscale (PNG's ``I;16``, or ``I``) is scaled to 8 bits;
    PIL's own ``convert("RGB")`` clips those values at 255, which turns almost every such image white.

    Raises:
        ValueError: a 32-bit float image (mode ``F``), whose range is unknown.
    """
    from PIL import Image

    if img.mode == "F":  # 32-bit float levels have no agreed range (0..1? 0..255?): convert("RGB") clips them
        raise ValueError("32-bit float image (PIL mode F): save it as an 8- or 16-bit image first")
    if img.mode.startswith("I"):
        levels = np.asarray(img).astype(np.float64)
        # "I" is also how PIL opens 16-bit PGMs; one whose levels stay within 0..255 is read as 8-bit.
        if img.mode != "I" or levels.max() > 255:
            levels = levels / 257.0  # 65535 -> 255
        img = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def check_finite(images: torch.Tensor, what: str = "images (the model's outputs)") -> None:
    """NaN or inf pixels are a ``ValueError`` naming ``what``: cast to 8 bits they would pass as some gray."""
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} hold NaN or inf values")


def unit_range(images: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    """``images`` clamped to [0, 1] after checking they are finite floats within half a gray level of it (a
    resize's overshoot); anything further out, e.g. [-1, 1] or 8-bit values, is a ``ValueError`` ending in
    ``fix``."""
    check_finite(images, what)  # NaN would pass the range check and count as black
    lo, hi = torch.aminmax(images.detach().float())
    if lo < -0.002 or hi > 1.002:
        raise ValueError(f"expected {what} as floats in [0, 1], got min {float(lo):.4g}, max {float(hi):.4g} ({fix})")
    return images.clamp(0, 1)


# Image files the readers take: evaluation's reference folders and webdataset shards' members.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> uint8 (N, H, W, 3)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, 3, H, W) images into one uint8 (H', W', 3) array, ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


@functools.cache
def _rgb_format(suffix: str) -> str | None:
    """PIL's format for a file extension, if it can hold an RGB image; once per extension (eval saves each image)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(suffix)
    try:  # Image.SAVE lists formats that still cannot hold an RGB image (.xbm, .blp, ...): try one pixel
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fmt


def image_format(path: str | os.PathLike) -> str:
    """The PIL format an image file written to ``path`` gets, from its extension (``.png`` -> ``"PNG"``).

    Raises:
        ValueError: ``path`` is a folder, or its extension is not an image format PIL can write.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give an image file name such as {path / 'sample.png'}")
    fmt = _rgb_format(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: not an image file name PIL can write as RGB (use .png, .jpg or .webp)")
    return fmt


def check_output_image(path: str | os.PathLike) -> str:
    """:func:`image_format` of ``path``, after checking that the file can be created there (no existing file
    where a folder must be made). Commands call it before any work; it walks the path, so not per image.

    Raises:
        ValueError: as :func:`image_format`, or ``path`` lies under a file.
    """
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, so no folder can be made there")
    return image_format(path)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    """Save one image or a grid in the format of ``path``'s extension (PNG, JPEG, ...); written to a temp file,
    then renamed."""
    from PIL import Image

    out = Path(path)
    fmt = image_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images)[0] if len(images) == 1 else make_grid(images, nrow)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(out, lambda tmp: img.save(tmp, format=fmt))


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """Load RGB images, turned upright by their EXIF orientation (as diffusers' ``load_image``) and resized to
    ``size`` x ``size``, as (N, 3, size, size) in [0, 1].

    A missing or unreadable file raises ValueError naming it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img = to_rgb(ImageOps.exif_transpose(img)).resize((size, size), Image.BICUBIC)
                out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
        except FileNotFoundError:
            raise ValueError(f"init image {p} does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot read init image {p}: {exc}") from None
    if not out:
        raise ValueError("no init images given")
    return torch.stack(out)
