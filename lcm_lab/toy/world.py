"""The toy world: procedurally drawn, captioned 32x32 images of one shape.

Six attributes describe an image: shape, color, size, position, background and a
fine-detail fill pattern (solid or finely striped). Stripes have a 4-pixel period,
close to the resolution limit of a 4x-downsampling VAE, so few-step samplers that
blur detail lose them first -- that is what makes 4 DDIM steps measurably worse
than 50 in this world.

Everything is a pure function of a seed: sample ``i`` of split ``s`` is drawn from
``np.random.default_rng([seed, split_id, i])``, so a dataset is deterministic,
infinite, and independent of batch size or worker count.

Some (shape, color, pattern) triples never appear in the ``train`` and ``eval``
splits; the ``compose`` split consists only of them and tests composition.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered: anti-aliased edges

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "color": ("red", "green", "blue", "yellow"),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom"),
    "background": ("dark", "light"),
    "pattern": ("solid", "striped"),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)

# (shape, color, pattern) triples kept out of the train/eval splits.
HELD_OUT = frozenset(
    {
        ("circle", "blue", "striped"),
        ("triangle", "yellow", "solid"),
        ("square", "green", "striped"),
        ("diamond", "red", "solid"),
    }
)

_RGB = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.18, 0.30, 0.90),
    "yellow": (0.93, 0.84, 0.12),
}
_BACKGROUND = {"dark": 0.12, "light": 0.86}
_RADIUS = {"small": 5.5, "large": 8.5}
_OFFSET = 7.0  # pixels from the image centre for left/right/top/bottom
_POSITION = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
_STRIPE_PERIOD = 4.0  # pixels; alternating bands of 2 px

_TEMPLATES = (
    "a {size} {pattern} {color} {shape} on the {position}, {background} background",
    "{size} {color} {shape} with a {pattern} fill at the {position} on a {background} background",
    "a picture of a {size} {color} {pattern} {shape}, {position} side, {background} background",
)

SPLITS = {"train": 0, "eval": 1, "compose": 2}
_WORD_TO_ATTRIBUTE = {word: (name, word) for name, words in ATTRIBUTES.items() for word in words}


@dataclass(frozen=True)
class ToySample:
    """One drawn example: its attributes, caption and uint8 image (H, W, 3)."""

    attributes: dict
    caption: str
    image: np.ndarray


def all_combinations(split: str = "train") -> list[dict]:
    """Every attribute combination allowed in ``split`` (train/eval share one set)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    combos = []
    for values in itertools.product(*ATTRIBUTES.values()):
        attrs = dict(zip(ATTRIBUTE_NAMES, values))
        held = (attrs["shape"], attrs["color"], attrs["pattern"]) in HELD_OUT
        if held == (split == "compose"):
            combos.append(attrs)
    return combos


def caption_for(attributes: dict, template: int = 0) -> str:
    """Render a caption for ``attributes`` with one of the caption templates."""
    return _TEMPLATES[template % len(_TEMPLATES)].format(**attributes)


def parse_caption(caption: str) -> dict:
    """Recover the attributes named in a caption (every attribute word is unique).

    Raises ValueError when an attribute is missing or named twice with different values.
    """
    found: dict[str, str] = {}
    for word in caption.lower().replace(",", " ").split():
        if word in _WORD_TO_ATTRIBUTE:
            name, value = _WORD_TO_ATTRIBUTE[word]
            if found.get(name, value) != value:
                raise ValueError(f"caption names two values for {name}: {caption!r}")
            found[name] = value
    missing = [n for n in ATTRIBUTE_NAMES if n not in found]
    if missing:
        raise ValueError(f"caption {caption!r} does not name: {', '.join(missing)}")
    return found


def attribute_labels(attributes: dict) -> list[int]:
    """Class index of each attribute, in ATTRIBUTE_NAMES order (the judge's targets)."""
    return [ATTRIBUTES[name].index(attributes[name]) for name in ATTRIBUTE_NAMES]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = 0.85 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":
        # Upward triangle: apex at (0, -r), base at y = 0.75 r (image y points down).
        top, base, half = -r, 0.75 * r, 1.0 * r
        frac = (dy - top) / (base - top)
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= frac * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(attributes: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image for ``attributes``; nuisance jitter (position, size, colour,
    background brightness) comes from ``rng``. Returns uint8 (size, size, 3)."""
    scale = size / IMAGE_SIZE
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel units at the output resolution
    ys, xs = np.meshgrid(coords, coords, indexing="ij")

    ux, uy = _POSITION[attributes["position"]]
    cx = size / 2 + scale * (ux * _OFFSET + rng.uniform(-1.5, 1.5))
    cy = size / 2 + scale * (uy * _OFFSET + rng.uniform(-1.5, 1.5))
    r = scale * _RADIUS[attributes["size"]] * rng.uniform(0.92, 1.08)
    inside = _shape_mask(attributes["shape"], xs - cx, ys - cy, r).astype(np.float32)

    color = np.clip(np.array(_RGB[attributes["color"]]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    fill = np.broadcast_to(color, (n, n, 3)).astype(np.float32)
    if attributes["pattern"] == "striped":
        phase = rng.uniform(0, _STRIPE_PERIOD * scale)  # any offset within one period, at any image size
        band = np.floor((ys + phase) / (_STRIPE_PERIOD * scale / 2)) % 2 == 1
        fill = np.where(band[..., None], 0.25 * fill + 0.05, fill)

    bg_level = _BACKGROUND[attributes["background"]] + rng.uniform(-0.06, 0.06)
    bg = np.clip(bg_level + rng.uniform(-0.03, 0.03, 3), 0, 1).astype(np.float32)
    img = inside[..., None] * fill + (1 - inside[..., None]) * bg
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


class ToyWorld:
    """Deterministic, infinite source of captioned toy images.

    Args:
        seed: base seed; sample ``i`` of a split depends only on (seed, split, i).
        split: ``"train"`` and ``"eval"`` draw from the same combinations with
            independent streams; ``"compose"`` draws only held-out combinations.
        size: image side in pixels (32 is the embedded default).
    """

    def __init__(self, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE):
        self.seed, self.split, self.size = int(seed), split, int(size)
        self.combinations = all_combinations(split)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index)])

    def attributes(self, index: int) -> dict:
        """The attributes of sample ``index`` (cheap: no drawing)."""
        rng = self._rng(index)
        return dict(self.combinations[rng.integers(len(self.combinations))])

    def __getitem__(self, index: int) -> ToySample:
        rng = self._rng(index)
        attrs = dict(self.combinations[rng.integers(len(self.combinations))])
        caption = caption_for(attrs, int(rng.integers(len(_TEMPLATES))))
        return ToySample(attrs, caption, render(attrs, rng, self.size))

    def prompts(self, n: int, start: int = 0) -> list[tuple[str, dict]]:
        """``n`` (caption, attributes) pairs, e.g. a fixed evaluation prompt set."""
        out = []
        for i in range(start, start + n):
            s = self[i]
            out.append((s.caption, s.attributes))
        return out

    def arrays(self, n: int, start: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``n`` samples as (uint8 images [n,H,W,3], captions, labels [n,6])."""
        images = np.empty((n, self.size, self.size, 3), np.uint8)
        captions, labels = [], []
        for j, i in enumerate(range(start, start + n)):
            s = self[i]
            images[j] = s.image
            captions.append(s.caption)
            labels.append(attribute_labels(s.attributes))
        return images, captions, np.asarray(labels, np.int64)

    def __iter__(self) -> Iterator[ToySample]:
        i = 0
        while True:
            yield self[i]
            i += 1

    def write_folder(self, out_dir: str | os.PathLike, n: int, start: int = 0) -> Path:
        """Write ``n`` samples as PNGs plus ``metadata.jsonl`` (``file_name``, ``text``
        and the attributes): the image-caption folder layout used for real data.
        Written into a temporary folder that is renamed into place when complete."""
        from PIL import Image

        from ..files import write_folder_atomically

        out = Path(out_dir)
        if out.exists():
            raise FileExistsError(f"{out} already exists; remove it or pick another folder")

        def write(tmp: Path) -> None:
            with open(tmp / "metadata.jsonl", "w") as meta:
                for i in range(start, start + n):
                    s = self[i]
                    name = f"{i:07d}.png"
                    Image.fromarray(s.image).save(tmp / name)
                    meta.write(json.dumps({"file_name": name, "text": s.caption, **s.attributes}) + "\n")

        return write_folder_atomically(out, write)
