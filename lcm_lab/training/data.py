"""Training data: image-caption datasets, a resumable step-indexed sampler and cached VAE latents.

Three sources share one item format, ``{"pixel_values": FloatTensor[3, R, R] in [-1, 1], "text": str,
"index": int}``, or ``None`` for an item that cannot be read (corrupt, missing or truncated image, no
caption). :func:`collate` drops the ``None`` s and counts them, so one bad file never stops a long run.

Batches are drawn with replacement by :class:`StepBatchSampler`: the batch of step ``s`` on rank ``r`` is a
pure function of ``(seed, rank, s)``, so a run resumed at step ``s`` sees exactly the batches of the
uninterrupted run, whatever the worker count. Because the sampler already splits data by rank, a loader
from :func:`make_dataloader` must not be passed through ``accelerator.prepare`` (that would shard it again).
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.latents import images_per_vae_call
from ..imaging import IMAGE_EXTENSIONS, to_rgb

DATASET_TYPES = ("toy", "folder", "webdataset")


@dataclass
class DataConfig:
    """Where training images come from and how they are prepared."""

    type: str = field(default="toy", metadata={"help": "Data source: 'toy', 'folder' or 'webdataset'."})
    path: str | None = field(default=None, metadata={
        "help": "folder: a directory with metadata.jsonl; webdataset: a directory of *.tar shards, one .tar or a "
                "glob. Required for both."})
    resolution: int = field(default=32, metadata={
        "help": "Images are resized (shorter side, bicubic) and center-cropped to this size."})
    random_flip: bool = field(default=False, metadata={
        "help": "Flip images horizontally with probability 0.5, drawn from the step's seeded generator."})
    num_images: int = field(default=16384, metadata={
        "help": "toy: size of the deterministic pool ToyWorld(toy_seed, 'train')[0..num_images)."})
    toy_seed: int = field(default=0, metadata={"help": "toy: seed of the ToyWorld the pool is drawn from."})
    image_column: str = field(default="file_name", metadata={
        "help": "folder: metadata.jsonl key holding the image file, relative to the folder."})
    caption_column: str = field(default="text", metadata={
        "help": "folder: metadata.jsonl key of the caption; webdataset: key tried first in .json captions "
                "(then 'text', 'caption'; a .txt member wins over .json)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    cache_latents: bool = field(default=False, metadata={
        "help": "Encode every image once with the VAE before training (see LatentCache)."})

    def __post_init__(self):
        if self.type not in DATASET_TYPES:
            raise ValueError(f"unknown data type {self.type!r}; expected one of {', '.join(DATASET_TYPES)}")
        if self.type != "toy" and not self.path:
            raise ValueError(f"data type {self.type!r} needs a path")
        if self.resolution <= 0 or self.num_images <= 0 or self.num_workers < 0:
            raise ValueError("resolution and num_images must be positive and num_workers non-negative")
        if self.random_flip and self.cache_latents:
            raise ValueError("random_flip and cache_latents exclude each other: the cache holds each image's "
                             "latents in one orientation only; set one of them to false")


def _load_pixels(source, resolution: int) -> torch.Tensor | None:
    """Decode ``source`` (a path, a file object or a PIL image), resize its shorter side to ``resolution``
    (bicubic), center-crop; return [3, R, R] in [-1, 1], or None if it cannot be decoded."""
    from PIL import Image

    try:
        if isinstance(source, Image.Image):
            img = to_rgb(source)
        else:
            with Image.open(source) as opened:
                img = to_rgb(opened)  # forces a full decode: truncated files fail here, not later
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
        return None
    w, h = img.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        # max(..., resolution) guards against rounding the longer side below the crop size.
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def random_hflip(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of ``pixels`` [B, C, H, W] horizontally with probability 0.5.

    Drawn from ``generator`` (the training step's), not in the dataset: the flips of a step are then a
    function of ``(seed, rank, step)`` like its batch, whatever the DataLoader workers, and a resumed run
    replays them."""
    flip = (torch.rand(len(pixels), generator=generator) < 0.5).to(pixels.device)
    return torch.where(flip.view(-1, *[1] * (pixels.dim() - 1)), pixels.flip(-1), pixels)


def _item(pixels: torch.Tensor | None, text, index: int) -> dict | None:
    # An empty caption is skipped like a missing one: it would train the image as unconditional (the LCD
    # config's top-level proportion_empty_prompts does that on purpose), and a reward model cannot score it.
    if pixels is None or not isinstance(text, str) or not text.strip():
        return None
    return {"pixel_values": pixels, "text": text, "index": int(index)}


class ImageCaptionFolder(Dataset):
    """Images listed in ``<root>/metadata.jsonl`` (one JSON object per line, as written by
    ``ToyWorld.write_folder`` or the Hugging Face ``imagefolder`` layout)."""

    def __init__(self, root: str | os.PathLike, resolution: int = 32, *, image_column: str = "file_name",
                 caption_column: str = "text"):
        self.root, self.resolution = Path(root), resolution
        self.image_column, self.caption_column = image_column, caption_column
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        meta = self.root / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{meta} not found: the folder needs a metadata.jsonl with one JSON object per line, holding the "
                f"image file name (key {image_column!r}, relative to the folder) and its caption (key "
                f"{caption_column!r})")
        self.rows: list[dict] = []
        with open(meta) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{meta}:{lineno} is not valid JSON: {exc}") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{meta}:{lineno} is not a JSON object ({{\"{image_column}\": ..., "
                                         f"\"{caption_column}\": ...}}): {line.strip()[:80]}")
                    self.rows.append(row)
        if not self.rows:
            raise ValueError(f"{meta} lists no images")
        for key, setting in ((image_column, "image_column"), (caption_column, "caption_column")):
            if not any(key in row for row in self.rows):  # a wrong column name, not unreadable images
                found = sorted({k for row in self.rows for k in row})
                raise ValueError(f"no row of {meta} has the key {key!r} (data.{setting}); its rows have {found}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        name = row.get(self.image_column)
        if not isinstance(name, str):
            return None
        return _item(_load_pixels(self.root / name, self.resolution),
                     row.get(self.caption_column), index)


def _resolve_shards(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(path))


class TarShards(Dataset):
    """Map-style dataset over uncompressed webdataset-style tar shards.

    A sample is the group of members sharing a key (the member path up to the first dot of its base name,
    as in webdataset): one image (.png/.jpg/.jpeg/.webp) and a caption (.txt, or .json with a string under
    ``caption_key``, "text" or "caption"). Construction reads only the tar headers; ``__getitem__`` reads the
    two members' bytes at their recorded offsets. File handles are cached per (process id, shard), so
    DataLoader workers never share a forked file offset.
    """

    def __init__(self, path: str, resolution: int = 32, *, caption_key: str = "text"):
        self.path, self.resolution = path, resolution
        self.caption_keys = tuple(dict.fromkeys((caption_key, "text", "caption")))
        self.shards = _resolve_shards(path)
        if not self.shards:
            raise ValueError(f"no .tar shards found at {path}")
        # One entry per sample: (shard id, image (offset, size), caption (offset, size) or None, caption ext).
        self.samples: list[tuple[int, tuple[int, int], tuple[int, int] | None, str | None]] = []
        for shard_id, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:  # "r:" rejects compressed tars: they cannot be seeked into
                    for member in tar:
                        if not member.isreg():
                            continue
                        folder, base = os.path.split(member.name)
                        stem, _, ext = base.partition(".")
                        groups.setdefault(os.path.join(folder, stem), {})[ext.lower()] = (member.offset_data,
                                                                                          member.size)
            except tarfile.TarError as exc:
                raise ValueError(f"shard {shard} is not a readable uncompressed tar ({exc}); remove or re-create "
                                 "it") from exc
            for members in groups.values():
                image = next((members[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in members), None)
                if image is None:
                    continue  # a caption without an image is not a sample
                ext = "txt" if "txt" in members else "json" if "json" in members else None
                self.samples.append((shard_id, image, members.get(ext), ext))
        if not self.samples:
            raise ValueError(f"the shards at {path} hold no image samples")
        self._handles: dict[tuple[int, str], io.BufferedReader] = {}

    def __getstate__(self):
        # Open files cannot be pickled to spawned workers; each process opens its own.
        return {**self.__dict__, "_handles": {}}

    def _read(self, shard_id: int, span: tuple[int, int]) -> bytes:
        key = (os.getpid(), self.shards[shard_id])
        if key not in self._handles:
            self._handles[key] = open(key[1], "rb")
        f = self._handles[key]
        f.seek(span[0])
        data = f.read(span[1])
        if len(data) != span[1]:
            raise OSError("truncated member")
        return data

    def _caption(self, shard_id: int, span: tuple[int, int] | None, ext: str | None) -> str | None:
        if span is None:
            return None
        text = self._read(shard_id, span).decode("utf-8")
        if ext == "txt":
            return text.strip()
        meta = json.loads(text)
        return next((meta[k] for k in self.caption_keys if isinstance(meta, dict) and isinstance(meta.get(k), str)),
                    None)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        shard_id, image, caption, ext = self.samples[index]
        try:
            text = self._caption(shard_id, caption, ext)
            data = self._read(shard_id, image)
        except (OSError, ValueError):  # unreadable shard, bad UTF-8 or JSON (JSONDecodeError is a ValueError)
            return None
        return _item(_load_pixels(io.BytesIO(data), self.resolution), text, index)

    def close(self) -> None:
        """Close this process's cached shard handles."""
        for key in [k for k in self._handles if k[0] == os.getpid()]:
            self._handles.pop(key).close()


class ToyImages(Dataset):
    """The first ``num_images`` samples of ``ToyWorld(seed, "train")``, rendered on access (never None)."""

    def __init__(self, num_images: int = 16384, seed: int = 0, resolution: int = 32):
        from lcm_lab.toy.world import ToyWorld

        self.world = ToyWorld(seed, "train")
        self.num_images, self.resolution = num_images, resolution

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict | None:
        from PIL import Image

        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} toy images")
        sample = self.world[index]
        return _item(_load_pixels(Image.fromarray(sample.image), self.resolution),
                     sample.caption, index)


def build_dataset(config: DataConfig) -> Dataset:
    """The dataset ``config`` describes."""
    if config.type == "toy":
        return ToyImages(config.num_images, config.toy_seed, config.resolution)
    if config.type == "folder":
        return ImageCaptionFolder(config.path, config.resolution, image_column=config.image_column,
                                  caption_column=config.caption_column)
    return TarShards(config.path, config.resolution, caption_key=config.caption_column)


def collate(items: Sequence[dict | None]) -> dict:
    """Stack the readable items; ``skipped`` counts the unreadable (None) ones.

    Returns ``{"pixel_values": [b, 3, R, R], "text": list[str], "index": LongTensor[b], "skipped": int}``.
    When every item was unreadable (b == 0), ``pixel_values`` is an empty tensor of shape (0, 3, 0, 0):
    the resolution is unknown then, so callers should test ``len(batch["text"]) == 0`` and skip the step.
    """
    kept = [x for x in items if x is not None]
    pixels = torch.stack([x["pixel_values"] for x in kept]) if kept else torch.empty(0, 3, 0, 0)
    return {"pixel_values": pixels, "text": [x["text"] for x in kept],
            "index": torch.tensor([x["index"] for x in kept], dtype=torch.long), "skipped": len(items) - len(kept)}


class StepBatchSampler(Sampler[list[int]]):
    """Infinite sampling with replacement, one batch per optimisation step (as in EDM's training loop).

    The batch of step ``s`` on rank ``r`` is ``np.random.default_rng([seed, rank, s]).integers(num_items,
    size=batch_size)``: restarting at ``start_step=s`` replays the uninterrupted run exactly, and ranks
    draw different data. Yields the batches of steps ``start_step, start_step + 1, ...`` forever: the training
    loop takes as many as it runs.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, start_step: int = 0):
        if num_items <= 0 or batch_size <= 0:
            raise ValueError(f"num_items ({num_items}) and batch_size ({batch_size}) must be positive")
        if min(seed, rank, start_step) < 0:
            raise ValueError("seed, rank and start_step must be non-negative")
        self.num_items, self.batch_size, self.seed, self.rank = num_items, batch_size, seed, rank
        self.start_step = start_step

    def batch(self, step: int) -> list[int]:
        """The dataset indices of ``step`` on this rank."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        return rng.integers(self.num_items, size=self.batch_size).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def make_dataloader(dataset: Dataset, batch_size: int, seed: int, rank: int = 0, start_step: int = 0,
                    num_workers: int = 0) -> DataLoader:
    """An infinite loader of :func:`collate` batches drawn by :class:`StepBatchSampler`.

    Pass ``rank=accelerator.process_index`` and do not ``accelerator.prepare`` the loader."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, start_step)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


class LatentCache:
    """VAE posteriors of a dataset: ``mean`` and ``std`` [N, C, h, w] (unscaled), captions ``text`` and the
    dataset ``index`` of each row (rows skip unreadable items, so row i need not be dataset item i).

    Draw training latents as ``(mean + std * randn) * scaling_factor``, as ``latent_dist.sample()`` would.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, text: list[str], index: torch.Tensor | None = None):
        if mean.shape != std.shape or len(mean) != len(text):
            raise ValueError(f"mismatched cache: mean {tuple(mean.shape)}, std {tuple(std.shape)}, {len(text)} texts")
        self.mean, self.std, self.text = mean, std, list(text)
        self.index = torch.arange(len(mean)) if index is None else index

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Rows ``indices`` (cache rows, e.g. from a StepBatchSampler over ``len(cache)``): (mean, std, texts)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.mean[idx], self.std[idx], [self.text[i] for i in idx.tolist()]


def encode_dataset(dataset: Dataset, vae, batch_size: int = 256, device="cpu", progress: bool = True,
                   chunk_size: int | None = None) -> tuple[LatentCache, int]:
    """Encode every readable item of ``dataset`` in order with ``vae.encode(x).latent_dist`` (a diffusers
    AutoencoderKL) and return the cache and the number of unreadable items skipped.

    Args:
        batch_size: items read per loader batch.
        chunk_size: images per VAE call; default :func:`~lcm_lab.core.latents.images_per_vae_call` (4 at 512
            px, the whole batch at toy sizes): a 512 px batch of 256 in one call would need ~160 GiB.
    """
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    means, stds, texts, indices, skipped = [], [], [], [], 0
    with torch.no_grad(), tqdm(total=len(dataset), unit="img", desc="encoding latents", disable=not progress) as bar:
        for batch in loader:
            skipped += batch["skipped"]
            bar.update(len(batch["text"]) + batch["skipped"])
            if not batch["text"]:
                continue
            pixels = batch["pixel_values"]
            for chunk in pixels.split(chunk_size or images_per_vae_call(*pixels.shape[-2:])):
                dist = vae.encode(chunk.to(device=device, dtype=vae.dtype)).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
            texts += batch["text"]
            indices.append(batch["index"])
    if not texts:
        raise ValueError(f"no readable images among the {len(dataset)} items of the dataset (an item needs an image "
                         "that decodes and a non-empty caption)")
    return LatentCache(torch.cat(means), torch.cat(stds), texts, torch.cat(indices)), skipped
