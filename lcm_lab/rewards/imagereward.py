"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", https://github.com/THUDM/ImageReward).

A BLIP ViT-L image encoder, a BERT text encoder that cross-attends to the image, and an MLP
on the ``[CLS]`` feature, standardised with the training set's mean and std (scores are
roughly N(0, 1) over generations). RG-LCD (Li et al. 2024) trains with ``min(r, 2) - 2``:
pass ``clip_max=2.0`` (the constant -2 changes no gradient and no preference).

This reward needs the optional ``image-reward`` package (``pip install image-reward``; it
imports under transformers < 5 only, its BLIP code using helpers that transformers 5 removed); its
BLIP code also loads the ``bert-base-uncased`` tokenizer through transformers, which must
be in the local Hugging Face cache when running offline.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path

import torch

from ..readable import reading
from .base import ImagePreprocessor, RewardModel, float32_head, missing_weights, register, resolve_weights
from .clip_score import as_dtype

IMAGEREWARD_CHECKPOINT_ENV = "LCM_LAB_IMAGEREWARD_CHECKPOINT"
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_MED_CONFIG = "med_config.json"
IMAGEREWARD_SOURCE = "https://huggingface.co/THUDM/ImageReward"
INSTALL_HINT = "pip install image-reward"
TEXT_MAX_LENGTH = 35  # as ImageReward.score()


def _imagereward_class():
    """The upstream ``ImageReward`` nn.Module class, or an ImportError saying how to get it."""
    try:
        module = importlib.import_module("ImageReward.ImageReward")
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "ImageReward":
            raise ImportError(
                "the 'imagereward' reward needs the optional ImageReward package (THUDM/ImageReward), which is "
                f"not installed. Install it with `{INSTALL_HINT}`, or use another reward (e.g. hpsv2, pickscore)."
            ) from error
        raise ImportError(f"the ImageReward package is installed but failed to import ({error}); reinstall it "
                          f"with `{INSTALL_HINT}` and its dependencies") from error
    except ImportError as error:
        if "transformers" in str(error):
            # image-reward 1.5's BLIP code imports helpers (apply_chunking_to_forward, ...) from
            # transformers.modeling_utils that transformers 5 removed: reinstalling it cannot help.
            installed = importlib.metadata.version("transformers")
            raise ImportError(
                f"the ImageReward package is installed but does not import under transformers {installed} ({error}): "
                "its BLIP code needs transformers < 5. Run it in an environment with transformers < 5, or use "
                "another reward (e.g. hpsv2, pickscore).") from error
        raise ImportError(f"the ImageReward package is installed but failed to import ({error}); reinstall it "
                          f"with `{INSTALL_HINT}` and its dependencies") from error
    return module.ImageReward


@register("imagereward")
class ImageRewardReward(RewardModel):
    """ImageReward-v1.0 score, optionally clipped from above (``min(r, clip_max)``).

    Args:
        checkpoint: ``ImageReward.pt`` (Hugging Face repo ``THUDM/ImageReward``) or a folder with
            ``ImageReward.pt`` and ``med_config.json``; default ``$LCM_LAB_IMAGEREWARD_CHECKPOINT``.
        med_config: the BLIP text-encoder config ``med_config.json`` (same repo); default: next
            to the checkpoint.
        clip_max: upper clip of the score (RG-LCD uses 2.0); ``None`` (default) for none.
            Clipped scores have zero gradient.
        device, dtype: where and in which precision the model runs.
        antialias: antialiased resizing, see :func:`~lcm_lab.rewards.base.preprocess_images`.

    Raises:
        ImportError: the ``image-reward`` package is missing (``pip install image-reward``).
        FileNotFoundError: the checkpoint, ``med_config.json`` or the cached ``bert-base-uncased`` tokenizer is missing.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, med_config: str | os.PathLike | None = None,
                 clip_max: float | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, antialias: bool = True):
        model_class = _imagereward_class()  # fail on the missing package before looking for weights
        super().__init__()
        path = resolve_weights(checkpoint, IMAGEREWARD_CHECKPOINT_ENV)
        if path is not None and path.is_dir():
            path = path / IMAGEREWARD_FILE
        if path is None or not path.is_file():
            raise missing_weights("ImageReward", IMAGEREWARD_FILE, f"{IMAGEREWARD_SOURCE} (file {IMAGEREWARD_FILE})",
                                  "checkpoint", IMAGEREWARD_CHECKPOINT_ENV, path)
        med = Path(med_config).expanduser() if med_config is not None else path.parent / IMAGEREWARD_MED_CONFIG
        if not med.is_file():
            raise FileNotFoundError(f"ImageReward: {med} not found; download {IMAGEREWARD_MED_CONFIG} from "
                                    f"{IMAGEREWARD_SOURCE} next to {IMAGEREWARD_FILE} or pass `med_config=...`")
        try:  # BLIP's constructor loads BertTokenizer.from_pretrained("bert-base-uncased") itself
            model = model_class(med_config=str(med), device="cpu")
        except OSError as e:
            raise FileNotFoundError(
                "ImageReward: its BLIP text encoder needs the 'bert-base-uncased' tokenizer in the Hugging Face "
                "cache (run `huggingface-cli download bert-base-uncased` once on a machine with network; set "
                f"HF_HUB_OFFLINE=1 to keep later runs offline): {e}") from e
        with reading(path, "ImageReward checkpoint"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            # strict=False as ImageReward.load() (the checkpoint may omit unused buffers), but the scoring head
            # and nearly all weights must load: a wrong file would otherwise score with random weights.
            missing = model.load_state_dict(state, strict=False).missing_keys
            expected = len(model.state_dict())
            if any(k.startswith("mlp.") for k in missing) or len(missing) > 0.05 * expected:
                raise ValueError(f"{len(missing)} of {expected} weights missing, e.g. {missing[:3]}")
        self.model = model.to(device=device, dtype=as_dtype(dtype))
        self.model.mlp.float()  # ImageReward scores its [CLS] feature in float32 whatever the backbone's dtype
        self.model.device = torch.device(device)
        self.preprocess = ImagePreprocessor(224)  # ImageReward's _transform(224): OpenAI CLIP statistics
        self.input_size = 224
        self.clip_max = None if clip_max is None else float(clip_max)
        self.checkpoint = path
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        blip = self.model.blip
        tokens = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                                return_tensors="pt").to(self.device)
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        image_embeds = blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = blip.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True)
        features = text.last_hidden_state[:, 0, :]
        rewards = float32_head(self.model.mlp, features).squeeze(-1)
        rewards = (rewards - self.model.mean) / self.model.std
        return rewards.clamp(max=self.clip_max) if self.clip_max is not None else rewards
