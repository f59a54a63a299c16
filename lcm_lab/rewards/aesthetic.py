"""The LAION aesthetic predictor (Schuhmann, "improved-aesthetic-predictor",
https://github.com/christophschuhmann/improved-aesthetic-predictor), used as a reward in
e.g. DDPO (Black et al. 2023) and RG-LCD (Li et al. 2024).

A head on the L2-normalised CLIP ViT-L/14 image embedding predicts a 1-10 aesthetic rating
(about 5-7 for typical generations): either the improved predictor's linear MLP
(``sac+logos+ava1-l14-linearMSE.pth``, the default) or LAION's original linear probe
(``sa_0_4_vit_l_14_linear.pth``, https://github.com/LAION-AI/aesthetic-predictor; the aesthetic
reward of RG-LCD's ``reward_fn.py``). The prompt is not used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from ..readable import reading
from .base import RewardModel, float32_head, missing_weights, register, resolve_weights
from .clip_score import as_dtype, load_open_clip, open_clip_preprocessor

AESTHETIC_HEAD_ENV = "LCM_LAB_AESTHETIC_HEAD"
AESTHETIC_CLIP_ENV = "LCM_LAB_AESTHETIC_CLIP_CHECKPOINT"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_SOURCE = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
AESTHETIC_CLIP_SOURCE = ("OpenAI CLIP ViT-L/14: the TorchScript ViT-L-14.pt of https://github.com/openai/CLIP, or "
                         "the open_clip folder https://huggingface.co/timm/vit_large_patch14_clip_224.openai")


class AestheticHead(torch.nn.Module):
    """A LAION aesthetic head on D-dim CLIP embeddings, with its checkpoint's own keys.

    ``kind="mlp"``: the improved predictor's Linear(D,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2)
    Linear(128,64) Dropout(0.1) Linear(64,16) Linear(16,1) (no activations; keys ``layers.N.*``).
    ``kind="linear"``: the original probe Linear(D, 1) (keys ``weight``, ``bias``).
    """

    def __init__(self, input_size: int = 768, kind: str = "mlp"):
        super().__init__()
        self.input_size, self.kind = int(input_size), kind
        if kind == "mlp":
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(self.input_size, 1024), torch.nn.Dropout(0.2),
                torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                torch.nn.Linear(64, 16),
                torch.nn.Linear(16, 1),
            )
        elif kind == "linear":
            self.layers = torch.nn.Linear(self.input_size, 1)
        else:
            raise ValueError(f"aesthetic head kind must be 'mlp' or 'linear', got {kind!r}")

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AestheticHead":
        """Load ``sac+logos+ava1-l14-linearMSE.pth`` or ``sa_0_4_vit_l_14_linear.pth`` (or any head saved with
        the same keys)."""
        with reading(path, "aesthetic-predictor head"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "state_dict" in state:
                state = state["state_dict"]
            if isinstance(state, Mapping) and "layers.0.weight" in state:
                head = cls(state["layers.0.weight"].shape[1], "mlp")
                head.load_state_dict(state, strict=True)
            elif isinstance(state, Mapping) and set(state) == {"weight", "bias"} and state["weight"].ndim == 2 \
                    and state["weight"].shape[0] == 1:
                head = cls(state["weight"].shape[1], "linear")
                head.layers.load_state_dict(state, strict=True)
            else:
                raise ValueError("not an aesthetic-predictor head (expected the MLP's keys layers.0.weight, ... "
                                 "or the linear probe's weight [1, D] and bias)")
        return head


@register("aesthetic")
class AestheticReward(RewardModel):
    """LAION aesthetic score: ``head(normalize(clip.encode_image(image)))``; prompts are ignored.

    Args:
        head: ``sac+logos+ava1-l14-linearMSE.pth`` (a folder is searched for that name), or the linear
            probe ``sa_0_4_vit_l_14_linear.pth`` given as a file (default ``$LCM_LAB_AESTHETIC_HEAD``).
        clip_checkpoint: the CLIP ViT-L/14 the head was trained on: OpenAI's TorchScript
            ``ViT-L-14.pt``, an open_clip folder or weights file
            (default ``$LCM_LAB_AESTHETIC_CLIP_CHECKPOINT``).
        clip_arch: architecture of an open_clip weights file (default ``"ViT-L-14-quickgelu"``:
            OpenAI's CLIP uses QuickGELU).
        device, dtype: where and in which precision the models run.
        antialias: antialiased resizing, see :func:`~lcm_lab.rewards.base.preprocess_images`.
    """

    uses_prompts = False

    def __init__(self, head: str | os.PathLike | None = None, clip_checkpoint: str | os.PathLike | None = None,
                 clip_arch: str | os.PathLike | Mapping = "ViT-L-14-quickgelu", device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, antialias: bool = True):
        super().__init__()
        head_path = resolve_weights(head, AESTHETIC_HEAD_ENV)
        if head_path is not None and head_path.is_dir():
            head_path = head_path / AESTHETIC_HEAD_FILE
        if head_path is None or not head_path.is_file():
            raise missing_weights("aesthetic predictor head", AESTHETIC_HEAD_FILE, AESTHETIC_HEAD_SOURCE, "head",
                                  AESTHETIC_HEAD_ENV, head_path)
        clip_path = resolve_weights(clip_checkpoint, AESTHETIC_CLIP_ENV)
        if clip_path is None or not clip_path.exists():
            raise missing_weights("aesthetic predictor CLIP", "ViT-L-14.pt (or open_clip_pytorch_model.bin)",
                                  AESTHETIC_CLIP_SOURCE, "clip_checkpoint", AESTHETIC_CLIP_ENV, clip_path)
        dtype = as_dtype(dtype)
        clip, _ = load_open_clip(clip_path, clip_arch)
        mlp = AestheticHead.from_file(head_path)
        embed_dim = getattr(clip.visual, "output_dim", None)
        if embed_dim is not None and int(embed_dim) != mlp.input_size:
            raise ValueError(f"aesthetic head {head_path} expects {mlp.input_size}-d CLIP embeddings but the CLIP "
                             f"model {clip_path} produces {embed_dim}-d ones (the head needs CLIP ViT-L/14)")
        self.clip = clip.to(device=device, dtype=dtype)
        self.head = mlp.to(device=device, dtype=torch.float32)  # the reference runs the head in float32
        self.preprocess = open_clip_preprocessor(clip, antialias)
        self.input_size = self.preprocess.size
        self.head_path, self.clip_checkpoint = Path(head_path), Path(clip_path)
        self.freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``(B, D)`` float32, differentiable w.r.t. ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return float32_head(self.head, self.image_features(images)).squeeze(-1)
