"""Reward models for reward-guided distillation (RG-LCD, Li et al. 2024) and evaluation.

Every reward maps ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` and ``prompts`` (``B`` strings)
to ``(B,)`` float32 scores, differentiable w.r.t. the images except for the JPEG rewards:

* ``clip``: CLIP score ``100 * max(cos, 0)`` with any open_clip model (Hessel et al. 2021);
* ``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al. 2023);
* ``pickscore``: PickScore (Kirstain et al. 2023);
* ``aesthetic``: the LAION aesthetic predictor on CLIP ViT-L/14 (prompt-free);
* ``imagereward``: ImageReward (Xu et al. 2023), needs the optional ``image-reward`` package;
* ``jpeg-compressibility`` / ``jpeg-incompressibility``: ``-`` / ``+`` JPEG size in kB
  (Black et al. 2023, DDPO), not differentiable;
* ``toy-clip``: the toy world's CLIP score (``100 * max(cos, 0)`` on 32 px images).

Weights are only ever read from local paths (arguments or ``LCM_LAB_*`` environment
variables); a missing file raises FileNotFoundError saying where it is published.

Example::

    from lcm_lab.rewards import load_reward, parse_reward_spec

    hps = load_reward("hpsv2", checkpoint="weights/HPS_v2.1_compressed.pt", device="cuda")
    scores = hps(images, prompts)                      # (B,)
    mix = parse_reward_spec("1.0*hpsv2+0.1*imagereward",
                            model_kwargs={"imagereward": {"clip_max": 2.0}}, device="cuda")
    total, parts = mix(images, prompts, return_components=True)   # (B,), (B, 2)
"""

from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, REGISTRY, ImagePreprocessor, RewardModel, WeightedReward,
                   available_rewards, load_reward, parse_reward_spec, parse_reward_terms, preprocess_images, register)
from .clip_score import CLIPScoreReward, OpenCLIPReward, create_open_clip, load_open_clip
from .hps import HPSv2Reward
from .pickscore import PickScoreReward
from .aesthetic import AestheticHead, AestheticReward
from .imagereward import ImageRewardReward
from .jpeg import JpegCompressibilityReward, JpegIncompressibilityReward, jpeg_sizes_kb
from .toy_clip import ToyCLIPReward, toy_clip_dir

__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "REGISTRY", "ImagePreprocessor", "RewardModel", "WeightedReward",
    "available_rewards", "load_reward", "parse_reward_spec", "parse_reward_terms", "preprocess_images", "register",
    "CLIPScoreReward", "OpenCLIPReward", "create_open_clip", "load_open_clip",
    "HPSv2Reward", "PickScoreReward", "AestheticHead", "AestheticReward", "ImageRewardReward",
    "JpegCompressibilityReward", "JpegIncompressibilityReward", "jpeg_sizes_kb",
    "ToyCLIPReward", "toy_clip_dir",
]
