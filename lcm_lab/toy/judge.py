"""The toy world's judge: an attribute classifier that is never used as a reward.

Its penultimate features define the toy world's Fréchet distance (FD); its per-attribute
predictions define prompt accuracy (every attribute of the caption right). Keeping it
separate from the reward model means reward-guided training cannot optimise the metric.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..readable import reading
from .world import ATTRIBUTE_NAMES, ATTRIBUTES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class AttributeJudge(nn.Module):
    """Small CNN: images in [0, 1], (B, 3, 32, 32) -> one logit vector per attribute.

    The spatial map is flattened (not pooled) before the feature layer so that the
    position attribute stays visible to it.
    """

    def __init__(self, image_size: int = 32, width: int = 32, feature_dim: int = 128,
                 num_classes: dict[str, int] | None = None):
        super().__init__()
        self.config = {"image_size": image_size, "width": width, "feature_dim": feature_dim,
                       "num_classes": dict(num_classes or {k: len(v) for k, v in ATTRIBUTES.items()})}
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.trunk = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in self.config["num_classes"].items()})

    @property
    def num_features(self) -> int:
        return self.config["feature_dim"]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images in [0, 1]."""
        return self.proj(self.trunk(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of each attribute head: ``{attribute: (B, num_values)}``."""
        feats = self.features(images)
        return {k: head(feats) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class index per attribute, (B, 6) in ATTRIBUTE_NAMES order."""
        logits = self(images)
        return torch.stack([logits[k].argmax(-1) for k in ATTRIBUTE_NAMES], dim=1)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and safetensors weights into the folder ``path``."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "AttributeJudge":
        """Load a folder written by :meth:`save_pretrained`; missing files name the rebuild command."""
        from safetensors.torch import load_file

        folder = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"judge file {folder / name} is missing; rebuild the toy assets with "
                    "`python scripts/build_toy_assets.py`")
        with reading(folder, "toy judge folder"):
            model = cls(**json.loads((folder / CONFIG_NAME).read_text()))
            model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        model.checkpoint = folder  # where it came from: evaluation rows record it
        return model.eval()
